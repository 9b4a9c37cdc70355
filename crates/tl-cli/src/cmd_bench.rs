//! `tl bench`: prompt-processing and generation throughput, printed as a
//! llama-bench-like table (mean ± stddev over repetitions); with `--spec`,
//! decode speed on a prompt file with and without speculative decoding,
//! side by side, with the acceptance rate.

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
    /// Context depths for the tg test, as llama-bench's `-d`: each sequence
    /// first prefills this many tokens (untimed), then decodes.
    #[arg(short = 'd', long, value_delimiter = ',', default_value = "0")]
    pub depth: Vec<usize>,
    /// Sampling temperature of the tg test (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Top-p of the tg test (with --temp > 0).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Top-k of the tg test (with --temp > 0; 0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    pub ubatch: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub spec: crate::cmd_generate::SpecArgs,
    /// With `--spec`, decoding with and without speculation is compared on
    /// this prompt (greedy) instead of the pp/tg tests. The prompt of the
    /// `--spec` comparison: the file's text as is
    /// (special-token text such as `<|im_start|>` is parsed as tokens).
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
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
    if a.spec.spec.is_some() {
        return run_spec(a);
    }
    anyhow::ensure!(
        a.spec.draft_model.is_none() && a.prompt_file.is_none(),
        "--draft-model and --prompt-file are used with --spec"
    );
    crate::cmd_generate::init_threads(a.threads)?;
    let threads = tl_core::pool::ThreadPool::global().threads();
    let mut model = Model::load_on(&a.model, crate::device())
        .with_context(|| format!("loading {} on {}", a.model.display(), crate::device()))?;
    crate::configure(&mut model)?;
    crate::log_device(&model);
    let c = &model.config;
    let vocab = c.vocab;
    let max_b = a.batch.iter().copied().max().unwrap_or(1).max(1);
    let max_d = a.depth.iter().copied().max().unwrap_or(0);
    let ctx = (a.prompt.max(max_d + 1) + a.gen + 1) * max_b;
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
        let sampling = tl_model::sampler::SamplingParams {
            temperature: a.temp,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: 42,
            ..Default::default()
        };
        sampling.validate()?;
        for &d in &a.depth {
            for &b in &a.batch {
                let b = b.max(1);
                let prompts: Vec<Vec<u32>> = (0..b).map(|s| tokens(d + 1, vocab, s + 1)).collect();
                let opts = TokenOptions {
                    max_tokens: a.gen,
                    sampling: sampling.clone(),
                    ..Default::default()
                };
                // Decode only, as llama-bench's tg: timed from the moment
                // every sequence has its first token (prefill done) to the
                // end, over the tokens after the first.
                let mut rates = Vec::new();
                for _ in 0..reps {
                    let mut seen = 0usize;
                    let mut t_first = Instant::now();
                    let out = runner.generate_batch(&prompts, &opts, |_, _| {
                        seen += 1;
                        if seen == b {
                            t_first = Instant::now();
                        }
                        true
                    })?;
                    let n: usize = out.iter().map(|(t, _)| t.len()).sum();
                    let dt = t_first.elapsed().as_secs_f64();
                    rates.push(n.saturating_sub(b) as f64 / dt.max(1e-9));
                }
                let test = if d > 0 {
                    format!("tg{} @ d{d}", a.gen)
                } else {
                    format!("tg{}", a.gen)
                };
                rows.push((test, b, mean_sd(&rates)));
            }
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

/// `tl bench --spec`: the prompt file generated greedily `reps` times
/// without and `reps` times with speculation, alternating (after one
/// untimed warm-up of each), so that both see the same machine state.
/// Decode tok/s counts the tokens after the first over the time after the
/// first (prefill excluded). Every speculative output is checked against
/// the plain one.
fn run_spec(a: &BenchArgs) -> anyhow::Result<()> {
    use tl_model::llm::GenerateOptions;
    use tl_model::spec::{SpecMethod, SpecStats};
    let cfg = a.spec.config()?.context("--spec METHOD")?;
    let method = cfg.method.clone();
    let k = cfg.k;
    // The flags are checked before the prompt file is read.
    match (&method, &a.spec.draft_model) {
        (SpecMethod::Draft, None) => anyhow::bail!("--spec draft needs --draft-model FILE"),
        (SpecMethod::Draft, Some(_)) | (_, None) => {}
        (_, Some(_)) => anyhow::bail!("--draft-model is used with --spec draft"),
    }
    let pf = a
        .prompt_file
        .as_ref()
        .context("--spec needs --prompt-file FILE (the prompt to decode)")?;
    let prompt = std::fs::read_to_string(pf)
        .with_context(|| format!("reading the prompt file {}", pf.display()))?;
    anyhow::ensure!(a.gen > 0, "--spec needs -n > 0 tokens to generate");
    let margs = crate::cmd_generate::ModelArgs {
        model: a.model.clone(),
        threads: a.threads,
        ctx_size: 0,
        check_tensors: false,
        chat_template: None,
    };
    let llm = crate::cmd_generate::load(&margs)?;
    let draft = a.spec.load_draft()?;
    if let Some(d) = &draft {
        llm.check_draft(d)?;
    }
    let plain = GenerateOptions {
        max_tokens: a.gen,
        prefill_chunk: a.ubatch,
        ..Default::default()
    };
    let spec = GenerateOptions {
        spec: Some(cfg),
        ..plain.clone()
    };
    let run = |o: &GenerateOptions| -> anyhow::Result<tl_model::llm::Generation> {
        Ok(match &draft {
            Some(d) if o.spec.is_some() => llm.generate_with_draft(&prompt, o, d, |_| true)?,
            _ => llm.generate(&prompt, o, |_| true)?,
        })
    };
    // Warm-up: buffers sized, caches filled, both paths once.
    let want = run(&plain)?;
    run(&spec)?;
    let reps = a.reps.max(1);
    let (mut base, mut fast) = (Vec::new(), Vec::new());
    let mut stats = SpecStats::default();
    let mut identical = true;
    for _ in 0..reps {
        let p = run(&plain)?;
        base.push(p.decode_tok_per_s());
        let s = run(&spec)?;
        fast.push(s.decode_tok_per_s());
        stats.add(&s.spec);
        identical &= s.tokens == want.tokens && p.tokens == want.tokens;
    }
    let (bm, bsd) = mean_sd(&base);
    let (fm, fsd) = mean_sd(&fast);
    let c = &llm.model.config;
    let name = if c.name.is_empty() {
        c.arch.name().to_string()
    } else {
        c.name.clone()
    };
    let threads = tl_core::pool::ThreadPool::global().threads();
    let test = if method == SpecMethod::Ngram || a.spec.draft_p_min <= 0.0 {
        format!("{} k≤{}", method, k)
    } else {
        format!("{} k≤{} p≥{}", method, k, a.spec.draft_p_min)
    };
    if a.json {
        let out = json!({
            "model": name, "threads": threads, "prompt_file": pf.display().to_string(),
            "prompt_tokens": want.prompt_tokens, "generated_tokens": want.tokens.len(),
            "method": method.to_string(), "spec_k": k,
            "draft_p_min": a.spec.draft_p_min, "reps": reps,
            "plain_tokens_per_s": bm, "plain_stddev": bsd,
            "spec_tokens_per_s": fm, "spec_stddev": fsd, "speedup": fm / bm.max(1e-9),
            "rounds": stats.rounds, "drafted": stats.drafted, "accepted": stats.accepted,
            "acceptance": stats.acceptance(), "identical_output": identical,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "| model | threads | test | tokens | plain t/s | spec t/s | speedup | drafted | accepted |"
        );
        println!("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        println!(
            "| {name} | {threads} | {test} | {} | {bm:.2} ± {bsd:.2} | {fm:.2} ± {fsd:.2} | {:.2}× | {} | {} ({:.1}%) |",
            want.tokens.len(),
            fm / bm.max(1e-9),
            stats.drafted,
            stats.accepted,
            100.0 * stats.acceptance()
        );
        if !identical {
            println!("\nWARNING: the speculative output differed from the plain one");
        }
    }
    anyhow::ensure!(identical, "speculative decoding changed the greedy output");
    Ok(())
}
