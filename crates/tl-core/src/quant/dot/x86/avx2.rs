//! AVX2 + FMA + F16C kernels: 256-bit vectors, `vpmaddubsw`/`vpmaddwd`
//! integer products (ggml's AVX2 paths in `ggml-cpu/arch/x86/quants.c`,
//! restructured so each block's integer sum is exact before any float
//! operation).
//!
//! Every function here is `#[target_feature(enable = "avx2,fma,f16c")]`
//! and only reachable through the kernel table, which installs them after
//! run-time detection of those features. Pointer arithmetic stays inside
//! the lengths checked by `check_kernel_args` (weights: one whole row;
//! activations: rows `row0..row0 + R`, `row_bytes` each, with `nb` entries
//! per row in the extras).

// Index loops over small fixed arrays of vectors read more plainly here
// than iterator chains, and unroll the same.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use tl_gguf::GgmlType;

use super::kind::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::{f16_at, legacy_kernel, tile_dispatch};
use crate::quant::dot::{Acts, Kernel};

pub(super) fn install(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::Q4_0, q4_0);
    set(GgmlType::Q4_1, q4_1);
    set(GgmlType::Q5_0, q5_0);
    set(GgmlType::Q5_1, q5_1);
    set(GgmlType::Q8_0, q8_0);
    set(GgmlType::Q4_K, q4_k);
    set(GgmlType::Q5_K, q5_k);
    set(GgmlType::Q6_K, q6_k);
    set(GgmlType::F32, f32_kernel);
    set(GgmlType::F16, f16_kernel);
    set(GgmlType::BF16, bf16_kernel);
}

// ---------------------------------------------------------------------------
// Small helpers.

/// Horizontal sum of eight i32 lanes (exact, wrapping like ggml's
/// `hsum_i32_8`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Horizontal sum of eight f32 lanes (ggml `hsum_float_8`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Eight vectors of eight i32 partial sums to one vector of their eight
/// totals, in order: a three-level transpose. Level 1 pairs vectors with
/// 64-bit shifts, adds and a blend (no shuffle-port work, and a form LLVM
/// does not fold back into `vphaddd`, whose two shuffles per use are what
/// bounds the prefill loop); levels 2 and 3 take one shuffle per pair.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn reduce8(p: &[__m256i; 8]) -> __m256i {
    // [a0+a1, b0+b1, a2+a3, b2+b3, ...]: a + (a >> 32) is right in the even
    // lanes, b + (b << 32) in the odd ones.
    macro_rules! pair32 {
        ($a:expr, $b:expr) => {{
            let x = _mm256_add_epi32($a, _mm256_srli_epi64::<32>($a));
            let y = _mm256_add_epi32($b, _mm256_slli_epi64::<32>($b));
            _mm256_blend_epi32::<0b1010_1010>(x, y)
        }};
    }
    // The same on the 64-bit halves of each 128-bit lane.
    macro_rules! pair64 {
        ($a:expr, $b:expr) => {{
            let x = _mm256_blend_epi32::<0b1100_1100>($a, $b);
            let y = _mm256_blend_epi32::<0b1100_1100>($b, $a);
            _mm256_add_epi32(x, _mm256_shuffle_epi32::<0b0100_1110>(y))
        }};
    }
    let q01 = pair32!(p[0], p[1]);
    let q23 = pair32!(p[2], p[3]);
    let q45 = pair32!(p[4], p[5]);
    let q67 = pair32!(p[6], p[7]);
    // r0 = [s0 s1 s2 s3 (low 128-bit halves) | s0 s1 s2 s3 (high halves)].
    let r0 = pair64!(q01, q23);
    let r1 = pair64!(q45, q67);
    // Level 3: the two 128-bit halves.
    let x = _mm256_blend_epi32::<0b1111_0000>(r0, r1);
    let y = _mm256_permute2x128_si256::<0x21>(r0, r1);
    _mm256_add_epi32(x, y)
}

/// Four such vectors to one vector whose low four lanes are their totals
/// (high lanes zero).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn reduce4(p: &[__m256i; 8]) -> __m256i {
    let z = _mm256_setzero_si256();
    let r = reduce8(&[p[0], p[1], p[2], p[3], z, z, z, z]);
    _mm256_blend_epi32::<0b1111_0000>(r, z)
}

/// `N` (8 or 4) f16 scales `stride` bytes apart, starting at `p`, as f32
/// (lanes past `N` zero).
///
/// # Safety
///
/// `p + (N - 1) * stride + 2` is within one readable allocation.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn f16xn<const N: usize>(p: *const u8, stride: usize) -> __m256 {
    let g = |j: usize| {
        if j < N {
            std::ptr::read_unaligned(p.add(j * stride) as *const i16)
        } else {
            0
        }
    };
    _mm256_cvtph_ps(_mm_setr_epi16(
        g(0),
        g(1),
        g(2),
        g(3),
        g(4),
        g(5),
        g(6),
        g(7),
    ))
}

/// `N` (8 or 4) f32 at `p` as a vector (lanes past `N` zero).
///
/// # Safety
///
/// `N` values readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn loadn_f32<const N: usize>(p: *const f32) -> __m256 {
    if N == 8 {
        _mm256_loadu_ps(p)
    } else {
        _mm256_zextps128_ps256(_mm_loadu_ps(p))
    }
}

/// `N` (8 or 4) i32 at `p` as a vector (lanes past `N` zero).
///
/// # Safety
///
/// `N` values readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn loadn_i32<const N: usize>(p: *const i32) -> __m256i {
    if N == 8 {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        _mm256_zextsi128_si256(_mm_loadu_si128(p as *const __m128i))
    }
}

/// ggml `bytes_from_nibbles_32`: 16 bytes to 32 nibbles, low nibbles first.
/// The upper copy of a broadcast load is shifted per dword (`vpsrlvd`):
/// bits that cross a byte boundary land in the high nibble, which the mask
/// drops, and no lane insert on the shuffle port is needed.
///
/// # Safety
///
/// 16 readable bytes at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    let split = _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    _mm256_and_si256(split, _mm256_set1_epi8(0x0F))
}

/// ggml `bytes_from_bits_32`: bit j of the u32 at `p` to byte j (0 or 0xFF).
///
/// # Safety
///
/// 4 readable bytes at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bits(p: *const u8) -> __m256i {
    let x32 = std::ptr::read_unaligned(p as *const u32) as i32;
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

// ---------------------------------------------------------------------------
// Legacy (32-value) weights.

/// The 32 levels of one weight block: unsigned (`value + offset`), except
/// Q8_0, whose signed quants go through the sign trick in [`block_dot`].
///
/// # Safety
///
/// One whole block of kind `T` is readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack<const T: u8>(p: *const u8) -> __m256i {
    match T {
        Q4_0 => nibbles(p.add(2)),
        Q4_1 => nibbles(p.add(4)),
        Q5_0 => _mm256_or_si256(
            nibbles(p.add(6)),
            _mm256_and_si256(bits(p.add(2)), _mm256_set1_epi8(0x10)),
        ),
        Q5_1 => _mm256_or_si256(
            nibbles(p.add(8)),
            _mm256_and_si256(bits(p.add(4)), _mm256_set1_epi8(0x10)),
        ),
        _ => _mm256_loadu_si256(p.add(2) as *const __m256i),
    }
}

/// Eight i32 partial sums of `levels x activations` over one block.
/// `vpmaddubsw` cannot overflow: pairs of `u <= 31` times `|a| <= 127`, and
/// for Q8_0's sign trick (ggml `mul_sum_i8_pairs_float`) `|w| <= 128`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn block_dot<const T: u8>(w: __m256i, a: __m256i) -> __m256i {
    let p16 = if T == Q8_0 {
        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
    } else {
        _mm256_maddubs_epi16(w, a)
    };
    _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
}

/// log2 of the level offset taken off through the activation sums.
const fn offset_shift<const T: u8>() -> Option<i32> {
    match T {
        Q4_0 => Some(3),
        Q5_0 => Some(4),
        _ => None,
    }
}

legacy_kernel!("avx2,fma,f16c");

macro_rules! legacy_entry {
    ($name:ident, $t:expr) => {
        /// Kernel entry for one legacy kind; see [`Kernel`] for the contract.
        unsafe fn $name(k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]) {
            tile_dispatch!(legacy, $t, k, w, acts, row0, out)
        }
    };
}
legacy_entry!(q4_0, Q4_0);
legacy_entry!(q4_1, Q4_1);
legacy_entry!(q5_0, Q5_0);
legacy_entry!(q5_1, Q5_1);
legacy_entry!(q8_0, Q8_0);

/// The kernels of the reference numerics (`crate::numerics`): the
/// 32-value types with ggml's generic float order, their exact integer
/// block sums done with AVX2.
pub(super) fn install_reference(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::Q4_0, q4_0_seq);
    set(GgmlType::Q4_1, q4_1_seq);
    set(GgmlType::Q5_0, q5_0_seq);
    set(GgmlType::Q5_1, q5_1_seq);
    set(GgmlType::Q8_0, q8_0_seq);
    set(GgmlType::Q3_K, q3_k_seq);
    set(GgmlType::Q4_K, q4_k_seq);
    set(GgmlType::Q5_K, q5_k_seq);
    set(GgmlType::Q6_K, q6_k_seq);
}

/// [`scalar::lanes8`](crate::quant::dot::scalar::lanes8) with AVX2: the
/// products of 16 values in i16 (exact), the two groups of eight added
/// lane by lane in i32 and multiplied by their shared scale.
///
/// # Safety
///
/// The CPU runs AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lanes8_avx2(q8: &[i8; 256], a: &[i8; 256], sc16: &[i32; 16]) -> [i32; 8] {
    let mut acc = _mm256_setzero_si256();
    for j in 0..16 {
        let x = _mm256_cvtepi8_epi16(_mm_loadu_si128(q8.as_ptr().add(16 * j) as *const __m128i));
        let y = _mm256_cvtepi8_epi16(_mm_loadu_si128(a.as_ptr().add(16 * j) as *const __m128i));
        let p = _mm256_mullo_epi16(x, y);
        let lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p));
        let hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(p));
        let both = _mm256_add_epi32(lo, hi);
        acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(both, _mm256_set1_epi32(sc16[j])));
    }
    let mut out = [0i32; 8];
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, acc);
    out
}

macro_rules! k_seq_entry {
    ($name:ident, $dot:ident) => {
        /// Reference-numerics kernel entry for one K-quant: ggml's generic
        /// dot with [`lanes8_avx2`]; see [`Kernel`] for the contract.
        unsafe fn $name(_k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]) {
            for (t, o) in out.iter_mut().enumerate() {
                *o = crate::quant::dot::scalar::$dot(w, acts.row(row0 + t), lanes8_avx2);
            }
        }
    };
}
k_seq_entry!(q3_k_seq, dot_q3_k_with);
k_seq_entry!(q4_k_seq, dot_q4_k_with);
k_seq_entry!(q5_k_seq, dot_q5_k_with);
k_seq_entry!(q6_k_seq, dot_q6_k_with);

/// One weight row of legacy kind `T` against `R` activation rows in the
/// float order of ggml's `ggml_vec_dot_*_generic`: block after block,
/// `sumf += (d_w * d_a) * sumi` (plus `m_w * s_a` in the same sum for the
/// kinds with a min), one f32 accumulator per activation row. The block
/// sums `sumi` are the tile kernel's exact ones, and so are the terms,
/// formed eight (or four) blocks at a time in vector lanes; only their
/// additions run one by one, in block order.
///
/// # Safety
///
/// As for `legacy`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_seq<const T: u8, const R: usize>(
    k: usize,
    w: &[u8],
    acts: &Acts<'_>,
    row0: usize,
    out: &mut [f32],
) {
    use super::{kind, ActRow};
    let nb = k / 32;
    let mut rows = [ActRow::EMPTY; R];
    for r in 0..R {
        rows[r] = ActRow::new(acts, row0 + r);
    }
    let mut acc = [0f32; R];
    // The tile kernel's group step in its `SEQ` form (its vector
    // accumulators stay unused).
    let (mut va, mut vm) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let mut b0 = 0;
    while b0 + 8 <= nb {
        legacy_group::<T, R, 8, true>(w.as_ptr(), b0, &rows, &mut va, &mut vm, &mut acc);
        b0 += 8;
    }
    if b0 + 4 <= nb {
        legacy_group::<T, R, 4, true>(w.as_ptr(), b0, &rows, &mut va, &mut vm, &mut acc);
        b0 += 4;
    }
    let (wb, ab, aq) = (kind::w_bytes(T), kind::act_bytes(T), kind::act_qs(T));
    for b in b0..nb {
        let wblk = w.as_ptr().add(b * wb);
        let wq = unpack::<T>(wblk);
        let dw = f16_at(wblk);
        for r in 0..R {
            let row = &rows[r];
            let av = _mm256_loadu_si256(row.bytes.add(b * ab + aq) as *const __m256i);
            let mut sumi = hsum_i32(block_dot::<T>(wq, av));
            if let Some(sh) = offset_shift::<T>() {
                sumi -= *row.sums.add(b) << sh;
            }
            let term = (dw * *row.d.add(b)) * sumi as f32;
            acc[r] += if kind::has_min(T) {
                term + f16_at(wblk.add(2)) * *row.s.add(b)
            } else {
                term
            };
        }
    }
    out[..R].copy_from_slice(&acc);
}

macro_rules! legacy_seq_entry {
    ($name:ident, $t:expr) => {
        /// Reference-numerics kernel entry for one legacy kind; see
        /// [`Kernel`] for the contract.
        unsafe fn $name(k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]) {
            tile_dispatch!(legacy_seq, $t, k, w, acts, row0, out)
        }
    };
}
legacy_seq_entry!(q4_0_seq, Q4_0);
legacy_seq_entry!(q4_1_seq, Q4_1);
legacy_seq_entry!(q5_0_seq, Q5_0);
legacy_seq_entry!(q5_1_seq, Q5_1);
legacy_seq_entry!(q8_0_seq, Q8_0);

// ---------------------------------------------------------------------------
// K-quants. One super-block of 256 weights at a time: its levels are
// unpacked once into eight vectors of 32, then each activation row of the
// tile is dotted with them, sub-block scales applied with `vpmaddwd`, and
// the block's integer sum reduced exactly before it meets the float scales.

const Q8K_BYTES: usize = 292;
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 4 + 256;

/// Scales and mins of a Q4_K/Q5_K block (ggml's `utmp` shuffle).
///
/// # Safety
///
/// 12 readable bytes at `p`.
#[inline(always)]
unsafe fn k4_scales(p: *const u8) -> ([u8; 8], [u8; 8]) {
    super::k4_utmp(&std::ptr::read_unaligned(p as *const [u8; 12]))
}

/// The mins of a Q4_K/Q5_K block, each repeated twice as i16, to meet the
/// 16 `bsums` of Q8_K in one `vpmaddwd`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn mins_x2(mn: &[u8; 8]) -> __m256i {
    let m = _mm_set1_epi64x(i64::from_le_bytes(*mn));
    _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m))
}

/// Q4_K or Q5_K (`FIVE`) against Q8_K: ggml `ggml_vec_dot_q4_K_q8_K` /
/// `ggml_vec_dot_q5_K_q8_K`, AVX2 branch, with exact per-block sums.
///
/// # Safety
///
/// As for [`Kernel`], with `out.len() >= R`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4<const FIVE: bool, const R: usize>(
    k: usize,
    w: &[u8],
    acts: &Acts<'_>,
    row0: usize,
    out: &mut [f32],
) {
    let (bytes, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    let nb = k / 256;
    let m4 = _mm256_set1_epi8(0x0F);
    let mut accd = [0f32; R];
    let mut accm = [0f32; R];
    for b in 0..nb {
        let x = w.as_ptr().add(b * bytes);
        let dx = f16_at(x);
        let dminx = f16_at(x.add(2));
        let (sc, mn) = k4_scales(x.add(4));
        let mut q = [_mm256_setzero_si256(); 8];
        let qh = if FIVE {
            _mm256_loadu_si256(x.add(16) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        for j in 0..4 {
            let v = _mm256_loadu_si256(x.add(qs_at + 32 * j) as *const __m256i);
            q[2 * j] = _mm256_and_si256(v, m4);
            q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
            if FIVE {
                q[2 * j] = _mm256_or_si256(q[2 * j], bit_to_16(qh, 2 * j as i32));
                q[2 * j + 1] = _mm256_or_si256(q[2 * j + 1], bit_to_16(qh, 2 * j as i32 + 1));
            }
        }
        let mut scv = [_mm256_setzero_si256(); 8];
        for j in 0..8 {
            scv[j] = _mm256_set1_epi16(i16::from(sc[j]));
        }
        let mins = mins_x2(&mn);
        for r in 0..R {
            let y = acts
                .bytes
                .as_ptr()
                .add((row0 + r) * acts.row_bytes + b * Q8K_BYTES);
            let yd = std::ptr::read_unaligned(y as *const f32);
            let yq = y.add(Q8K_QS);
            let mut acc = _mm256_setzero_si256();
            for j in 0..8 {
                let a = _mm256_loadu_si256(yq.add(32 * j) as *const __m256i);
                let p = _mm256_maddubs_epi16(q[j], a);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, scv[j]));
            }
            let bsums = _mm256_loadu_si256(y.add(Q8K_BSUMS) as *const __m256i);
            let isum = hsum_i32(acc);
            let summ = hsum_i32(_mm256_madd_epi16(bsums, mins));
            accd[r] += (dx * yd) * isum as f32;
            accm[r] += (dminx * yd) * summ as f32;
        }
    }
    for r in 0..R {
        out[r] = accd[r] - accm[r];
    }
}

/// Bit `bit` (0..8) of every byte of `qh`, moved to 0x10.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn bit_to_16(qh: __m256i, bit: i32) -> __m256i {
    // 16-bit shifts spill bits across the byte boundary only into bits the
    // 0x10 mask drops (shifts of at most 4 either way).
    let v = if bit <= 4 {
        _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - bit))
    } else {
        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(bit - 4))
    };
    _mm256_and_si256(v, _mm256_set1_epi8(0x10))
}

unsafe fn k4_only<const R: usize>(
    k: usize,
    w: &[u8],
    acts: &Acts<'_>,
    row0: usize,
    out: &mut [f32],
) {
    k4::<false, R>(k, w, acts, row0, out)
}
unsafe fn k5_only<const R: usize>(
    k: usize,
    w: &[u8],
    acts: &Acts<'_>,
    row0: usize,
    out: &mut [f32],
) {
    k4::<true, R>(k, w, acts, row0, out)
}
k_entry!(q4_k, k4_only);
k_entry!(q5_k, k5_only);

/// Q6_K against Q8_K: ggml `ggml_vec_dot_q6_K_q8_K`, AVX2 branch. Levels
/// `u = value + 32` in 0..64 go through `vpmaddubsw`; the offset comes off
/// as `32 * sum(scale_j * bsum_j)`, exactly.
///
/// # Safety
///
/// As for [`Kernel`], with `out.len() >= R`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k6<const R: usize>(k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]) {
    let nb = k / 256;
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let mut accd = [0f32; R];
    for b in 0..nb {
        let x = w.as_ptr().add(b * 210);
        let d = f16_at(x.add(208));
        let mut q = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(x.add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(x.add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(x.add(128 + 32 * h) as *const __m256i);
            q[4 * h] = _mm256_or_si256(
                _mm256_and_si256(ql0, m4),
                _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
            );
            q[4 * h + 1] = _mm256_or_si256(
                _mm256_and_si256(ql1, m4),
                _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
            );
            q[4 * h + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                _mm256_and_si256(qh, m30),
            );
            q[4 * h + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
            );
        }
        let sc8 = _mm_loadu_si128(x.add(192) as *const __m128i);
        let sc_all = _mm256_cvtepi8_epi16(sc8);
        let mut scv = [_mm256_setzero_si256(); 8];
        for i in 0..8 {
            // [scale 2i x 8 | scale 2i+1 x 8]: one scale per 16 values.
            let lo = (2 * i) as i8;
            let hi = lo + 1;
            let sel = _mm_setr_epi8(
                lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi,
            );
            scv[i] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, sel));
        }
        for r in 0..R {
            let y = acts
                .bytes
                .as_ptr()
                .add((row0 + r) * acts.row_bytes + b * Q8K_BYTES);
            let yd = std::ptr::read_unaligned(y as *const f32);
            let yq = y.add(Q8K_QS);
            let mut acc = _mm256_setzero_si256();
            for i in 0..8 {
                let a = _mm256_loadu_si256(yq.add(32 * i) as *const __m256i);
                let p = _mm256_maddubs_epi16(q[i], a);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, scv[i]));
            }
            let bsums = _mm256_loadu_si256(y.add(Q8K_BSUMS) as *const __m256i);
            let corr = _mm256_madd_epi16(bsums, sc_all);
            acc = _mm256_sub_epi32(acc, _mm256_slli_epi32::<5>(corr));
            accd[r] += (d * yd) * hsum_i32(acc) as f32;
        }
    }
    out[..R].copy_from_slice(&accd);
}
k_entry!(q6_k, k6);

// ---------------------------------------------------------------------------
// Float weights: F32, F16, BF16 against activations of the same type. Two
// accumulators of eight lanes per row; the values past the last 16 are
// added in scalar f32.

/// Which float format a float kernel reads.
const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// Eight values of format `F` at `p` as f32.
///
/// # Safety
///
/// 8 values readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const F: u8>(p: *const u8) -> __m256 {
    match F {
        F32 => _mm256_loadu_ps(p as *const f32),
        F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        _ => {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
    }
}

/// One value of format `F` at `p` as f32.
///
/// # Safety
///
/// One value readable at `p`.
#[inline(always)]
unsafe fn load1<const F: u8>(p: *const u8) -> f32 {
    match F {
        F32 => std::ptr::read_unaligned(p as *const f32),
        F16 => f16_at(p),
        _ => f32::from_bits(u32::from(std::ptr::read_unaligned(p as *const u16)) << 16),
    }
}

/// # Safety
///
/// As for [`Kernel`], with `out.len() >= R`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_dot<const F: u8, const R: usize>(
    k: usize,
    w: &[u8],
    acts: &Acts<'_>,
    row0: usize,
    out: &mut [f32],
) {
    let es = if F == F32 { 4 } else { 2 };
    let wp = w.as_ptr();
    let mut arow = [wp; R];
    for r in 0..R {
        arow[r] = acts.bytes.as_ptr().add((row0 + r) * acts.row_bytes);
    }
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    let steps = k / 16;
    for i in 0..steps {
        let off = 16 * i * es;
        let w0 = load8::<F>(wp.add(off));
        let w1 = load8::<F>(wp.add(off + 8 * es));
        for r in 0..R {
            acc0[r] = _mm256_fmadd_ps(w0, load8::<F>(arow[r].add(off)), acc0[r]);
            acc1[r] = _mm256_fmadd_ps(w1, load8::<F>(arow[r].add(off + 8 * es)), acc1[r]);
        }
    }
    for r in 0..R {
        let mut tail = 0f32;
        for i in 16 * steps..k {
            tail += load1::<F>(wp.add(i * es)) * load1::<F>(arow[r].add(i * es));
        }
        out[r] = hsum_ps(_mm256_add_ps(acc0[r], acc1[r])) + tail;
    }
}

macro_rules! float_entry {
    ($name:ident, $f:expr) => {
        /// Kernel entry; see [`Kernel`] for the contract.
        unsafe fn $name(k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]) {
            tile_dispatch!(float_dot, $f, k, w, acts, row0, out)
        }
    };
}
float_entry!(f32_kernel, F32);
float_entry!(f16_kernel, F16);
float_entry!(bf16_kernel, BF16);

// ---------------------------------------------------------------------------
// Activation quantization, byte-identical to the scalar versions in
// `quant::dot` (ggml's x86 `quantize_row_q8_0/q8_1`, `quantize_row_q8_K_ref`).

/// Largest |x| of 32 values, and the four vectors.
///
/// # Safety
///
/// 32 readable f32 at `x`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load32_amax(x: *const f32) -> ([__m256; 4], f32) {
    let sign = _mm256_set1_ps(-0.0);
    let v = [
        _mm256_loadu_ps(x),
        _mm256_loadu_ps(x.add(8)),
        _mm256_loadu_ps(x.add(16)),
        _mm256_loadu_ps(x.add(24)),
    ];
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
    }
    (v, hmax_ps(m))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hmax_ps(m: __m256) -> f32 {
    let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    _mm_cvtss_f32(m4)
}

/// `round_ties_even(v * id)` of 32 values as i32 (`_mm256_round_ps` +
/// `_mm256_cvtps_epi32`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn round4(v: &[__m256; 4], id: f32) -> [__m256i; 4] {
    let mul = _mm256_set1_ps(id);
    let mut out = [_mm256_setzero_si256(); 4];
    for i in 0..4 {
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(v[i], mul),
        );
        out[i] = _mm256_cvtps_epi32(r);
    }
    out
}

/// Four vectors of eight i32 to 32 saturated i8, in order.
///
/// # Safety
///
/// 32 writable bytes at `dst`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pack32(i: &[__m256i; 4], dst: *mut u8) {
    let a = _mm256_packs_epi32(i[0], i[1]);
    let b = _mm256_packs_epi32(i[2], i[3]);
    let c = _mm256_packs_epi16(a, b);
    let c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(dst as *mut __m256i, c);
}

/// ggml x86 `quantize_row_q8_0` (AVX2 branch).
///
/// # Safety
///
/// AVX2/FMA/F16C present; `x.len()` is a multiple of 32 and `out` holds
/// `x.len() / 32` blocks of 34 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        let (v, amax) = load32_amax(xb.as_ptr());
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        ob[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        pack32(&round4(&v, id), ob.as_mut_ptr().add(2));
    }
}

/// ggml x86 `quantize_row_q8_1` (AVX2 branch).
///
/// # Safety
///
/// As [`quantize_q8_0`], with blocks of 36 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(36)) {
        let (v, amax) = load32_amax(xb.as_ptr());
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let i = round4(&v, id);
        let sum = hsum_i32(_mm256_add_epi32(
            _mm256_add_epi32(i[0], i[1]),
            _mm256_add_epi32(i[2], i[3]),
        ));
        ob[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        ob[2..4].copy_from_slice(&half::f16::from_f32(d * sum as f32).to_le_bytes());
        pack32(&i, ob.as_mut_ptr().add(4));
    }
}

/// ggml `quantize_row_q8_K_ref`: scale from the signed value of largest
/// magnitude (the first one on ties), `nearest_int` (ties to even, exact in
/// this range) capped at 127, and the 16-value sums.
///
/// # Safety
///
/// As [`quantize_q8_0`], with 256-value blocks of 292 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    for (xb, ob) in x.chunks_exact(256).zip(out.chunks_exact_mut(Q8K_BYTES)) {
        let p = xb.as_ptr();
        let mut m = _mm256_setzero_ps();
        for i in 0..32 {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))));
        }
        let amax = hmax_ps(m);
        ob.fill(0);
        if amax == 0.0 {
            continue;
        }
        // The first value whose magnitude is amax, sign included.
        let target = _mm256_set1_ps(amax);
        let mut max = amax;
        for i in 0..32 {
            let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i)));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, target));
            if hit != 0 {
                max = xb[8 * i + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let mul = _mm256_set1_ps(iscale);
        let cap = _mm256_set1_epi32(127);
        for c in 0..8 {
            let mut i = [_mm256_setzero_si256(); 4];
            for j in 0..4 {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(32 * c + 8 * j)), mul);
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                i[j] = _mm256_min_epi32(_mm256_cvtps_epi32(r), cap);
            }
            pack32(&i, ob.as_mut_ptr().add(Q8K_QS + 32 * c));
            let s0 = hsum_i32(_mm256_add_epi32(i[0], i[1])) as i16;
            let s1 = hsum_i32(_mm256_add_epi32(i[2], i[3])) as i16;
            let at = Q8K_BSUMS + 4 * c;
            ob[at..at + 2].copy_from_slice(&s0.to_le_bytes());
            ob[at + 2..at + 4].copy_from_slice(&s1.to_le_bytes());
        }
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}
