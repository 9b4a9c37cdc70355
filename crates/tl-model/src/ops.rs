//! Row kernels the forward pass uses, with llama.cpp's numerics (f64
//! accumulation in RMS norm, iterative rope angles, f16-rounded GELU table).

use half::f16;
use rayon::prelude::*;
use tl_gguf::GgmlType;

use crate::error::{ModelError, Result};
use crate::weights::Weight;

/// `y = x / sqrt(mean(x²) + eps) * w` (ggml `rms_norm` then `mul`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &g) in y.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// In-place variant of [`rms_norm`].
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// Rotary embedding of one head in place (ggml `rope_f32`, ext_factor 0):
/// angles `pos * base^(-2i/n_rot)` computed by repeated multiplication as
/// ggml does. `neox` pairs `(i, i + n_rot/2)`, otherwise `(2i, 2i+1)`.
pub fn rope_head(x: &mut [f32], pos: usize, n_rot: usize, base: f32, neox: bool) {
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let mut theta = pos as f32;
    let half = n_rot / 2;
    for i in 0..half {
        let (s, c) = theta.sin_cos();
        let (a, b) = if neox {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let x0 = x[a];
        let x1 = x[b];
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
        theta *= theta_scale;
    }
}

/// `g = silu(g) * u`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

fn gelu_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// `g = gelu(g) * u` with ggml's CPU GELU: the input rounded to f16, the
/// tanh approximation evaluated, the result rounded to f16 (ggml looks it up
/// in a 64k-entry f16 table built that way), saturating beyond ±10.
pub fn gelu_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        let x = *a;
        let y = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            let xh = f16::from_f32(x).to_f32();
            f16::from_f32(gelu_f32(xh)).to_f32()
        };
        *a = y * b;
    }
}

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
