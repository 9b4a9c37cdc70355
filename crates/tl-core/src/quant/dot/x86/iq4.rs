//! IQ4_NL (against Q8_0) and IQ4_XS (against Q8_K) kernels, AVX2 and
//! AVX-512 VNNI.
//!
//! The 4-bit indices of a 32-value group are looked up in the 16-entry
//! level table with one `vpshufb`, giving signed 8-bit weights. Their
//! products with the activation quants are summed exactly per group: the
//! sign trick of ggml (`|w|` times `a` with `w`'s sign) feeds `vpmaddubsw` +
//! `vpmaddwd` under AVX2 (pair sums stay below 2 * 127 * 127, no
//! saturation) or `vpdpbusd` under VNNI. Eight group sums are reduced to
//! one vector, converted and scaled in one go, and then added to the row's
//! sum one lane at a time, in group order: the float operations are those
//! of ggml's generic kernels, so these kernels give the reference's bits.
//!
//! Pointer arithmetic stays inside the lengths checked by
//! `check_kernel_args` (weights: one whole row; activations: rows
//! `row0..row0 + R` of `row_bytes` each).

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use tl_gguf::GgmlType;

use super::avx2::reduce8;
use super::f16_at;
use crate::quant::dot::{Acts, Kernel};
use crate::quant::iq4::KVALUES_IQ4NL;

pub(super) fn install_avx2(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::IQ4_NL, nl_avx2);
    set(GgmlType::IQ4_XS, xs_avx2);
}

pub(super) fn install_avx512(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::IQ4_NL, nl_vnni);
    set(GgmlType::IQ4_XS, xs_vnni);
}

/// Bytes of one IQ4_NL block and one Q8_0 block.
const NL_BYTES: usize = 18;
const Q8_0_BYTES: usize = 34;
/// Bytes of one IQ4_XS super-block and one Q8_K block.
const XS_BYTES: usize = 136;
const Q8_K_BYTES: usize = 292;

/// The level table in both 128-bit lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn levels() -> __m256i {
    table_of(KVALUES_IQ4NL)
}

/// A 16-level table in both 128-bit lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn table_of(levels: [i8; 16]) -> __m256i {
    let t = levels.map(|v| v as u8);
    let v = u128::from_le_bytes(t);
    let lo = v as i64;
    let hi = (v >> 64) as i64;
    _mm256_broadcastsi128_si256(_mm_set_epi64x(hi, lo))
}

/// The 32 signed levels of the 16 index bytes at `p`: low nibbles (values
/// 0..16) in the low lane, high nibbles (16..32) in the high lane.
///
/// # Safety
///
/// `p..p + 16` is readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn unpack(p: *const u8, table: __m256i) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(q, m4);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), m4);
    _mm256_shuffle_epi8(table, _mm256_set_m128i(hi, lo))
}

/// Eight i32 partial sums of the products of 32 signed levels `w` and 32
/// activation quants `a` (AVX2).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn dot_avx2(w: __m256i, a: __m256i) -> __m256i {
    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// The same with VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
pub(super) fn dot_vnni(w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(
        _mm256_setzero_si256(),
        _mm256_sign_epi8(w, w),
        _mm256_sign_epi8(a, w),
    )
}

/// Adds the first `n` lanes of `scale * sums` to `acc`, in lane order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn add_lanes(acc: &mut f32, scale: __m256, sums: __m256i, n: usize) {
    let prod = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(sums));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), prod) };
    for &v in &lanes[..n] {
        *acc += v;
    }
}

/// A dot-product kernel of a 32-value block of 16 index bytes into a
/// 16-level table (IQ4_NL, MXFP4) against Q8_0: `$bytes` a block, its
/// scale read by `$scale` from the block's start, the indices at `$qs`.
macro_rules! nl32_kernel {
    ($what:literal, $feat:literal, $dot:ident, $body:ident, $bytes:expr, $qs:expr, $scale:expr, $table:expr) => {
        /// $what against Q8_0, `R` activation rows.
        ///
        /// # Safety
        ///
        /// The CPU runs the instruction set; the arguments passed
        /// `check_kernel_args`, and `out.len() >= R`.
        #[target_feature(enable = $feat)]
        unsafe fn $body<const R: usize>(
            k: usize,
            w: &[u8],
            acts: &Acts<'_>,
            row0: usize,
            out: &mut [f32],
        ) {
            let nb = k / 32;
            let table = $table;
            let wp = w.as_ptr();
            let mut sumf = [0f32; R];
            let mut ib = 0;
            while ib < nb {
                let n = (nb - ib).min(8);
                let mut wv = [_mm256_setzero_si256(); 8];
                let mut dw = [0f32; 8];
                for j in 0..n {
                    let b = wp.add((ib + j) * $bytes);
                    dw[j] = $scale(b);
                    wv[j] = unpack(b.add($qs), table);
                }
                for r in 0..R {
                    let ap = acts.bytes.as_ptr().add((row0 + r) * acts.row_bytes);
                    let mut p = [_mm256_setzero_si256(); 8];
                    let mut d = [0f32; 8];
                    for j in 0..n {
                        let a = ap.add((ib + j) * Q8_0_BYTES);
                        d[j] = f16_at(a) * dw[j];
                        p[j] = $dot(wv[j], _mm256_loadu_si256(a.add(2) as *const __m256i));
                    }
                    add_lanes(&mut sumf[r], _mm256_loadu_ps(d.as_ptr()), reduce8(&p), n);
                }
                ib += 8;
            }
            out[..R].copy_from_slice(&sumf);
        }
    };
}
pub(super) use nl32_kernel;

macro_rules! iq4_kernels {
    ($feat:literal, $dot:ident, $nl:ident, $nl_body:ident, $xs:ident, $xs_body:ident) => {
        nl32_kernel!(
            "IQ4_NL",
            $feat,
            $dot,
            $nl_body,
            NL_BYTES,
            2,
            f16_at,
            levels()
        );

        /// IQ4_XS against Q8_K, `R` activation rows.
        ///
        /// # Safety
        ///
        /// As for the IQ4_NL kernel.
        #[target_feature(enable = $feat)]
        unsafe fn $xs_body<const R: usize>(
            k: usize,
            w: &[u8],
            acts: &Acts<'_>,
            row0: usize,
            out: &mut [f32],
        ) {
            let nb = k / 256;
            let table = levels();
            let wp = w.as_ptr();
            let mut sumf = [0f32; R];
            for ibl in 0..nb {
                let b = wp.add(ibl * XS_BYTES);
                let d = f16_at(b);
                let sh = u32::from(std::ptr::read_unaligned(b.add(2) as *const u16));
                let mut ls = [0f32; 8];
                let mut wv = [_mm256_setzero_si256(); 8];
                for ib in 0..8 {
                    let lo = u32::from(*b.add(4 + ib / 2) >> (4 * (ib % 2))) & 0xF;
                    let hi = (sh >> (2 * ib)) & 3;
                    ls[ib] = ((lo | (hi << 4)) as i32 - 32) as f32;
                    wv[ib] = unpack(b.add(8 + 16 * ib), table);
                }
                let ls = _mm256_loadu_ps(ls.as_ptr());
                for r in 0..R {
                    let a = acts
                        .bytes
                        .as_ptr()
                        .add((row0 + r) * acts.row_bytes + ibl * Q8_K_BYTES);
                    let dy = std::ptr::read_unaligned(a as *const f32);
                    let mut p = [_mm256_setzero_si256(); 8];
                    for ib in 0..8 {
                        let q = _mm256_loadu_si256(a.add(4 + 32 * ib) as *const __m256i);
                        p[ib] = $dot(wv[ib], q);
                    }
                    let dl = _mm256_mul_ps(_mm256_set1_ps(d * dy), ls);
                    add_lanes(&mut sumf[r], dl, reduce8(&p), 8);
                }
            }
            out[..R].copy_from_slice(&sumf);
        }

        k_entry!($nl, $nl_body);
        k_entry!($xs, $xs_body);
    };
}

iq4_kernels!(
    "avx2,fma,f16c",
    dot_avx2,
    nl_avx2,
    nl_avx2_rows,
    xs_avx2,
    xs_avx2_rows
);
iq4_kernels!(
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dot_vnni,
    nl_vnni,
    nl_vnni_rows,
    xs_vnni,
    xs_vnni_rows
);
