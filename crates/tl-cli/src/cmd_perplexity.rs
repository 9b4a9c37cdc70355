//! `tl perplexity`: llama.cpp-compatible perplexity of a text file.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tl_model::generate::Runner;
use tl_tokenizer::EncodeOptions;

use crate::cmd_generate::{load, ModelArgs};

#[derive(clap::Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text file.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Tokens per chunk (llama.cpp's -c).
    #[arg(long = "chunk", default_value_t = 512)]
    pub chunk: usize,
    /// A base model (GGUF, same vocabulary; e.g. the F16 original of the
    /// quantized model under test): also report the base's perplexity, the
    /// KL divergence of this model's next-token distributions from the
    /// base's (mean, 99th percentile, max) and how often their top tokens
    /// agree, over the same scored positions. Both models run here, chunk by
    /// chunk (llama.cpp's --kl-divergence reads saved base logits instead).
    #[arg(long, value_name = "MODEL")]
    pub kl_divergence_base: Option<PathBuf>,
}

pub fn run(a: &PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let llm = load(&a.model)?;
    let add_bos = llm.tokenizer.add_bos();
    let toks = llm.tokenizer.encode(
        &text,
        EncodeOptions {
            add_special: add_bos,
            parse_special: false,
        },
    )?;
    let bos = if add_bos { llm.tokenizer.bos() } else { None };
    let n_chunks = toks.len() / a.chunk.max(1);
    anyhow::ensure!(
        n_chunks > 0,
        "{} has {} tokens, fewer than one chunk of {}",
        a.file.display(),
        toks.len(),
        a.chunk
    );
    eprintln!("{} tokens, {n_chunks} chunks of {}", toks.len(), a.chunk);
    let base = match &a.kl_divergence_base {
        Some(p) => {
            let mut b = tl_model::llm::Llm::load_on(p, crate::device())
                .with_context(|| format!("loading the base model {}", p.display()))?;
            crate::configure(&mut b.model)?;
            Some(b)
        }
        None => None,
    };
    let mut runner = Runner::new(&llm.model, a.chunk)?;
    let mut base_runner = match &base {
        Some(b) => Some(Runner::new(&b.model, a.chunk)?),
        None => None,
    };
    let bar = ProgressBar::new(n_chunks as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:40} {pos}/{len} chunks, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let res = runner.perplexity_vs(base_runner.as_mut(), &toks, a.chunk, bos, |_, _, ppl| {
        bar.inc(1);
        bar.set_message(format!("ppl {ppl:.4}"));
    })?;
    bar.finish();
    println!(
        "perplexity: {:.4} ({} chunks of {}, {} tokens scored)",
        res.ppl, res.chunks, a.chunk, res.scored
    );
    if let Some(k) = &res.vs_base {
        println!(
            "base perplexity: {:.4}; ln(ppl/base): {:+.5}; KL divergence: mean {:.6}, p99 {:.6}, max {:.6}; same top token: {:.2}%",
            k.base_ppl,
            (res.ppl / k.base_ppl).ln(),
            k.kl_mean,
            k.kl_p99,
            k.kl_max,
            100.0 * k.top1_agree
        );
    }
    Ok(())
}
