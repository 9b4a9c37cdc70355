//! `tl bench`: prompt-processing and generation throughput, printed as a
//! llama-bench-like table (mean ± stddev over repetitions).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use tl_model::generate::{Runner, TokenOptions};
use tl_model::model::Model;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(short, long)]
    pub model: PathBuf,
    /// Prompt tokens for the pp test (0 skips it).
    #[arg(short = 'p', long, default_value_t = 512)]
    pub prompt: usize,
    /// Generated tokens for the tg test (0 skips it).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub gen: usize,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 3)]
    pub reps: usize,
    /// Batch sizes for generation (sequences decoding together), e.g. 1,4,8.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    pub ubatch: usize,
    #[arg(long)]
    pub json: bool,
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, var.sqrt())
}

/// Deterministic token ids spread over the vocabulary (skipping the first
/// ids, where special tokens usually live).
fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| {
            (1000 + (i * 7919 + salt * 104_729) % (vocab.saturating_sub(1000).max(1))) as u32
                % vocab as u32
        })
        .collect()
}

pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    crate::cmd_generate::init_threads(a.threads)?;
    let threads = tl_core::pool::ThreadPool::global().threads();
    let model = Model::load_on(&a.model, crate::device())
        .with_context(|| format!("loading {} on {}", a.model.display(), crate::device()))?;
    crate::log_device(&model);
    let c = &model.config;
    let vocab = c.vocab;
    let max_b = a.batch.iter().copied().max().unwrap_or(1).max(1);
    let ctx = (a.prompt.max(1) + a.gen + 1) * max_b;
    let mut runner = Runner::new(&model, ctx)?;
    let mut rows = Vec::new();
    let reps = a.reps.max(1);
    if a.prompt > 0 {
        let toks = tokens(a.prompt, vocab, 0);
        // Warm-up with the whole prompt, as llama-bench does: buffers sized
        // and first touched, caches filled, outside the timed runs.
        runner.prefill_only(&toks, a.ubatch)?;
        let mut rates = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            runner.prefill_only(&toks, a.ubatch)?;
            rates.push(a.prompt as f64 / t0.elapsed().as_secs_f64());
        }
        rows.push((format!("pp{}", a.prompt), 1usize, mean_sd(&rates)));
    }
    if a.gen > 0 {
        for &b in &a.batch {
            let b = b.max(1);
            let prompts: Vec<Vec<u32>> = (0..b).map(|s| tokens(1, vocab, s + 1)).collect();
            let opts = TokenOptions {
                max_tokens: a.gen,
                ..Default::default()
            };
            let mut rates = Vec::new();
            for _ in 0..reps {
                let t0 = Instant::now();
                let out = runner.generate_batch(&prompts, &opts, |_, _| true)?;
                let n: usize = out.iter().map(|(t, _)| t.len()).sum();
                rates.push(n as f64 / t0.elapsed().as_secs_f64());
            }
            rows.push((format!("tg{}", a.gen), b, mean_sd(&rates)));
        }
    }
    let name = if c.name.is_empty() {
        c.arch.name().to_string()
    } else {
        c.name.clone()
    };
    let size = model.file.tensors.iter().map(|t| t.size).sum::<u64>() as f64 / (1u64 << 20) as f64;
    if a.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(test, b, (m, sd))| {
                json!({"model": name, "size_mib": size, "threads": threads, "test": test, "batch": b, "tokens_per_s": m, "stddev": sd, "peak_rss_mib": peak_rss_mib()})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let dev = model.device();
        let (col, val) = match dev {
            tl_core::Device::Cpu => ("threads", threads.to_string()),
            d => ("device", d.to_string()),
        };
        println!("| model | size | {col} | test | batch | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: |");
        for (test, b, (m, sd)) in &rows {
            println!("| {name} | {size:.1} MiB | {val} | {test} | {b} | {m:.2} ± {sd:.2} |");
        }
    }
    if let Some(p) = model.device_profile() {
        let total: f64 = p.iter().map(|t| t.1).sum();
        println!("\nGPU time by stage (TL_CUDA_PROFILE=1, all timed and untimed runs):");
        println!("| stage | ms | calls | µs/call | share |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (label, ms, n) in &p {
            println!(
                "| {label} | {ms:.2} | {n} | {:.1} | {:.1}% |",
                1000.0 * ms / (*n).max(1) as f64,
                100.0 * ms / total.max(1e-9)
            );
        }
    }
    Ok(())
}
