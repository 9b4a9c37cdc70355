//! The ternary formats TQ1_0 and TQ2_0 against Q8_K, AVX2 and AVX-512 VNNI.
//!
//! A weight super-block is unpacked once into eight vectors of 32 unsigned
//! levels `u` in 0..=2 (value `u - 1`), vector `i` lining up with the Q8_K
//! quants `32 i..32 i + 32`:
//!
//! - TQ2_0: the two-bit fields of each 32-byte half, shifted and masked (a
//!   field of 3, which ggml's quantizer never writes, is the level 3 and
//!   the value 2, as in ggml's generic kernel);
//! - TQ1_0: the `n`-th trit of a byte is the top base-3 digit of `q * 3^n`
//!   (mod 256), `(q * 3) >> 8`, which is `(q >= 86) + (q >= 171)`: the
//!   multiplications by 3 are byte additions (wrapping as ggml's `uint8_t`
//!   does) and the digit two signed byte comparisons, the bytes being kept
//!   as `q ^ 0x80` (that is `q + 128`, and `3 (q + 128) = 3 q + 128` mod
//!   256, so the multiplications by 3 carry the offset along). The five
//!   trits of bytes 0..32 give vectors 0..5; bytes 32..48 give `[t0, t1]`,
//!   `[t2, t3]` and `t4` (Q8_K quants 160..240; a multiplication by 9 is
//!   a shift by 3, masked, and an addition), and the four `qh` bytes,
//!   broadcast and multiplied by 1, 3, 9 and 27 dword by dword (two 16-bit
//!   multiplications, one for the low bytes and one for the high), the last
//!   16 levels.
//!
//! The integer sum `sum(u * q8) - sum(q8)` is formed exactly
//! (`vpmaddubsw` into i16 lanes, at most 8 * 2 * 3 * 127 in magnitude, less
//! the Q8_K `bsums` (each at most 16 * 127), then `vpmaddwd`; or
//! `vpdpbusd` into four accumulators, so that its latency chains overlap,
//! less the `bsums` summed by `vpmaddwd`), and each
//! super-block's float term is formed and added in block order as in
//! ggml's generic kernels, so these kernels give the reference's bits.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use tl_gguf::GgmlType;

use super::avx2::hsum_i32;
use super::f16_at;
use crate::quant::dot::{Acts, Kernel};
use crate::quant::k_quants::QK_K;
use crate::quant::ternary::TQ1_QS;

pub(super) fn install_avx2(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::TQ1_0, tq1_0_avx2);
    set(GgmlType::TQ2_0, tq2_0_avx2);
}

pub(super) fn install_avx512(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::TQ1_0, tq1_0_vnni);
    set(GgmlType::TQ2_0, tq2_0_vnni);
}

/// The weight types, as const-generic tags.
mod tag {
    pub const TQ1_0: u8 = 0;
    pub const TQ2_0: u8 = 1;

    /// Bytes of one super-block; its f16 scale is the last two.
    pub const fn bytes(t: u8) -> usize {
        match t {
            TQ1_0 => 54,
            _ => 66,
        }
    }
}

const Q8_K_BYTES: usize = 292;
/// Offset of the 16 i16 `bsums` in a Q8_K block.
const Q8_K_BSUMS: usize = 4 + QK_K;

/// The bytes `q` of `v` as `q ^ 0x80`, the form [`digit`] takes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn offset(v: __m256i) -> __m256i {
    _mm256_xor_si256(v, _mm256_set1_epi8(i8::MIN))
}

/// `q * 3` in every byte, wrapping.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn times3(q: __m256i) -> __m256i {
    _mm256_add_epi8(_mm256_add_epi8(q, q), q)
}

/// `q * 9` in every byte, wrapping: `(q << 3) + q`, the bits shifted
/// across a byte boundary by the 16-bit shift masked off.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn times9(q: __m256i) -> __m256i {
    let q8 = _mm256_and_si256(_mm256_slli_epi16(q, 3), _mm256_set1_epi8(-8));
    _mm256_add_epi8(q8, q)
}

/// The top base-3 digit `(q * 3) >> 8` of every byte `q`, given as
/// `x = q ^ 0x80`: `(q >= 86) + (q >= 171)`, that is `(x > 85 - 128) +
/// (x > 170 - 128)` (-43 and 42) in signed bytes, the comparisons' all-ones (-1)
/// subtracted from 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn digit(x: __m256i) -> __m256i {
    let a = _mm256_cmpgt_epi8(x, _mm256_set1_epi8(-43));
    let b = _mm256_cmpgt_epi8(x, _mm256_set1_epi8(42));
    _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), a), b)
}

/// The eight level vectors of the super-block at `blk`.
///
/// # Safety
///
/// `blk` points at `tag::bytes(T)` readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack<const T: u8>(blk: *const u8) -> [__m256i; 8] {
    let mut u = [_mm256_setzero_si256(); 8];
    if T == tag::TQ2_0 {
        let mask = _mm256_set1_epi8(3);
        for j in 0..2 {
            let v = _mm256_loadu_si256(blk.add(32 * j) as *const __m256i);
            u[4 * j] = _mm256_and_si256(v, mask);
            u[4 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask);
            u[4 * j + 2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            u[4 * j + 3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask);
        }
        return u;
    }
    let x = tq1_digit_operands(blk);
    for n in 0..8 {
        u[n] = digit(x[n]);
    }
    u
}

/// For a TQ1_0 super-block at `blk`, the eight vectors (as `q ^ 0x80`)
/// whose [`digit`]s are its level vectors.
///
/// # Safety
///
/// `blk` points at 54 readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tq1_digit_operands(blk: *const u8) -> [__m256i; 8] {
    let mut u = [_mm256_setzero_si256(); 8];
    // Bytes 0..32: five trits each, Q8_K quants 0..160.
    let mut q = offset(_mm256_loadu_si256(blk as *const __m256i));
    for n in 0..5 {
        u[n] = q;
        q = times3(q);
    }
    // Bytes 32..48: [q, 3q] against quants 160..192, [9q, 27q] against
    // 192..224, and 81q in the low half of the last vector.
    let x = _mm_xor_si128(
        _mm_loadu_si128(blk.add(32) as *const __m128i),
        _mm_set1_epi8(i8::MIN),
    );
    let x3 = _mm_add_epi8(_mm_add_epi8(x, x), x);
    let mut p = _mm256_setr_m128i(x, x3);
    u[5] = p;
    p = times9(p);
    u[6] = p;
    p = times9(p);
    // The four qh bytes: trit n of byte j against quant 240 + 4n + j, so
    // the dword n of the high half is the four bytes times 3^n.
    let h0 = _mm_xor_si128(
        _mm_set1_epi32(std::ptr::read_unaligned(blk.add(TQ1_QS) as *const i32)),
        _mm_set1_epi8(i8::MIN),
    );
    // Bytewise products by 3^n through 16-bit ones: the low byte of a
    // 16-bit product is the low byte's, and the high byte's product comes
    // whole from the high byte alone (the low byte masked off).
    let pow3 = _mm_setr_epi16(1, 1, 3, 3, 9, 9, 27, 27);
    let hi_mask = _mm_set1_epi16(0xff00u16 as i16);
    let lo = _mm_andnot_si128(hi_mask, _mm_mullo_epi16(h0, pow3));
    let hi = _mm_mullo_epi16(_mm_and_si128(h0, hi_mask), pow3);
    let h = _mm_or_si128(lo, hi);
    u[7] = _mm256_inserti128_si256::<1>(p, h);
    u
}

/// The exact sum of the products of the values `u - 1` of the eight level
/// vectors `u` with the 256 activation quants of the Q8_K block at `y`
/// (AVX2): `sum(u * q8)` less the block's `bsums`.
///
/// # Safety
///
/// `y` points at a readable Q8_K block (292 bytes).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_avx2(u: &[__m256i; 8], y: *const u8) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for i in 0..8 {
        let q = _mm256_loadu_si256(y.add(4 + 32 * i) as *const __m256i);
        // A pair sum is at most 2 * 3 * 127 = 762 in magnitude, eight of
        // them 6096: no i16 saturation.
        acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(u[i], q));
    }
    // Less the bsums (each at most 16 * 127 = 2032): at most 8128.
    let bsums = _mm256_loadu_si256(y.add(Q8_K_BSUMS) as *const __m256i);
    let acc = _mm256_sub_epi16(acc, bsums);
    hsum_i32(_mm256_madd_epi16(acc, _mm256_set1_epi16(1)))
}

/// The same with VNNI.
///
/// # Safety
///
/// As for [`dot_avx2`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn dot_vnni(u: &[__m256i; 8], y: *const u8) -> i32 {
    // Four accumulators: the products' latency chains run side by side.
    let mut acc4 = [_mm256_setzero_si256(); 4];
    for i in 0..8 {
        let q = _mm256_loadu_si256(y.add(4 + 32 * i) as *const __m256i);
        acc4[i % 4] = _mm256_dpbusd_epi32(acc4[i % 4], u[i], q);
    }
    let acc = _mm256_add_epi32(
        _mm256_add_epi32(acc4[0], acc4[1]),
        _mm256_add_epi32(acc4[2], acc4[3]),
    );
    let bsums = _mm256_loadu_si256(y.add(Q8_K_BSUMS) as *const __m256i);
    let sum = _mm256_madd_epi16(bsums, _mm256_set1_epi16(1));
    hsum_i32(_mm256_sub_epi32(acc, sum))
}

macro_rules! ternary_kernel {
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
                let blk = w.as_ptr().add(ibl * wbytes);
                let u = unpack::<T>(blk);
                let dw = f16_at(blk.add(wbytes - 2));
                for r in 0..R {
                    let y = acts
                        .bytes
                        .as_ptr()
                        .add((row0 + r) * acts.row_bytes + ibl * Q8_K_BYTES);
                    let dy = std::ptr::read_unaligned(y as *const f32);
                    let sumi = $dot(&u, y);
                    if T == tag::TQ1_0 {
                        sumf[r] += sumi as f32 * (dw * dy);
                    } else {
                        sumf[r] += sumi as f32 * (dy * dw);
                    }
                }
            }
            out[..R].copy_from_slice(&sumf);
        }
    };
}

ternary_kernel!("avx2,fma,f16c", dot_avx2, ternary_avx2_rows);
ternary_kernel!(
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dot_vnni,
    ternary_vnni_rows
);

k_tag_entries!(
    ternary_avx2_rows,
    tq1_0_avx2 = tag::TQ1_0,
    tq2_0_avx2 = tag::TQ2_0
);
k_tag_entries!(
    ternary_vnni_rows,
    tq1_0_vnni = tag::TQ1_0,
    tq2_0_vnni = tag::TQ2_0
);
