//! `tl imatrix`: an importance matrix computed as llama.cpp's
//! llama-imatrix computes one, for `tl quantize --imatrix`.

use std::path::PathBuf;

use anyhow::Context;
use tl_model::generate::Runner;
use tl_model::imatrix::ImatrixCollector;
use tl_tokenizer::EncodeOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// GGUF (llama-imatrix's default): raw sums and counts.
    Gguf,
    /// The legacy `.dat` format.
    Dat,
}

#[derive(clap::Args)]
pub struct ImatrixArgs {
    /// The GGUF model file.
    #[arg(short, long)]
    pub model: PathBuf,
    /// The calibration text file.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Where to write the importance matrix.
    #[arg(short = 'o', long, default_value = "imatrix.gguf")]
    pub output: PathBuf,
    /// Tokens per chunk (llama-imatrix's -c).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx: usize,
    /// Process at most this many chunks (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Also collect the output projection (`output.weight`).
    #[arg(long)]
    pub process_output: bool,
    /// The file format: gguf or dat (the legacy format).
    #[arg(long, value_enum, default_value = "gguf")]
    pub output_format: OutputFormat,
    /// Skip the perplexity estimate printed per chunk.
    #[arg(long)]
    pub no_ppl: bool,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

pub fn run(a: &ImatrixArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.ctx > 0, "--ctx-size must be positive");
    let mut text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading the text file {}", a.file.display()))?;
    // llama.cpp's -f drops one trailing newline.
    if text.ends_with('\n') {
        text.pop();
    }
    crate::cmd_generate::init_threads(a.threads)?;
    let mut llm = tl_model::llm::Llm::load_on(&a.model, tl_core::Device::Cpu)
        .with_context(|| format!("loading {}", a.model.display()))?;
    crate::configure(&mut llm.model)?;
    let add_bos = llm.tokenizer.add_bos();
    let tokens = llm.tokenizer.encode(
        &text,
        EncodeOptions {
            add_special: add_bos,
            parse_special: false,
        },
    )?;
    let ctx = a.ctx;
    anyhow::ensure!(
        tokens.len() >= 2 * ctx,
        "{} tokenizes to only {} tokens: at least {} are needed for chunks of {ctx} tokens (as llama-imatrix asks)",
        a.file.display(),
        tokens.len(),
        2 * ctx
    );
    let n_max = tokens.len() / ctx;
    let n_chunks = match a.chunks {
        Some(n) if n > 0 => n.min(n_max),
        _ => n_max,
    };
    let bos = if add_bos { llm.tokenizer.bos() } else { None };
    let vocab = llm.model.config.vocab;
    eprintln!(
        "imatrix: {} tokens, computing over {n_chunks} chunks of {ctx}",
        tokens.len()
    );
    let mut runner = Runner::new(&llm.model, ctx)?;
    runner.set_imatrix(Some(ImatrixCollector::new(a.process_output)))?;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut chunk = Vec::with_capacity(ctx);
    for c in 0..n_chunks {
        let t0 = std::time::Instant::now();
        chunk.clear();
        chunk.extend_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let logits = runner.all_logits(&chunk)?;
        if c == 0 {
            let s = t0.elapsed().as_secs_f64();
            eprintln!(
                "imatrix: {s:.2} seconds per pass - ETA {:.2} minutes",
                s * n_chunks as f64 / 60.0
            );
        }
        if a.no_ppl {
            continue;
        }
        // As llama-imatrix: the second half of the chunk is scored.
        for j in ctx / 2..ctx.saturating_sub(1) {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let next = tokens[c * ctx + j + 1] as usize;
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f64 = row.iter().map(|&v| f64::from((v - max).exp())).sum();
            let v = -(f64::from(row[next] - max) - sum.ln());
            nll += v;
            nll2 += v * v;
            count += 1;
        }
        if count > 0 {
            print!("[{}]{:.4},", c + 1, (nll / count as f64).exp());
            std::io::Write::flush(&mut std::io::stdout()).ok();
        }
    }
    println!();
    if !a.no_ppl && count > 1 {
        let mean = nll / count as f64;
        let ppl = mean.exp();
        let var = nll2 / count as f64 - mean * mean;
        if var > 0.0 {
            let err = (var / (count - 1) as f64).sqrt();
            println!("Final estimate: PPL = {ppl:.4} +/- {:.5}", err * ppl);
        }
    }
    let collector = runner
        .take_imatrix()
        .context("the importance-matrix collector went missing")?;
    anyhow::ensure!(
        !collector.stats.is_empty(),
        "no weight product was collected (llama-imatrix skips products of fewer than 16 rows): use a larger --ctx-size"
    );
    let dataset = a.file.to_string_lossy().into_owned();
    match a.output_format {
        OutputFormat::Gguf => collector.write_gguf(&a.output, &[dataset], ctx)?,
        OutputFormat::Dat => collector.write_legacy(&a.output, &dataset, ctx)?,
    }
    eprintln!(
        "imatrix: {} entries, {} chunks, written to {}",
        collector.stats.len(),
        collector.chunk_count(ctx),
        a.output.display()
    );
    Ok(())
}
