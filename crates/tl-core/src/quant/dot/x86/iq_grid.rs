//! The grid formats IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M
//! against Q8_K, AVX2 and AVX-512 VNNI.
//!
//! Each 32-value sub-block of a weight super-block is unpacked once to 32
//! signed 8-bit levels: the grid points' bytes (table lookups) with their
//! signs applied by `vpsignb` from a mask built of the sign bits. Its
//! products with the activation quants are summed exactly (ggml's sign
//! trick feeding `vpmaddubsw` + `vpmaddwd`, or `vpdpbusd`) into eight i32
//! lanes of four values each, which are multiplied by the sub-block's (or
//! half's) integer scale and added up: the super-block's integer sum of
//! ggml's generic kernel, exactly. The float operations per super-block
//! are then those of the generic kernel, in its order, so these kernels
//! give the reference's bits.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use tl_gguf::GgmlType;

use super::avx2::hsum_i32;
use crate::quant::dot::{Acts, Kernel};
use crate::quant::iq1::{BlockIQ1M, BlockIQ1S, IQ1S_DELTA};
use crate::quant::iq2::{BlockIQ2S, BlockIQ2XS, BlockIQ2XXS};
use crate::quant::iq3::{BlockIQ3S, BlockIQ3XXS};
use crate::quant::iq_grids::{
    IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KSIGNS_IQ2XS,
};
use crate::quant::k_quants::QK_K;

pub(super) fn install_avx2(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::IQ3_XXS, iq3_xxs_avx2);
    set(GgmlType::IQ3_S, iq3_s_avx2);
    set(GgmlType::IQ2_XXS, iq2_xxs_avx2);
    set(GgmlType::IQ2_XS, iq2_xs_avx2);
    set(GgmlType::IQ2_S, iq2_s_avx2);
    set(GgmlType::IQ1_S, iq1_s_avx2);
    set(GgmlType::IQ1_M, iq1_m_avx2);
}

pub(super) fn install_avx512(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::IQ3_XXS, iq3_xxs_vnni);
    set(GgmlType::IQ3_S, iq3_s_vnni);
    set(GgmlType::IQ2_XXS, iq2_xxs_vnni);
    set(GgmlType::IQ2_XS, iq2_xs_vnni);
    set(GgmlType::IQ2_S, iq2_s_vnni);
    set(GgmlType::IQ1_S, iq1_s_vnni);
    set(GgmlType::IQ1_M, iq1_m_vnni);
}

/// The weight types, as const-generic tags.
mod tag {
    pub const IQ3_XXS: u8 = 0;
    pub const IQ3_S: u8 = 1;
    pub const IQ2_XXS: u8 = 2;
    pub const IQ2_XS: u8 = 3;
    pub const IQ2_S: u8 = 4;
    pub const IQ1_S: u8 = 5;
    pub const IQ1_M: u8 = 6;

    /// Bytes of one super-block.
    pub const fn bytes(t: u8) -> usize {
        match t {
            IQ3_XXS => 98,
            IQ3_S => 110,
            IQ2_XXS => 66,
            IQ2_XS => 74,
            IQ2_S => 82,
            IQ1_S => 50,
            _ => 56,
        }
    }
}

const Q8_K_BYTES: usize = 292;

/// One super-block unpacked: eight sub-blocks of 32 signed levels, the
/// integer scale of each i32 lane of their products, the f16 scale, and
/// for IQ1 the shift terms.
struct Unpacked {
    w: [__m256i; 8],
    sc: [__m256i; 8],
    d: f32,
    /// IQ1_S: `ls * delta` per sub-block (against the Q8_K `bsums`).
    ls_delta: [i32; 8],
    /// IQ1_M: `ls * delta` per lane of four values.
    dl: [__m256i; 8],
}

/// The 32 sign multipliers (1 or -1) of the four sign bytes of `s`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn sign_vec(s: u32) -> __m256i {
    let v = _mm256_set1_epi32(s as i32);
    let idx = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let m = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, idx), bits), bits);
    _mm256_or_si256(m, _mm256_set1_epi8(1))
}

/// Four 8-level grid points as 32 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn grid64(g: [u64; 4]) -> __m256i {
    _mm256_set_epi64x(g[3] as i64, g[2] as i64, g[1] as i64, g[0] as i64)
}

/// Eight 4-level grid points as 32 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn grid32(g: [u32; 8]) -> __m256i {
    _mm256_set_epi32(
        g[7] as i32,
        g[6] as i32,
        g[5] as i32,
        g[4] as i32,
        g[3] as i32,
        g[2] as i32,
        g[1] as i32,
        g[0] as i32,
    )
}

/// Lane scales: `a` for the first 16 values (lanes 0..4), `b` for the rest.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn halves(a: i32, b: i32) -> __m256i {
    _mm256_setr_epi32(a, a, a, a, b, b, b, b)
}

/// Unpacks super-block `blk` (the bytes of one block of tag `T`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn unpack<const T: u8>(blk: &[u8]) -> Unpacked {
    let mut u = Unpacked {
        w: [_mm256_setzero_si256(); 8],
        sc: [_mm256_setzero_si256(); 8],
        d: 0.0,
        ls_delta: [0; 8],
        dl: [_mm256_setzero_si256(); 8],
    };
    match T {
        tag::IQ3_XXS => {
            let x: BlockIQ3XXS = bytemuck::pod_read_unaligned(blk);
            u.d = x.d.to_f32();
            for ib in 0..QK_K / 32 {
                let aux = x.aux(ib);
                let q = &x.qs[8 * ib..8 * ib + 8];
                let g = std::array::from_fn(|j| IQ3XXS_GRID[usize::from(q[j])]);
                let s = u32::from_le_bytes(std::array::from_fn(|l| {
                    KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize]
                }));
                u.w[ib] = _mm256_sign_epi8(grid32(g), sign_vec(s));
                u.sc[ib] = _mm256_set1_epi32(2 * (aux >> 28) as i32 + 1);
            }
        }
        tag::IQ3_S => {
            let x: BlockIQ3S = bytemuck::pod_read_unaligned(blk);
            u.d = x.d.to_f32();
            for ib in 0..QK_K / 32 {
                let g = std::array::from_fn(|j| {
                    let (a, b) = x.indices(ib, j / 2);
                    IQ3S_GRID[if j % 2 == 0 { a } else { b }]
                });
                let s = u32::from_le_bytes([
                    x.signs[4 * ib],
                    x.signs[4 * ib + 1],
                    x.signs[4 * ib + 2],
                    x.signs[4 * ib + 3],
                ]);
                u.w[ib] = _mm256_sign_epi8(grid32(g), sign_vec(s));
                u.sc[ib] = _mm256_set1_epi32(x.sub_scale(ib) as i32);
            }
        }
        tag::IQ2_XXS => {
            let x: BlockIQ2XXS = bytemuck::pod_read_unaligned(blk);
            u.d = x.d.to_f32();
            for ib in 0..QK_K / 32 {
                let (a0, a1) = x.aux(ib);
                let idx = a0.to_le_bytes();
                let g = std::array::from_fn(|l| IQ2XXS_GRID[usize::from(idx[l])]);
                let s = u32::from_le_bytes(std::array::from_fn(|l| {
                    KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize]
                }));
                u.w[ib] = _mm256_sign_epi8(grid64(g), sign_vec(s));
                u.sc[ib] = _mm256_set1_epi32(2 * (a1 >> 28) as i32 + 1);
            }
        }
        tag::IQ2_XS => {
            let x: BlockIQ2XS = bytemuck::pod_read_unaligned(blk);
            u.d = x.d.to_f32();
            for ib in 0..QK_K / 32 {
                let q = &x.qs[4 * ib..4 * ib + 4];
                let g = std::array::from_fn(|l| IQ2XS_GRID[usize::from(q[l] & 511)]);
                let s = u32::from_le_bytes(std::array::from_fn(|l| {
                    KSIGNS_IQ2XS[usize::from(q[l] >> 9)]
                }));
                u.w[ib] = _mm256_sign_epi8(grid64(g), sign_vec(s));
                u.sc[ib] = halves(
                    2 * i32::from(x.scales[ib] & 0xF) + 1,
                    2 * i32::from(x.scales[ib] >> 4) + 1,
                );
            }
        }
        tag::IQ2_S => {
            let x: BlockIQ2S = bytemuck::pod_read_unaligned(blk);
            u.d = x.d.to_f32();
            for ib in 0..QK_K / 32 {
                let g = std::array::from_fn(|l| IQ2S_GRID[x.index(ib, l)]);
                let at = QK_K / 8 + 4 * ib;
                let s = u32::from_le_bytes([x.qs[at], x.qs[at + 1], x.qs[at + 2], x.qs[at + 3]]);
                u.w[ib] = _mm256_sign_epi8(grid64(g), sign_vec(s));
                u.sc[ib] = halves(
                    2 * i32::from(x.scales[ib] & 0xF) + 1,
                    2 * i32::from(x.scales[ib] >> 4) + 1,
                );
            }
        }
        tag::IQ1_S => {
            let x: BlockIQ1S = bytemuck::pod_read_unaligned(blk);
            u.d = x.d.to_f32();
            for ib in 0..QK_K / 32 {
                let g = std::array::from_fn(|l| IQ1S_GRID[x.index(ib, l)]);
                u.w[ib] = grid64(g);
                let ls = x.sub_scale(ib);
                u.sc[ib] = _mm256_set1_epi32(ls);
                u.ls_delta[ib] = if x.qh[ib] & 0x8000 != 0 { -ls } else { ls };
            }
        }
        _ => {
            let x: BlockIQ1M = bytemuck::pod_read_unaligned(blk);
            u.d = x.d().to_f32();
            for ib in 0..QK_K / 32 {
                let mut g = [0u64; 4];
                let mut delta = [0i32; 4];
                for l in 0..4 {
                    let (idx, neg) = x.index(ib, l);
                    g[l] = IQ1S_GRID[idx];
                    delta[l] = if neg { -1 } else { 1 };
                }
                u.w[ib] = grid64(g);
                let (ls1, ls2) = x.sub_scales(ib);
                u.sc[ib] = halves(ls1, ls2);
                u.dl[ib] = _mm256_setr_epi32(
                    ls1 * delta[0],
                    ls1 * delta[0],
                    ls1 * delta[1],
                    ls1 * delta[1],
                    ls2 * delta[2],
                    ls2 * delta[2],
                    ls2 * delta[3],
                    ls2 * delta[3],
                );
            }
        }
    }
    u
}

/// Eight i32 sums of four products each of 32 signed levels `w` and 32
/// activation quants `a` (AVX2).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_avx2(w: __m256i, a: __m256i) -> __m256i {
    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// The same with VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn dot_vnni(w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(
        _mm256_setzero_si256(),
        _mm256_sign_epi8(w, w),
        _mm256_sign_epi8(a, w),
    )
}

/// Eight i32 sums of four activation quants each.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn sum4(a: __m256i) -> __m256i {
    let p = _mm256_maddubs_epi16(_mm256_set1_epi8(1), a);
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

macro_rules! grid_kernel {
    ($feat:literal, $dot:ident, $body:ident) => {
        /// Weights of tag `T` against `R` activation rows.
        ///
        /// # Safety
        ///
        /// The CPU runs the instruction set; the arguments passed
        /// `check_kernel_args`, and `out.len() >= R`.
        #[target_feature(enable = $feat)]
        unsafe fn $body<const T: u8, const R: usize>(
            k: usize,
            w: &[u8],
            acts: &Acts<'_>,
            row0: usize,
            out: &mut [f32],
        ) {
            let nb = k / QK_K;
            let wbytes = tag::bytes(T);
            let mut sumf = [0f32; R];
            for ibl in 0..nb {
                let u = unpack::<T>(&w[ibl * wbytes..(ibl + 1) * wbytes]);
                for r in 0..R {
                    let start = (row0 + r) * acts.row_bytes + ibl * Q8_K_BYTES;
                    let y = &acts.bytes[start..start + Q8_K_BYTES];
                    let dy = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                    let ap = y.as_ptr().add(4);
                    let mut acc = _mm256_setzero_si256();
                    let mut acc2 = _mm256_setzero_si256();
                    for ib in 0..QK_K / 32 {
                        let q = _mm256_loadu_si256(ap.add(32 * ib) as *const __m256i);
                        acc = _mm256_add_epi32(acc, _mm256_mullo_epi32($dot(u.w[ib], q), u.sc[ib]));
                        if T == tag::IQ1_M {
                            acc2 = _mm256_add_epi32(acc2, _mm256_mullo_epi32(sum4(q), u.dl[ib]));
                        }
                    }
                    let bsum = hsum_i32(acc);
                    match T {
                        tag::IQ1_S => {
                            let mut sumi1 = 0i32;
                            for ib in 0..QK_K / 32 {
                                let at = 4 + QK_K + 4 * ib;
                                let b0 = i16::from_le_bytes([y[at], y[at + 1]]);
                                let b1 = i16::from_le_bytes([y[at + 2], y[at + 3]]);
                                sumi1 += u.ls_delta[ib] * (i32::from(b0) + i32::from(b1));
                            }
                            sumf[r] += u.d * dy * (bsum as f32 + IQ1S_DELTA * sumi1 as f32);
                        }
                        tag::IQ1_M => {
                            let sumi2 = hsum_i32(acc2);
                            sumf[r] += u.d * dy * (bsum as f32 + IQ1S_DELTA * sumi2 as f32);
                        }
                        _ => sumf[r] += u.d * dy * bsum as f32,
                    }
                }
            }
            let post = match T {
                tag::IQ3_XXS => 0.25,
                tag::IQ3_S | tag::IQ1_S | tag::IQ1_M => 1.0,
                _ => 0.125,
            };
            for r in 0..R {
                out[r] = if post == 1.0 { sumf[r] } else { post * sumf[r] };
            }
        }
    };
}

grid_kernel!("avx2,fma,f16c", dot_avx2, grid_avx2_rows);
grid_kernel!(
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dot_vnni,
    grid_vnni_rows
);

k_tag_entries!(
    grid_avx2_rows,
    iq3_xxs_avx2 = tag::IQ3_XXS,
    iq3_s_avx2 = tag::IQ3_S,
    iq2_xxs_avx2 = tag::IQ2_XXS,
    iq2_xs_avx2 = tag::IQ2_XS,
    iq2_s_avx2 = tag::IQ2_S,
    iq1_s_avx2 = tag::IQ1_S,
    iq1_m_avx2 = tag::IQ1_M
);
k_tag_entries!(
    grid_vnni_rows,
    iq3_xxs_vnni = tag::IQ3_XXS,
    iq3_s_vnni = tag::IQ3_S,
    iq2_xxs_vnni = tag::IQ2_XXS,
    iq2_xs_vnni = tag::IQ2_XS,
    iq2_s_vnni = tag::IQ2_S,
    iq1_s_vnni = tag::IQ1_S,
    iq1_m_vnni = tag::IQ1_M
);
