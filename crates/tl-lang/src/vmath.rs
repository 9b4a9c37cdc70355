//! Elementwise functions over slices in a form the compiler vectorizes:
//! no branches and no libm calls in the loop body. GELU (tanh
//! approximation) and its derivative go through one exponential,
//! `tanh(u) = 1 - 2 / (exp(2u) + 1)`, with ggml's degree-5 `expf`
//! polynomial (within 2 ulp of `exp` over the clamped range).
//!
//! Each loop is compiled three times — for AVX-512F, for AVX2, and plain —
//! and the variant is chosen at run time. The arithmetic is the same
//! sequence of separate f32 multiplies and adds in all three (no fused
//! multiply-add), so the results are the same bits on every machine.

const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
const P5: f32 = f32::from_bits(0x3c07_2010);
const P4: f32 = f32::from_bits(0x3d2b_9f17);
const P3: f32 = f32::from_bits(0x3e2a_af33);
const P2: f32 = f32::from_bits(0x3eff_fedb);
const P1: f32 = f32::from_bits(0x3f7f_fff6);

/// `exp(x)` for `x` clamped to [-87, 88] (so `2^n` stays a normal
/// number): results below `exp(-87)` are that value, not 0 or a subnormal.
#[inline(always)]
pub fn exp_clamped(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let z = x * LOG2E + ROUND;
    let n = z - ROUND;
    let b = (x - n * LN2_HI) - n * LN2_LO;
    let k = f32::from_bits((z.to_bits() << 23).wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = ((P5 * b + P4) * u + (P3 * b + P2)) * u + P1 * b;
    j * k + k
}

/// `tanh(x)`, within about 1e-7 absolute of libm's.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp_clamped(2.0 * x) + 1.0)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// GELU, tanh approximation.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * x * (1.0 + GELU_A * x * x)))
}

/// d gelu(x) / dx.
#[inline(always)]
pub fn gelu_deriv(x: f32) -> f32 {
    let t = tanh(SQRT_2_OVER_PI * (x + GELU_A * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_A * x * x)
}

/// Defines `$name(args)` as the loop `$body` compiled for AVX-512F, AVX2
/// and plain x86-64 (or only plain elsewhere), picked at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F was detected at run time.
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 was detected at run time.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

multiversion! {
    /// `out[i] = gelu(x[i])` (over the shorter of the two).
    pub fn gelu_into(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = gelu(v);
        }
    }
}

multiversion! {
    /// `out[i] = g[i] · gelu'(x[i])` (over the shortest of the three).
    pub fn gelu_grad_into(g: &[f32], x: &[f32], out: &mut [f32]) {
        for ((o, &gv), &v) in out.iter_mut().zip(g).zip(x) {
            *o = gv * gelu_deriv(v);
        }
    }
}

/// `exp(x)`, 0 below -87 (where f32's normal range ends).
#[inline(always)]
pub fn exp_ftz(x: f32) -> f32 {
    let e = exp_clamped(x);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

multiversion! {
    /// Softmax of each row of `n` values of `x`, in place: `exp(x - max)`
    /// over its sum.
    pub fn softmax_rows(x: &mut [f32], n: usize) {
        for row in x.chunks_mut(n.max(1)) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for v in row.iter_mut() {
                *v = exp_ftz(*v - m);
            }
            let s: f32 = row.iter().sum();
            let r = 1.0 / s;
            row.iter_mut().for_each(|v| *v *= r);
        }
    }
}

multiversion! {
    /// `log(softmax(x))` of each row of `n` values, in place:
    /// `x - max - log Σ exp(x - max)`.
    pub fn log_softmax_rows(x: &mut [f32], n: usize, tmp: &mut Vec<f32>) {
        for row in x.chunks_mut(n.max(1)) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            tmp.clear();
            tmp.extend(row.iter().map(|&v| exp_ftz(v - m)));
            let s: f32 = tmp.iter().sum();
            let l = m + s.ln();
            row.iter_mut().for_each(|v| *v -= l);
        }
    }
}

multiversion! {
    /// The gradient of `log_softmax` rows: `d = g - exp(y) Σ g` per row of
    /// `n`, for outputs `y` and their gradient `g`.
    pub fn log_softmax_grad(y: &[f32], g: &[f32], n: usize, d: &mut [f32]) {
        for ((dr, yr), gr) in d.chunks_mut(n.max(1)).zip(y.chunks(n.max(1))).zip(g.chunks(n.max(1))) {
            let s: f32 = gr.iter().sum();
            for ((o, &p), &q) in dr.iter_mut().zip(yr).zip(gr) {
                *o = q - exp_ftz(p) * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_and_its_derivative_match_libm() {
        let xs: Vec<f32> = (0..20001).map(|i| -30.0 + i as f32 * 0.003).collect();
        let mut y = vec![0.0f32; xs.len()];
        gelu_into(&xs, &mut y);
        let g = vec![1.0f32; xs.len()];
        let mut d = vec![0.0f32; xs.len()];
        gelu_grad_into(&g, &xs, &mut d);
        for ((&x, &yv), &dv) in xs.iter().zip(&y).zip(&d) {
            let xd = f64::from(x);
            let c = f64::from(SQRT_2_OVER_PI);
            let a = f64::from(GELU_A);
            let t = (c * (xd + a * xd * xd * xd)).tanh();
            let want = 0.5 * xd * (1.0 + t);
            let dwant = 0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * c * (1.0 + 3.0 * a * xd * xd);
            assert!(
                (f64::from(yv) - want).abs() <= 2e-6 * (1.0 + want.abs()),
                "gelu({x})"
            );
            assert!(
                (f64::from(dv) - dwant).abs() <= 2e-6 * (1.0 + dwant.abs()),
                "gelu'({x})"
            );
            assert_eq!(
                yv.to_bits(),
                gelu(x).to_bits(),
                "lanes against one value at {x}"
            );
        }
        let mut row = vec![1.0f32, 2.0, -1.0e9, 3.0];
        softmax_rows(&mut row, 4);
        let z: f32 = [1.0f32, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        let want = [1.0f32.exp() / z, 2.0f32.exp() / z, 0.0, 3.0f32.exp() / z];
        for (g, w) in row.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "softmax {g} vs {w}");
        }
        for x in [-100.0f32, -1.0, 0.0, 1e-3, 1.0, 100.0] {
            assert!(
                (f64::from(tanh(x)) - f64::from(x).tanh()).abs() < 2e-7,
                "tanh({x})"
            );
        }
    }
}
