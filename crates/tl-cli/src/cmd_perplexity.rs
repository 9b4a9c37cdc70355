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
    let mut runner = Runner::new(&llm.model, a.chunk)?;
    let bar = ProgressBar::new(n_chunks as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:40} {pos}/{len} chunks, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let res = runner.perplexity(&toks, a.chunk, bos, |_, _, ppl| {
        bar.inc(1);
        bar.set_message(format!("ppl {ppl:.4}"));
    })?;
    bar.finish();
    println!(
        "perplexity: {:.4} ({} chunks of {}, {} tokens scored)",
        res.ppl, res.chunks, a.chunk, res.scored
    );
    Ok(())
}
