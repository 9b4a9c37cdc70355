//! The [`Backend`] trait: the ops a transformer forward pass needs, one
//! implementation per device.
//!
//! Every op has an `_into` form that writes into a caller-provided output
//! (contiguous, of exactly the result's shape and dtype, sharing no storage
//! with the inputs), so a decode step can run on buffers allocated once.
//! Ops that the forward pass applies to a buffer it owns also have an
//! `_inplace` form. The plain-named forms allocate their output and exist
//! for convenience and tests.
//!
//! Shape and dtype rules of each op live in [`checks`], shared by all
//! backends so that they reject exactly the same inputs with the same errors.

pub mod checks;

use std::fmt;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;

/// Elementwise binary ops (with numpy broadcasting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Mul,
}

/// Activation functions of feed-forward blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (llama, qwen2).
    Silu,
    /// GELU, tanh approximation as ggml computes it (gemma).
    Gelu,
}

/// Elementwise unary ops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Act(Activation),
    /// Multiply by a constant.
    Scale(f32),
}

/// Which dimensions RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs `(x[2i], x[2i+1])` (llama; ggml `GGML_ROPE_TYPE_NORMAL`).
    Normal,
    /// Halves `(x[i], x[i + n_rot/2])` (qwen2, gemma; ggml `GGML_ROPE_TYPE_NEOX`).
    Neox,
}

/// Rotary position embedding parameters, read from GGUF metadata.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub mode: RopeMode,
    /// Leading dims of each head that rotate (`rope.dimension_count`); the
    /// rest pass through. Even, at most the head dim.
    pub n_rot: usize,
    /// `rope.freq_base`: pair `i` turns by `pos * base^(-2i/n_rot)`.
    pub base: f32,
    /// Linear position scaling (`1 / rope.scaling.factor`); 1 for none.
    pub freq_scale: f32,
}

impl RopeConfig {
    pub fn new(mode: RopeMode, n_rot: usize, base: f32) -> Self {
        RopeConfig {
            mode,
            n_rot,
            base,
            freq_scale: 1.0,
        }
    }
}

/// The ops of one device.
///
/// The trait is object-safe and models hold a `&dyn Backend` (or an
/// `Arc<dyn Backend>`): the device is picked at run time from a flag, and a
/// generic parameter would run through every model, the engine and the
/// server and compile each of them once per backend. The price, one
/// indirect call per op, is a few nanoseconds against ops that take
/// microseconds or more, and a few hundred ops per token.
///
/// Tensors are passed by reference and their dtypes checked at run time for
/// the same reason: a weight's dtype comes from the model file.
pub trait Backend: Send + Sync + fmt::Debug {
    fn device(&self) -> Device;

    /// A zero-filled tensor on this backend's device.
    fn zeros(&self, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        Tensor::zeros(dtype, dims, self.device())
    }

    /// `out[i, j] = Σ_p x[i, p] · w[j, p]`: f32 activations `x [m, k]`
    /// against a weight `w [n, k]` of any dtype (f32, f16, bf16, GGML block
    /// formats), stored one output feature per row as in GGUF. `out` is f32
    /// `[m, n]`.
    fn matmul_into(&self, x: &Tensor, w: &Tensor, out: &mut Tensor) -> Result<()>;

    /// Plain f32 matrix product `[.., m, k] × [.., k, n] → [.., m, n]` with
    /// equal leading (batch) dims; both inputs may be strided (transposed,
    /// broadcast), so `q · kᵀ` needs no copy.
    fn matmul_f32_into(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `out = a op b`, f32, with `a` and `b` broadcast to `out`'s shape.
    fn binary_into(&self, op: BinaryOp, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `x = x op y`, with `y` broadcast to `x`'s shape.
    fn binary_inplace(&self, op: BinaryOp, x: &mut Tensor, y: &Tensor) -> Result<()>;

    /// `out = op(x)`, f32.
    fn unary_into(&self, op: UnaryOp, x: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `x = op(x)`.
    fn unary_inplace(&self, op: UnaryOp, x: &mut Tensor) -> Result<()>;

    /// The gated feed-forward product `out = act(gate) * up` (same shapes).
    fn gated_into(
        &self,
        act: Activation,
        gate: &Tensor,
        up: &Tensor,
        out: &mut Tensor,
    ) -> Result<()>;

    /// `gate = act(gate) * up`.
    fn gated_inplace(&self, act: Activation, gate: &mut Tensor, up: &Tensor) -> Result<()>;

    /// RMS norm over the last dim (llama.cpp semantics):
    /// `out = x / sqrt(mean(x²) + eps) * w`, `w` f32 of the last dim's size.
    fn rms_norm_into(&self, x: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()>;

    /// Layer norm over the last dim: `(x - mean) / sqrt(var + eps) * w + b`
    /// (population variance); `w` and `b` are optional.
    fn layer_norm_into(
        &self,
        x: &Tensor,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()>;

    /// Softmax over the last dim. With `causal = Some(offset)`, row `i` of
    /// each `[rows, cols]` matrix (the last two dims) sees only columns
    /// `≤ i + offset`; the others come out 0.
    fn softmax_into(&self, x: &Tensor, causal: Option<usize>, out: &mut Tensor) -> Result<()>;

    /// [`Backend::softmax_into`] in place.
    fn softmax_inplace(&self, x: &mut Tensor, causal: Option<usize>) -> Result<()>;

    /// Rotary position embedding of `x [n_tokens, n_heads, head_dim]`;
    /// token `t` sits at `positions[t]` (i32 `[n_tokens]`). `freq_factors`
    /// (f32, at least `n_rot / 2`; llama 3's `rope_freqs.weight`) divide
    /// each pair's angle.
    fn rope_into(
        &self,
        x: &Tensor,
        positions: &Tensor,
        freq_factors: Option<&Tensor>,
        cfg: &RopeConfig,
        out: &mut Tensor,
    ) -> Result<()>;

    /// [`Backend::rope_into`] in place.
    fn rope_inplace(
        &self,
        x: &mut Tensor,
        positions: &Tensor,
        freq_factors: Option<&Tensor>,
        cfg: &RopeConfig,
    ) -> Result<()>;

    /// Rows `ids` (i32 `[n]`) of `table [vocab, d]` (any weight dtype) as
    /// f32 `[n, d]`; only the requested rows are dequantized.
    fn embedding_into(&self, table: &Tensor, ids: &Tensor, out: &mut Tensor) -> Result<()>;

    /// Index of the largest value along the last dim (the first on ties),
    /// as i32 with the last dim dropped.
    fn argmax_into(&self, x: &Tensor, out: &mut Tensor) -> Result<()>;

    // Allocating and named forms.

    fn matmul(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, &checks::matmul_dims(x, w)?)?;
        self.matmul_into(x, w, &mut out)?;
        Ok(out)
    }

    fn matmul_f32(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, checks::matmul_f32_dims(a, b)?.dims())?;
        self.matmul_f32_into(a, b, &mut out)?;
        Ok(out)
    }

    fn binary(&self, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, checks::binary_dims(op, a, b)?.dims())?;
        self.binary_into(op, a, b, &mut out)?;
        Ok(out)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Add, a, b)
    }

    fn add_into(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
        self.binary_into(BinaryOp::Add, a, b, out)
    }

    fn add_inplace(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        self.binary_inplace(BinaryOp::Add, x, y)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Mul, a, b)
    }

    fn mul_into(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
        self.binary_into(BinaryOp::Mul, a, b, out)
    }

    fn mul_inplace(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        self.binary_inplace(BinaryOp::Mul, x, y)
    }

    fn unary(&self, op: UnaryOp, x: &Tensor) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, x.dims())?;
        self.unary_into(op, x, &mut out)?;
        Ok(out)
    }

    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Scale(s), x)
    }

    fn scale_into(&self, x: &Tensor, s: f32, out: &mut Tensor) -> Result<()> {
        self.unary_into(UnaryOp::Scale(s), x, out)
    }

    fn scale_inplace(&self, x: &mut Tensor, s: f32) -> Result<()> {
        self.unary_inplace(UnaryOp::Scale(s), x)
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        self.unary(UnaryOp::Act(Activation::Silu), x)
    }

    fn silu_into(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        self.unary_into(UnaryOp::Act(Activation::Silu), x, out)
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.unary(UnaryOp::Act(Activation::Gelu), x)
    }

    fn gelu_into(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        self.unary_into(UnaryOp::Act(Activation::Gelu), x, out)
    }

    fn gated(&self, act: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, checks::gated_dims(gate, up)?.dims())?;
        self.gated_into(act, gate, up, &mut out)?;
        Ok(out)
    }

    /// `silu(a) * b`.
    fn silu_mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.gated(Activation::Silu, a, b)
    }

    fn silu_mul_into(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
        self.gated_into(Activation::Silu, a, b, out)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, x.dims())?;
        self.rms_norm_into(x, w, eps, &mut out)?;
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, x.dims())?;
        self.layer_norm_into(x, w, b, eps, &mut out)?;
        Ok(out)
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, x.dims())?;
        self.softmax_into(x, None, &mut out)?;
        Ok(out)
    }

    /// Causal softmax: row `i` sees columns `≤ i + offset`.
    fn softmax_causal(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, x.dims())?;
        self.softmax_into(x, Some(offset), &mut out)?;
        Ok(out)
    }

    fn softmax_causal_into(&self, x: &Tensor, offset: usize, out: &mut Tensor) -> Result<()> {
        self.softmax_into(x, Some(offset), out)
    }

    fn softmax_causal_inplace(&self, x: &mut Tensor, offset: usize) -> Result<()> {
        self.softmax_inplace(x, Some(offset))
    }

    fn rope(
        &self,
        x: &Tensor,
        positions: &Tensor,
        freq_factors: Option<&Tensor>,
        cfg: &RopeConfig,
    ) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, x.dims())?;
        self.rope_into(x, positions, freq_factors, cfg, &mut out)?;
        Ok(out)
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let mut out = self.zeros(DType::F32, &checks::embedding_dims(table, ids)?)?;
        self.embedding_into(table, ids, &mut out)?;
        Ok(out)
    }

    fn argmax(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = self.zeros(DType::I32, checks::argmax_dims(x)?.dims())?;
        self.argmax_into(x, &mut out)?;
        Ok(out)
    }
}

// The trait must stay usable as `dyn Backend`.
const _: Option<&dyn Backend> = None;
