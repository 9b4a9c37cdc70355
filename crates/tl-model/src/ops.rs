//! Weight access for the forward pass: 1-D weights dequantized at load and
//! the weight matmul.

use tl_core::MatmulScratch;

use crate::error::{ModelError, Result};
use crate::weights::Weight;

/// Dequantizes a 1-D weight (norm scales, biases) into f32.
pub fn vector(w: &Weight, file: &tl_gguf::GgufFile) -> Result<Vec<f32>> {
    let mut v = vec![0.0f32; w.cols * w.rows];
    tl_core::quant::dequantize(w.ty, w.bytes(file), &mut v).map_err(|e| ModelError::Core {
        tensor: w.name.clone(),
        err: e,
    })?;
    Ok(v)
}

/// `out[m, n] = x[m, k] · Wᵀ` for a weight of `n` rows of `k` in any block
/// format, the way ggml-cpu computes it: activations quantized once to the
/// weight's vec-dot type, integer block dot products, SIMD kernels chosen at
/// run time (`tl_core::matmul`).
pub fn linear(
    x: &[f32],
    m: usize,
    w: &Weight,
    wbytes: &[u8],
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<()> {
    let r = match &w.packed {
        Some(p) => tl_core::matmul_packed(x, m, p, out, scratch),
        None => tl_core::matmul(x, m, w.cols, wbytes, w.ty, w.rows, out, scratch),
    };
    r.map_err(|e| ModelError::Core {
        tensor: w.name.clone(),
        err: e,
    })
}
