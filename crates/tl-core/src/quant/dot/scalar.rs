//! Scalar reference dot products, one per weight type, ported from ggml
//! `ggml-cpu/quants.c` (`ggml_vec_dot_*_generic`) and `ggml-cpu/vec.cpp`
//! (the scalar branches of `ggml_vec_dot_f32/f16/bf16`).
//!
//! These fix the numerics the SIMD kernels are held to: the integer sums of
//! each block (or sub-block lane) are formed exactly as ggml forms them, and
//! the float scale products and accumulations happen in ggml's order
//! (`sumf += sumi * dx * dy` where ggml writes that, `(dx * dy) * sumi`
//! where it writes that). The products are left unfused; a C build that
//! contracts `sumf += a * b` into an FMA can differ in the last bit.
//!
//! Each function takes one weight row `w` and one activation row `a` of the
//! weight type's `vec_dot_type` holding the same number of values; the
//! caller has checked both lengths (a trailing partial block is ignored).

// Index loops mirror the C code so that the port can be checked line by line.
#![allow(clippy::needless_range_loop)]

use bytemuck::Pod;
use half::f16;

use crate::quant::iq1::{grid8 as iq1_grid8, BlockIQ1M, BlockIQ1S, IQ1S_DELTA};
use crate::quant::iq2::{BlockIQ2S, BlockIQ2XS, BlockIQ2XXS};
use crate::quant::iq3::{BlockIQ3S, BlockIQ3XXS};
use crate::quant::iq4::{BlockIQ4NL, BlockIQ4XS, KVALUES_IQ4NL};
use crate::quant::iq_grids::{
    IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KMASK_IQ2XS, KSIGNS_IQ2XS,
};
use crate::quant::k_quants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, QK_K};
use crate::quant::legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1};

/// The blocks of `bytes`, copied out one at a time (GGUF data is only
/// byte-aligned).
fn blocks<B: Pod>(bytes: &[u8]) -> impl Iterator<Item = B> + '_ {
    bytes
        .chunks_exact(std::mem::size_of::<B>())
        .map(bytemuck::pod_read_unaligned)
}

fn f32_at(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn f16_at(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn bf16_at(b: &[u8]) -> f32 {
    // ggml `GGML_BF16_TO_FP32`: the bits become the top half of an f32.
    f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
}

/// ggml `ggml_vec_dot_f32`, scalar branch: f32 products summed in f64.
pub fn dot_f32(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f64;
    for (x, y) in w.chunks_exact(4).zip(a.chunks_exact(4)) {
        sumf += f64::from(f32_at(x) * f32_at(y));
    }
    sumf as f32
}

/// ggml `ggml_vec_dot_f16`, scalar branch. The f32 product of two f16
/// values is exact (11 + 11 significant bits).
pub fn dot_f16(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f64;
    for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)) {
        sumf += f64::from(f16_at(x) * f16_at(y));
    }
    sumf as f32
}

/// ggml `ggml_vec_dot_bf16`, scalar branch (exact products, f64 sum).
pub fn dot_bf16(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f64;
    for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)) {
        sumf += f64::from(bf16_at(x) * bf16_at(y));
    }
    sumf as f32
}

/// ggml `ggml_vec_dot_q4_0_q8_0_generic`.
pub fn dot_q4_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockQ4_0>(w).zip(blocks::<BlockQ8_0>(a)) {
        let mut sumi0 = 0i32;
        let mut sumi1 = 0i32;
        for j in 0..16 {
            let v0 = i32::from(x.qs[j] & 0x0F) - 8;
            let v1 = i32::from(x.qs[j] >> 4) - 8;
            sumi0 += v0 * i32::from(y.qs[j]);
            sumi1 += v1 * i32::from(y.qs[j + 16]);
        }
        let sumi = sumi0 + sumi1;
        sumf += sumi as f32 * x.d.to_f32() * y.d.to_f32();
    }
    sumf
}

/// ggml `ggml_vec_dot_q4_1_q8_1_generic`: the min `m` meets the activation
/// block sum `s` that Q8_1 carries precomputed.
pub fn dot_q4_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockQ4_1>(w).zip(blocks::<BlockQ8_1>(a)) {
        let mut sumi0 = 0i32;
        let mut sumi1 = 0i32;
        for j in 0..16 {
            let v0 = i32::from(x.qs[j] & 0x0F);
            let v1 = i32::from(x.qs[j] >> 4);
            sumi0 += v0 * i32::from(y.qs[j]);
            sumi1 += v1 * i32::from(y.qs[j + 16]);
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sumf
}

/// ggml `ggml_vec_dot_q5_0_q8_0_generic`.
pub fn dot_q5_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockQ5_0>(w).zip(blocks::<BlockQ8_0>(a)) {
        let qh = u32::from_le_bytes(x.qh);
        let mut sumi0 = 0i32;
        let mut sumi1 = 0i32;
        for j in 0..16 {
            let xh_0 = (((qh & (1 << j)) >> j) << 4) as u8;
            let xh_1 = ((qh & (1 << (j + 16))) >> (j + 12)) as u8;
            let x0 = i32::from(((x.qs[j] & 0x0F) | xh_0) as i8) - 16;
            let x1 = i32::from(((x.qs[j] >> 4) | xh_1) as i8) - 16;
            sumi0 += x0 * i32::from(y.qs[j]);
            sumi1 += x1 * i32::from(y.qs[j + 16]);
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32;
    }
    sumf
}

/// ggml `ggml_vec_dot_q5_1_q8_1_generic`.
pub fn dot_q5_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockQ5_1>(w).zip(blocks::<BlockQ8_1>(a)) {
        let qh = u32::from_le_bytes(x.qh);
        let mut sumi0 = 0i32;
        let mut sumi1 = 0i32;
        for j in 0..16 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = i32::from((x.qs[j] & 0x0F) | xh_0);
            let x1 = i32::from((x.qs[j] >> 4) | xh_1);
            sumi0 += x0 * i32::from(y.qs[j]);
            sumi1 += x1 * i32::from(y.qs[j + 16]);
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sumf
}

/// ggml `ggml_vec_dot_q8_0_q8_0_generic`.
pub fn dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockQ8_0>(w).zip(blocks::<BlockQ8_0>(a)) {
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += i32::from(x.qs[j]) * i32::from(y.qs[j]);
        }
        sumf += sumi as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sumf
}

/// ggml `ggml_vec_dot_q2_K_q8_K_generic`.
pub fn dot_q2_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockQ2K>(w).zip(blocks::<BlockQ8K>(a)) {
        let sc = &x.scales;
        let mut summs = 0i32;
        for j in 0..16 {
            summs += i32::from(y.bsums[j]) * i32::from(sc[j] >> 4);
        }
        let dall = y.d * x.d.to_f32();
        let dmin = y.d * x.dmin.to_f32();

        let mut isum = 0i32;
        let mut is = 0;
        let mut q8 = 0;
        for k in 0..QK_K / 128 {
            let q2 = &x.qs[32 * k..32 * k + 32];
            for shift in [0, 2, 4, 6] {
                let d = i32::from(sc[is] & 0xF);
                is += 1;
                let mut isuml = 0i32;
                for l in 0..16 {
                    isuml += i32::from(y.qs[q8 + l]) * i32::from((q2[l] >> shift) & 3);
                }
                isum += d * isuml;
                let d = i32::from(sc[is] & 0xF);
                is += 1;
                let mut isuml = 0i32;
                for l in 16..32 {
                    isuml += i32::from(y.qs[q8 + l]) * i32::from((q2[l] >> shift) & 3);
                }
                isum += d * isuml;
                q8 += 32;
            }
        }
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// The eight-lane accumulation shared by ggml's generic Q3_K..Q6_K dots:
/// `aux32[l] += scale * (q8[l] * a[l])` over groups of eight values, where
/// `sc16[j]` is the scale of values `16 j..16 j + 16`; returns `aux32`.
/// Integer arithmetic only, so any implementation with these sums (see
/// [`Lanes8`]) gives the same lanes.
///
/// # Safety
///
/// None (an `unsafe fn` to share [`Lanes8`]'s type).
pub(crate) unsafe fn lanes8(q8: &[i8; QK_K], a: &[i8; QK_K], sc16: &[i32; 16]) -> [i32; 8] {
    let mut aux32 = [0i32; 8];
    for g in 0..QK_K / 8 {
        let scale = sc16[g / 2];
        for l in 0..8 {
            // ggml keeps the product in an int16_t; |q8 * a| <= 128 * 64 fits.
            let aux16 = i32::from(q8[8 * g + l]) * i32::from(a[8 * g + l]);
            aux32[l] += scale * aux16;
        }
    }
    aux32
}

/// An implementation of [`lanes8`] (the scalar one, or a SIMD one whose
/// instruction set the CPU runs: the safety contract of calling it).
pub(crate) type Lanes8 = unsafe fn(&[i8; QK_K], &[i8; QK_K], &[i32; 16]) -> [i32; 8];

/// ggml `ggml_vec_dot_q3_K_q8_K_generic`.
pub fn dot_q3_k(w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: the scalar lanes need nothing.
    unsafe { dot_q3_k_with(w, a, lanes8) }
}

/// [`dot_q3_k`] with the lane sums of `lanes`.
///
/// # Safety
///
/// The CPU runs `lanes`' instruction set.
pub(crate) unsafe fn dot_q3_k_with(w: &[u8], a: &[u8], lanes: Lanes8) -> f32 {
    let mut sums = [0.0f32; 8];
    for (x, y) in blocks::<BlockQ3K>(w).zip(blocks::<BlockQ8K>(a)) {
        let mut aux8 = [0i8; QK_K];
        let mut m = 1u8;
        let mut ai = 0;
        for j in (0..QK_K).step_by(128) {
            let q3 = &x.qs[j / 4..j / 4 + 32];
            for shift in [0, 2, 4, 6] {
                for l in 0..32 {
                    let low = ((q3[l] >> shift) & 3) as i8;
                    let high = if x.hmask[l] & m != 0 { 0 } else { 4 };
                    aux8[ai + l] = low - high;
                }
                ai += 32;
                m <<= 1;
            }
        }
        let scales = crate::quant::k_quants::unpack_q3_scales(&x.scales);
        let sc16: [i32; 16] = std::array::from_fn(|j| i32::from(scales[j]) - 32);
        let aux32 = lanes(&y.qs, &aux8, &sc16);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0.0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

/// The `utmp` shuffle of ggml's Q4_K/Q5_K dots: the 8 six-bit scales and
/// the 8 six-bit mins of [`crate::quant::k_quants::get_scale_min_k4`].
pub(crate) fn k4_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        (sc[j], mn[j]) = crate::quant::k_quants::get_scale_min_k4(j, s);
    }
    (sc, mn)
}

/// The common tail of ggml's generic Q4_K/Q5_K dots, given the unpacked
/// levels of one super-block.
///
/// # Safety
///
/// The CPU runs `lanes`' instruction set.
#[allow(clippy::too_many_arguments)]
unsafe fn k4_block(
    lanes: Lanes8,
    aux8: &[i8; QK_K],
    scales: &[u8; 12],
    d: f16,
    dmin: f16,
    y: &BlockQ8K,
    sums: &mut [f32; 8],
    sumf: &mut f32,
) {
    let (sc, mn) = k4_scales_mins(scales);
    let mut sumi = 0i32;
    for j in 0..QK_K / 16 {
        sumi += i32::from(y.bsums[j]) * i32::from(mn[j / 2]);
    }
    let sc16: [i32; 16] = std::array::from_fn(|j| i32::from(sc[j / 2]));
    let aux32 = lanes(&y.qs, aux8, &sc16);
    let d = d.to_f32() * y.d;
    for l in 0..8 {
        sums[l] += d * aux32[l] as f32;
    }
    let dmin = dmin.to_f32() * y.d;
    *sumf -= dmin * sumi as f32;
}

/// ggml `ggml_vec_dot_q4_K_q8_K_generic`.
pub fn dot_q4_k(w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: the scalar lanes need nothing.
    unsafe { dot_q4_k_with(w, a, lanes8) }
}

/// [`dot_q4_k`] with the lane sums of `lanes`.
///
/// # Safety
///
/// The CPU runs `lanes`' instruction set.
pub(crate) unsafe fn dot_q4_k_with(w: &[u8], a: &[u8], lanes: Lanes8) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockQ4K>(w).zip(blocks::<BlockQ8K>(a)) {
        let mut aux8 = [0i8; QK_K];
        for j in 0..QK_K / 64 {
            for l in 0..32 {
                aux8[64 * j + l] = (x.qs[32 * j + l] & 0xF) as i8;
                aux8[64 * j + 32 + l] = (x.qs[32 * j + l] >> 4) as i8;
            }
        }
        k4_block(
            lanes, &aux8, &x.scales, x.d, x.dmin, &y, &mut sums, &mut sumf,
        );
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

/// ggml `ggml_vec_dot_q5_K_q8_K_generic`.
pub fn dot_q5_k(w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: the scalar lanes need nothing.
    unsafe { dot_q5_k_with(w, a, lanes8) }
}

/// [`dot_q5_k`] with the lane sums of `lanes`.
///
/// # Safety
///
/// The CPU runs `lanes`' instruction set.
pub(crate) unsafe fn dot_q5_k_with(w: &[u8], a: &[u8], lanes: Lanes8) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockQ5K>(w).zip(blocks::<BlockQ8K>(a)) {
        let mut aux8 = [0i8; QK_K];
        let mut m = 1u8;
        for j in 0..QK_K / 64 {
            for l in 0..32 {
                let h = if x.qh[l] & m != 0 { 16 } else { 0 };
                aux8[64 * j + l] = (x.qs[32 * j + l] & 0xF) as i8 + h;
            }
            m <<= 1;
            for l in 0..32 {
                let h = if x.qh[l] & m != 0 { 16 } else { 0 };
                aux8[64 * j + 32 + l] = (x.qs[32 * j + l] >> 4) as i8 + h;
            }
            m <<= 1;
        }
        k4_block(
            lanes, &aux8, &x.scales, x.d, x.dmin, &y, &mut sums, &mut sumf,
        );
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

/// ggml `ggml_vec_dot_q6_K_q8_K_generic`.
pub fn dot_q6_k(w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: the scalar lanes need nothing.
    unsafe { dot_q6_k_with(w, a, lanes8) }
}

/// [`dot_q6_k`] with the lane sums of `lanes`.
///
/// # Safety
///
/// The CPU runs `lanes`' instruction set.
pub(crate) unsafe fn dot_q6_k_with(w: &[u8], a: &[u8], lanes: Lanes8) -> f32 {
    let mut sums = [0.0f32; 8];
    for (x, y) in blocks::<BlockQ6K>(w).zip(blocks::<BlockQ8K>(a)) {
        let mut aux8 = [0i8; QK_K];
        for half in 0..2 {
            let ql = &x.ql[64 * half..64 * half + 64];
            let qh = &x.qh[32 * half..32 * half + 32];
            let a = &mut aux8[128 * half..128 * half + 128];
            for l in 0..32 {
                a[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                a[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                a[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                a[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        let sc16: [i32; 16] = std::array::from_fn(|j| i32::from(x.scales[j]));
        let aux32 = lanes(&y.qs, &aux8, &sc16);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0.0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

/// The integer dot of one 16-byte group of IQ4 indices (32 values: low
/// nibbles first, then high) with 32 activation quants.
#[inline]
fn iq4_group(qs: &[u8], q8: &[i8]) -> i32 {
    let mut sumi1 = 0i32;
    let mut sumi2 = 0i32;
    for j in 0..16 {
        sumi1 += i32::from(q8[j]) * i32::from(KVALUES_IQ4NL[usize::from(qs[j] & 0xF)]);
        sumi2 += i32::from(q8[j + 16]) * i32::from(KVALUES_IQ4NL[usize::from(qs[j] >> 4)]);
    }
    sumi1 + sumi2
}

/// ggml `ggml_vec_dot_iq4_nl_q8_0_generic`.
pub fn dot_iq4_nl(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ4NL>(w).zip(blocks::<BlockQ8_0>(a)) {
        let d = y.d.to_f32() * x.d.to_f32();
        sumf += d * iq4_group(&x.qs, &y.qs) as f32;
    }
    sumf
}

/// ggml `ggml_vec_dot_iq4_xs_q8_K_generic`.
pub fn dot_iq4_xs(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ4XS>(w).zip(blocks::<BlockQ8K>(a)) {
        let d4d8 = x.d.to_f32() * y.d;
        for ib in 0..QK_K / 32 {
            let dl = d4d8 * (x.sub_scale(ib) - 32) as f32;
            let sumi = iq4_group(&x.qs[16 * ib..16 * ib + 16], &y.qs[32 * ib..32 * ib + 32]);
            sumf += dl * sumi as f32;
        }
    }
    sumf
}

/// The signed product sum of eight grid levels `g` (signs in the bits of
/// `signs`) with eight activation quants.
#[inline]
fn signed8(g: [u8; 8], signs: u8, q8: &[i8]) -> i32 {
    let mut sumi = 0i32;
    for j in 0..8 {
        let s = if signs & KMASK_IQ2XS[j] != 0 { -1 } else { 1 };
        sumi += i32::from(g[j]) * i32::from(q8[j]) * s;
    }
    sumi
}

/// The integer sum of one IQ2_XXS super-block against its Q8_K block.
pub(crate) fn iq2_xxs_bsum(x: &BlockIQ2XXS, q8: &[i8]) -> i32 {
    let mut bsum = 0i32;
    for ib32 in 0..QK_K / 32 {
        let (a0, a1) = x.aux(ib32);
        let ls = 2 * (a1 >> 28) as i32 + 1;
        let idx = a0.to_le_bytes();
        let mut sumi = 0i32;
        for l in 0..4 {
            let g = IQ2XXS_GRID[usize::from(idx[l])].to_le_bytes();
            let signs = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
            let at = 32 * ib32 + 8 * l;
            sumi += signed8(g, signs, &q8[at..at + 8]);
        }
        bsum += sumi * ls;
    }
    bsum
}

/// ggml `ggml_vec_dot_iq2_xxs_q8_K_generic`.
pub fn dot_iq2_xxs(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ2XXS>(w).zip(blocks::<BlockQ8K>(a)) {
        let d = x.d.to_f32() * y.d;
        sumf += d * iq2_xxs_bsum(&x, &y.qs) as f32;
    }
    0.125 * sumf
}

/// The integer sum of one IQ2_XS super-block against its Q8_K block.
pub(crate) fn iq2_xs_bsum(x: &BlockIQ2XS, q8: &[i8]) -> i32 {
    let mut bsum = 0i32;
    for ib32 in 0..QK_K / 32 {
        let ls = [
            2 * i32::from(x.scales[ib32] & 0xF) + 1,
            2 * i32::from(x.scales[ib32] >> 4) + 1,
        ];
        for h in 0..2 {
            let mut sumi = 0i32;
            for l in 2 * h..2 * h + 2 {
                let q = x.qs[4 * ib32 + l];
                let g = IQ2XS_GRID[usize::from(q & 511)].to_le_bytes();
                let signs = KSIGNS_IQ2XS[usize::from(q >> 9)];
                let at = 32 * ib32 + 8 * l;
                sumi += signed8(g, signs, &q8[at..at + 8]);
            }
            bsum += sumi * ls[h];
        }
    }
    bsum
}

/// ggml `ggml_vec_dot_iq2_xs_q8_K_generic`.
pub fn dot_iq2_xs(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ2XS>(w).zip(blocks::<BlockQ8K>(a)) {
        let d = x.d.to_f32() * y.d;
        sumf += d * iq2_xs_bsum(&x, &y.qs) as f32;
    }
    0.125 * sumf
}

/// The integer sum of one IQ2_S super-block against its Q8_K block.
pub(crate) fn iq2_s_bsum(x: &BlockIQ2S, q8: &[i8]) -> i32 {
    let mut bsum = 0i32;
    for ib32 in 0..QK_K / 32 {
        let ls1 = 1 + 2 * i32::from(x.scales[ib32] & 0xF);
        let ls2 = 1 + 2 * i32::from(x.scales[ib32] >> 4);
        let mut sumi = [0i32; 2];
        for l in 0..4 {
            let g = IQ2S_GRID[x.index(ib32, l)].to_le_bytes();
            let signs = x.qs[QK_K / 8 + 4 * ib32 + l];
            let at = 32 * ib32 + 8 * l;
            sumi[l / 2] += signed8(g, signs, &q8[at..at + 8]);
        }
        bsum += ls1 * sumi[0] + ls2 * sumi[1];
    }
    bsum
}

/// ggml `ggml_vec_dot_iq2_s_q8_K_generic`.
pub fn dot_iq2_s(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ2S>(w).zip(blocks::<BlockQ8K>(a)) {
        let d = x.d.to_f32() * y.d;
        sumf += d * iq2_s_bsum(&x, &y.qs) as f32;
    }
    0.125 * sumf
}

/// Two IQ3 grid points (eight levels) as one group of eight.
#[inline]
fn grid_pair(g1: u32, g2: u32) -> [u8; 8] {
    let a = g1.to_le_bytes();
    let b = g2.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// The integer sum of one IQ3_XXS super-block against its Q8_K block.
pub(crate) fn iq3_xxs_bsum(x: &BlockIQ3XXS, q8: &[i8]) -> i32 {
    let mut bsum = 0i32;
    for ib32 in 0..QK_K / 32 {
        let aux = x.aux(ib32);
        let ls = 2 * (aux >> 28) as i32 + 1;
        let q3 = &x.qs[8 * ib32..8 * ib32 + 8];
        let mut sumi = 0i32;
        for l in 0..4 {
            let g = grid_pair(
                IQ3XXS_GRID[usize::from(q3[2 * l])],
                IQ3XXS_GRID[usize::from(q3[2 * l + 1])],
            );
            let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
            let at = 32 * ib32 + 8 * l;
            sumi += signed8(g, signs, &q8[at..at + 8]);
        }
        bsum += sumi * ls;
    }
    bsum
}

/// ggml `ggml_vec_dot_iq3_xxs_q8_K_generic`.
pub fn dot_iq3_xxs(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ3XXS>(w).zip(blocks::<BlockQ8K>(a)) {
        let d = x.d.to_f32() * y.d;
        sumf += d * iq3_xxs_bsum(&x, &y.qs) as f32;
    }
    0.25 * sumf
}

/// The integer sum of one IQ3_S super-block against its Q8_K block.
pub(crate) fn iq3_s_bsum(x: &BlockIQ3S, q8: &[i8]) -> i32 {
    let mut bsum = 0i32;
    for ib32 in 0..QK_K / 32 {
        let ls = x.sub_scale(ib32) as i32;
        let mut sumi = 0i32;
        for l in 0..4 {
            let (i1, i2) = x.indices(ib32, l);
            let g = grid_pair(IQ3S_GRID[i1], IQ3S_GRID[i2]);
            let at = 32 * ib32 + 8 * l;
            sumi += signed8(g, x.signs[4 * ib32 + l], &q8[at..at + 8]);
        }
        bsum += sumi * ls;
    }
    bsum
}

/// ggml `ggml_vec_dot_iq3_s_q8_K_generic`.
pub fn dot_iq3_s(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ3S>(w).zip(blocks::<BlockQ8K>(a)) {
        let d = x.d.to_f32() * y.d;
        sumf += d * iq3_s_bsum(&x, &y.qs) as f32;
    }
    sumf
}

/// The product sum of eight IQ1 grid levels with eight activation quants.
#[inline]
fn grid1_dot(g: [i8; 8], q8: &[i8]) -> i32 {
    let mut s = 0i32;
    for j in 0..8 {
        s += i32::from(q8[j]) * i32::from(g[j]);
    }
    s
}

/// The two integer sums of one IQ1_S super-block against its Q8_K block:
/// the scaled grid products, and the scaled signed activation sums of the
/// shifts.
pub(crate) fn iq1_s_sums(x: &BlockIQ1S, y: &BlockQ8K) -> (i32, i32) {
    let (mut sumi, mut sumi1) = (0i32, 0i32);
    for ib in 0..QK_K / 32 {
        let ls = x.sub_scale(ib);
        let delta = if x.qh[ib] & 0x8000 != 0 { -1 } else { 1 };
        let mut lsum = 0i32;
        for l in 0..4 {
            let at = 32 * ib + 8 * l;
            lsum += grid1_dot(iq1_grid8(x.index(ib, l)), &y.qs[at..at + 8]);
        }
        sumi += ls * lsum;
        sumi1 += ls * delta * (i32::from(y.bsums[2 * ib]) + i32::from(y.bsums[2 * ib + 1]));
    }
    (sumi, sumi1)
}

/// ggml `ggml_vec_dot_iq1_s_q8_K_generic`.
pub fn dot_iq1_s(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ1S>(w).zip(blocks::<BlockQ8K>(a)) {
        let (sumi, sumi1) = iq1_s_sums(&x, &y);
        sumf += x.d.to_f32() * y.d * (sumi as f32 + IQ1S_DELTA * sumi1 as f32);
    }
    sumf
}

/// The two integer sums of one IQ1_M super-block against its Q8_K block.
pub(crate) fn iq1_m_sums(x: &BlockIQ1M, q8: &[i8]) -> (i32, i32) {
    let (mut sumi1, mut sumi2) = (0i32, 0i32);
    for ib in 0..QK_K / 32 {
        let mut sum1 = [0i32; 2];
        let mut sum2 = [0i32; 2];
        for l in 0..4 {
            let (idx, neg) = x.index(ib, l);
            let at = 32 * ib + 8 * l;
            let q = &q8[at..at + 8];
            let lsum2: i32 = q.iter().map(|&v| i32::from(v)).sum();
            sum1[l / 2] += grid1_dot(iq1_grid8(idx), q);
            sum2[l / 2] += if neg { -lsum2 } else { lsum2 };
        }
        let (ls1, ls2) = x.sub_scales(ib);
        sumi1 += sum1[0] * ls1 + sum1[1] * ls2;
        sumi2 += sum2[0] * ls1 + sum2[1] * ls2;
    }
    (sumi1, sumi2)
}

/// ggml `ggml_vec_dot_iq1_m_q8_K_generic`.
pub fn dot_iq1_m(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in blocks::<BlockIQ1M>(w).zip(blocks::<BlockQ8K>(a)) {
        let (sumi1, sumi2) = iq1_m_sums(&x, &y.qs);
        sumf += x.d().to_f32() * y.d * (sumi1 as f32 + IQ1S_DELTA * sumi2 as f32);
    }
    sumf
}
