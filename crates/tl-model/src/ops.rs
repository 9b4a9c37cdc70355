//! Weight access for the forward pass: 1-D weights dequantized at load and
//! the weight matmul.

use rayon::prelude::*;
use tl_core::quant::dot;
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
/// format, the way ggml-cpu computes it: the activations are quantized once
/// to the weight's vec-dot type (Q8_0 / Q8_1 / Q8_K), then every output is
/// an integer block dot product (`tl_core::quant::dot`). Weight rows are
/// split across threads; each task reads a weight row once for all `m`
/// activation rows.
pub fn linear(
    x: &[f32],
    m: usize,
    w: &Weight,
    wbytes: &[u8],
    out: &mut [f32],
    act: &mut Vec<u8>,
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    let core = |e| ModelError::Core {
        tensor: w.name.clone(),
        err: e,
    };
    if x.len() < m * k || out.len() < m * n {
        return Err(ModelError::Kv(format!(
            "linear {}: buffers too small for [{m}, {k}] x [{n}, {k}]",
            w.name
        )));
    }
    let ty: GgmlType = w.ty;
    let vt = dot::vec_dot_type(ty);
    let arow = dot::row_bytes(vt, k).ok_or_else(|| {
        core(tl_core::CoreError::Invalid {
            op: "linear",
            reason: format!("{k} is not a whole number of {vt} blocks"),
        })
    })?;
    if act.len() < m * arow {
        act.resize(m * arow, 0);
    }
    for i in 0..m {
        dot::quantize_activations(
            ty,
            &x[i * k..(i + 1) * k],
            &mut act[i * arow..(i + 1) * arow],
        )
        .map_err(core)?;
    }
    let act: &[u8] = act;
    let row_bytes = w.row_bytes();
    let ptr = SyncPtr(out.as_mut_ptr());
    let chunk = 16usize;
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let p = ptr;
        for r in c * chunk..((c + 1) * chunk).min(n) {
            let wr = &wbytes[r * row_bytes..(r + 1) * row_bytes];
            for i in 0..m {
                let v = dot::vec_dot(ty, k, wr, &act[i * arow..(i + 1) * arow]);
                // SAFETY: (i, r) is written by exactly one task (the one
                // owning row chunk c), and i < m, r < n were checked above.
                unsafe { *p.0.add(i * n + r) = v };
            }
        }
    });
    Ok(())
}
