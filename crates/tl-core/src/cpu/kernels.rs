//! Row kernels on plain slices, shared by the CPU backend's tensor ops and by
//! the model forward pass (which works on preallocated slices). Numerics are
//! ggml's: f64 sums in RMS norm, rope angles by repeated f32 multiplication
//! (`ggml_rope_cache_init`), and an f16-quantized GELU matching ggml-cpu's
//! lookup table.

use half::f16;

use crate::backend::RopeMode;

/// `sqrt(2/π)` and the cubic coefficient of the tanh GELU (ggml-cpu `vec.h`).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044715;

/// `x * sigmoid(x)` (ggml `ggml_silu_f32`).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))` (ggml `ggml_gelu_f32`).
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

/// GELU as ggml's CPU backend evaluates it (`ggml_vec_gelu_f32` with
/// `GGML_GELU_FP16`): the input rounded to f16, looked up in a table of
/// f16-rounded `gelu` values, saturating beyond ±10.
#[inline]
pub fn gelu_ggml_cpu(x: f32) -> f32 {
    gelu_lookup(gelu_table(), x)
}

#[inline]
fn gelu_lookup(table: &[f32; 1 << 16], x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        table[usize::from(f16::from_f32(x).to_bits())]
    }
}

/// `f16(gelu(f16 value))` for every f16 bit pattern, built once: the table
/// ggml-cpu keeps (`ggml_table_gelu_f16`), so a lookup replaces a `tanh`.
fn gelu_table() -> &'static [f32; 1 << 16] {
    static TABLE: std::sync::OnceLock<Box<[f32; 1 << 16]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f32; 1 << 16]);
        for (bits, v) in t.iter_mut().enumerate() {
            let x = f16::from_bits(bits as u16).to_f32();
            *v = f16::from_f32(gelu(x)).to_f32();
        }
        t
    })
}

/// `1 / sqrt(mean(x²) + eps)` with the sum in f64, as ggml's `rms_norm`.
#[inline]
pub fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len().max(1) as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// `out = x * rms_scale(x) * w`.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let scale = rms_scale(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// In-place [`rms_norm_row`].
pub fn rms_norm_row_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let scale = rms_scale(x, eps);
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// Fills `cache` (`n_rot` values) with `[cos θ_0, sin θ_0, cos θ_1, …]` for
/// position `pos`: `θ_i = freq_scale · pos · base^(-2/n_rot)^i / ff_i`.
pub fn rope_cache(
    pos: f32,
    base: f32,
    freq_scale: f32,
    freq_factors: Option<&[f32]>,
    cache: &mut [f32],
) {
    let n_rot = cache.len();
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let mut theta = pos;
    for (i, cs) in cache.chunks_exact_mut(2).enumerate() {
        let ff = freq_factors.and_then(|f| f.get(i).copied()).unwrap_or(1.0);
        let angle = freq_scale * (theta / ff);
        cs[0] = angle.cos();
        cs[1] = angle.sin();
        theta *= theta_scale;
    }
}

/// Rotates the first `cache.len()` values of one head by a [`rope_cache`].
pub fn rope_rotate(row: &mut [f32], cache: &[f32], mode: RopeMode) {
    let n_rot = cache.len();
    let rot = |x0: f32, x1: f32, cs: &[f32]| (x0 * cs[0] - x1 * cs[1], x0 * cs[1] + x1 * cs[0]);
    match mode {
        RopeMode::Normal => {
            for (pair, cs) in row[..n_rot].chunks_exact_mut(2).zip(cache.chunks_exact(2)) {
                (pair[0], pair[1]) = rot(pair[0], pair[1], cs);
            }
        }
        RopeMode::Neox => {
            let (lo, hi) = row[..n_rot].split_at_mut(n_rot / 2);
            for ((a, b), cs) in lo.iter_mut().zip(hi).zip(cache.chunks_exact(2)) {
                (*a, *b) = rot(*a, *b, cs);
            }
        }
    }
}

/// `g = silu(g) * u`, spread over the thread pool when long (prefill).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    par_pairs(g, u, &|a, b| {
        for (a, &b) in a.iter_mut().zip(b) {
            *a = silu(*a) * b;
        }
    });
}

/// `g = gelu_ggml_cpu(g) * u`, spread over the thread pool when long.
pub fn gelu_mul(g: &mut [f32], u: &[f32]) {
    let table = gelu_table();
    par_pairs(g, u, &|a, b| {
        #[cfg(target_arch = "x86_64")]
        if gelu_x86::available() {
            // SAFETY: `available` checked the CPU features.
            unsafe { gelu_x86::gelu_mul(table, a, b) };
            return;
        }
        for (a, &b) in a.iter_mut().zip(b) {
            *a = gelu_lookup(table, *a) * b;
        }
    });
}

/// [`gelu_lookup`] times `u`, 16 lanes at a time: the inputs rounded to f16
/// by `vcvtps2ph`, the table read by a gather, the saturation by masks. The
/// same bits as the scalar loop.
#[cfg(target_arch = "x86_64")]
mod gelu_x86 {
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c")
    }

    /// # Safety
    ///
    /// The CPU runs AVX-512F and F16C.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn gelu_mul(table: &[f32; 1 << 16], g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let (lo, hi) = (_mm512_set1_ps(-10.0), _mm512_set1_ps(10.0));
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if n - i >= 16 {
                0xffff
            } else {
                (1u16 << (n - i)) - 1
            };
            let x = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            let y = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
            let bits = _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            let t = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, bits, table.as_ptr());
            // x >= 10 gives x, x <= -10 gives 0 (NaN fails both, as in the
            // scalar comparisons, and takes the table's NaN).
            let t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, hi), x);
            let t = _mm512_mask_mov_ps(
                t,
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, lo),
                _mm512_setzero_ps(),
            );
            _mm512_mask_storeu_ps(g.as_mut_ptr().add(i), m, _mm512_mul_ps(t, y));
            i += 16;
        }
    }
}

/// Runs `f` on matching chunks of `g` and `u` (up to the shorter length),
/// on the pool for long slices. Element-wise, so the result does not depend
/// on the split.
fn par_pairs(g: &mut [f32], u: &[f32], f: &(dyn Fn(&mut [f32], &[f32]) + Sync)) {
    const CHUNK: usize = 1 << 14;
    let n = g.len().min(u.len());
    if n < 2 * CHUNK {
        f(&mut g[..n], &u[..n]);
        return;
    }
    struct Ptr(*mut f32);
    // SAFETY: every task writes only its own chunk of `g` (disjoint
    // ranges of `CHUNK` elements), and `run` returns after all of them.
    unsafe impl Sync for Ptr {}
    let gp = Ptr(g.as_mut_ptr());
    let gp = &gp;
    crate::pool::ThreadPool::global().run(n.div_ceil(CHUNK), &|c| {
        let lo = c * CHUNK;
        let hi = (lo + CHUNK).min(n);
        // SAFETY: see `Ptr`; `lo..hi` lies within `g[..n]`.
        let a = unsafe { std::slice::from_raw_parts_mut(gp.0.add(lo), hi - lo) };
        f(a, &u[lo..hi]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_by_hand() {
        let mut out = [0.0; 4];
        rms_norm_row(&[1.0, 2.0, 3.0, 4.0], &[1.0; 4], 0.0, &mut out);
        let s = 1.0 / 7.5f32.sqrt();
        assert_eq!(out, [s, 2.0 * s, 3.0 * s, 4.0 * s]);
    }

    #[test]
    fn gelu_table_semantics() {
        assert_eq!(gelu_ggml_cpu(-11.0), 0.0);
        assert_eq!(gelu_ggml_cpu(12.5), 12.5);
        // Within f16 rounding of the exact formula.
        for x in [-3.0f32, -0.5, 0.0, 0.7, 2.0] {
            assert!((gelu_ggml_cpu(x) - gelu(x)).abs() <= 2e-3 * (1.0 + gelu(x).abs()));
        }
        assert_eq!(gelu_ggml_cpu(0.0), 0.0);
        // The table holds exactly f16(gelu(f16(x))) for every f16 input.
        for x in [-9.99f32, -1.234, -0.001, 1e-5, 0.333, 3.75, 9.99] {
            let direct = f16::from_f32(gelu(f16::from_f32(x).to_f32())).to_f32();
            assert_eq!(gelu_ggml_cpu(x).to_bits(), direct.to_bits(), "{x}");
        }
    }

    #[test]
    fn long_gated_products_match_the_serial_loop() {
        let n = 100_003;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 1001) as f32 / 100.0 - 5.0)
            .collect();
        let u: Vec<f32> = (0..n)
            .map(|i| ((i * 11) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let mut a = g.clone();
        silu_mul(&mut a, &u);
        let mut b = g.clone();
        gelu_mul(&mut b, &u);
        for i in 0..n {
            assert_eq!(a[i].to_bits(), (silu(g[i]) * u[i]).to_bits());
            assert_eq!(b[i].to_bits(), (gelu_ggml_cpu(g[i]) * u[i]).to_bits());
        }
    }

    /// The vector GELU gives the scalar lookup's bits across the saturation
    /// bounds, at them, for specials and for every length around 16.
    #[test]
    fn vector_gelu_matches_the_scalar_lookup() {
        let mut g: Vec<f32> = (0..5003)
            .map(|i| ((i * 37) % 2601) as f32 / 100.0 - 13.0)
            .collect();
        g.extend([
            -10.0, 10.0, -9.999, 9.999, -10.001, 10.001, 0.0, -0.0, 65504.0, 1e9, -1e9,
        ]);
        g.extend([f32::INFINITY, f32::NEG_INFINITY, 1e-8, -1e-8]);
        for len in (1..40).chain([g.len()]) {
            let u: Vec<f32> = (0..len).map(|i| (i % 7) as f32 * 0.25 - 0.6).collect();
            let mut a = g[..len].to_vec();
            gelu_mul(&mut a, &u);
            for i in 0..len {
                let want = gelu_ggml_cpu(g[i]) * u[i];
                assert!(
                    a[i].to_bits() == want.to_bits() || (a[i].is_nan() && want.is_nan()),
                    "len {len} gelu({}) * {}: {} vs {want}",
                    g[i],
                    u[i],
                    a[i]
                );
            }
        }
    }

    #[test]
    fn rope_position_one_rotates_by_one_radian() {
        let mut cache = [0.0; 2];
        rope_cache(1.0, 10000.0, 1.0, None, &mut cache);
        let mut row = [1.0, 0.0];
        rope_rotate(&mut row, &cache, RopeMode::Normal);
        assert_eq!(row, [1f32.cos(), 1f32.sin()]);
    }
}
