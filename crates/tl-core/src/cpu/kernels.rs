//! Row kernels on plain slices, shared by the CPU backend's tensor ops and by
//! the model forward pass (which works on preallocated slices). Numerics are
//! ggml's: f64 sums in RMS norm, rope angles by repeated f32 multiplication
//! (`ggml_rope_cache_init`), and an f16-quantized GELU matching ggml-cpu's
//! lookup table.

use half::f16;

use crate::backend::RopeMode;
pub use crate::cpu::vexp::{consts as vexp, vexpf};

/// `sqrt(2/π)` and the cubic coefficient of the tanh GELU (ggml-cpu `vec.h`).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044715;

/// `x * sigmoid(x)`. Fast numerics: ggml's `ggml_silu_f32`, `x / (1 +
/// expf(-x))` with libm's `expf` ([`expf`]). Reference numerics: what
/// llama.cpp's portable x86-64 build applies to each group of four values of
/// a row in `ggml_vec_silu_f32`/`ggml_vec_swiglu_f32`, the same division
/// with ggml's vector exponential ([`vexpf`]). (There a row's last `len % 4`
/// values take libm's `expf`; the rows of Llama-family models are multiples
/// of 4 long.)
#[inline]
pub fn silu(x: f32) -> f32 {
    if crate::numerics::reference() {
        silu_vexpf(x)
    } else {
        silu_expf(x)
    }
}

/// `x / (1 + expf(-x))` with libm's exponential (ggml `ggml_silu_f32`).
#[inline]
pub fn silu_expf(x: f32) -> f32 {
    x / (1.0 + expf(-x))
}

/// `x / (1 + e^-x)` with ggml's vector exponential (see [`silu`]).
#[inline]
pub fn silu_vexpf(x: f32) -> f32 {
    x / (1.0 + vexpf(0.0 - x))
}

/// Single-precision `e^x` by the algorithm of glibc's `expf` (2.28 and
/// later, from Arm's optimized routines) in its FMA build: `x·32/ln 2`
/// split into `k + r` in double, `2^(k/32)` from a 32-entry table, a cubic
/// in `r`, one rounding to f32 at the end. Written out here so that the
/// vector SiLU ([`silu_mul`]) and the scalar one give the same bits on
/// every machine; on glibc with FMA they are also the bits of `f32::exp`
/// (checked by the tests), which the engine used before.
pub fn expf(x: f32) -> f32 {
    let ax = x.to_bits() & 0x7fff_ffff;
    if ax >= EXPF_SPECIAL {
        // |x| >= 88 or NaN: glibc's special cases.
        if x == f32::NEG_INFINITY {
            return 0.0;
        }
        if ax >= 0x7f80_0000 {
            return x + x;
        }
        if x > f32::from_bits(0x42b1_7217) {
            return f32::INFINITY;
        }
        if x < f32::from_bits(0xc2cf_f1b4) {
            return 0.0;
        }
        if x < f32::from_bits(0xc2ce_8ecf) {
            return f32::from_bits(1);
        }
    }
    let xd = f64::from(x);
    let kd = EXPF_INV_LN2_N.mul_add(xd, EXPF_SHIFT);
    let ki = kd.to_bits();
    let kd = kd - EXPF_SHIFT;
    let r = EXPF_INV_LN2_N.mul_add(xd, -kd);
    let z = r.mul_add(EXPF_C[0], EXPF_C[1]);
    let t = EXPF_TAB[(ki & 31) as usize].wrapping_add(ki << 47);
    let r2 = r * r;
    let y = r.mul_add(EXPF_C[2], 1.0);
    let y = z.mul_add(r2, y);
    (y * f64::from_bits(t)) as f32
}

/// Bits of |x| from which (88.0) [`expf`] takes glibc's special cases.
const EXPF_SPECIAL: u32 = 0x42b0_0000;
/// `32 / ln 2`, the rounding shift `1.5·2^52`, and the cubic's
/// coefficients (scaled for `r` in units of 1/32).
const EXPF_INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
const EXPF_SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
const EXPF_C: [f64; 3] = [
    f64::from_bits(0x3ebc_6af8_4b91_2394),
    f64::from_bits(0x3f2e_bfce_50fa_c4f3),
    f64::from_bits(0x3f96_2e42_ff0c_52d6),
];
/// `bits(2^(i/32)) - (i << 47)`, `2^(i/32)` correctly rounded, so that
/// adding `k << 47` to entry `k % 32` gives `2^(k/32)`.
const EXPF_TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

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

/// One value of ggml's `ggml_vec_geglu_f32`: `gelu(x) * g`, except that
/// `x <= -10` gives +0 whatever the sign of `g` (ggml stores `0.0f` there).
#[inline]
fn gelu_gated(table: &[f32; 1 << 16], x: f32, g: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else {
        gelu_lookup(table, x) * g
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
    scale_of_sum(sum, x.len(), eps)
}

/// `1 / sqrt(sum / len + eps)`, the mean taken in f64 and rounded to f32.
fn scale_of_sum(sum: f64, len: usize, eps: f32) -> f32 {
    let mean = (sum / len.max(1) as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// `out = x * rms_scale(x) * w`.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let scale = rms_scale(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// [`rms_norm_row_inplace`] on each row of `width` values of `x` (a whole
/// number of rows): the same bits, with the scales of four rows summed
/// side by side so that their sequential f64 sums overlap instead of
/// waiting on one another (one row's sum is a chain of dependent adds).
pub fn rms_norm_rows_inplace(x: &mut [f32], width: usize, w: &[f32], eps: f32) {
    if width == 0 {
        return;
    }
    let mut quads = x.chunks_exact_mut(4 * width);
    for q in &mut quads {
        let mut sum = [0f64; 4];
        for i in 0..width {
            for (j, s) in sum.iter_mut().enumerate() {
                let v = q[j * width + i];
                *s += f64::from(v * v);
            }
        }
        for (row, s) in q.chunks_exact_mut(width).zip(sum) {
            scale_row(row, scale_of_sum(s, width, eps), w);
        }
    }
    for row in quads.into_remainder().chunks_exact_mut(width) {
        rms_norm_row_inplace(row, w, eps);
    }
}

/// In-place [`rms_norm_row`].
pub fn rms_norm_row_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    scale_row(x, rms_scale(x, eps), w);
}

/// `x = x * scale * w`, element by element.
fn scale_row(x: &mut [f32], scale: f32, w: &[f32]) {
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// Mean and `1 / sqrt(var + eps)` of a row as ggml's `norm` computes them
/// in llama.cpp's portable build: the mean from an f64 sum rounded to f32
/// and divided in f32; the variance summed in f64 over groups of four
/// squared deviations, each group added pairwise in f32 (the SSE2 path of
/// `ggml_vec_cvar_f32`), the last `len % 4` one by one.
fn layer_norm_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len().max(1);
    let sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
    let mean = (sum as f32) / n as f32;
    let mut var = 0f64;
    let mut quads = x.chunks_exact(4);
    for q in &mut quads {
        let s = [q[0] - mean, q[1] - mean, q[2] - mean, q[3] - mean];
        var += f64::from((s[0] * s[0] + s[1] * s[1]) + (s[2] * s[2] + s[3] * s[3]));
    }
    for &v in quads.remainder() {
        let s = v - mean;
        var += f64::from(s * s);
    }
    let var = (var / n as f64) as f32;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `out = (x - mean(x)) / sqrt(var(x) + eps) * w`: ggml's `norm` followed
/// by the weight's `mul` (a LayerNorm without bias), in llama.cpp's float
/// order (see [`layer_norm_stats`]).
pub fn layer_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let (mean, scale) = layer_norm_stats(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = (v - mean) * scale * g;
    }
}

/// In-place [`layer_norm_row`].
pub fn layer_norm_row_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let (mean, scale) = layer_norm_stats(x, eps);
    for (v, &g) in x.iter_mut().zip(w) {
        *v = (*v - mean) * scale * g;
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

/// YaRN parameters of [`rope_cache_yarn`] (ggml `rope_ext`'s arguments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YarnRope {
    pub freq_scale: f32,
    pub ext_factor: f32,
    /// ggml's `attn_factor`: the magnitude every cos/sin is multiplied by
    /// (before YaRN's own `1 + 0.1 ln(1 / freq_scale)`).
    pub attn_factor: f32,
    /// ggml `ggml_rope_yarn_corr_dims`: the pair range over which the
    /// angle ramps from extrapolated to interpolated.
    pub corr_dims: [f32; 2],
}

/// ggml `ggml_rope_yarn_corr_dims` for `n_dims` rotated values, the
/// original training context `n_ctx_orig` and the rope base.
pub fn rope_yarn_corr_dims(
    n_dims: usize,
    n_ctx_orig: usize,
    base: f32,
    beta_fast: f32,
    beta_slow: f32,
) -> [f32; 2] {
    let corr_dim = |n_rot: f32| {
        n_dims as f32 * (n_ctx_orig as f32 / (n_rot * 2.0 * std::f32::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let start = corr_dim(beta_fast).floor();
    let end = corr_dim(beta_slow).ceil();
    [start.max(0.0), end.min(n_dims as f32 - 1.0)]
}

/// [`rope_cache`] with YaRN scaling, ggml's `ggml_rope_cache_init` and
/// `rope_yarn`: pair `i`'s angle `θ_e = pos · base^(-2i/n_rot) / ff_i` is
/// interpolated (`θ_i = freq_scale · θ_e`) and, with `ext_factor` set,
/// mixed back towards `θ_e` by the ramp over the correction dimensions;
/// cos and sin are scaled by `attn_factor` (times `1 + 0.1 ln(1 /
/// freq_scale)` with `ext_factor` set).
pub fn rope_cache_yarn(
    pos: f32,
    base: f32,
    yarn: &YarnRope,
    freq_factors: Option<&[f32]>,
    cache: &mut [f32],
) {
    let n_rot = cache.len();
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let [low, high] = yarn.corr_dims;
    let mut mscale = yarn.attn_factor;
    if yarn.ext_factor != 0.0 {
        mscale *= 1.0 + 0.1 * (1.0 / yarn.freq_scale).ln();
    }
    let mut theta = pos;
    for (i, cs) in cache.chunks_exact_mut(2).enumerate() {
        let ff = freq_factors.and_then(|f| f.get(i).copied()).unwrap_or(1.0);
        let theta_extrap = theta / ff;
        let theta_interp = yarn.freq_scale * theta_extrap;
        let mut angle = theta_interp;
        if yarn.ext_factor != 0.0 {
            // ggml `rope_yarn_ramp` (its `i0 / 2` is the pair index).
            let y = (i as f32 - low) / (high - low).max(0.001);
            let ramp_mix = (1.0 - y.clamp(0.0, 1.0)) * yarn.ext_factor;
            angle = theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix;
        }
        cs[0] = angle.cos() * mscale;
        cs[1] = angle.sin() * mscale;
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
    // The mode is read once per call, not per element.
    let reference = crate::numerics::reference();
    let one: fn(f32) -> f32 = if reference { silu_vexpf } else { silu_expf };
    par_pairs(g, u, &|a, b| {
        #[cfg(target_arch = "x86_64")]
        {
            if reference && crate::cpu::vexp::x86::available() {
                // SAFETY: `available` checked the CPU features.
                unsafe { crate::cpu::vexp::x86::silu_mul(a, b) };
                return;
            }
            if !reference && silu_x86::available() {
                // SAFETY: `available` checked the CPU features.
                unsafe { silu_x86::silu_mul(a, b) };
                return;
            }
        }
        for (a, &b) in a.iter_mut().zip(b) {
            *a = one(*a) * b;
        }
    });
}

/// The mask of the first `min(left, 16)` of 16 lanes, for the last
/// vector of a slice.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lanes_left(left: usize) -> u16 {
    if left >= 16 {
        0xffff
    } else {
        (1u16 << left) - 1
    }
}

/// [`silu`] times `u`, 16 lanes at a time: [`expf`]'s steps on two
/// vectors of 8 doubles (the table read by two 16-entry permutes), then the
/// f32 add, divide and multiply of the scalar form. The same bits as the
/// scalar loop; a vector holding an input beyond the table's range
/// (|x| >= 88, or NaN) takes the scalar loop.
#[cfg(target_arch = "x86_64")]
mod silu_x86 {
    use std::arch::x86_64::*;

    use super::{EXPF_C, EXPF_INV_LN2_N, EXPF_SHIFT, EXPF_SPECIAL, EXPF_TAB};

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("fma")
    }

    /// `e^x` for 8 doubles converted from f32 inputs within the table's
    /// range, rounded to f32.
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    #[inline]
    unsafe fn exp8(xd: __m512d, tab: &[__m512i; 4]) -> __m256 {
        let inv = _mm512_set1_pd(EXPF_INV_LN2_N);
        let shift = _mm512_set1_pd(EXPF_SHIFT);
        let kd = _mm512_fmadd_pd(inv, xd, shift);
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, shift);
        let r = _mm512_fmsub_pd(inv, xd, kd);
        let z = _mm512_fmadd_pd(r, _mm512_set1_pd(EXPF_C[0]), _mm512_set1_pd(EXPF_C[1]));
        // Entry `ki % 32`: bits 0..4 pick among 16 entries, bit 4 the half.
        let lo = _mm512_permutex2var_epi64(tab[0], ki, tab[1]);
        let hi = _mm512_permutex2var_epi64(tab[2], ki, tab[3]);
        let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
        let entry = _mm512_mask_mov_epi64(lo, upper, hi);
        let t = _mm512_add_epi64(entry, _mm512_slli_epi64::<47>(ki));
        let r2 = _mm512_mul_pd(r, r);
        let y = _mm512_fmadd_pd(r, _mm512_set1_pd(EXPF_C[2]), _mm512_set1_pd(1.0));
        let y = _mm512_fmadd_pd(z, r2, y);
        _mm512_cvtpd_ps(_mm512_mul_pd(y, _mm512_castsi512_pd(t)))
    }

    /// # Safety
    ///
    /// The CPU runs AVX-512F/DQ and FMA.
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub(super) unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let tab: [__m512i; 4] =
            std::array::from_fn(|i| _mm512_loadu_si512(EXPF_TAB.as_ptr().add(8 * i) as *const _));
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let big = _mm512_set1_epi32(EXPF_SPECIAL as i32);
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = super::lanes_left(n - i);
            let x = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            // `-x` exactly (the sign flipped, as the scalar negation).
            let neg = _mm512_xor_ps(x, _mm512_set1_ps(-0.0));
            let ax = _mm512_and_si512(_mm512_castps_si512(neg), abs);
            if _mm512_mask_cmpge_epi32_mask(m, ax, big) != 0 {
                for j in i..(i + 16).min(n) {
                    g[j] = super::silu_expf(g[j]) * u[j];
                }
                i += 16;
                continue;
            }
            let lo = exp8(_mm512_cvtps_pd(_mm512_castps512_ps256(neg)), &tab);
            let hi = exp8(
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(neg),
                ))),
                &tab,
            );
            let e = _mm512_insertf64x4::<1>(
                _mm512_castps_pd(_mm512_castps256_ps512(lo)),
                _mm256_castps_pd(hi),
            );
            let s = _mm512_div_ps(x, _mm512_add_ps(one, _mm512_castpd_ps(e)));
            let y = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
            _mm512_mask_storeu_ps(g.as_mut_ptr().add(i), m, _mm512_mul_ps(s, y));
            i += 16;
        }
    }
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
            *a = gelu_gated(table, *a, b);
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
            let m = super::lanes_left(n - i);
            let x = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            let y = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
            let bits = _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            let t = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, bits, table.as_ptr());
            // x >= 10 gives x, x <= -10 gives 0 (NaN fails both, as in the
            // scalar comparisons, and takes the table's NaN).
            let t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, hi), x);
            // x <= -10 stores +0 after the product, as ggml's `0.0f`.
            let r = _mm512_mask_mov_ps(
                _mm512_mul_ps(t, y),
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, lo),
                _mm512_setzero_ps(),
            );
            _mm512_mask_storeu_ps(g.as_mut_ptr().add(i), m, r);
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
    fn layer_norm_by_hand() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 10.0];
        let w = [1.0, 2.0, 1.0, 1.0, 0.5];
        let mut out = [0.0; 5];
        layer_norm_row(&x, &w, 1e-5, &mut out);
        let mean = 4.0f64;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / 5.0;
        for i in 0..5 {
            let want = (f64::from(x[i]) - mean) / (var + 1e-5).sqrt() * f64::from(w[i]);
            assert!(
                (f64::from(out[i]) - want).abs() < 1e-6,
                "{i}: {} {want}",
                out[i]
            );
        }
        let mut y = x;
        layer_norm_row_inplace(&mut y, &w, 1e-5);
        assert_eq!(y, out);
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
            assert_eq!(
                b[i].to_bits(),
                gelu_gated(gelu_table(), g[i], u[i]).to_bits()
            );
        }
    }

    /// The written-out `expf` is glibc's: the same bits as `f32::exp` on
    /// every 61st bit pattern of the whole f32 range (both signs, specials,
    /// subnormal results) and around each special-case bound. Elsewhere it
    /// stays within one ulp of the platform's `expf`.
    #[test]
    fn expf_is_the_platform_expf() {
        let bounds = [
            0x42b0_0000u32,
            0x42b1_7217,
            0xc2cf_f1b4,
            0xc2ce_8ecf,
            0xc2b0_0000,
        ];
        let near = bounds
            .iter()
            .flat_map(|&b| (b - 64..b + 64).chain((b & 0x7fff_ffff) - 64..(b & 0x7fff_ffff) + 64));
        let mut same = 0u64;
        let mut total = 0u64;
        for bits in (0..=u32::MAX).step_by(61).chain(near) {
            let x = f32::from_bits(bits);
            let (got, want) = (expf(x), x.exp());
            total += 1;
            if got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()) {
                same += 1;
                continue;
            }
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 1, "expf({x:e}) = {got:e}, platform {want:e}");
        }
        // glibc (2.28 and later) computes exactly these steps.
        if cfg!(all(target_env = "gnu", target_arch = "x86_64"))
            && std::is_x86_feature_detected!("fma")
        {
            assert_eq!(
                same,
                total,
                "expf differs from glibc's on {} inputs",
                total - same
            );
        }
        let table_ok = EXPF_TAB.iter().enumerate().all(|(i, &t)| {
            let v = f64::from_bits(t.wrapping_add((i as u64) << 47));
            (v - (i as f64 / 32.0).exp2()).abs() <= f64::EPSILON
        });
        assert!(table_ok, "2^(i/32) table");
    }

    /// Every one of the 2^32 inputs (about a minute in release: run with
    /// `--ignored` after touching `expf`; the sampled test above runs
    /// always).
    #[test]
    #[ignore]
    fn expf_is_the_platform_expf_everywhere() {
        let differ = (0..=u32::MAX)
            .filter(|&bits| {
                let x = f32::from_bits(bits);
                let (got, want) = (expf(x), x.exp());
                got.to_bits() != want.to_bits() && !(got.is_nan() && want.is_nan())
            })
            .count();
        assert_eq!(
            differ, 0,
            "expf differs from the platform's on {differ} inputs"
        );
    }

    /// Rows normed four at a time are the rows normed one by one, bit for
    /// bit, for 1 to 9 rows (a remainder included) and odd widths.
    #[test]
    fn rows_normed_together_are_rows_normed_alone() {
        for width in [1usize, 7, 64, 256] {
            let w: Vec<f32> = (0..width).map(|i| 0.5 + (i % 13) as f32 / 7.0).collect();
            for rows in 1..10 {
                let x: Vec<f32> = (0..rows * width)
                    .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e6 - 8.0)
                    .collect();
                let mut a = x.clone();
                rms_norm_rows_inplace(&mut a, width, &w, 1e-6);
                let mut b = x.clone();
                for row in b.chunks_exact_mut(width) {
                    rms_norm_row_inplace(row, &w, 1e-6);
                }
                assert_eq!(
                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "width {width}, {rows} rows"
                );
            }
        }
    }

    /// The vector SiLU gives the scalar loop's bits: large and tiny inputs,
    /// both zeros, the |x| >= 88 bound (scalar fallback), NaN and every
    /// length around 16.
    #[test]
    fn vector_silu_matches_the_scalar_loop() {
        let mut g: Vec<f32> = (0..20_011)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0)
            .map(|t| (t * 2.0 - 1.0) * 40.0)
            .collect();
        g.extend([
            0.0, -0.0, 87.99, 88.0, -88.0, 88.01, 104.0, -104.0, 1e-30, -1e-30,
        ]);
        g.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3.0, -3.0, 0.5]);
        let u: Vec<f32> = (0..g.len())
            .map(|i| ((i * 11) % 97) as f32 / 50.0 - 1.0)
            .collect();
        for len in (0..40).chain([g.len()]) {
            let mut a = g[..len].to_vec();
            silu_mul(&mut a, &u[..len]);
            for i in 0..len {
                let want = silu(g[i]) * u[i];
                assert!(
                    a[i].to_bits() == want.to_bits() || (a[i].is_nan() && want.is_nan()),
                    "silu({}) * {} at {i} of {len}",
                    g[i],
                    u[i]
                );
            }
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
                let want = gelu_gated(gelu_table(), g[i], u[i]);
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

    #[test]
    fn yarn_extrapolates_fast_pairs_and_interpolates_slow_ones() {
        // gpt-oss's values: base 150000, factor 32, 4096 original tokens,
        // 64 rotated values.
        let corr = rope_yarn_corr_dims(64, 4096, 150_000.0, 32.0, 1.0);
        assert_eq!(corr, [8.0, 18.0]);
        let off = YarnRope {
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            corr_dims: corr,
        };
        let (mut a, mut b) = ([0f32; 64], [0f32; 64]);
        rope_cache_yarn(37.0, 150_000.0, &off, None, &mut a);
        rope_cache(37.0, 150_000.0, 1.0, None, &mut b);
        // The same angles (cos and sin may be paired into one call
        // differently: an ulp).
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6, "{x} vs {y}");
        }
        let yarn = YarnRope {
            freq_scale: 1.0 / 32.0,
            ext_factor: 1.0,
            attn_factor: 1.0 / (1.0 + 0.1 * 32f32.ln()),
            corr_dims: corr,
        };
        let pos = 1000.0;
        rope_cache_yarn(pos, 150_000.0, &yarn, None, &mut a);
        let mscale = yarn.attn_factor * (1.0 + 0.1 * 32f32.ln());
        let theta = |i: usize| pos * 150_000f32.powf(-2.0 / 64.0).powi(i as i32);
        for i in [0usize, 8] {
            // Below the ramp: the angle unscaled.
            let want = theta(i);
            assert!((a[2 * i] - want.cos() * mscale).abs() < 1e-3, "pair {i}");
        }
        for i in [18usize, 31] {
            // Past it: interpolated by the factor.
            let want = theta(i) / 32.0;
            assert!((a[2 * i] - want.cos() * mscale).abs() < 1e-4, "pair {i}");
            assert!(
                (a[2 * i + 1] - want.sin() * mscale).abs() < 1e-4,
                "pair {i}"
            );
        }
        // Between, a mix: neither.
        let i = 13;
        let (e, p) = (theta(i), theta(i) / 32.0);
        assert!((a[2 * i] - e.cos() * mscale).abs() > 1e-3);
        assert!((a[2 * i] - p.cos() * mscale).abs() > 1e-3);
    }
}
