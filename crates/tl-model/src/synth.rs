//! Synthetic random-weight GGUF models of the real architectures' layout:
//! the same tensor names, metadata keys and block types as converted models,
//! at any size. Unit tests use tiny ones; GPU benchmarks use full-size ones
//! written on the GPU machine (real files can't travel there).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tl_gguf::{Array, GgmlType, GgufWriter, Value};

use crate::error::{ModelError, Result};

/// Architectures the synthesizer can lay out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthArch {
    Llama,
    Qwen2,
    Qwen3,
    /// Gemma (1): pre-norms only, tied output.
    Gemma,
    Gemma2,
    Gemma3,
    /// Phi-3: fused `attn_qkv` and `ffn_up` (gate rows, then up rows).
    Phi3,
    /// Granite: llama's tensors plus embedding, attention, residual and
    /// logit scales in the metadata.
    Granite,
    /// SmolLM3: llama's tensors (NoPE every 4th layer is implied).
    Smollm3,
    /// Qwen 3 MoE: qwen3's attention, stacked expert tensors and a router.
    Qwen3Moe,
    /// Mixtral-style MoE in the `llama` architecture (stacked experts).
    Mixtral,
    /// Qwen 2 MoE: qwen2's attention, experts and a gated shared expert
    /// (twice an expert's FFN size).
    Qwen2Moe,
    /// OLMo 2: post-norms only (`post_attention_norm`, `post_ffw_norm`),
    /// Q/K norms over the whole projection, untied output.
    Olmo2,
    /// Command-R: one LayerNorm (`attn_norm`) per layer, a logit scale,
    /// tied output; per-head Q/K norms (`[head_dim, heads]`) from 64
    /// layers on.
    CommandR,
    /// gpt-oss: Q/K/V and output biases, sink logits, a 32-token window
    /// on even layers, YaRN scaling (factor 32 over 4096 tokens), biased
    /// router and experts; the experts in MXFP4 whatever the weight type
    /// (as the released models), `post_attention_norm` as the FFN norm.
    GptOss,
    /// Mistral 3 (Ministral 3): llama's tensors under `mistral3`.
    Mistral3,
    /// BERT encoder: learned positions, token types, separate Q/K/V with
    /// biases, post-LayerNorms with biases, GELU FFN; a WordPiece vocab.
    Bert,
    /// Nomic BERT encoder: RoPE, fused `attn_qkv`, SwiGLU FFN.
    NomicBert,
}

impl SynthArch {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "gemma" => Ok(Self::Gemma),
            "gemma2" => Ok(Self::Gemma2),
            "gemma3" => Ok(Self::Gemma3),
            "phi3" => Ok(Self::Phi3),
            "granite" => Ok(Self::Granite),
            "smollm3" => Ok(Self::Smollm3),
            "qwen3moe" => Ok(Self::Qwen3Moe),
            "mixtral" => Ok(Self::Mixtral),
            "qwen2moe" => Ok(Self::Qwen2Moe),
            "olmo2" => Ok(Self::Olmo2),
            "command-r" => Ok(Self::CommandR),
            "gpt-oss" => Ok(Self::GptOss),
            "mistral3" => Ok(Self::Mistral3),
            "bert" => Ok(Self::Bert),
            "nomic-bert" => Ok(Self::NomicBert),
            other => Err(ModelError::UnknownArchitecture {
                name: other.to_string(),
                supported:
                    "llama, mixtral, qwen2, qwen2moe, qwen3, qwen3moe, gemma, gemma2, gemma3, phi3, granite, smollm3, olmo2, command-r, gpt-oss, mistral3, bert, nomic-bert",
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma => "gemma",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
            Self::Granite => "granite",
            Self::Smollm3 => "smollm3",
            Self::Qwen3Moe => "qwen3moe",
            // A llama file with experts.
            Self::Mixtral => "llama",
            Self::Qwen2Moe => "qwen2moe",
            Self::Olmo2 => "olmo2",
            Self::CommandR => "command-r",
            Self::GptOss => "gpt-oss",
            Self::Mistral3 => "mistral3",
            Self::Bert => "bert",
            Self::NomicBert => "nomic-bert",
        }
    }

    /// Whether this is an encoder (embedding) architecture.
    pub fn is_encoder(self) -> bool {
        matches!(self, Self::Bert | Self::NomicBert)
    }
}

/// What to synthesize. `Default` is a tiny Qwen2-shaped model.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub arch: SynthArch,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    /// Number of filler tokens after the 3 control and 256 byte tokens.
    pub extra_vocab: usize,
    pub context: usize,
    /// Type of the 2-D weight matrices and the embedding table.
    pub weight_type: GgmlType,
    /// Type of the output projection (ignored when tied, as in Gemma 3).
    pub output_type: GgmlType,
    pub seed: u64,
    /// Write Llama 3.1-style RoPE frequency factors (`rope_freqs.weight`).
    pub rope_freqs: bool,
    /// Scale of the Q and K weights relative to the default: above 1 the
    /// attention is peaked instead of near uniform, so position encoding
    /// details show in the logits.
    pub qk_scale: f32,
    /// Experts per layer and experts per token (MoE architectures only;
    /// `ffn` is then one expert's).
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// YaRN RoPE scaling by this factor (`rope.scaling.type = yarn`,
    /// the original context the model's `context`); 0: none.
    pub yarn_factor: f32,
    /// Phi-3 LongRoPE: short and long frequency factors
    /// (`rope_factors_short/long.weight`) with this original context
    /// (`rope.scaling.original_context_length`); 0: none.
    pub long_rope_ctx: usize,
    /// `rope.scaling.attn_factor` (the RoPE magnitude factor), written
    /// when not 1.
    pub rope_attn_factor: f32,
    /// gpt-oss: `attention.sliding_window_pattern` (every n-th layer
    /// global), written when not 0.
    pub swa_pattern: usize,
    /// Linear RoPE scaling by this factor (`rope.scaling.type = linear`);
    /// 0: none.
    pub linear_factor: f32,
    /// YaRN's original context (`rope.scaling.original_context_length`);
    /// 0: the model's `context`.
    pub yarn_orig_ctx: usize,
    /// Extra `rope.scaling.<name>` values (the `yarn_*` keys), written as
    /// given whether or not the architecture reads them.
    pub rope_scaling_keys: Vec<(String, f32)>,
    /// Mistral 3's `attention.temperature_scale`; 0: not written.
    pub attn_temp_scale: f32,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            arch: SynthArch::Qwen2,
            n_layers: 2,
            d_model: 256,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ffn: 512,
            extra_vocab: 61,
            context: 512,
            weight_type: GgmlType::Q8_0,
            output_type: GgmlType::Q8_0,
            seed: 0,
            rope_freqs: false,
            qk_scale: 1.0,
            n_expert: 8,
            n_expert_used: 2,
            yarn_factor: 0.0,
            long_rope_ctx: 0,
            rope_attn_factor: 1.0,
            swa_pattern: 0,
            linear_factor: 0.0,
            yarn_orig_ctx: 0,
            rope_scaling_keys: Vec::new(),
            attn_temp_scale: 0.0,
        }
    }
}

impl SynthSpec {
    /// Vocabulary size: `<unk>`, `<s>`, `</s>`, 256 byte tokens, filler
    /// (and Phi-3's `<|endoftext|>`, which llama.cpp's loader requires of a
    /// model named Phi-3).
    pub fn vocab(&self) -> usize {
        if self.arch.is_encoder() {
            return wpm_vocab(self.extra_vocab).0.len();
        }
        3 + 256 + self.extra_vocab + usize::from(self.arch == SynthArch::Phi3)
    }
}

fn bad(reason: String) -> ModelError {
    ModelError::Synth(reason)
}

/// Builds the writer for a synthetic model (call `write_file` or `to_bytes`).
/// Encoders get mean pooling (see [`synthesize_encoder`]).
pub fn synthesize(spec: &SynthSpec) -> Result<GgufWriter<'static>> {
    if spec.arch.is_encoder() {
        return synthesize_encoder(spec, crate::encoder::Pooling::Mean);
    }
    if spec.n_layers == 0 || spec.n_heads == 0 || spec.n_kv_heads == 0 || spec.head_dim == 0 {
        return Err(bad("layers, heads and head_dim must be positive".into()));
    }
    if !spec.n_heads.is_multiple_of(spec.n_kv_heads) {
        return Err(bad(format!(
            "{} heads is not a multiple of {} KV heads",
            spec.n_heads, spec.n_kv_heads
        )));
    }
    // Shared by the tensor closures below (one stream, drawn in order).
    let rng = std::cell::RefCell::new(ChaCha8Rng::seed_from_u64(spec.seed));
    let arch = spec.arch.name();
    let mut w = GgufWriter::new();
    let d = spec.d_model;
    let q_dim = spec.n_heads * spec.head_dim;
    let kv_dim = spec.n_kv_heads * spec.head_dim;
    let vocab = spec.vocab();
    let u32v = |v: usize| Value::U32(v as u32);

    set_shape_keys(&mut w, spec, arch);
    w.set(
        format!("{arch}.attention.head_count_kv"),
        u32v(spec.n_kv_heads),
    );
    if spec.arch == SynthArch::CommandR {
        w.set(
            format!("{arch}.attention.layer_norm_epsilon"),
            Value::F32(1e-5),
        );
        w.set(format!("{arch}.logit_scale"), Value::F32(0.125));
    } else {
        w.set(
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        );
    }
    w.set(format!("{arch}.rope.freq_base"), Value::F32(1e6));
    // Gemma 2 and 3: windowed layers, post-norms.
    let gemma = matches!(spec.arch, SynthArch::Gemma2 | SynthArch::Gemma3);
    let gemma_any = gemma || spec.arch == SynthArch::Gemma;
    if gemma_any || spec.head_dim * spec.n_heads != d {
        w.set(format!("{arch}.attention.key_length"), u32v(spec.head_dim));
        w.set(
            format!("{arch}.attention.value_length"),
            u32v(spec.head_dim),
        );
    }
    if gemma {
        w.set(format!("{arch}.attention.sliding_window"), u32v(64));
    }
    if spec.arch == SynthArch::Gemma2 {
        // Caps low enough to bite on a random model's scores and logits.
        w.set(format!("{arch}.attn_logit_softcapping"), Value::F32(5.0));
        w.set(format!("{arch}.final_logit_softcapping"), Value::F32(30.0));
    }
    let gpt_oss = spec.arch == SynthArch::GptOss;
    let moe = matches!(
        spec.arch,
        SynthArch::Qwen3Moe | SynthArch::Mixtral | SynthArch::Qwen2Moe | SynthArch::GptOss
    );
    if moe {
        w.set(format!("{arch}.expert_count"), u32v(spec.n_expert));
        w.set(
            format!("{arch}.expert_used_count"),
            u32v(spec.n_expert_used),
        );
    }
    if matches!(
        spec.arch,
        SynthArch::Qwen3Moe | SynthArch::Qwen2Moe | SynthArch::GptOss
    ) {
        w.set(format!("{arch}.expert_feed_forward_length"), u32v(spec.ffn));
    }
    if gpt_oss {
        // Short enough that the window matters within a test sequence.
        w.set(format!("{arch}.attention.sliding_window"), u32v(32));
        w.set(
            format!("{arch}.rope.scaling.type"),
            Value::String("yarn".into()),
        );
        w.set(format!("{arch}.rope.scaling.factor"), Value::F32(32.0));
        w.set(
            format!("{arch}.rope.scaling.original_context_length"),
            u32v(4096),
        );
    }
    if spec.swa_pattern > 0 {
        if !gpt_oss {
            return Err(bad("--swa-pattern is gpt-oss's (--arch gpt-oss)".into()));
        }
        w.set(
            format!("{arch}.attention.sliding_window_pattern"),
            u32v(spec.swa_pattern),
        );
    }
    if spec.yarn_factor != 0.0 {
        if gpt_oss {
            return Err(bad("gpt-oss always has its own YaRN scaling".into()));
        }
        if !(spec.yarn_factor.is_finite() && spec.yarn_factor > 1.0) {
            return Err(bad(format!(
                "YaRN factor {} (must be above 1)",
                spec.yarn_factor
            )));
        }
        w.set(
            format!("{arch}.rope.scaling.type"),
            Value::String("yarn".into()),
        );
        w.set(
            format!("{arch}.rope.scaling.factor"),
            Value::F32(spec.yarn_factor),
        );
        w.set(
            format!("{arch}.rope.scaling.original_context_length"),
            u32v(if spec.yarn_orig_ctx > 0 {
                spec.yarn_orig_ctx
            } else {
                spec.context
            }),
        );
    } else if spec.yarn_orig_ctx > 0 {
        return Err(bad("a YaRN original context needs a YaRN factor".into()));
    }
    for (name, v) in &spec.rope_scaling_keys {
        if !name.starts_with("yarn_") {
            return Err(bad(format!(
                "rope.scaling.{name}: only the yarn_* keys are written this way"
            )));
        }
        w.set(format!("{arch}.rope.scaling.{name}"), Value::F32(*v));
    }
    if spec.attn_temp_scale != 0.0 {
        if spec.arch != SynthArch::Mistral3 {
            return Err(bad(
                "attention temperature scaling is Mistral 3's (--arch mistral3)".into(),
            ));
        }
        w.set(
            format!("{arch}.attention.temperature_scale"),
            Value::F32(spec.attn_temp_scale),
        );
    }
    if spec.linear_factor != 0.0 {
        if gpt_oss || spec.yarn_factor != 0.0 {
            return Err(bad("linear RoPE scaling excludes YaRN".into()));
        }
        if !(spec.linear_factor.is_finite() && spec.linear_factor > 0.0) {
            return Err(bad(format!(
                "linear RoPE factor {} (must be positive)",
                spec.linear_factor
            )));
        }
        w.set(
            format!("{arch}.rope.scaling.type"),
            Value::String("linear".into()),
        );
        w.set(
            format!("{arch}.rope.scaling.factor"),
            Value::F32(spec.linear_factor),
        );
    }
    if spec.long_rope_ctx > 0 {
        if spec.arch != SynthArch::Phi3 {
            return Err(bad("LongRoPE factors are Phi-3's (--arch phi3)".into()));
        }
        if spec.rope_freqs {
            return Err(bad(
                "LongRoPE factors and rope_freqs exclude each other".into()
            ));
        }
        w.set(
            format!("{arch}.rope.scaling.original_context_length"),
            u32v(spec.long_rope_ctx),
        );
    }
    if spec.rope_attn_factor != 1.0 {
        w.set(
            format!("{arch}.rope.scaling.attn_factor"),
            Value::F32(spec.rope_attn_factor),
        );
    }
    if spec.arch == SynthArch::Qwen2Moe {
        w.set(
            format!("{arch}.expert_shared_feed_forward_length"),
            u32v(2 * spec.ffn),
        );
    }
    if spec.arch == SynthArch::Granite {
        // Granite 3's kind of values (embedding 12, residual 0.22,
        // attention 1/128, logits 8).
        w.set(format!("{arch}.embedding_scale"), Value::F32(12.0));
        w.set(format!("{arch}.residual_scale"), Value::F32(0.22));
        w.set(format!("{arch}.attention.scale"), Value::F32(0.0078125));
        w.set(format!("{arch}.logit_scale"), Value::F32(8.0));
    }

    // A SentencePiece-style vocabulary with byte fallback: every string is
    // encodable, so the synthetic model can run the whole pipeline.
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let letters = "abcdefghijklmnopqrstuvwxyz";
    for i in 0..spec.extra_vocab {
        let mut s = String::from("\u{2581}");
        let mut n = i;
        loop {
            s.push(letters.as_bytes()[n % 26] as char);
            n /= 26;
            if n == 0 {
                break;
            }
        }
        if tokens.contains(&s) {
            s.push('_');
        }
        tokens.push(s);
        types.push(1);
    }
    if spec.arch == SynthArch::Phi3 {
        tokens.push("<|endoftext|>".into());
        types.push(3);
    }
    let scores: Vec<f32> = (0..vocab).map(|i| -(i as f32)).collect();
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    w.set("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
    w.set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.set("tokenizer.ggml.add_eos_token", Value::Bool(false));

    let matrix = |w: &mut GgufWriter<'static>,
                  name: String,
                  cols: usize,
                  rows: usize,
                  ty: GgmlType,
                  scale: f32|
     -> Result<()> {
        let vals: Vec<f32> = (0..cols * rows)
            .map(|_| rng.borrow_mut().gen_range(-scale..scale))
            .collect();
        add_tensor(w, name, vec![cols as u64, rows as u64], ty, &vals)
    };
    let norm_dims = |w: &mut GgufWriter<'static>, name: String, dims: &[usize]| -> Result<()> {
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|i| 1.0 + 0.01 * ((i % 7) as f32 - 3.0))
            .collect();
        let dims = dims.iter().map(|&v| v as u64).collect();
        add_tensor(w, name, dims, GgmlType::F32, &vals)
    };
    let norm = |w: &mut GgufWriter<'static>, name: String, n: usize| norm_dims(w, name, &[n]);
    let olmo2 = spec.arch == SynthArch::Olmo2;
    let command_r = spec.arch == SynthArch::CommandR;

    let wt = spec.weight_type;
    let s_in = 1.0 / (d as f32).sqrt();
    // Gemma (1)'s tied LM head has no soft-cap: a table of ±1/sqrt(d)
    // keeps its logits of the order of the other architectures'.
    let s_embd = if spec.arch == SynthArch::Gemma {
        s_in
    } else {
        1.0
    };
    matrix(&mut w, "token_embd.weight".into(), d, vocab, wt, s_embd)?;
    for i in 0..spec.n_layers {
        let b = format!("blk.{i}");
        if !olmo2 {
            norm(&mut w, format!("{b}.attn_norm.weight"), d)?;
        }
        let s_qk = s_in * spec.qk_scale;
        if spec.arch == SynthArch::Phi3 {
            let rows = q_dim + 2 * kv_dim;
            matrix(&mut w, format!("{b}.attn_qkv.weight"), d, rows, wt, s_qk)?;
        } else {
            matrix(&mut w, format!("{b}.attn_q.weight"), d, q_dim, wt, s_qk)?;
            matrix(&mut w, format!("{b}.attn_k.weight"), d, kv_dim, wt, s_qk)?;
            matrix(&mut w, format!("{b}.attn_v.weight"), d, kv_dim, wt, s_in)?;
        }
        if matches!(
            spec.arch,
            SynthArch::Qwen2 | SynthArch::Qwen2Moe | SynthArch::GptOss
        ) {
            for (n, len) in [("q", q_dim), ("k", kv_dim), ("v", kv_dim)] {
                matrix(
                    &mut w,
                    format!("{b}.attn_{n}.bias"),
                    len,
                    1,
                    GgmlType::F32,
                    0.1,
                )?;
            }
        }
        if matches!(
            spec.arch,
            SynthArch::Gemma3 | SynthArch::Qwen3 | SynthArch::Qwen3Moe
        ) {
            norm(&mut w, format!("{b}.attn_q_norm.weight"), spec.head_dim)?;
            norm(&mut w, format!("{b}.attn_k_norm.weight"), spec.head_dim)?;
        }
        if olmo2 {
            norm(&mut w, format!("{b}.attn_q_norm.weight"), q_dim)?;
            norm(&mut w, format!("{b}.attn_k_norm.weight"), kv_dim)?;
        }
        if command_r && spec.n_layers >= 64 {
            let hd = spec.head_dim;
            norm_dims(
                &mut w,
                format!("{b}.attn_q_norm.weight"),
                &[hd, spec.n_heads],
            )?;
            norm_dims(
                &mut w,
                format!("{b}.attn_k_norm.weight"),
                &[hd, spec.n_kv_heads],
            )?;
        }
        if gemma || olmo2 {
            norm(&mut w, format!("{b}.post_attention_norm.weight"), d)?;
            norm(&mut w, format!("{b}.post_ffw_norm.weight"), d)?;
        }
        let s_o = 1.0 / (q_dim as f32).sqrt();
        matrix(&mut w, format!("{b}.attn_output.weight"), q_dim, d, wt, s_o)?;
        if gpt_oss {
            let f32t = GgmlType::F32;
            matrix(&mut w, format!("{b}.attn_output.bias"), d, 1, f32t, 0.1)?;
            // Sink logits of the order of the scores, so they take a share.
            let n = spec.n_heads;
            matrix(&mut w, format!("{b}.attn_sinks.weight"), n, 1, f32t, 2.0)?;
            norm(&mut w, format!("{b}.post_attention_norm.weight"), d)?;
        } else if !olmo2 && !command_r {
            norm(&mut w, format!("{b}.ffn_norm.weight"), d)?;
        }
        if moe {
            let (ne, ff) = (spec.n_expert, spec.ffn);
            matrix(
                &mut w,
                format!("{b}.ffn_gate_inp.weight"),
                d,
                ne,
                GgmlType::F32,
                s_in,
            )?;
            if gpt_oss {
                let f32t = GgmlType::F32;
                matrix(&mut w, format!("{b}.ffn_gate_inp.bias"), ne, 1, f32t, 0.1)?;
            }
            let et = if gpt_oss { GgmlType::MXFP4 } else { wt };
            for (name, cols, rows, scale) in [
                ("ffn_gate_exps", d, ff, s_in),
                ("ffn_up_exps", d, ff, s_in),
                ("ffn_down_exps", ff, d, 1.0 / (ff as f32).sqrt()),
            ] {
                let vals: Vec<f32> = (0..cols * rows * ne)
                    .map(|_| rng.borrow_mut().gen_range(-scale..scale))
                    .collect();
                let dims = vec![cols as u64, rows as u64, ne as u64];
                add_tensor(&mut w, format!("{b}.{name}.weight"), dims, et, &vals)?;
                if gpt_oss {
                    // One bias row per expert.
                    let name = format!("{b}.{name}.bias");
                    matrix(&mut w, name, rows, ne, GgmlType::F32, 0.1)?;
                }
            }
            if spec.arch == SynthArch::Qwen2Moe {
                let fs = 2 * ff;
                let s_fs = 1.0 / (fs as f32).sqrt();
                matrix(
                    &mut w,
                    format!("{b}.ffn_gate_inp_shexp.weight"),
                    d,
                    1,
                    GgmlType::F32,
                    s_in,
                )?;
                matrix(
                    &mut w,
                    format!("{b}.ffn_gate_shexp.weight"),
                    d,
                    fs,
                    wt,
                    s_in,
                )?;
                matrix(&mut w, format!("{b}.ffn_up_shexp.weight"), d, fs, wt, s_in)?;
                matrix(
                    &mut w,
                    format!("{b}.ffn_down_shexp.weight"),
                    fs,
                    d,
                    wt,
                    s_fs,
                )?;
            }
        } else if spec.arch == SynthArch::Phi3 {
            let rows = 2 * spec.ffn;
            matrix(&mut w, format!("{b}.ffn_up.weight"), d, rows, wt, s_in)?;
        } else {
            matrix(
                &mut w,
                format!("{b}.ffn_gate.weight"),
                d,
                spec.ffn,
                wt,
                s_in,
            )?;
            matrix(&mut w, format!("{b}.ffn_up.weight"), d, spec.ffn, wt, s_in)?;
        }
        if !moe {
            let s_f = 1.0 / (spec.ffn as f32).sqrt();
            matrix(&mut w, format!("{b}.ffn_down.weight"), spec.ffn, d, wt, s_f)?;
        }
    }
    norm(&mut w, "output_norm.weight".into(), d)?;
    if spec.rope_freqs {
        // Llama 3.1's shape: high-frequency pairs kept (1), low-frequency
        // ones slowed (up to 8), a ramp between.
        let n = spec.head_dim / 2;
        let vals: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f32 / (n.max(2) - 1) as f32;
                if t < 0.4 {
                    1.0
                } else if t > 0.8 {
                    8.0
                } else {
                    1.0 + 7.0 * (t - 0.4) / 0.4
                }
            })
            .collect();
        add_tensor(
            &mut w,
            "rope_freqs.weight".into(),
            vec![n as u64],
            GgmlType::F32,
            &vals,
        )?;
    }
    if spec.long_rope_ctx > 0 {
        // Phi-3 128k's shape: short factors near 1, long ones rising to
        // tens over the low-frequency pairs.
        let n = spec.head_dim / 2;
        for (name, top) in [
            ("rope_factors_short.weight", 1.5f32),
            ("rope_factors_long.weight", 40.0),
        ] {
            let vals: Vec<f32> = (0..n)
                .map(|i| {
                    let t = i as f32 / (n.max(2) - 1) as f32;
                    1.0 + (top - 1.0) * t * t
                })
                .collect();
            add_tensor(&mut w, name.into(), vec![n as u64], GgmlType::F32, &vals)?;
        }
    }
    if !gemma_any && !command_r {
        matrix(
            &mut w,
            "output.weight".into(),
            d,
            vocab,
            spec.output_type,
            s_in,
        )?;
    }
    Ok(w)
}

/// A WordPiece vocabulary as llama.cpp's GGUF stores one: `[PAD]`,
/// `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, then word-initial pieces with the
/// "▁" prefix and continuation pieces bare (BERT's `##` dropped), then
/// `extra` filler words. Returns (texts, GGUF token types).
pub fn wpm_vocab(extra: usize) -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut types = vec![3, 2, 3, 3, 3];
    let mut push = |t: String, tokens: &mut Vec<String>| {
        if !tokens.contains(&t) {
            tokens.push(t);
            types.push(1);
        }
    };
    for c in ('a'..='z').chain('0'..='9') {
        push(format!("\u{2581}{c}"), &mut tokens);
        push(c.to_string(), &mut tokens);
    }
    for c in ".,!?'\"-:;()[]{}<>/@#$%^&*+=_~`|\\".chars() {
        push(format!("\u{2581}{c}"), &mut tokens);
    }
    for c in "中文日本語东京的是".chars() {
        push(format!("\u{2581}{c}"), &mut tokens);
    }
    for w in [
        "the", "quick", "brown", "fox", "jump", "over", "lazy", "dog", "hello", "world", "test",
        "token", "embed", "un", "cafe", "naive", "resume", "is", "a", "an", "of", "and", "to",
        "in", "it", "we", "model", "text", "search", "query", "document", "paris", "france",
        "capital", "city", "cat", "sat", "on", "mat", "zurich", "sao", "paulo",
    ] {
        push(format!("\u{2581}{w}"), &mut tokens);
    }
    for w in [
        "s", "ed", "ing", "ly", "er", "est", "izer", "ding", "believ", "able", "tion", "ment",
        "ness", "ful", "less", "ize", "ise", "ted",
    ] {
        push(w.to_string(), &mut tokens);
    }
    let letters = "abcdefghijklmnopqrstuvwxyz".as_bytes();
    for i in 0..extra {
        let mut s = String::from("\u{2581}x");
        let mut n = i;
        loop {
            s.push(letters[n % 26] as char);
            n /= 26;
            if n == 0 {
                break;
            }
        }
        push(s, &mut tokens);
    }
    (tokens, types)
}

/// A random encoder model (`bert`, `nomic-bert`) with llama.cpp's tensor
/// names and metadata as `convert_hf_to_gguf.py` writes them, a WordPiece
/// vocabulary ([`wpm_vocab`]) that lowercases and strips accents, two
/// token types and the given pooling.
pub fn synthesize_encoder(
    spec: &SynthSpec,
    pooling: crate::encoder::Pooling,
) -> Result<GgufWriter<'static>> {
    use crate::encoder::Pooling;
    let d = spec.d_model;
    if spec.n_layers == 0 || spec.n_heads == 0 || spec.n_heads * spec.head_dim != d {
        return Err(bad(format!(
            "an encoder needs layers and {} heads of {} making up the width {d}",
            spec.n_heads, spec.head_dim
        )));
    }
    let rng = std::cell::RefCell::new(ChaCha8Rng::seed_from_u64(spec.seed));
    let arch = spec.arch.name();
    let nomic = spec.arch == SynthArch::NomicBert;
    let mut w = GgufWriter::new();
    set_shape_keys(&mut w, spec, arch);
    w.set(
        format!("{arch}.attention.layer_norm_epsilon"),
        Value::F32(1e-12),
    );
    w.set(format!("{arch}.attention.causal"), Value::Bool(false));
    let pool = match pooling {
        Pooling::None => 0,
        Pooling::Mean => 1,
        Pooling::Cls => 2,
        Pooling::Last => 3,
    };
    w.set(format!("{arch}.pooling_type"), Value::U32(pool));
    if nomic {
        w.set(format!("{arch}.rope.freq_base"), Value::F32(1000.0));
    }
    let (tokens, types) = wpm_vocab(spec.extra_vocab);
    let vocab = tokens.len();
    w.set("tokenizer.ggml.model", Value::String("bert".into()));
    w.set("tokenizer.ggml.pre", Value::String("default".into()));
    w.set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    w.set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    w.set("tokenizer.ggml.token_type_count", Value::U32(2));
    w.set("tokenizer.ggml.normalizer.lowercase", Value::Bool(true));
    w.set("tokenizer.ggml.padding_token_id", Value::U32(0));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(1));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(2));
    w.set("tokenizer.ggml.cls_token_id", Value::U32(2));
    w.set("tokenizer.ggml.seperator_token_id", Value::U32(3));
    w.set("tokenizer.ggml.mask_token_id", Value::U32(4));

    let rand = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| rng.borrow_mut().gen_range(-scale..scale))
            .collect()
    };
    let f32t = |w: &mut GgufWriter<'static>, name: String, dims: Vec<u64>, vals: Vec<f32>| {
        add_tensor(w, name, dims, GgmlType::F32, &vals)
    };
    let ln = |w: &mut GgufWriter<'static>, name: &str| -> Result<()> {
        let g: Vec<f32> = (0..d)
            .map(|i| 1.0 + 0.05 * ((i % 7) as f32 - 3.0))
            .collect();
        f32t(w, format!("{name}.weight"), vec![d as u64], g)?;
        let b = rand(d, 0.1);
        f32t(w, format!("{name}.bias"), vec![d as u64], b)
    };
    let wt = spec.weight_type;
    let matrix =
        |w: &mut GgufWriter<'static>, name: String, cols: usize, rows: usize, scale: f32| {
            let vals = rand(cols * rows, scale);
            add_tensor(w, name, vec![cols as u64, rows as u64], wt, &vals)
        };
    let s_in = 1.0 / (d as f32).sqrt();
    let s_qk = s_in * spec.qk_scale;
    matrix(&mut w, "token_embd.weight".into(), d, vocab, 1.0)?;
    let types = rand(2 * d, 0.5);
    f32t(
        &mut w,
        "token_types.weight".into(),
        vec![d as u64, 2],
        types,
    )?;
    if !nomic {
        let pos = rand(spec.context * d, 0.5);
        f32t(
            &mut w,
            "position_embd.weight".into(),
            vec![d as u64, spec.context as u64],
            pos,
        )?;
    }
    ln(&mut w, "token_embd_norm")?;
    for i in 0..spec.n_layers {
        let b = format!("blk.{i}");
        if nomic {
            // Q and K rows scaled for peaked attention, V rows plain.
            let mut vals = rand(3 * d * d, s_qk);
            for v in vals[2 * d * d..].iter_mut() {
                *v *= s_in / s_qk;
            }
            add_tensor(
                &mut w,
                format!("{b}.attn_qkv.weight"),
                vec![d as u64, 3 * d as u64],
                wt,
                &vals,
            )?;
        } else {
            matrix(&mut w, format!("{b}.attn_q.weight"), d, d, s_qk)?;
            let bq = rand(d, 0.1);
            f32t(&mut w, format!("{b}.attn_q.bias"), vec![d as u64], bq)?;
            matrix(&mut w, format!("{b}.attn_k.weight"), d, d, s_qk)?;
            let bk = rand(d, 0.1);
            f32t(&mut w, format!("{b}.attn_k.bias"), vec![d as u64], bk)?;
            matrix(&mut w, format!("{b}.attn_v.weight"), d, d, s_in)?;
            let bv = rand(d, 0.1);
            f32t(&mut w, format!("{b}.attn_v.bias"), vec![d as u64], bv)?;
        }
        matrix(&mut w, format!("{b}.attn_output.weight"), d, d, s_in)?;
        if !nomic {
            let bo = rand(d, 0.1);
            f32t(&mut w, format!("{b}.attn_output.bias"), vec![d as u64], bo)?;
        }
        ln(&mut w, &format!("{b}.attn_output_norm"))?;
        let f = spec.ffn;
        matrix(&mut w, format!("{b}.ffn_up.weight"), d, f, s_in)?;
        if nomic {
            matrix(&mut w, format!("{b}.ffn_gate.weight"), d, f, s_in)?;
        } else {
            let bu = rand(f, 0.1);
            f32t(&mut w, format!("{b}.ffn_up.bias"), vec![f as u64], bu)?;
        }
        matrix(
            &mut w,
            format!("{b}.ffn_down.weight"),
            f,
            d,
            1.0 / (f as f32).sqrt(),
        )?;
        if !nomic {
            let bd = rand(d, 0.1);
            f32t(&mut w, format!("{b}.ffn_down.bias"), vec![d as u64], bd)?;
        }
        ln(&mut w, &format!("{b}.layer_output_norm"))?;
    }
    Ok(w)
}

/// The architecture, name and shape keys every synthetic file starts with.
fn set_shape_keys(w: &mut GgufWriter, spec: &SynthSpec, arch: &str) {
    let u32v = |v: usize| Value::U32(v as u32);
    let d = spec.d_model;
    w.set("general.architecture", Value::String(arch.into()));
    w.set(
        "general.name",
        Value::String(format!("synthetic {arch} {}L d{d}", spec.n_layers)),
    );
    w.set(format!("{arch}.context_length"), u32v(spec.context));
    w.set(format!("{arch}.embedding_length"), u32v(d));
    w.set(format!("{arch}.block_count"), u32v(spec.n_layers));
    w.set(format!("{arch}.feed_forward_length"), u32v(spec.ffn));
    w.set(format!("{arch}.attention.head_count"), u32v(spec.n_heads));
}

fn add_tensor(
    w: &mut GgufWriter<'static>,
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    vals: &[f32],
) -> Result<()> {
    let row = dims.first().copied().unwrap_or(1) as usize;
    if !row.is_multiple_of(ty.block_size()) {
        return Err(bad(format!(
            "tensor '{name}': rows of {row} values are not a whole number of {ty} blocks of {}",
            ty.block_size()
        )));
    }
    let n_bytes = ty
        .bytes_for(vals.len() as u64)
        .ok_or_else(|| bad(format!("tensor '{name}': size overflows")))?;
    let mut bytes = vec![0u8; n_bytes as usize];
    // Rows are quantized independently: split them over the cores (the
    // full-size benchmark shapes took minutes on one). Same bytes.
    let rows = vals.len() / row.max(1);
    let row_bytes = n_bytes as usize / rows.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = rows.div_ceil(threads).max(1);
    let results: Vec<tl_core::Result<()>> = std::thread::scope(|sc| {
        let handles: Vec<_> = bytes
            .chunks_mut(per * row_bytes.max(1))
            .zip(vals.chunks(per * row))
            .map(|(out, src)| sc.spawn(move || tl_core::quant::quantize(ty, src, out)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(tl_core::CoreError::Invalid {
                        op: "quantize",
                        reason: "a quantization thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    for r in results {
        r.map_err(|e| ModelError::Core {
            tensor: name.clone(),
            err: e,
        })?;
    }
    w.add_tensor(name, dims, ty, bytes)?;
    Ok(())
}
