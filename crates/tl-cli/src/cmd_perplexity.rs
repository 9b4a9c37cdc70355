//! `tl perplexity`: llama.cpp-compatible perplexity of a text file.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tl_model::generate::{KlBase, PerplexityOptions, Runner};
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
    /// Score at most this many chunks (llama.cpp's --chunks; default all).
    #[arg(long, default_value_t = 0)]
    pub chunks: usize,
    /// A base to compare with: a GGUF model (same vocabulary; e.g. the F16
    /// original of the quantized model under test), run here on the same
    /// chunks, or a file of its log-probabilities saved by --save-logprobs on
    /// the same text, chunk size and chunk count. Also reports the base's
    /// perplexity, the KL divergence of this model's next-token
    /// distributions from the base's (mean, 99th percentile, max) and how
    /// often their top tokens agree (llama.cpp's --kl-divergence figures).
    #[arg(long, value_name = "MODEL|FILE")]
    pub kl_divergence_base: Option<PathBuf>,
    /// Save this model's log-probabilities at the scored positions (f32,
    /// vocabulary × positions: large) for later --kl-divergence-base runs.
    #[arg(long, value_name = "FILE")]
    pub save_logprobs: Option<PathBuf>,
}

pub fn run(a: &PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    // llama-perplexity's `-c` is both the chunk and the runtime context
    // (which picks Phi-3 LongRoPE's factor set): without `--ctx-size`, the
    // chunk is the runtime context here too.
    let ctx = if a.model.ctx_size == 0 {
        a.chunk
    } else {
        a.model.ctx_size
    };
    let mut margs = a.model.clone();
    margs.ctx_size = ctx;
    let llm = load(&margs)?;
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
    // The base: a model when the file is GGUF, else saved log-probabilities.
    let mut base_model = None;
    let mut base_file = None;
    if let Some(p) = &a.kl_divergence_base {
        let mut magic = [0u8; 4];
        std::fs::File::open(p)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .with_context(|| format!("reading {}", p.display()))?;
        if &magic == b"GGUF" {
            let mut b = tl_model::llm::Llm::load_ctx(p, crate::device(), ctx)
                .with_context(|| format!("loading the base model {}", p.display()))?;
            crate::configure(&mut b.model)?;
            base_model = Some(b);
        } else {
            let f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
            base_file = Some(std::io::BufReader::with_capacity(1 << 20, f));
        }
    }
    let mut save = match &a.save_logprobs {
        Some(p) => Some(std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut runner = Runner::new(&llm.model, a.chunk)?;
    let mut base_runner = match &base_model {
        Some(b) => Some(Runner::new(&b.model, a.chunk)?),
        None => None,
    };
    let base = match (base_runner.as_mut(), base_file.as_mut()) {
        (Some(r), _) => Some(KlBase::Model(r)),
        (None, Some(f)) => Some(KlBase::Saved(f)),
        _ => None,
    };
    let n_chunks = if a.chunks > 0 {
        n_chunks.min(a.chunks)
    } else {
        n_chunks
    };
    let bar = ProgressBar::new(n_chunks as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:40} {pos}/{len} chunks, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let opts = PerplexityOptions {
        base,
        save: save.as_mut().map(|w| w as &mut dyn std::io::Write),
        max_chunks: a.chunks,
    };
    let res = runner.perplexity_with(opts, &toks, a.chunk, bos, |_, _, ppl| {
        bar.inc(1);
        bar.set_message(format!("ppl {ppl:.4}"));
    })?;
    bar.finish();
    if let (Some(w), Some(p)) = (save.as_mut(), &a.save_logprobs) {
        std::io::Write::flush(w).with_context(|| format!("writing {}", p.display()))?;
    }
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
