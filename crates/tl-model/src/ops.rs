//! Weight access for the forward pass: 1-D weights dequantized at load and
//! the weight matmul.

use rayon::prelude::*;
use tl_gguf::GgmlType;

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

/// A raw pointer that may cross threads; writers touch disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only to write disjoint output columns from parallel tasks;
// the pointee outlives the parallel scope.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// `out[m, n] = x[m, k] · Wᵀ` for a weight of `n` rows of `k` in any block
/// format: each task dequantizes a weight row once and dots it with every
/// activation row.
pub fn linear(x: &[f32], m: usize, w: &Weight, wbytes: &[u8], out: &mut [f32]) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    if x.len() < m * k || out.len() < m * n {
        return Err(ModelError::Kv(format!(
            "linear {}: buffers too small for [{m}, {k}] x [{n}, {k}]",
            w.name
        )));
    }
    let row_bytes = w.row_bytes();
    let ty: GgmlType = w.ty;
    let ptr = SyncPtr(out.as_mut_ptr());
    let chunk = 16usize;
    let err = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map_init(
            || vec![0.0f32; k],
            |row, c| -> Result<()> {
                let p = ptr;
                for r in c * chunk..((c + 1) * chunk).min(n) {
                    tl_core::quant::dequantize(
                        ty,
                        &wbytes[r * row_bytes..(r + 1) * row_bytes],
                        row,
                    )
                    .map_err(|e| ModelError::Core {
                        tensor: w.name.clone(),
                        err: e,
                    })?;
                    for i in 0..m {
                        let xr = &x[i * k..(i + 1) * k];
                        let mut acc = 0.0f32;
                        for (a, b) in xr.iter().zip(row.iter()) {
                            acc += a * b;
                        }
                        // SAFETY: (i, r) is written by exactly one task
                        // (the one owning row chunk c) and i < m, r < n.
                        unsafe { *p.0.add(i * n + r) = acc };
                    }
                }
                Ok(())
            },
        )
        .find_any(|r| r.is_err());
    match err {
        Some(e) => e,
        None => Ok(()),
    }
}
