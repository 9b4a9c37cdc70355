//! Typed model configuration, read once from GGUF metadata. Nothing in a
//! forward pass looks at a metadata key or compares an architecture string.

use tl_gguf::Metadata;

use crate::error::{ModelError, Result};

/// Supported architectures (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen 3 (dense): Qwen 2 without Q/K/V biases, with per-head RMS norms
    /// of Q and K before RoPE.
    Qwen3,
    /// Gemma (1): RMS pre-norms only, the embedding scaled by
    /// sqrt(d_model), the query by 1/sqrt(head_dim), GeGLU, tied output;
    /// no soft-capping, no window.
    Gemma,
    /// Gemma 2: Gemma 3's norms without the Q/K norms, attention and final
    /// logit soft-capping, every other layer windowed.
    Gemma2,
    Gemma3,
    /// Phi-3: fused QKV and gate/up matrices, the query scaled before
    /// attention; its sliding window is not applied (as in llama.cpp).
    Phi3,
    /// Granite (dense): llama's layout with embedding, attention,
    /// residual and logit scales.
    Granite,
    /// SmolLM3: llama's layout, every 4th layer without RoPE (NoPE).
    Smollm3,
    /// Qwen 3 MoE: qwen3's attention; every FFN a mixture of experts
    /// (softmax router, top-k, weights renormalised).
    Qwen3Moe,
    /// Qwen 2 MoE: qwen2's attention; experts (weights not renormalised)
    /// plus a shared expert behind a sigmoid gate.
    Qwen2Moe,
    /// OLMo 2: no pre-norms; each sub-layer's output RMS-normed before the
    /// residual add; Q and K RMS-normed over the whole projection.
    Olmo2,
    /// Command-R (Cohere): LayerNorm without bias, attention and FFN in
    /// parallel off one norm, logits multiplied by `logit_scale`, per-head
    /// Q/K LayerNorms in models of 64 layers or more, tied output.
    CommandR,
    /// gpt-oss (OpenAI): Q/K/V and output biases, a learned sink logit
    /// per head, even layers windowed, YaRN RoPE; every FFN a mixture of
    /// experts with biases, chosen by the top-k router logits (softmax over
    /// those k), each a clamped SwiGLU (`swiglu_oai`).
    GptOss,
    /// Mistral 3 (`mistral3`: Ministral 3): llama's dense layout, YaRN
    /// with the file's `rope.scaling.yarn_beta_fast/slow` and
    /// `yarn_log_multiplier`, and Llama 4-style attention temperature
    /// scaling of the query by position (`attention.temperature_scale`).
    Mistral3,
}

pub const SUPPORTED_ARCHS: &str =
    "llama, qwen2, qwen2moe, qwen3, qwen3moe, gemma, gemma2, gemma3, phi3, granite, smollm3, olmo2, command-r, gpt-oss, mistral3";

impl Arch {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            "gemma" => Ok(Arch::Gemma),
            "gemma2" => Ok(Arch::Gemma2),
            "phi3" => Ok(Arch::Phi3),
            "granite" => Ok(Arch::Granite),
            "smollm3" => Ok(Arch::Smollm3),
            "qwen3moe" => Ok(Arch::Qwen3Moe),
            "qwen2moe" => Ok(Arch::Qwen2Moe),
            "gemma3" => Ok(Arch::Gemma3),
            "olmo2" => Ok(Arch::Olmo2),
            "command-r" => Ok(Arch::CommandR),
            "gpt-oss" => Ok(Arch::GptOss),
            "mistral3" => Ok(Arch::Mistral3),
            "bert" | "nomic-bert" => Err(ModelError::BadConfig(format!(
                "{name} is an embedding (encoder) model, not a text generator: run it with \
                 `tl embed` or the server's /v1/embeddings"
            ))),
            other => Err(ModelError::UnknownArchitecture {
                name: other.to_string(),
                supported: SUPPORTED_ARCHS,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma => "gemma",
            Arch::Gemma2 => "gemma2",
            Arch::Phi3 => "phi3",
            Arch::Granite => "granite",
            Arch::Smollm3 => "smollm3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Gemma3 => "gemma3",
            Arch::Olmo2 => "olmo2",
            Arch::CommandR => "command-r",
            Arch::GptOss => "gpt-oss",
            Arch::Mistral3 => "mistral3",
        }
    }
}

/// How rotary embeddings pair dimensions (ggml `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.
    Normal,
    /// Half split (x[i], x[i + n/2]): qwen2, gemma3.
    Neox,
}

/// Feed-forward activation of the gated FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnAct {
    Silu,
    /// Tanh-approximated GELU (gemma).
    Gelu,
    /// gpt-oss's clamped SwiGLU (ggml `swiglu_oai`): with the gate `x`
    /// clamped above at [`SWIGLU_OAI_LIMIT`] and `y` the up projection
    /// clamped to ±the limit, `x · sigmoid(α x) · (y + 1)`, α =
    /// [`SWIGLU_OAI_ALPHA`].
    SwigluOai,
}

/// α of [`FfnAct::SwigluOai`] (llama.cpp's constant).
pub const SWIGLU_OAI_ALPHA: f32 = 1.702;
/// The clamp of [`FfnAct::SwigluOai`].
pub const SWIGLU_OAI_LIMIT: f32 = 7.0;

/// How a mixture of experts weighs the experts it picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeGating {
    /// Softmax over all router logits; the top k probabilities (qwen3moe,
    /// qwen2moe, mixtral).
    Softmax,
    /// The top k router logits, then a softmax over just those k
    /// (llama.cpp `SOFTMAX_WEIGHT`: gpt-oss).
    SoftmaxSelected,
}

/// RoPE scaling: YaRN (`rope.scaling.type = yarn`), or unscaled angles
/// with a magnitude factor (`rope.scaling.attn_factor`, Phi-3 LongRoPE),
/// with the values llama.cpp's context derives from the metadata
/// (`llama-context.cpp`) for ggml's `rope_ext`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    /// `1 / rope.scaling.factor`.
    pub freq_scale: f32,
    /// `rope.scaling.original_context_length` (the training context when
    /// absent).
    pub n_ctx_orig: usize,
    /// 1: the interpolation ramps between extrapolation and
    /// interpolation over the correction dimensions (YaRN); 0: angles
    /// scaled by `freq_scale` alone.
    pub ext_factor: f32,
    /// The magnitude factor before ggml's own `1 + 0.1 ln(1 / freq_scale)`.
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// The kind of every norm of a model (its weight is always applied; no
/// bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `x / sqrt(mean(x²) + eps)`.
    Rms,
    /// `(x - mean) / sqrt(var + eps)` (ggml `norm`): command-r.
    Layer,
}

/// Where the sub-layers take their norms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPlacement {
    /// A norm before attention and before the FFN (gemma's post-norms,
    /// where present, come on top).
    Pre,
    /// No pre-norms: each sub-layer sees the residual stream itself and
    /// its output is normed before the residual add (olmo2).
    Post,
    /// One norm before attention and FFN, which run side by side off it;
    /// both outputs are added to the residual (command-r).
    Parallel,
}

/// How the Q and K projections are normed before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Each head RMS-normed on its own, one weight vector of `head_dim`
    /// shared by the heads (qwen3, gemma3).
    Head,
    /// Each head on its own with its own weights (`[head_dim, heads]`):
    /// command-r of 64 layers or more.
    HeadWeights,
    /// The whole projection as one vector (olmo2).
    Whole,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub name: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    /// The context RoPE was trained at (`rope.scaling.original_context_length`,
    /// else `context`): Phi-3 LongRoPE's long factors apply beyond it.
    pub n_ctx_orig: usize,
    /// Epsilon of every norm (`layer_norm_rms_epsilon`, or
    /// `layer_norm_epsilon` where the norms are LayerNorms).
    pub rms_eps: f32,
    pub norm: NormKind,
    pub norm_placement: NormPlacement,
    pub qk_norm: QkNorm,
    pub rope_base: f32,
    /// Rope base of sliding-window layers (gemma3: 10,000).
    pub rope_base_swa: f32,
    pub rope_dims: usize,
    pub rope_layout: RopeLayout,
    pub ffn_act: FfnAct,
    /// Sliding window size for windowed layers; `None` when all layers are global.
    pub sliding_window: Option<usize>,
    /// Every `swa_period`-th layer (index % period == period - 1) is global.
    pub swa_period: usize,
    /// Multiply embeddings by this (gemma: sqrt(d_model)).
    pub embed_scale: f32,
    /// Attention score scale (1/sqrt(head_dim) unless the architecture says otherwise).
    pub attn_scale: f32,
    pub final_logit_softcap: Option<f32>,
    /// Attention scores are soft-capped: `tanh(s / cap) * cap` (gemma2).
    pub attn_logit_softcap: Option<f32>,
    /// Each sub-layer's output is multiplied by this before the residual
    /// add (granite's `residual_scale`; 1 elsewhere).
    pub residual_scale: f32,
    /// Logits are multiplied by this: `1 / logit_scale` in granite,
    /// `logit_scale` in command-r, 1 elsewhere.
    pub logit_mul: f32,
    /// Experts per MoE layer (0: dense FFN); `ffn` is then one expert's.
    pub n_expert: usize,
    /// Experts each token uses.
    pub n_expert_used: usize,
    /// The chosen experts' weights are renormalised to sum 1.
    pub moe_norm_weights: bool,
    /// The shared expert's FFN size (qwen2moe; 0 without one).
    pub ffn_shared: usize,
    pub moe_gating: MoeGating,
    /// RoPE scaling (YaRN, or LongRoPE's magnitude factor), when the
    /// model uses it.
    pub yarn: Option<Yarn>,
    /// Attention temperature scaling of the query by position (Mistral 3).
    pub attn_temp: Option<AttnTemp>,
    /// The context the LongRoPE factor set is chosen by (llama.cpp's
    /// `n_ctx_seq`): the long factors where it exceeds `n_ctx_orig`. The
    /// training context unless the loader is given a runtime one
    /// ([`crate::model::Model::from_file_ctx`]).
    pub rope_ctx: usize,
}

/// Llama 4-style attention temperature (llama.cpp `llm_graph_input_attn_temp`):
/// the query at position `p` is multiplied, after RoPE, by
/// `1 + scale · ln(floor(p / floor) + 1)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnTemp {
    /// `attention.temperature_scale`.
    pub scale: f32,
    /// The original context (`rope.scaling.original_context_length`, else
    /// the training context).
    pub floor: usize,
}

impl AttnTemp {
    /// The query's factor at position `pos` (in llama.cpp's float order).
    pub fn at(&self, pos: usize) -> f32 {
        let q = (pos as f32 / self.floor as f32).floor();
        ((q as f64 + 1.0).ln() * self.scale as f64 + 1.0) as f32
    }
}

impl Config {
    /// Whether layer `il` uses the sliding window.
    pub fn is_swa_layer(&self, il: usize) -> bool {
        self.sliding_window.is_some()
            && self.swa_period > 0
            && il % self.swa_period < self.swa_period - 1
    }

    /// The RoPE scaling of layer `il`: Gemma 3's windowed layers rotate
    /// with the frequency scale 1 (llama.cpp's `rope_freq_scale_train_swa`
    /// for gemma3); the others as the file says.
    pub fn rope_scaling_for(&self, il: usize) -> Option<Yarn> {
        let y = self.yarn?;
        if self.arch == Arch::Gemma3 && self.is_swa_layer(il) {
            return Some(Yarn {
                freq_scale: 1.0,
                ..y
            });
        }
        Some(y)
    }

    pub fn rope_base_for(&self, il: usize) -> f32 {
        if self.is_swa_layer(il) {
            self.rope_base_swa
        } else {
            self.rope_base
        }
    }

    /// Whether the query is multiplied by the attention scale after RoPE
    /// (and the scores then by 1), as llama.cpp's graph does for these
    /// architectures; the same product, in llama.cpp's float order.
    /// Whether layer `il` rotates Q and K (SmolLM3 leaves every 4th
    /// layer without position encoding).
    pub fn rope_in_layer(&self, il: usize) -> bool {
        self.arch != Arch::Smollm3 || !(il + 1).is_multiple_of(4)
    }

    pub fn prescale_q(&self) -> bool {
        matches!(
            self.arch,
            Arch::Gemma | Arch::Gemma2 | Arch::Gemma3 | Arch::Phi3
        )
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Reads the config from metadata; `vocab` comes from the embedding table
    /// when the tokenizer array is absent.
    pub fn from_metadata(m: &Metadata, vocab_from_tensors: Option<usize>) -> Result<Self> {
        let arch_name = m.get_str("general.architecture")?;
        let arch = Arch::from_name(arch_name)?;
        let a = arch.name();
        let k = |s: &str| format!("{a}.{s}");
        let usize_of = |key: String| -> Result<usize> { Ok(m.get_u64(&key)? as usize) };
        let d_model = usize_of(k("embedding_length"))?;
        let n_heads = usize_of(k("attention.head_count"))?;
        let n_kv_heads = match m.opt_u64(&k("attention.head_count_kv"))? {
            Some(v) => v as usize,
            None => n_heads,
        };
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(ModelError::BadConfig(format!(
                "{n_heads} attention heads / {n_kv_heads} KV heads: heads must be a positive multiple of KV heads"
            )));
        }
        let head_dim = match m.opt_u64(&k("attention.key_length"))? {
            Some(v) => v as usize,
            None => d_model / n_heads,
        };
        let head_dim_v = match m.opt_u64(&k("attention.value_length"))? {
            Some(v) => v as usize,
            None => head_dim,
        };
        if head_dim != head_dim_v {
            return Err(ModelError::BadConfig(format!(
                "key length {head_dim} != value length {head_dim_v} is not supported"
            )));
        }
        let vocab = match m.opt_array("tokenizer.ggml.tokens")? {
            Some(t) => t.len(),
            None => vocab_from_tensors.ok_or_else(|| {
                ModelError::BadConfig("no tokenizer.ggml.tokens and no embedding table".into())
            })?,
        };
        let rope_dims = match m.opt_u64(&k("rope.dimension_count"))? {
            Some(v) => v as usize,
            None => head_dim,
        };
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "rope dimension count {rope_dims} must be even and at most the head size {head_dim}"
            )));
        }
        let rope_base = m.opt_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0);
        let norm = match arch {
            Arch::CommandR => NormKind::Layer,
            _ => NormKind::Rms,
        };
        let rms_eps = match norm {
            NormKind::Rms => m
                .opt_f32(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            NormKind::Layer => m.get_f32(&k("attention.layer_norm_epsilon"))?,
        };
        let (rope_layout, ffn_act) = match arch {
            Arch::Llama | Arch::Granite | Arch::Smollm3 | Arch::CommandR | Arch::Mistral3 => {
                (RopeLayout::Normal, FfnAct::Silu)
            }
            Arch::Qwen2
            | Arch::Qwen2Moe
            | Arch::Qwen3
            | Arch::Qwen3Moe
            | Arch::Phi3
            | Arch::Olmo2 => (RopeLayout::Neox, FfnAct::Silu),
            Arch::Gemma | Arch::Gemma2 | Arch::Gemma3 => (RopeLayout::Neox, FfnAct::Gelu),
            Arch::GptOss => (RopeLayout::Neox, FfnAct::SwigluOai),
        };
        // Gemma 3 (llama.cpp `llama-model.cpp`, LLM_ARCH_GEMMA3): every 6th
        // layer is global, the others use the sliding window with rope base
        // 10,000; queries are scaled by 1/sqrt(head_dim) except for the 27B
        // model (62 layers), which uses 1/sqrt(d_model / n_heads).
        let n_layers = usize_of(k("block_count"))?;
        let norm_placement = match arch {
            Arch::Olmo2 => NormPlacement::Post,
            Arch::CommandR => NormPlacement::Parallel,
            _ => NormPlacement::Pre,
        };
        // Command-R: llama.cpp reads per-head Q/K norms only in models of
        // 64 layers or more (`models/command-r.cpp`).
        let qk_norm = match arch {
            Arch::Gemma3 | Arch::Qwen3 | Arch::Qwen3Moe => QkNorm::Head,
            Arch::Olmo2 => QkNorm::Whole,
            Arch::CommandR if n_layers >= 64 => QkNorm::HeadWeights,
            _ => QkNorm::None,
        };
        if matches!(arch, Arch::Olmo2 | Arch::CommandR) && n_heads * head_dim != d_model {
            return Err(ModelError::BadConfig(format!(
                "{a}: {n_heads} heads of {head_dim} must make up the embedding width {d_model}"
            )));
        }
        if arch == Arch::Olmo2
            && m.opt_u64(&k("attention.sliding_window"))?
                .is_some_and(|w| w > 0)
        {
            return Err(ModelError::BadConfig(
                "olmo2 with a sliding window (Olmo 3) is not supported yet".into(),
            ));
        }
        let (sliding_window, swa_period, rope_base_swa, embed_scale, attn_scale) = match arch {
            Arch::Gemma3 => {
                let swa = m
                    .opt_u64(&k("attention.sliding_window"))?
                    .map(|v| v as usize);
                let scale = if n_layers == 62 {
                    1.0 / ((d_model / n_heads) as f32).sqrt()
                } else {
                    1.0 / (head_dim as f32).sqrt()
                };
                (swa, 6, 10_000.0, (d_model as f32).sqrt(), scale)
            }
            // Gemma 2 (llama.cpp `models/gemma2.cpp`): even layers windowed
            // (4096 unless the file says), the same rope base for both.
            Arch::Gemma2 => {
                let swa = m
                    .opt_u64(&k("attention.sliding_window"))?
                    .map_or(4096, |v| v as usize);
                let scale = if n_layers == 46 {
                    1.0 / ((d_model / n_heads) as f32).sqrt()
                } else {
                    1.0 / (head_dim as f32).sqrt()
                };
                let base_swa = m.opt_f32(&k("rope.freq_base_swa"))?.unwrap_or(rope_base);
                (Some(swa), 2, base_swa, (d_model as f32).sqrt(), scale)
            }
            // Gemma (llama.cpp `models/gemma.cpp`): the embedding scaled by
            // sqrt(d_model), the query by 1/sqrt(head_dim); no window.
            Arch::Gemma => (
                None,
                0,
                rope_base,
                (d_model as f32).sqrt(),
                1.0 / (head_dim as f32).sqrt(),
            ),
            // gpt-oss (llama.cpp `models/openai-moe.cpp`): the window is
            // required; every `attention.sliding_window_pattern`-th layer
            // (2 unless the file says) is global, the others windowed; the
            // same rope base unless the file gives one for them.
            Arch::GptOss => {
                let key = k("attention.sliding_window_pattern");
                if m.get(&key).is_some_and(|v| v.as_array().is_some()) {
                    return Err(ModelError::BadConfig(format!(
                        "gpt-oss with a per-layer {key} array is not supported yet (a period is)"
                    )));
                }
                let period = match m.opt_u64(&key)? {
                    None => 2,
                    Some(p) if p >= 2 => p as usize,
                    // llama.cpp: 0 windows every layer; 1 none, which its
                    // gpt-oss graph refuses.
                    Some(p) => {
                        return Err(ModelError::BadConfig(format!(
                            "gpt-oss with {key} = {p} is not supported (every n-th layer global, n >= 2)"
                        )))
                    }
                };
                let swa = usize_of(k("attention.sliding_window"))?;
                let base_swa = m.opt_f32(&k("rope.freq_base_swa"))?.unwrap_or(rope_base);
                (
                    (swa > 0).then_some(swa),
                    period,
                    base_swa,
                    1.0,
                    1.0 / (head_dim as f32).sqrt(),
                )
            }
            Arch::Granite => {
                let emb = m.opt_f32(&k("embedding_scale"))?.filter(|v| *v != 0.0);
                let att = m.opt_f32(&k("attention.scale"))?.filter(|v| *v != 0.0);
                (
                    None,
                    0,
                    rope_base,
                    emb.unwrap_or(1.0),
                    att.unwrap_or(1.0 / (head_dim as f32).sqrt()),
                )
            }
            _ => (None, 0, rope_base, 1.0, 1.0 / (head_dim as f32).sqrt()),
        };
        let (residual_scale, logit_scale) = match arch {
            Arch::Granite => (
                m.opt_f32(&k("residual_scale"))?
                    .filter(|v| *v != 0.0)
                    .unwrap_or(1.0),
                m.get_f32(&k("logit_scale"))?,
            ),
            // llama.cpp scales only by a non-zero `logit_scale`.
            Arch::CommandR => (
                1.0,
                m.opt_f32(&k("logit_scale"))?
                    .filter(|v| *v != 0.0)
                    .unwrap_or(1.0),
            ),
            _ => (1.0, 1.0),
        };
        if logit_scale == 0.0 || !logit_scale.is_finite() {
            return Err(ModelError::BadConfig(format!(
                "logit scale {logit_scale} (must be finite and non-zero)"
            )));
        }
        // Granite divides (llama.cpp scales by `1 / logit_scale`).
        let logit_mul = match arch {
            Arch::Granite => 1.0 / logit_scale,
            _ => logit_scale,
        };
        let final_logit_softcap = match arch {
            // Without a sliding window llama.cpp builds the non-iSWA Gemma 3
            // graph, which caps the final logits.
            Arch::Gemma3 if sliding_window.is_none() => m
                .opt_f32(&k("final_logit_softcapping"))?
                .filter(|v| *v > 0.0),
            Arch::Gemma2 => {
                Some(m.opt_f32(&k("final_logit_softcapping"))?.unwrap_or(30.0)).filter(|v| *v > 0.0)
            }
            _ => None,
        };
        let attn_logit_softcap = match arch {
            Arch::Gemma2 => {
                Some(m.opt_f32(&k("attn_logit_softcapping"))?.unwrap_or(50.0)).filter(|v| *v > 0.0)
            }
            _ => None,
        };
        let (n_expert, n_expert_used, ffn) = match arch {
            Arch::Qwen3Moe | Arch::Qwen2Moe | Arch::GptOss => {
                let ne = usize_of(k("expert_count"))?;
                let nu = usize_of(k("expert_used_count"))?;
                if ne == 0 || nu == 0 || nu > ne {
                    return Err(ModelError::BadConfig(format!(
                        "{nu} experts used of {ne}: need 0 < used <= count"
                    )));
                }
                (ne, nu, usize_of(k("expert_feed_forward_length"))?)
            }
            // Mixtral-style llama MoE: `feed_forward_length` is one expert's.
            Arch::Llama if m.opt_u64(&k("expert_count"))?.unwrap_or(0) > 0 => {
                let ne = usize_of(k("expert_count"))?;
                let nu = usize_of(k("expert_used_count"))?;
                if nu == 0 || nu > ne {
                    return Err(ModelError::BadConfig(format!(
                        "{nu} experts used of {ne}: need 0 < used <= count"
                    )));
                }
                (ne, nu, usize_of(k("feed_forward_length"))?)
            }
            _ => (0, 0, usize_of(k("feed_forward_length"))?),
        };
        let n_ctx_train = usize_of(k("context_length"))?;
        let yarn = read_rope_scaling(m, arch, n_ctx_train)?;
        let n_ctx_orig = match m.opt_u64(&k("rope.scaling.original_context_length"))? {
            Some(v) if v > 0 => v as usize,
            _ => n_ctx_train,
        };
        // Mistral 3 (llama.cpp `models/mistral3.cpp`): the query scaled by
        // position, over the floor of the original context.
        let attn_temp = match arch {
            Arch::Mistral3 => {
                let key = k("attention.temperature_scale");
                match m.opt_f32(&key)? {
                    None => None,
                    Some(0.0) => None,
                    Some(v) if v.is_finite() && n_ctx_orig > 0 => Some(AttnTemp {
                        scale: v,
                        floor: n_ctx_orig,
                    }),
                    Some(v) => {
                        return Err(ModelError::BadConfig(format!(
                            "{key} = {v} (must be finite, over a positive original context)"
                        )))
                    }
                }
            }
            _ => None,
        };
        if arch == Arch::Mistral3 && m.opt_u64(&k("expert_count"))?.unwrap_or(0) > 0 {
            return Err(ModelError::BadConfig(
                "mistral3 with experts (mistral3.expert_count) is not supported yet".into(),
            ));
        }
        Ok(Config {
            arch,
            name: m.opt_str("general.name")?.unwrap_or("").to_string(),
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            head_dim_v,
            ffn,
            vocab,
            context: n_ctx_train,
            n_ctx_orig,
            rms_eps,
            norm,
            norm_placement,
            qk_norm,
            rope_base,
            rope_base_swa,
            rope_dims,
            rope_layout,
            ffn_act,
            sliding_window,
            swa_period,
            embed_scale,
            attn_scale,
            final_logit_softcap,
            attn_logit_softcap,
            residual_scale,
            logit_mul,
            n_expert,
            n_expert_used,
            moe_norm_weights: !matches!(arch, Arch::Qwen2Moe | Arch::GptOss),
            ffn_shared: match arch {
                Arch::Qwen2Moe => match m.opt_u64(&k("expert_shared_feed_forward_length"))? {
                    Some(v) => v as usize,
                    None => usize_of(k("feed_forward_length"))?,
                },
                _ => 0,
            },
            moe_gating: match arch {
                Arch::GptOss => MoeGating::SoftmaxSelected,
                _ => MoeGating::Softmax,
            },
            yarn,
            attn_temp,
            rope_ctx: n_ctx_train.div_ceil(256).saturating_mul(256),
        })
    }
}

/// The `rope.scaling.yarn_*` keys llama.cpp reads for an architecture
/// (`models/*.cpp`, `load_arch_hparams`): only Grok reads all of them,
/// DeepSeek 2 the log multiplier, Mistral 3 the betas and the log
/// multiplier. Every other architecture leaves them at their defaults
/// whatever the file says (the converter writes the betas and factors of
/// any YaRN model), and so does tl.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct YarnKeys {
    /// `yarn_ext_factor`: the ramp's mix; negative means "from the
    /// scaling type" (1 for YaRN, else 0).
    pub ext_factor: Option<f32>,
    /// `yarn_attn_factor`: the magnitude factor where `ext_factor` is 0
    /// (with a ramp llama.cpp derives its own and this is unused).
    pub attn_factor: Option<f32>,
    pub beta_fast: Option<f32>,
    pub beta_slow: Option<f32>,
    /// `yarn_log_multiplier`: HF's `mscale_all_dim` (Mistral 3 stores it
    /// as is; DeepSeek 2's converter stores 0.1 times it).
    pub log_multiplier: Option<f32>,
}

impl YarnKeys {
    /// The keys (after `{arch}.rope.scaling.`) llama.cpp reads for `arch`.
    pub fn read_by(arch: Arch) -> &'static [&'static str] {
        match arch {
            Arch::Mistral3 => &["yarn_beta_fast", "yarn_beta_slow", "yarn_log_multiplier"],
            _ => &[],
        }
    }

    /// Reads the keys llama.cpp reads for `arch`.
    pub fn read(m: &Metadata, arch: Arch) -> Result<Self> {
        Self::read_keys(m, arch.name(), Self::read_by(arch))
    }

    /// Reads `names` (of the five `yarn_*` keys) under `{arch}.rope.scaling.`,
    /// each checked: a value that would make the rotation meaningless is
    /// an error naming the key. A negative `yarn_ext_factor` means "not
    /// set", as in llama.cpp.
    pub fn read_keys(m: &Metadata, arch: &str, names: &[&str]) -> Result<Self> {
        let mut y = YarnKeys::default();
        for &name in names {
            let key = format!("{arch}.rope.scaling.{name}");
            let Some(v) = m.opt_f32(&key)? else {
                continue;
            };
            let (slot, ok, what) = match name {
                "yarn_ext_factor" => (
                    &mut y.ext_factor,
                    v <= 1.0,
                    "the ramp's mix: 0 to 1, or negative for the scaling type's",
                ),
                "yarn_attn_factor" => (&mut y.attn_factor, v > 0.0, "must be positive"),
                "yarn_beta_fast" => (&mut y.beta_fast, v > 0.0, "must be positive"),
                "yarn_beta_slow" => (&mut y.beta_slow, v > 0.0, "must be positive"),
                "yarn_log_multiplier" => (
                    &mut y.log_multiplier,
                    v >= 0.0,
                    "must be 0 (off) or positive",
                ),
                other => {
                    return Err(ModelError::BadConfig(format!(
                        "{arch}.rope.scaling.{other} is not a YaRN key"
                    )))
                }
            };
            if !(v.is_finite() && ok) {
                return Err(ModelError::BadConfig(format!("{key} = {v} ({what})")));
            }
            *slot = Some(v);
        }
        y.ext_factor = y.ext_factor.filter(|v| *v >= 0.0);
        let (fast, slow) = (y.beta_fast.unwrap_or(32.0), y.beta_slow.unwrap_or(1.0));
        if fast < slow {
            return Err(ModelError::BadConfig(format!(
                "{arch}.rope.scaling.yarn_beta_fast = {fast} is below \
                 {arch}.rope.scaling.yarn_beta_slow = {slow} (the fast boundary is the higher)"
            )));
        }
        Ok(y)
    }
}

/// The RoPE scaling of a file, as llama.cpp's context derives it from the
/// metadata (`llama-context.cpp`) for ggml's `rope_ext`; `None` where
/// RoPE runs unscaled.
///
/// `freq_scale` is `1 / rope.scaling.factor` (1 for type `none`);
/// `ext_factor` the file's `yarn_ext_factor` where the architecture reads
/// it ([`YarnKeys`]), else 1 for `rope.scaling.type = yarn` and 0 for the
/// others. With a ramp (`ext_factor` non-zero) the magnitude factor is
/// `get_mscale(factor, 1)`, or with a log multiplier `L` (Mistral 3)
/// `get_mscale(factor, 1) / get_mscale(factor, L)`, where
/// `get_mscale(s, m) = 1 + 0.1 m ln s` (1 for s <= 1); then divided by
/// `1 + 0.1 ln factor`, which ggml's rope multiplies back. Without a ramp
/// it is `yarn_attn_factor` (1 unless read). Either way it is then
/// multiplied by `rope.scaling.attn_factor` (Phi-3's LongRoPE files carry
/// one: cos and sin, so Q and K, are scaled by it). `beta_fast` and
/// `beta_slow` are 32 and 1 unless read; `n_ctx_orig` comes from
/// `rope.scaling.original_context_length` (the training context when
/// absent).
///
/// Linear scaling (`rope.scaling.type = linear`, also llama.cpp's default
/// when only a factor is given): the angles times `1 / factor`, no ramp.
/// Other types are refused rather than ignored.
fn read_rope_scaling(m: &Metadata, arch: Arch, n_ctx_train: usize) -> Result<Option<Yarn>> {
    let a = arch.name();
    let k = |s: &str| format!("{a}.{s}");
    let keys = YarnKeys::read(m, arch)?;
    let n_ctx_orig = match m.opt_u64(&k("rope.scaling.original_context_length"))? {
        Some(v) if v > 0 => v as usize,
        _ => n_ctx_train,
    };
    let rope_attn_factor = m.opt_f32(&k("rope.scaling.attn_factor"))?.unwrap_or(1.0);
    if !(rope_attn_factor.is_finite() && rope_attn_factor > 0.0) {
        return Err(ModelError::BadConfig(format!(
            "{} = {rope_attn_factor} (must be positive)",
            k("rope.scaling.attn_factor")
        )));
    }
    // (`rope.scale_linear`: the older name of the factor.)
    let factor = match m.opt_f32(&k("rope.scaling.factor"))? {
        Some(f) => f,
        None => m.opt_f32(&k("rope.scale_linear"))?.unwrap_or(0.0),
    };
    let kind = m.opt_str(&k("rope.scaling.type"))?;
    let yarn_type = match kind {
        Some("yarn") => true,
        None | Some("linear") | Some("none") => false,
        Some(other) => {
            return Err(ModelError::BadConfig(format!(
                "{} {other:?} (factor {factor}) is not supported yet (linear and yarn are)",
                k("rope.scaling.type")
            )))
        }
    };
    let freq_scale = if factor == 0.0 || kind == Some("none") {
        1.0
    } else {
        1.0 / factor
    };
    if !(freq_scale.is_finite() && freq_scale > 0.0) {
        return Err(ModelError::BadConfig(format!(
            "{} {factor} (must be positive)",
            k("rope.scaling.factor")
        )));
    }
    let ext_factor = keys.ext_factor.unwrap_or(if yarn_type { 1.0 } else { 0.0 });
    let attn_factor = if ext_factor != 0.0 {
        let get_mscale = |scale: f32, mscale: f32| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * mscale * scale.ln() + 1.0
            }
        };
        let factor = 1.0 / freq_scale;
        let mut f = match keys.log_multiplier {
            Some(l) if l != 0.0 => get_mscale(factor, 1.0) / get_mscale(factor, l),
            _ => get_mscale(factor, 1.0),
        };
        f *= 1.0 / (1.0 + 0.1 * factor.ln());
        f
    } else {
        keys.attn_factor.unwrap_or(1.0)
    } * rope_attn_factor;
    let yarn = Yarn {
        freq_scale,
        n_ctx_orig,
        ext_factor,
        attn_factor,
        beta_fast: keys.beta_fast.unwrap_or(32.0),
        beta_slow: keys.beta_slow.unwrap_or(1.0),
    };
    // Unscaled, unramped and unit magnitude: plain RoPE.
    let plain = freq_scale == 1.0 && ext_factor == 0.0 && attn_factor == 1.0;
    Ok((!plain).then_some(yarn))
}
