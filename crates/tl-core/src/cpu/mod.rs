//! The CPU backend: scalar reference kernels (`ops/`), run on the calling
//! thread. SIMD and multi-threaded versions come later and are held to
//! these by tests.
//!
//! Layout support, op by op: elementwise ops and the plain f32 matmul take
//! any strides (broadcast views included); row-wise ops (norms, softmax,
//! rope, argmax, the activations and weight of a weight matmul, embedding
//! tables) need a contiguous last dim and take any strides for the other
//! dims; 1-D parameters (norm weights, positions, ids, frequency factors)
//! must be contiguous. Outputs are contiguous. Anything else is an error,
//! never a hidden copy.

pub(crate) mod buffers;
pub mod kernels;
pub(crate) mod ops;
pub(crate) mod vexp;

use crate::backend::checks;
use crate::backend::{Activation, Backend, BinaryOp, RopeConfig, UnaryOp};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;
use buffers::{with_in_place, with_output, ReadSet};

/// The CPU backend. Stateless: per-thread scratch lives in thread-locals.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn matmul_into(&self, x: &Tensor, w: &Tensor, out: &mut Tensor) -> Result<()> {
        let op = "matmul";
        let dims = checks::matmul_dims(x, w)?;
        checks::output(op, out, DType::F32, &dims, &[Some(x), Some(w)])?;
        let reads = ReadSet::new(op, [Some(x), Some(w)])?;
        let (xs, ws) = (reads.data::<f32>(op, 0)?, reads.storage(op, 1)?);
        with_output(op, out, |o| {
            ops::matmul::matmul_weight(op, xs, x.layout(), ws, w.layout(), o)
        })
    }

    fn matmul_f32_into(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
        let op = "matmul_f32";
        let shape = checks::matmul_f32_dims(a, b)?;
        checks::output(op, out, DType::F32, shape.dims(), &[Some(a), Some(b)])?;
        let reads = ReadSet::new(op, [Some(a), Some(b)])?;
        let (ad, bd) = (reads.data::<f32>(op, 0)?, reads.data::<f32>(op, 1)?);
        with_output(op, out, |o| {
            ops::matmul::matmul_f32(op, ad, a.layout(), bd, b.layout(), o)
        })
    }

    fn binary_into(&self, kind: BinaryOp, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
        let op = checks::binary_name(kind);
        let shape = checks::binary_dims(kind, a, b)?;
        checks::output(op, out, DType::F32, shape.dims(), &[Some(a), Some(b)])?;
        let reads = ReadSet::new(op, [Some(a), Some(b)])?;
        let (ad, bd) = (reads.data::<f32>(op, 0)?, reads.data::<f32>(op, 1)?);
        with_output(op, out, |o| {
            ops::elementwise::binary_into(kind, (ad, a.layout()), (bd, b.layout()), o, shape.dims())
        })
    }

    fn binary_inplace(&self, kind: BinaryOp, x: &mut Tensor, y: &Tensor) -> Result<()> {
        let op = checks::binary_name(kind);
        checks::binary_inplace(kind, x, y)?;
        let reads = ReadSet::new(op, [Some(y)])?;
        let yd = reads.data::<f32>(op, 0)?;
        with_in_place(op, x, |xd| {
            ops::elementwise::binary_inplace(kind, (xd, x.layout()), (yd, y.layout()))
        })
    }

    fn unary_into(&self, kind: UnaryOp, x: &Tensor, out: &mut Tensor) -> Result<()> {
        let op = unary_name(kind);
        checks::dtype(op, "x", x, DType::F32)?;
        checks::output(op, out, DType::F32, x.dims(), &[Some(x)])?;
        let reads = ReadSet::new(op, [Some(x)])?;
        let xd = reads.data::<f32>(op, 0)?;
        with_output(op, out, |o| {
            ops::elementwise::unary_into(kind, xd, x.layout(), o);
            Ok(())
        })
    }

    fn unary_inplace(&self, kind: UnaryOp, x: &mut Tensor) -> Result<()> {
        let op = unary_name(kind);
        checks::dtype(op, "x", x, DType::F32)?;
        checks::in_place(op, x, &[])?;
        with_in_place(op, x, |xd| {
            ops::elementwise::unary_inplace(kind, xd, x.layout());
            Ok(())
        })
    }

    fn gated_into(
        &self,
        act: Activation,
        gate: &Tensor,
        up: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let op = "gated";
        let shape = checks::gated_dims(gate, up)?;
        checks::output(op, out, DType::F32, shape.dims(), &[Some(gate), Some(up)])?;
        let reads = ReadSet::new(op, [Some(gate), Some(up)])?;
        let (g, u) = (reads.data::<f32>(op, 0)?, reads.data::<f32>(op, 1)?);
        with_output(op, out, |o| {
            ops::elementwise::gated_into(act, (g, gate.layout()), (u, up.layout()), o, shape.dims())
        })
    }

    fn gated_inplace(&self, act: Activation, gate: &mut Tensor, up: &Tensor) -> Result<()> {
        let op = "gated";
        checks::gated_dims(gate, up)?;
        checks::in_place(op, gate, &[Some(up)])?;
        let reads = ReadSet::new(op, [Some(up)])?;
        let u = reads.data::<f32>(op, 0)?;
        with_in_place(op, gate, |g| {
            ops::elementwise::gated_inplace(act, (g, gate.layout()), (u, up.layout()))
        })
    }

    fn rms_norm_into(&self, x: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        let op = "rms_norm";
        checks::norm(op, x, Some(w), None)?;
        checks::output(op, out, DType::F32, x.dims(), &[Some(x), Some(w)])?;
        let reads = ReadSet::new(op, [Some(x), Some(w)])?;
        let (xd, wd) = (reads.data::<f32>(op, 0)?, reads.contiguous::<f32>(op, 1)?);
        with_output(op, out, |o| {
            ops::norm::rms_norm(op, (xd, x.layout()), wd, eps, o)
        })
    }

    fn layer_norm_into(
        &self,
        x: &Tensor,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        let op = "layer_norm";
        checks::norm(op, x, w, b)?;
        checks::output(op, out, DType::F32, x.dims(), &[Some(x), w, b])?;
        let reads = ReadSet::new(op, [Some(x), w, b])?;
        let xd = reads.data::<f32>(op, 0)?;
        let (wd, bd) = (reads.optional::<f32>(op, 1)?, reads.optional::<f32>(op, 2)?);
        with_output(op, out, |o| {
            ops::norm::layer_norm(op, (xd, x.layout()), wd, bd, eps, o)
        })
    }

    fn softmax_into(&self, x: &Tensor, causal: Option<usize>, out: &mut Tensor) -> Result<()> {
        let op = "softmax";
        checks::softmax(x)?;
        checks::output(op, out, DType::F32, x.dims(), &[Some(x)])?;
        let reads = ReadSet::new(op, [Some(x)])?;
        let xd = reads.data::<f32>(op, 0)?;
        with_output(op, out, |o| {
            ops::softmax::softmax_into(op, (xd, x.layout()), causal, o)
        })
    }

    fn softmax_inplace(&self, x: &mut Tensor, causal: Option<usize>) -> Result<()> {
        let op = "softmax";
        checks::softmax(x)?;
        checks::in_place(op, x, &[])?;
        with_in_place(op, x, |xd| {
            ops::softmax::softmax_inplace(op, (xd, x.layout()), causal)
        })
    }

    fn rope_into(
        &self,
        x: &Tensor,
        positions: &Tensor,
        freq_factors: Option<&Tensor>,
        cfg: &RopeConfig,
        out: &mut Tensor,
    ) -> Result<()> {
        let op = "rope";
        checks::rope(x, positions, freq_factors, cfg)?;
        let inputs = [Some(x), Some(positions), freq_factors];
        checks::output(op, out, DType::F32, x.dims(), &inputs)?;
        let reads = ReadSet::new(op, inputs)?;
        let xd = reads.data::<f32>(op, 0)?;
        let pos = reads.contiguous::<i32>(op, 1)?;
        let ff = reads.optional::<f32>(op, 2)?;
        with_output(op, out, |o| {
            ops::rope::rope_into(op, (xd, x.layout()), pos, ff, cfg, o)
        })
    }

    fn rope_inplace(
        &self,
        x: &mut Tensor,
        positions: &Tensor,
        freq_factors: Option<&Tensor>,
        cfg: &RopeConfig,
    ) -> Result<()> {
        let op = "rope";
        checks::rope(x, positions, freq_factors, cfg)?;
        let inputs = [Some(positions), freq_factors];
        checks::in_place(op, x, &inputs)?;
        let reads = ReadSet::new(op, inputs)?;
        let pos = reads.contiguous::<i32>(op, 0)?;
        let ff = reads.optional::<f32>(op, 1)?;
        with_in_place(op, x, |xd| {
            ops::rope::rope_inplace(op, (xd, x.layout()), pos, ff, cfg)
        })
    }

    fn embedding_into(&self, table: &Tensor, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        let op = "embedding";
        let dims = checks::embedding_dims(table, ids)?;
        checks::output(op, out, DType::F32, &dims, &[Some(table), Some(ids)])?;
        let reads = ReadSet::new(op, [Some(table), Some(ids)])?;
        let (ts, id) = (reads.storage(op, 0)?, reads.contiguous::<i32>(op, 1)?);
        with_output(op, out, |o| {
            ops::embedding::embedding(op, (ts, table.layout()), id, o)
        })
    }

    fn argmax_into(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        let op = "argmax";
        let shape = checks::argmax_dims(x)?;
        checks::output(op, out, DType::I32, shape.dims(), &[Some(x)])?;
        let reads = ReadSet::new(op, [Some(x)])?;
        let xd = reads.data::<f32>(op, 0)?;
        with_output(op, out, |o| ops::reduce::argmax(op, (xd, x.layout()), o))
    }
}

fn unary_name(op: UnaryOp) -> &'static str {
    match op {
        UnaryOp::Act(Activation::Silu) => "silu",
        UnaryOp::Act(Activation::Gelu) => "gelu",
        UnaryOp::Scale(_) => "scale",
    }
}
