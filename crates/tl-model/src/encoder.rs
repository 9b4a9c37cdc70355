//! Encoder (embedding) models: `bert` and `nomic-bert`, as llama.cpp's
//! `models/bert.cpp` builds them.
//!
//! An encoder has no KV cache and no LM head: every token of a sequence
//! attends to every other (non-causal attention), and the output is the
//! last hidden state pooled per sequence (`<arch>.pooling_type`: mean,
//! CLS, last, or none for one vector per token), optionally L2-normalised
//! as llama.cpp's embedding example does. The layout differs enough from
//! the decoder forward of [`crate::forward`] (post-LayerNorms with biases,
//! an embedding LayerNorm, position and token-type tables, whole sequences
//! at once) that it is its own forward here, with its own typed config; the
//! two architectures differ only in data read once at load:
//!
//! - `bert`: learned position embeddings, separate Q/K/V with biases, a
//!   GELU FFN (`ffn_up` → GELU → `ffn_down`, with biases).
//! - `nomic-bert`: NeoX RoPE instead of position embeddings, fused
//!   `attn_qkv`, a SwiGLU FFN (`silu(ffn_gate) · ffn_up` → `ffn_down`).
//!
//! Both: token embedding + token-type row 0 (llama.cpp hard-codes "sentence
//! A") + position, an embedding LayerNorm (`token_embd_norm`), then per
//! layer `x = LN(x + attn(x))`, `x = LN(x + ffn(x))` (LayerNorms with
//! weight and bias, epsilon `<arch>.attention.layer_norm_epsilon`).
//!
//! The forward runs on the CPU; a CUDA device is refused before anything
//! touches the GPU.

use tl_core::cpu::kernels;
use tl_core::{Device, RopeMode};
use tl_gguf::GgufFile;

use crate::error::{ModelError, Result};
use crate::ops;
use crate::weights::{Loader, Weight};

/// Encoder architectures (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderArch {
    Bert,
    NomicBert,
}

/// The encoder architectures, as README lists them.
pub const ENCODER_ARCHS: &str = "bert, nomic-bert";

impl EncoderArch {
    /// The encoder architecture named `name`, or `None` for any other.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "bert" => Some(Self::Bert),
            "nomic-bert" => Some(Self::NomicBert),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::NomicBert => "nomic-bert",
        }
    }
}

/// How token states become one vector per sequence (llama.cpp
/// `llama_pooling_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// No pooling: one vector per token.
    None,
    /// The mean over the sequence's tokens.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
    /// The last token's state.
    Last,
}

impl Pooling {
    /// From the GGUF value of `<arch>.pooling_type`.
    pub fn from_gguf(v: u64) -> Result<Self> {
        match v {
            0 => Ok(Self::None),
            1 => Ok(Self::Mean),
            2 => Ok(Self::Cls),
            3 => Ok(Self::Last),
            4 => Err(ModelError::BadConfig(
                "pooling type 4 (rank, a reranker's classifier head) is not supported".into(),
            )),
            other => Err(ModelError::BadConfig(format!(
                "unknown pooling type {other} (0 none, 1 mean, 2 cls, 3 last)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Mean => "mean",
            Self::Cls => "cls",
            Self::Last => "last",
        }
    }
}

/// How positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PositionKind {
    /// A learned table (`position_embd.weight`) added to the embeddings.
    Learned,
    /// NeoX RoPE on Q and K (`rope.dimension_count` dims, `rope.freq_base`).
    Rope { dims: usize, base: f32 },
}

/// The FFN of every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderFfn {
    /// `down(gelu(up(x)))` with biases where present (bert).
    Gelu,
    /// `down(silu(gate(x)) · up(x))` (nomic-bert).
    SwiGlu,
}

/// Everything the encoder forward needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    pub arch: EncoderArch,
    pub name: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Longest sequence (`context_length`; the position table's rows).
    pub context: usize,
    pub eps: f32,
    pub pooling: Pooling,
    pub positions: PositionKind,
    pub ffn_kind: EncoderFfn,
}

impl EncoderConfig {
    pub fn from_metadata(m: &tl_gguf::Metadata) -> Result<Self> {
        let arch_name = m.get_str("general.architecture")?;
        let arch = EncoderArch::from_name(arch_name).ok_or_else(|| {
            ModelError::BadConfig(format!(
                "'{arch_name}' is not an embedding model (embedding architectures: {ENCODER_ARCHS})"
            ))
        })?;
        let a = arch.name();
        let k = |s: &str| format!("{a}.{s}");
        let us = |key: String| -> Result<usize> { Ok(m.get_u64(&key)? as usize) };
        let d_model = us(k("embedding_length"))?;
        let n_heads = us(k("attention.head_count"))?;
        if n_heads == 0 || d_model % n_heads != 0 {
            return Err(ModelError::BadConfig(format!(
                "{a}: {n_heads} attention heads do not divide the embedding width {d_model}"
            )));
        }
        if let Some(kv) = m.opt_u64(&k("attention.head_count_kv"))? {
            if kv as usize != n_heads {
                return Err(ModelError::BadConfig(format!(
                    "{a}: {kv} KV heads for {n_heads} heads (grouped-query attention) is not supported"
                )));
            }
        }
        if m.opt_bool(&k("attention.causal"))? == Some(true) {
            return Err(ModelError::BadConfig(format!(
                "{a}: causal attention ({a}.attention.causal = true) is not supported for encoders"
            )));
        }
        let head_dim = d_model / n_heads;
        let vocab = m.get_array("tokenizer.ggml.tokens")?.len();
        // Absent, llama.cpp pools nothing (one vector per token).
        let pooling = match m.opt_u64(&k("pooling_type"))? {
            Some(v) => Pooling::from_gguf(v)?,
            None => Pooling::None,
        };
        let (positions, ffn_kind) = match arch {
            EncoderArch::Bert => (PositionKind::Learned, EncoderFfn::Gelu),
            EncoderArch::NomicBert => {
                let dims = match m.opt_u64(&k("rope.dimension_count"))? {
                    Some(v) => v as usize,
                    None => head_dim,
                };
                if dims > head_dim || dims % 2 != 0 {
                    return Err(ModelError::BadConfig(format!(
                        "rope dimension count {dims} must be even and at most the head size {head_dim}"
                    )));
                }
                let base = m.opt_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0);
                (PositionKind::Rope { dims, base }, EncoderFfn::SwiGlu)
            }
        };
        Ok(EncoderConfig {
            arch,
            name: m.opt_str("general.name")?.unwrap_or("").to_string(),
            n_layers: us(k("block_count"))?,
            d_model,
            n_heads,
            head_dim,
            ffn: us(k("feed_forward_length"))?,
            vocab,
            context: us(k("context_length"))?,
            eps: m.get_f32(&k("attention.layer_norm_epsilon"))?,
            pooling,
            positions,
            ffn_kind,
        })
    }
}

/// A LayerNorm's weight and bias.
struct Ln {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Ln {
    fn apply(&self, x: &mut [f32], eps: f32) {
        kernels::layer_norm_row_inplace(x, &self.w, eps);
        x.iter_mut().zip(&self.b).for_each(|(v, b)| *v += b);
    }
}

struct EncLayer {
    wq: Weight,
    wk: Weight,
    wv: Weight,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: Weight,
    bo: Option<Vec<f32>>,
    attn_out_norm: Ln,
    up: Weight,
    up_b: Option<Vec<f32>>,
    gate: Option<Weight>,
    down: Weight,
    down_b: Option<Vec<f32>>,
    out_norm: Ln,
}

/// A loaded encoder model.
pub struct Encoder {
    pub config: EncoderConfig,
    file: GgufFile,
    token_embd: Weight,
    /// Token-type row 0, added to every token (when the model has types).
    type_row0: Option<Vec<f32>>,
    /// `context × d_model` learned positions (bert).
    pos_embd: Option<Vec<f32>>,
    embd_norm: Ln,
    layers: Vec<EncLayer>,
}

/// An encoder's config and weights, read from a file it does not own.
struct Parts {
    config: EncoderConfig,
    token_embd: Weight,
    type_row0: Option<Vec<f32>>,
    pos_embd: Option<Vec<f32>>,
    embd_norm: Ln,
    layers: Vec<EncLayer>,
}

/// Whether the file's architecture is an encoder (embedding) model.
pub fn is_encoder(file: &GgufFile) -> bool {
    file.metadata
        .opt_str("general.architecture")
        .ok()
        .flatten()
        .and_then(EncoderArch::from_name)
        .is_some()
}

fn vec_of(w: &Option<Weight>, f: &GgufFile) -> Result<Option<Vec<f32>>> {
    w.as_ref().map(|w| ops::vector(w, f)).transpose()
}

impl Encoder {
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Loads onto `device`; only the CPU runs encoders for now.
    pub fn load_on(path: impl AsRef<std::path::Path>, device: Device) -> Result<Self> {
        let file = GgufFile::open(path)?;
        if let Device::Cuda(_) = device {
            let c = EncoderConfig::from_metadata(&file.metadata)?;
            return Err(crate::cuda::refuse_encoder(c.arch.name()));
        }
        Self::from_file(file)
    }

    pub fn from_file(file: GgufFile) -> Result<Self> {
        let p = Self::read(&file)?;
        Ok(Encoder {
            config: p.config,
            token_embd: p.token_embd,
            type_row0: p.type_row0,
            pos_embd: p.pos_embd,
            embd_norm: p.embd_norm,
            layers: p.layers,
            file,
        })
    }

    /// Whether `file` loads as an encoder: the error names the missing or
    /// misshapen piece.
    pub fn check_file(file: &GgufFile) -> Result<()> {
        Self::read(file).map(|_| ())
    }

    fn read(file: &GgufFile) -> Result<Parts> {
        let c = EncoderConfig::from_metadata(&file.metadata)?;
        let l = Loader { file };
        let (d, f) = (c.d_model, c.ffn);
        let ln = |name: String| -> Result<Ln> {
            Ok(Ln {
                w: ops::vector(&l.get(&format!("{name}.weight"), &[d])?, file)?,
                b: ops::vector(&l.get(&format!("{name}.bias"), &[d])?, file)?,
            })
        };
        let token_embd = l.get("token_embd.weight", &[d, c.vocab])?;
        let type_row0 = match file.tensor("token_types.weight") {
            Some(t) => {
                let n_types = t.dims.get(1).copied().unwrap_or(1).max(1) as usize;
                let w = l.get("token_types.weight", &[d, n_types])?;
                let all = ops::vector(&w, file)?;
                Some(all[..d].to_vec())
            }
            None => None,
        };
        let pos_embd = match c.positions {
            PositionKind::Learned => Some(ops::vector(
                &l.get("position_embd.weight", &[d, c.context])?,
                file,
            )?),
            PositionKind::Rope { .. } => None,
        };
        let embd_norm = ln("token_embd_norm".into())?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let (wq, wk, wv, bq, bk, bv) = match l.opt(&n("attn_qkv.weight"), &[d, 3 * d])? {
                Some(fw) => {
                    let (bq, bk, bv) = match l.opt(&n("attn_qkv.bias"), &[3 * d])? {
                        Some(b) => {
                            let b = ops::vector(&b, file)?;
                            (
                                Some(b[..d].to_vec()),
                                Some(b[d..2 * d].to_vec()),
                                Some(b[2 * d..].to_vec()),
                            )
                        }
                        None => (None, None, None),
                    };
                    (
                        fw.row_range("q", 0, d),
                        fw.row_range("k", d, d),
                        fw.row_range("v", 2 * d, d),
                        bq,
                        bk,
                        bv,
                    )
                }
                None => (
                    l.get(&n("attn_q.weight"), &[d, d])?,
                    l.get(&n("attn_k.weight"), &[d, d])?,
                    l.get(&n("attn_v.weight"), &[d, d])?,
                    vec_of(&l.opt(&n("attn_q.bias"), &[d])?, file)?,
                    vec_of(&l.opt(&n("attn_k.bias"), &[d])?, file)?,
                    vec_of(&l.opt(&n("attn_v.bias"), &[d])?, file)?,
                ),
            };
            let gate = match c.ffn_kind {
                EncoderFfn::SwiGlu => Some(l.get(&n("ffn_gate.weight"), &[d, f])?),
                EncoderFfn::Gelu => None,
            };
            layers.push(EncLayer {
                wq,
                wk,
                wv,
                bq,
                bk,
                bv,
                wo: l.get(&n("attn_output.weight"), &[d, d])?,
                bo: vec_of(&l.opt(&n("attn_output.bias"), &[d])?, file)?,
                attn_out_norm: ln(n("attn_output_norm"))?,
                up: l.get(&n("ffn_up.weight"), &[d, f])?,
                up_b: vec_of(&l.opt(&n("ffn_up.bias"), &[f])?, file)?,
                gate,
                down: l.get(&n("ffn_down.weight"), &[f, d])?,
                down_b: vec_of(&l.opt(&n("ffn_down.bias"), &[d])?, file)?,
                out_norm: ln(n("layer_output_norm"))?,
            });
        }
        Ok(Parts {
            config: c,
            token_embd,
            type_row0,
            pos_embd,
            embd_norm,
            layers,
        })
    }

    /// The GGUF file (for the tokenizer).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Width of each output vector.
    pub fn n_embd(&self) -> usize {
        self.config.d_model
    }

    /// Runs the encoder over several sequences at once (every weight
    /// product over all their tokens together) and returns, per sequence,
    /// its pooled vector, or with [`Pooling::None`] its tokens' vectors
    /// one after another (`len × d_model`). With `normalize` each vector
    /// is divided by its Euclidean norm (llama.cpp `common_embd_normalize`
    /// with 2; a zero vector stays zero).
    pub fn embed(&self, seqs: &[&[u32]], normalize: bool) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let d = c.d_model;
        for (si, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(ModelError::EmptyPrompt(si));
            }
            if s.len() > c.context {
                return Err(ModelError::ContextOverflow {
                    needed: s.len(),
                    context: c.context,
                });
            }
            if let Some(&t) = s.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(ModelError::BadToken {
                    token: t,
                    vocab: c.vocab,
                });
            }
        }
        // (start row, length) of each sequence in the flattened batch.
        let mut spans = Vec::with_capacity(seqs.len());
        let mut n = 0;
        for s in seqs {
            spans.push((n, s.len()));
            n += s.len();
        }
        let mut x = vec![0f32; n * d];
        self.embed_tokens(seqs, &mut x)?;
        let mut act = tl_core::MatmulScratch::default();
        let mut q = vec![0f32; n * d];
        let mut k = vec![0f32; n * d];
        let mut v = vec![0f32; n * d];
        let mut att = vec![0f32; n * d];
        let mut o = vec![0f32; n * d];
        let mut up = vec![0f32; n * c.ffn];
        let mut gate = vec![0f32; n * c.ffn];
        let file = &self.file;
        for lw in &self.layers {
            for (w, out, b) in [
                (&lw.wq, &mut q, &lw.bq),
                (&lw.wk, &mut k, &lw.bk),
                (&lw.wv, &mut v, &lw.bv),
            ] {
                ops::linear(&x, n, w, w.bytes(file), out, &mut act)?;
                add_bias(out, b);
            }
            if let PositionKind::Rope { dims, base } = c.positions {
                let mut cs = vec![0f32; dims];
                for &(start, len) in &spans {
                    for p in 0..len {
                        kernels::rope_cache(p as f32, base, 1.0, None, &mut cs);
                        let r = (start + p) * d..(start + p + 1) * d;
                        for head in q[r.clone()].chunks_exact_mut(c.head_dim) {
                            kernels::rope_rotate(head, &cs, RopeMode::Neox);
                        }
                        for head in k[r].chunks_exact_mut(c.head_dim) {
                            kernels::rope_rotate(head, &cs, RopeMode::Neox);
                        }
                    }
                }
            }
            self.attention(&spans, &q, &k, &v, &mut att);
            ops::linear(&att, n, &lw.wo, lw.wo.bytes(file), &mut o, &mut act)?;
            add_bias(&mut o, &lw.bo);
            // x = LN(attn + x): the FFN's input.
            for (xr, or) in x.chunks_exact_mut(d).zip(o.chunks_exact(d)) {
                xr.iter_mut().zip(or).for_each(|(a, b)| *a += *b);
                lw.attn_out_norm.apply(xr, c.eps);
            }
            ops::linear(&x, n, &lw.up, lw.up.bytes(file), &mut up, &mut act)?;
            add_bias(&mut up, &lw.up_b);
            match (&lw.gate, c.ffn_kind) {
                (Some(g), EncoderFfn::SwiGlu) => {
                    ops::linear(&x, n, g, g.bytes(file), &mut gate, &mut act)?;
                    kernels::silu_mul(&mut gate, &up);
                    std::mem::swap(&mut gate, &mut up);
                }
                _ => up.iter_mut().for_each(|v| *v = kernels::gelu_ggml_cpu(*v)),
            }
            ops::linear(&up, n, &lw.down, lw.down.bytes(file), &mut o, &mut act)?;
            add_bias(&mut o, &lw.down_b);
            for (xr, or) in x.chunks_exact_mut(d).zip(o.chunks_exact(d)) {
                xr.iter_mut().zip(or).for_each(|(a, b)| *a += *b);
                lw.out_norm.apply(xr, c.eps);
            }
        }
        let mut out = Vec::with_capacity(seqs.len());
        for &(start, len) in &spans {
            let rows = &x[start * d..(start + len) * d];
            let mut vecs: Vec<Vec<f32>> = match c.pooling {
                Pooling::None => rows.chunks_exact(d).map(<[f32]>::to_vec).collect(),
                Pooling::Cls => vec![rows[..d].to_vec()],
                Pooling::Last => vec![rows[(len - 1) * d..].to_vec()],
                Pooling::Mean => {
                    let mut m = vec![0f32; d];
                    let inv = 1.0 / len as f32;
                    for r in rows.chunks_exact(d) {
                        m.iter_mut().zip(r).for_each(|(a, b)| *a += b * inv);
                    }
                    vec![m]
                }
            };
            if normalize {
                vecs.iter_mut().for_each(|v| l2_normalize(v));
            }
            out.push(vecs.concat());
        }
        Ok(out)
    }

    /// Token + type row 0 + position, then the embedding LayerNorm.
    fn embed_tokens(&self, seqs: &[&[u32]], x: &mut [f32]) -> Result<()> {
        let d = self.config.d_model;
        let emb = &self.token_embd;
        let eb = emb.bytes(&self.file);
        let rb = emb.row_bytes();
        let mut rows = x.chunks_exact_mut(d);
        for s in seqs {
            for (p, &t) in s.iter().enumerate() {
                let Some(row) = rows.next() else {
                    return Err(ModelError::BadConfig("embedding rows short".into()));
                };
                let t = t as usize;
                let bytes = eb.get(t * rb..(t + 1) * rb).unwrap_or(&[]);
                tl_core::quant::dequantize(emb.ty, bytes, row).map_err(|e| ModelError::Core {
                    tensor: emb.name.clone(),
                    err: e,
                })?;
                if let Some(ty) = &self.type_row0 {
                    row.iter_mut().zip(ty).for_each(|(a, b)| *a += b);
                }
                if let Some(pe) = &self.pos_embd {
                    let pr = &pe[p * d..(p + 1) * d];
                    row.iter_mut().zip(pr).for_each(|(a, b)| *a += *b);
                }
                self.embd_norm.apply(row, self.config.eps);
            }
        }
        Ok(())
    }

    /// Non-causal attention within each sequence: every query head over
    /// all keys of its own sequence, softmax of `q·k / sqrt(head_dim)`.
    /// One task per token on the matmul pool, each writing its own row.
    fn attention(
        &self,
        spans: &[(usize, usize)],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (d, hd) = (c.d_model, c.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        // The (start, length) of each token's sequence.
        let span_of: Vec<(usize, usize)> = spans
            .iter()
            .flat_map(|&sp| std::iter::repeat_n(sp, sp.1))
            .collect();
        let rows: Vec<std::sync::Mutex<&mut [f32]>> =
            out.chunks_mut(d).map(std::sync::Mutex::new).collect();
        tl_core::pool::ThreadPool::global().run(rows.len(), &|i| {
            let Some(&(start, len)) = span_of.get(i) else {
                return;
            };
            let Ok(mut row) = rows[i].lock() else {
                return;
            };
            let mut scores = vec![0f32; len];
            for h in 0..c.n_heads {
                let qh = &q[i * d + h * hd..i * d + (h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let kh = &k[(start + j) * d + h * hd..(start + j) * d + (h + 1) * hd];
                    let dot: f32 = qh.iter().zip(kh).map(|(a, b)| a * b).sum();
                    *s = dot * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f64;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += f64::from(*s);
                }
                let inv = (1.0 / sum) as f32;
                let oh = &mut row[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    let vh = &v[(start + j) * d + h * hd..(start + j) * d + (h + 1) * hd];
                    oh.iter_mut().zip(vh).for_each(|(o, &x)| *o += p * x);
                }
                oh.iter_mut().for_each(|o| *o *= inv);
            }
        });
    }
}

fn add_bias(x: &mut [f32], b: &Option<Vec<f32>>) {
    if let Some(b) = b {
        for row in x.chunks_exact_mut(b.len().max(1)) {
            row.iter_mut().zip(b).for_each(|(a, c)| *a += c);
        }
    }
}

/// `v / |v|` with the norm summed in f64 (llama.cpp `common_embd_normalize`
/// with 2); a zero vector stays zero.
pub fn l2_normalize(v: &mut [f32]) {
    let sum: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let norm = sum.sqrt();
    let inv = if norm > 0.0 { (1.0 / norm) as f32 } else { 0.0 };
    v.iter_mut().for_each(|x| *x *= inv);
}

/// An encoder with its tokenizer: text in, vectors out.
pub struct Embedder {
    pub encoder: Encoder,
    pub tokenizer: tl_tokenizer::Tokenizer,
}

impl Embedder {
    /// Loads an embedding model onto `device` (the CPU only for now).
    pub fn load_on(path: impl AsRef<std::path::Path>, device: Device) -> Result<Self> {
        let encoder = Encoder::load_on(path, device)?;
        let tokenizer = tl_tokenizer::Tokenizer::from_gguf(encoder.file())?;
        Ok(Embedder { encoder, tokenizer })
    }

    /// Tokenizes as llama.cpp's embedding path does: special tokens added
    /// ([CLS] … [SEP] for WordPiece), special-token text left as text.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(
            text,
            tl_tokenizer::EncodeOptions {
                add_special: true,
                parse_special: false,
            },
        )?)
    }

    /// Checks token sequences against the model before a forward: not
    /// empty, within the context, ids in the vocabulary. The error names
    /// the input (0-based) and what is wrong with it.
    pub fn check(&self, seqs: &[Vec<u32>]) -> std::result::Result<(), String> {
        let c = &self.encoder.config;
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(format!("input {i} has no tokens"));
            }
            if s.len() > c.context {
                return Err(format!(
                    "input {i} has {} tokens, more than the model's context of {}",
                    s.len(),
                    c.context
                ));
            }
            if let Some(&t) = s.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(format!(
                    "input {i}: token id {t} is outside the vocabulary of {}",
                    c.vocab
                ));
            }
        }
        Ok(())
    }

    /// Embeds token sequences in one batch (see [`Encoder::embed`]).
    pub fn embed(&self, seqs: &[Vec<u32>], normalize: bool) -> Result<Vec<Vec<f32>>> {
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        self.encoder.embed(&refs, normalize)
    }
}
