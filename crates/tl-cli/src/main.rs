//! The `tl` command-line tool.

use clap::{Parser, Subcommand};

mod cmd_bench;
mod cmd_embed;
mod cmd_generate;
mod cmd_imatrix;
mod cmd_inspect;
mod cmd_lang;
mod cmd_perplexity;
mod cmd_quantize;
mod cmd_serve;
mod cmd_synth;
mod cmd_tokenize;

#[derive(Parser)]
#[command(
    name = "tl",
    version,
    about = "TensorLogic: GGUF LLM inference engine and tensor language"
)]
struct Cli {
    /// Kernel arithmetic: `fast` (SIMD kernels, the default) or `reference`
    /// (llama.cpp's portable CPU code bit for bit: scalar matmuls, much
    /// slower). Also `TL_NUMERICS=reference`.
    #[arg(long, global = true, value_name = "MODE")]
    numerics: Option<tl_core::Numerics>,
    /// Where the model runs: `cpu` (the default), `cuda` or `cuda:N`.
    /// Also `TL_DEVICE`.
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<String>,
    /// KV cache element type: `f16` (the default), `q8_0`, `q4_0` or `fp8`
    /// (E4M3). Also `TL_KV_TYPE`.
    #[arg(long, global = true, value_name = "TYPE")]
    kv_type: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF model's architecture, hyper-parameters, tokenizer and tensors.
    Inspect(cmd_inspect::InspectArgs),
    /// Write a small random-weight GGUF model of a given architecture.
    Synth(cmd_synth::SynthArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(cmd_generate::GenerateArgs),
    /// Interactive chat with the model's chat template.
    Chat(cmd_generate::ChatArgs),
    /// Perplexity of a text file, computed as llama.cpp's perplexity tool does.
    Perplexity(cmd_perplexity::PerplexityArgs),
    /// Quantize a GGUF model (llama-quantize's types and per-tensor mixes).
    Quantize(cmd_quantize::QuantizeArgs),
    /// Compute an importance matrix over a text file (llama-imatrix's
    /// statistics and file formats) for `quantize --imatrix`.
    Imatrix(cmd_imatrix::ImatrixArgs),
    /// Prompt-processing and generation throughput (llama-bench-like table).
    Bench(cmd_bench::BenchArgs),
    /// Embeddings of texts with an embedding model (bert, nomic-bert).
    Embed(cmd_embed::EmbedArgs),
    /// Print the token ids and pieces of a text.
    Tokenize(cmd_tokenize::TokenizeArgs),
    /// OpenAI-compatible HTTP server with continuous batching.
    Serve(cmd_serve::ServeArgs),
    /// Run a TensorLogic (.tl) program.
    Run(cmd_lang::RunArgs),
    /// Parse, resolve and type/shape-check a .tl program without running it.
    Check(cmd_lang::CheckArgs),
    /// Run the `test` blocks of .tl files.
    Test(cmd_lang::TestArgs),
    /// Interactive TensorLogic session.
    Repl(cmd_lang::ReplArgs),
}

static DEVICE: std::sync::OnceLock<tl_core::Device> = std::sync::OnceLock::new();

/// The device chosen by `--device` / `TL_DEVICE` (the CPU by default).
pub fn device() -> tl_core::Device {
    DEVICE.get().copied().unwrap_or_default()
}

static KV_TYPE: std::sync::OnceLock<tl_model::kv::KvType> = std::sync::OnceLock::new();

/// The KV cache type chosen by `--kv-type` / `TL_KV_TYPE` (f16 by default).
pub fn kv_type() -> tl_model::kv::KvType {
    KV_TYPE.get().copied().unwrap_or_default()
}

/// Gives a freshly loaded model the chosen KV cache type.
pub fn configure(m: &mut tl_model::model::Model) -> anyhow::Result<()> {
    m.set_kv_type(kv_type())
        .map_err(|e| anyhow::anyhow!("--kv-type {}: {e}", kv_type()))?;
    if kv_type() != tl_model::kv::KvType::F16 {
        eprintln!(
            "kv cache: {} ({} bytes per token)",
            kv_type(),
            m.kv_bytes_per_token()
        );
    }
    Ok(())
}

/// Prints where the model runs (a line on stderr) when it is not the CPU.
pub fn log_device(m: &tl_model::model::Model) {
    if m.device() != tl_core::Device::Cpu {
        eprintln!("device: {}", m.device_summary());
    }
}

fn main() {
    let cli = Cli::parse();
    if let Some(mode) = cli.numerics {
        if let Err(now) = tl_core::set_numerics(mode) {
            eprintln!("error: --numerics {mode:?}: the numerics are already {now:?}");
            std::process::exit(1);
        }
    }
    let dev = cli
        .device
        .clone()
        .or_else(|| std::env::var("TL_DEVICE").ok().filter(|s| !s.is_empty()));
    if let Some(d) = dev {
        match d.parse::<tl_core::Device>() {
            Ok(d) => {
                let _ = DEVICE.set(d);
            }
            Err(e) => {
                eprintln!("error: --device: {e}");
                std::process::exit(1);
            }
        }
    }
    let kv = cli
        .kv_type
        .clone()
        .or_else(|| std::env::var("TL_KV_TYPE").ok().filter(|s| !s.is_empty()));
    if let Some(k) = kv {
        let loads_a_model = matches!(
            cli.command,
            Command::Generate(_)
                | Command::Chat(_)
                | Command::Perplexity(_)
                | Command::Bench(_)
                | Command::Serve(_)
        );
        if !loads_a_model && cli.kv_type.is_some() {
            eprintln!("error: --kv-type applies to generate, chat, perplexity, bench and serve");
            std::process::exit(2);
        }
        match k.parse::<tl_model::kv::KvType>() {
            Ok(k) => {
                let _ = KV_TYPE.set(k);
            }
            Err(e) => {
                eprintln!("error: --kv-type: {e}");
                std::process::exit(1);
            }
        }
    }
    let result = match &cli.command {
        Command::Inspect(a) => cmd_inspect::run(a),
        Command::Synth(a) => cmd_synth::run(a),
        Command::Generate(a) => cmd_generate::run_generate(a),
        Command::Chat(a) => cmd_generate::run_chat(a),
        Command::Perplexity(a) => cmd_perplexity::run(a),
        Command::Bench(a) => cmd_bench::run(a),
        Command::Quantize(a) => cmd_quantize::run(a),
        Command::Imatrix(a) => cmd_imatrix::run(a),
        Command::Tokenize(a) => cmd_tokenize::run(a),
        Command::Embed(a) => cmd_embed::run(a),
        Command::Serve(a) => cmd_serve::run(a),
        Command::Run(a) => cmd_lang::run(a),
        Command::Check(a) => cmd_lang::check(a),
        Command::Test(a) => cmd_lang::test(a),
        Command::Repl(a) => cmd_lang::repl(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
