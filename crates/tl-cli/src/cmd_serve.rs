//! `tl serve`: the OpenAI-compatible HTTP server.

use std::time::Duration;

use anyhow::Context;
use tl_engine::{EngineConfig, SchedulerConfig};
use tl_server::ServerConfig;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::cmd_generate::ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences decoded together in one step.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most tokens in one step (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 256)]
    pub max_batch_tokens: usize,
    /// KV cache memory, e.g. 512M, 2G (bytes without a suffix). Default:
    /// 512M on the CPU; on a GPU the cache is sized by
    /// --gpu-memory-utilization instead.
    #[arg(long)]
    pub kv_memory: Option<String>,
    /// On a GPU, the fraction of the card's memory this server may use
    /// (weights, step buffers and KV cache; vLLM's meaning); the KV cache
    /// takes what the weights and steps leave. Default 0.9 on a GPU.
    #[arg(long, value_name = "F")]
    pub gpu_memory_utilization: Option<f64>,
    /// Requests waiting beyond the running batch before 429 answers.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (also read from TL_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model id served (default: the file name without .gguf).
    #[arg(long)]
    pub alias: Option<String>,
    /// Seconds a request may take, queueing included.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Disable the prefix cache.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Speculative decoding by default: `ngram` (prompt lookup), `draft`
    /// (a draft model, `--draft-model`) or `self` (the model drafts with a
    /// subset of its layers; CPU only). Requests opt out (or in, without
    /// this flag, with prompt lookup) with `"speculative": false|true`.
    #[arg(long, value_name = "METHOD")]
    pub spec: Option<tl_model::spec::SpecMethod>,
    /// Most tokens drafted per round; default 6 with a draft model, 8
    /// otherwise.
    #[arg(long)]
    pub spec_k: Option<usize>,
    /// The draft model for `--spec draft` (same vocabulary as the model; it
    /// gets its own KV cache, sharing --kv-memory with the model's).
    #[arg(long, value_name = "FILE")]
    pub draft_model: Option<std::path::PathBuf>,
    /// A draft model stops a round's drafts at the first token whose
    /// probability (its softmax) is below P; 0 drafts all `--spec-k`.
    #[arg(long, value_name = "P", default_value_t = crate::cmd_generate::DRAFT_P_MIN)]
    pub draft_p_min: f32,
    /// The draft model's output projection is requantized to this block
    /// type at load where the file's is wider (CPU; exact either way);
    /// `keep` leaves it as the file has it.
    #[arg(long, value_name = "TYPE", default_value = crate::cmd_generate::DRAFT_OUTPUT_TYPE)]
    pub draft_output_type: String,
    /// Speculate only while at most this many sequences decode. 2 is
    /// where prompt lookup still paid on a chat workload (45% accepted) on
    /// the 2-core CPU; on code editing (78% accepted) it paid up to 12
    /// (docs/BENCHMARKS.md): raise it for such traffic.
    #[arg(long, default_value_t = 2)]
    pub spec_max_batch: usize,
    /// Threads that compute grammar masks (structured output, tool calls)
    /// while a step's forward runs; 0 computes them after the forward.
    /// Default: on a GPU one per core beside the engine's thread, up to 8
    /// (the host waits during the forward); on the CPU the cores -t leaves
    /// free of the forward's threads, up to 8, else 0 (on the 2-core CPU
    /// with both cores in the forward the overlap did not change the step
    /// time: docs/BENCHMARKS.md).
    #[arg(long, value_name = "N")]
    pub mask_threads: Option<usize>,
    /// Bit-identical output for a request whatever shares its steps: on a
    /// GPU every product of up to 64 rows then takes the one-row-order
    /// kernels (slower batched decode; the CPU always is invariant).
    #[arg(long)]
    pub batch_invariant: bool,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// "512M", "2G", "1.5GiB", "1048576" → bytes.
pub fn parse_size(s: &str) -> anyhow::Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .with_context(|| format!("'{s}' is not a size (examples: 512M, 2G, 1048576)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => anyhow::bail!("unknown size unit '{other}' in '{s}' (use K, M or G)"),
    };
    let bytes = v * mult;
    anyhow::ensure!((1.0..1e15).contains(&bytes), "size '{s}' is out of range");
    Ok(bytes as usize)
}

pub fn run(a: &ServeArgs) -> anyhow::Result<()> {
    let level: tracing::Level = a
        .log_level
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown --log-level '{}'", a.log_level))?;
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    anyhow::ensure!(a.max_batch > 0, "--max-batch must be positive");
    anyhow::ensure!(a.max_queue > 0, "--max-queue must be positive");
    anyhow::ensure!(a.request_timeout > 0, "--request-timeout must be positive");
    let kv_bytes = parse_size(a.kv_memory.as_deref().unwrap_or("512M")).context("--kv-memory")?;
    anyhow::ensure!(
        a.kv_memory.is_none() || a.gpu_memory_utilization.is_none(),
        "--kv-memory and --gpu-memory-utilization are alternatives: give one"
    );
    let on_gpu = crate::device().is_gpu();
    anyhow::ensure!(
        on_gpu || a.gpu_memory_utilization.is_none(),
        "--gpu-memory-utilization applies to --device cuda (use --kv-memory on the CPU)"
    );
    let gpu_memory_utilization = match (on_gpu, a.kv_memory.is_some()) {
        (true, false) => Some(a.gpu_memory_utilization.unwrap_or(0.9)),
        _ => None,
    };
    anyhow::ensure!(
        a.model.model.is_file(),
        "model file {} not found",
        a.model.model.display()
    );
    let model_id = a
        .alias
        .clone()
        .unwrap_or_else(|| default_id(&a.model.model));
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("TL_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let cfg = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        api_key,
        model_id,
        max_body_bytes: a.max_body,
        request_timeout: Duration::from_secs(a.request_timeout),
        model_path: a.model.model.display().to_string(),
    };
    // An embedding model (bert, nomic-bert) serves /v1/embeddings, without
    // a generation engine.
    let is_encoder = tl_gguf::GgufFile::open(&a.model.model)
        .map(|f| tl_model::encoder::is_encoder(&f))
        .unwrap_or(false);
    if is_encoder {
        let path = a.model.model.clone();
        tl_server::run_embedding(cfg, move || {
            tl_model::encoder::Embedder::load_on(&path, crate::device())
                .map_err(|e| format!("{}: {e}", path.display()))
        })?;
        return Ok(());
    }
    let draft_output_type = crate::cmd_generate::draft_output_type(&a.draft_output_type)?;
    match (&a.spec, &a.draft_model) {
        (Some(tl_model::spec::SpecMethod::Draft), None) => {
            anyhow::bail!("--spec draft needs --draft-model FILE")
        }
        (Some(tl_model::spec::SpecMethod::Draft), Some(p)) => {
            anyhow::ensure!(p.is_file(), "draft model file {} not found", p.display())
        }
        (_, Some(_)) => anyhow::bail!("--draft-model is used with --spec draft"),
        _ => {}
    }
    let spec = match &a.spec {
        Some(m) => Some(
            tl_model::spec::SpecConfig::new(m.clone(), crate::cmd_generate::spec_k(m, a.spec_k))
                .map_err(|e| anyhow::anyhow!("--spec-k: {e}"))?
                .with_p_min(a.draft_p_min)
                .map_err(|e| anyhow::anyhow!("--draft-p-min: {e}"))?,
        ),
        None => None,
    };
    let mask_threads = a.mask_threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if on_gpu {
            // The host waits during the forward: a thread per core beside
            // the engine's, up to 8 (16 masks of ≈0.3 ms in two rounds
            // fit a 16-sequence step's ≈2 ms forward of the 0.5B shape).
            cores.saturating_sub(1).clamp(1, 8)
        } else {
            // The cores -t leaves free of the forward's threads.
            a.model
                .threads
                .map_or(0, |t| cores.saturating_sub(t))
                .min(8)
        }
    });
    let engine = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch: a.max_batch,
            max_batch_tokens: a.max_batch_tokens,
            prefix_caching: !a.no_prefix_cache,
            spec,
            spec_max_batch: a.spec_max_batch,
            mask_threads,
            device_draws_on_cpu: false,
            emit_thread: on_gpu,
        },
        kv_bytes,
        gpu_memory_utilization,
        max_queue: a.max_queue,
    };
    let margs = a.model.clone();
    let invariant = a.batch_invariant;
    let fault = injected_fault()?;
    let draft_path = a.draft_model.clone();
    tl_server::run_with_draft(cfg, engine, move || {
        let llm = crate::cmd_generate::load(&margs).map_err(|e| format!("{e:#}"))?;
        llm.model.set_batch_invariant(invariant);
        if let Some((after, fatal)) = fault {
            llm.model.inject_fault(after, fatal);
        }
        let draft = match draft_path {
            Some(p) => {
                let load = || -> anyhow::Result<tl_model::llm::Llm> {
                    let mut d = tl_model::llm::Llm::load_on(&p, crate::device())?;
                    crate::configure(&mut d.model)?;
                    crate::cmd_generate::cheapen_draft(&mut d.model, draft_output_type)?;
                    d.model.set_batch_invariant(invariant);
                    Ok(d)
                };
                Some(
                    load()
                        .map_err(|e| format!("loading the draft model {}: {e:#}", p.display()))?,
                )
            }
            None => None,
        };
        Ok((llm, draft))
    })?;
    Ok(())
}

/// `TL_INJECT_FAULT=N` or `N:fatal`: the model's step after N more fails
/// as a GPU fault would (with `fatal`, as a lost device). For the tests of
/// how the server handles device faults; works on every device.
fn injected_fault() -> anyhow::Result<Option<(usize, bool)>> {
    let Ok(v) = std::env::var("TL_INJECT_FAULT") else {
        return Ok(None);
    };
    let (n, fatal) = match v.split_once(':') {
        Some((n, "fatal")) => (n, true),
        Some((_, other)) => anyhow::bail!("TL_INJECT_FAULT={v}: '{other}' is not 'fatal'"),
        None => (v.as_str(), false),
    };
    let n = n
        .parse()
        .map_err(|_| anyhow::anyhow!("TL_INJECT_FAULT={v}: expected N or N:fatal"))?;
    Ok(Some((n, fatal)))
}

fn default_id(p: &std::path::Path) -> String {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").ok(), Some(512 << 20));
        assert_eq!(parse_size("2G").ok(), Some(2 << 30));
        assert_eq!(parse_size("1.5GiB").ok(), Some(3 << 29));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0").is_err());
    }
}
