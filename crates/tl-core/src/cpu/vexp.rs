//! ggml's vector exponential (`ggml_v_expf`) in the form llama.cpp's
//! portable x86-64 build runs it, scalar and in 16 AVX-512 lanes with the
//! same bits: the SiLU and softmax of the reference numerics
//! (`crate::numerics`).

/// Constants of ggml's vector `expf` (bit patterns of its hex literals).
pub mod consts {
    pub const ROUND: u32 = 0x4b40_0000; // 0x1.8p23
    pub const LOG2E: u32 = 0x3fb8_aa3b; // 0x1.715476p+0
    pub const LN2_LO: u32 = 0x35bf_be8e; // 0x1.7f7d1cp-20
    pub const LN2_HI: u32 = 0x3f31_7200; // 0x1.62e4p-1
    pub const P5: u32 = 0x3c07_2010; // 0x1.0e4020p-7
    pub const P4: u32 = 0x3d2b_9f17; // 0x1.573e2ep-5
    pub const P3: u32 = 0x3e2a_af33; // 0x1.555e66p-3
    pub const P2: u32 = 0x3eff_fedb; // 0x1.fffdb6p-2
    pub const P1: u32 = 0x3f7f_fff6; // 0x1.ffffecp-1
}

/// One lane of ggml's vector `ggml_v_expf` in its x86-64 form without FMA
/// (`vec.h`, the `__SSE2__` branch with `MADD128 = mul + add`): `x = n·ln2 +
/// b` with `n` rounded by the 1.5·2^23 trick, a degree-5 polynomial in `b`,
/// `2^n` put into the exponent bits, and for `|n| > 126` the two-factor
/// scaling that reaches subnormals and infinity (`|n| > 192`: 0 or ∞).
/// Every product and sum rounds on its own, as the code it follows. Within
/// 2 ulp of `exp`; `exp(-∞) = 0`.
#[inline]
pub fn vexpf(x: f32) -> f32 {
    use consts::*;
    let c = f32::from_bits;
    let z = x * c(LOG2E) + c(ROUND);
    let n = z - c(ROUND);
    let b = (x - n * c(LN2_HI)) - n * c(LN2_LO);
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = ((c(P5) * b + c(P4)) * u + (c(P3) * b + c(P2))) * u + c(P1) * b;
    let an = n.abs();
    // `|n| > 126` is false for NaN too, which takes the main path as in ggml.
    if an <= 126.0 || an.is_nan() {
        return j * k + k;
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    if an > 192.0 {
        return s1 * s1;
    }
    let s2 = f32::from_bits(e.wrapping_sub(g));
    (s2 * j + s2) * s1
}

/// [`super::kernels::silu_vexpf`] times `u`, 16 lanes at a time: [`vexpf`]'s steps in 16 lanes
/// (separate multiplies and adds, no FMA), then the f32 add, divide and
/// multiply of the scalar form. The same bits as the scalar loop.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    pub(crate) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// [`super::vexpf`] of 16 lanes.
    ///
    /// # Safety
    ///
    /// The CPU runs AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn vexpf16(x: __m512) -> __m512 {
        use super::consts::*;
        let c = |b: u32| _mm512_set1_ps(f32::from_bits(b));
        let round = c(ROUND);
        let z = _mm512_add_ps(_mm512_mul_ps(x, c(LOG2E)), round);
        let n = _mm512_sub_ps(z, round);
        let b = _mm512_sub_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(n, c(LN2_HI))),
            _mm512_mul_ps(n, c(LN2_LO)),
        );
        let e = _mm512_slli_epi32::<23>(_mm512_castps_si512(z));
        let k = _mm512_castsi512_ps(_mm512_add_epi32(e, _mm512_set1_epi32(0x3f80_0000)));
        let u = _mm512_mul_ps(b, b);
        let p54 = _mm512_add_ps(_mm512_mul_ps(c(P5), b), c(P4));
        let p32 = _mm512_add_ps(_mm512_mul_ps(c(P3), b), c(P2));
        let j = _mm512_add_ps(
            _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(p54, u), p32), u),
            _mm512_mul_ps(c(P1), b),
        );
        let fast = _mm512_add_ps(_mm512_mul_ps(j, k), k);
        let an = _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(n),
            _mm512_set1_epi32(0x7fff_ffff),
        ));
        let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(an, _mm512_set1_ps(126.0));
        if big == 0 {
            return fast;
        }
        let neg = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
        let g = _mm512_maskz_mov_epi32(neg, _mm512_set1_epi32(0x8200_0000u32 as i32));
        let s1 = _mm512_castsi512_ps(_mm512_add_epi32(g, _mm512_set1_epi32(0x7f00_0000)));
        let s2 = _mm512_castsi512_ps(_mm512_sub_epi32(e, g));
        let mid = _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(s2, j), s2), s1);
        let huge = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(an, _mm512_set1_ps(192.0));
        let r = _mm512_mask_mov_ps(fast, big, mid);
        _mm512_mask_mov_ps(r, huge, _mm512_mul_ps(s1, s1))
    }

    /// # Safety
    ///
    /// The CPU runs AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = crate::cpu::kernels::lanes_left(n - i);
            let x = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            let e = vexpf16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let s = _mm512_div_ps(x, _mm512_add_ps(one, e));
            let y = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
            _mm512_mask_storeu_ps(g.as_mut_ptr().add(i), m, _mm512_mul_ps(s, y));
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 16-lane [`vexpf`] is the scalar one on a sample of the whole f32
    /// range (every 97th bit pattern, both signs, the branch bounds |n| = 126
    /// and 192 included), and it stays an exponential.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vexpf_lanes_are_the_scalar_vexpf() {
        if !x86::available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let mut xs: Vec<f32> = (0..=u32::MAX).step_by(97).map(f32::from_bits).collect();
        xs.extend([
            f32::NEG_INFINITY,
            f32::INFINITY,
            0.0,
            -0.0,
            87.3,
            88.8,
            -87.5,
            -88.0,
        ]);
        xs.extend((0..4000).map(|i| -140.0 + i as f32 * 0.061));
        for ch in xs.chunks(16) {
            let mut lanes = [0.0f32; 16];
            lanes[..ch.len()].copy_from_slice(ch);
            let mut got = [0.0f32; 16];
            // SAFETY: AVX-512F was checked above.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    x86::vexpf16(_mm512_loadu_ps(lanes.as_ptr())),
                );
            }
            for (g, &x) in got.iter().zip(&lanes) {
                let want = vexpf(x);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "vexpf({x:e}): lanes {g:e}, scalar {want:e}"
                );
            }
        }
        // Normal results (below about -87.3 they are subnormal, with fewer bits).
        for x in [-87.0f32, -20.0, -1.0, -1e-3, 0.0, 0.5, 1.0, 10.0, 80.0] {
            let (got, want) = (f64::from(vexpf(x)), f64::from(x).exp());
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "vexpf({x}) = {got}, exp {want}"
            );
        }
        assert_eq!(vexpf(f32::NEG_INFINITY), 0.0);
    }
}
