//! `tl synth`: writes a random-weight GGUF model with a real architecture's
//! layout, for tests and for benchmarks where real files can't go.

use std::path::PathBuf;

use anyhow::Context;
use tl_gguf::{GgmlType, Value};
use tl_model::encoder::Pooling;
use tl_model::synth::{synthesize, synthesize_encoder, SynthArch, SynthSpec};

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output file.
    #[arg(short, long)]
    pub out: PathBuf,
    /// Architecture: llama, mixtral (llama with experts), qwen2, qwen2moe, qwen3, qwen3moe, gemma, gemma2, gemma3,
    /// phi3, granite, smollm3, olmo2, command-r, gpt-oss (experts in MXFP4), mistral3, or the embedding
    /// models bert and nomic-bert
    /// (`--heads` × `--head-dim` must then be `--d-model`; `--extra-vocab` filler words
    /// follow a small WordPiece vocabulary).
    #[arg(long, default_value = "qwen2")]
    pub arch: String,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 256)]
    pub d_model: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 512)]
    pub ffn: usize,
    /// Filler tokens beyond the 259 control and byte tokens.
    #[arg(long, default_value_t = 61)]
    pub extra_vocab: usize,
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Block type of the weight matrices (Q4_K, Q8_0, F16, …).
    #[arg(long, default_value = "Q8_0")]
    pub weight_type: String,
    /// Block type of the output projection.
    #[arg(long, default_value = "Q8_0")]
    pub output_type: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write Llama 3.1-style RoPE frequency factors (`rope_freqs.weight`).
    #[arg(long)]
    pub rope_freqs: bool,
    /// Scale of the Q and K weights (above 1: peaked attention).
    #[arg(long, default_value_t = 1.0)]
    pub qk_scale: f32,
    /// Experts per layer (qwen3moe, qwen2moe, mixtral; `--ffn` is then one expert's).
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// Experts each token uses (qwen3moe).
    #[arg(long, default_value_t = 2)]
    pub experts_used: usize,
    /// YaRN RoPE scaling by this factor (above 1; the original context is `--context`).
    #[arg(long, default_value_t = 0.0)]
    pub yarn: f32,
    /// Linear RoPE scaling by this factor (`rope.scaling.type = linear`).
    #[arg(long, default_value_t = 0.0)]
    pub rope_linear: f32,
    /// Phi-3 LongRoPE: write short and long frequency factors with this original context
    /// (llama.cpp uses the long ones when its context exceeds it).
    #[arg(long, default_value_t = 0)]
    pub long_rope: usize,
    /// `rope.scaling.attn_factor`: the RoPE magnitude factor (written when not 1).
    #[arg(long, default_value_t = 1.0)]
    pub rope_attn_factor: f32,
    /// gpt-oss: `attention.sliding_window_pattern` (every N-th layer global; 0: not written).
    #[arg(long, default_value_t = 0)]
    pub swa_pattern: usize,
    /// YaRN's original context (`rope.scaling.original_context_length`; default `--context`).
    #[arg(long, default_value_t = 0)]
    pub yarn_orig_ctx: usize,
    /// A `rope.scaling.yarn_*` value, NAME=VALUE (e.g. `yarn_beta_fast=8`); repeatable.
    /// Written whatever the architecture; llama.cpp reads them for mistral3 (betas, log
    /// multiplier) and ignores them elsewhere, as tl does.
    #[arg(long, value_name = "NAME=VALUE")]
    pub yarn_key: Vec<String>,
    /// mistral3: `attention.temperature_scale` (0: not written).
    #[arg(long, default_value_t = 0.0)]
    pub attn_temp: f32,
    /// Pooling of an embedding model (bert, nomic-bert): mean, cls, last or none.
    #[arg(long, default_value = "mean")]
    pub pooling: String,
    /// Take the tokenizer (every `tokenizer.*` key, the chat template included) from
    /// this GGUF file, the vocabulary size with it (`--extra-vocab` is then ignored):
    /// random weights that read and write real text, for benchmarks of grammars and
    /// chat on full-size shapes without the real weights.
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
}

/// The `tokenizer.*` metadata of `path` and its vocabulary size.
fn tokenizer_of(path: &std::path::Path) -> anyhow::Result<(Vec<(String, Value)>, usize)> {
    let f = tl_gguf::GgufFile::open(path)
        .with_context(|| format!("--tokenizer-from {}", path.display()))?;
    let keys: Vec<(String, Value)> = f
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let n = match f.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len(),
        _ => anyhow::bail!(
            "--tokenizer-from {}: no tokenizer.ggml.tokens array",
            path.display()
        ),
    };
    anyhow::ensure!(
        n >= 259,
        "--tokenizer-from {}: {n} tokens (at least 259 needed)",
        path.display()
    );
    Ok((keys, n))
}

fn parse_type(s: &str) -> anyhow::Result<GgmlType> {
    GgmlType::from_name(s).with_context(|| format!("unknown tensor type '{s}'"))
}

pub fn run(a: &SynthArgs) -> anyhow::Result<()> {
    let tok = match &a.tokenizer_from {
        Some(p) => Some(tokenizer_of(p)?),
        None => None,
    };
    let spec = SynthSpec {
        arch: SynthArch::parse(&a.arch)?,
        n_layers: a.layers,
        d_model: a.d_model,
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        ffn: a.ffn,
        extra_vocab: tok.as_ref().map_or(a.extra_vocab, |(_, n)| n - 259),
        context: a.context,
        weight_type: parse_type(&a.weight_type)?,
        output_type: parse_type(&a.output_type)?,
        seed: a.seed,
        rope_freqs: a.rope_freqs,
        qk_scale: a.qk_scale,
        n_expert: a.experts,
        n_expert_used: a.experts_used,
        yarn_factor: a.yarn,
        long_rope_ctx: a.long_rope,
        rope_attn_factor: a.rope_attn_factor,
        swa_pattern: a.swa_pattern,
        linear_factor: a.rope_linear,
        yarn_orig_ctx: a.yarn_orig_ctx,
        rope_scaling_keys: a
            .yarn_key
            .iter()
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--yarn-key {kv}: expected NAME=VALUE"))?;
                let v: f32 = v
                    .parse()
                    .with_context(|| format!("--yarn-key {kv}: {v} is not a number"))?;
                Ok((k.to_string(), v))
            })
            .collect::<anyhow::Result<_>>()?,
        attn_temp_scale: a.attn_temp,
    };
    let w = if spec.arch.is_encoder() {
        let pooling = match a.pooling.as_str() {
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            "last" => Pooling::Last,
            "none" => Pooling::None,
            other => anyhow::bail!("--pooling {other}: expected mean, cls, last or none"),
        };
        synthesize_encoder(&spec, pooling)?
    } else {
        synthesize(&spec)?
    };
    let mut w = w;
    if let Some((keys, _)) = tok {
        let ours: Vec<String> = w
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, _)| k.to_string())
            .collect();
        for k in ours {
            w.metadata.remove(&k);
        }
        for (k, v) in keys {
            w.set(k, v);
        }
    }
    w.write_file(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
