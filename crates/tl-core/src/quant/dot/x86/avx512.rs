//! AVX-512 kernels (F, BW, VL, VNNI; AVX2/FMA/F16C for the shared
//! helpers): `vpdpbusd` for the 32-value blocks (256-bit, one block per
//! vector, as ggml's AVX512-VNNI build does), and 512-bit vectors with
//! `vpdpwssd` (scale and accumulate in one) for the K-quants, whose 256
//! values fill four or eight of them.
//!
//! Every function here is `#[target_feature(enable = FEATURES)]` and only
//! reachable through the kernel table, which installs them after run-time
//! detection of all those features. Pointer arithmetic stays inside the
//! lengths `check_kernel_args` checked (see `avx2` for the same contract).

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use tl_gguf::GgmlType;

use super::avx2::{f16xn, hsum_i32, hsum_ps, loadn_f32, loadn_i32, reduce4, reduce8};
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
// Legacy (32-value) weights, VNNI.

/// 16 bytes at `p` to 32 nibbles, low nibbles first (ggml
/// `bytes_from_nibbles_32`): a broadcast load and a shift of the upper
/// half under a mask, instead of a lane insert on the shuffle port.
///
/// # Safety
///
/// 16 readable bytes at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    let split = _mm256_mask_srli_epi16::<4>(both, 0xFF00, both);
    _mm256_and_si256(split, _mm256_set1_epi8(0x0F))
}

/// `q + 16` where bit j of the u32 at `qh` is set, for byte j of `q`.
///
/// # Safety
///
/// 4 readable bytes at `qh`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn add_high_bits(q: __m256i, qh: *const u8) -> __m256i {
    let k: __mmask32 = std::ptr::read_unaligned(qh as *const u32);
    _mm256_mask_add_epi8(q, k, q, _mm256_set1_epi8(16))
}

/// Unsigned levels of one weight block: `value + offset`; Q8_0's signed
/// quants get their sign bit flipped (`+ 128`) so that `vpdpbusd`, which
/// multiplies unsigned by signed bytes, takes them.
///
/// # Safety
///
/// One whole block of kind `T` is readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn unpack<const T: u8>(p: *const u8) -> __m256i {
    match T {
        Q4_0 => nibbles(p.add(2)),
        Q4_1 => nibbles(p.add(4)),
        Q5_0 => add_high_bits(nibbles(p.add(6)), p.add(2)),
        Q5_1 => add_high_bits(nibbles(p.add(8)), p.add(4)),
        _ => _mm256_xor_si256(
            _mm256_loadu_si256(p.add(2) as *const __m256i),
            _mm256_set1_epi8(-128),
        ),
    }
}

/// Eight i32 partial sums of one block: `vpdpbusd` adds four `u8 x i8`
/// products per lane without intermediate saturation.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn block_dot<const T: u8>(w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
}

/// log2 of the level offset taken off through the activation sums.
const fn offset_shift<const T: u8>() -> Option<i32> {
    match T {
        Q4_0 => Some(3),
        Q5_0 => Some(4),
        Q8_0 => Some(7),
        _ => None,
    }
}

legacy_kernel!("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c");

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

// ---------------------------------------------------------------------------
// K-quants in 512-bit vectors: 64 levels per vector, `vpmaddubsw` for the
// `u8 x i8` pairs (no saturation: levels <= 63, |a| <= 127) and `vpdpwssd`
// to multiply the pair sums by the sub-block scales and accumulate.

const Q8K_BYTES: usize = 292;
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 4 + 256;

/// 32 lanes of i16 (or bytes, `BYTES`): `lo` in the low half, `hi` in the
/// high half.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn halves16(lo: i16, hi: i16) -> __m512i {
    _mm512_mask_blend_epi16(0xFFFF_0000, _mm512_set1_epi16(lo), _mm512_set1_epi16(hi))
}

/// Q4_K or Q5_K (`FIVE`) against Q8_K (ggml `ggml_vec_dot_q4_K_q8_K` /
/// `ggml_vec_dot_q5_K_q8_K`), exact per-block sums.
///
/// # Safety
///
/// As for [`Kernel`], with `out.len() >= R`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k4<const FIVE: bool, const R: usize>(
    k: usize,
    w: &[u8],
    acts: &Acts<'_>,
    row0: usize,
    out: &mut [f32],
) {
    let (bytes, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    let nb = k / 256;
    let m4 = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    // Chunk j (64 values) = sub-blocks 2j (low nibbles) and 2j + 1 (high).
    let mut idx = [_mm512_setzero_si512(); 4];
    let mut hsel = [_mm512_setzero_si512(); 4];
    for j in 0..4 {
        idx[j] = halves16(2 * j as i16, 2 * j as i16 + 1);
        hsel[j] = _mm512_mask_blend_epi8(
            0xFFFF_FFFF_0000_0000,
            _mm512_set1_epi8(1 << (2 * j)),
            _mm512_set1_epi8((1u8 << (2 * j + 1)) as i8),
        );
    }
    let mut accd = [0f32; R];
    let mut accm = [0f32; R];
    for b in 0..nb {
        let x = w.as_ptr().add(b * bytes);
        let dx = f16_at(x);
        let dminx = f16_at(x.add(2));
        let s: [u8; 12] = std::ptr::read_unaligned(x.add(4) as *const [u8; 12]);
        let (sc, mn) = super::k4_utmp(&s);
        let scz =
            _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_set1_epi64x(i64::from_le_bytes(sc))));
        let qh = if FIVE {
            _mm512_broadcast_i64x4(_mm256_loadu_si256(x.add(16) as *const __m256i))
        } else {
            _mm512_setzero_si512()
        };
        let mut q = [_mm512_setzero_si512(); 4];
        let mut scv = [_mm512_setzero_si512(); 4];
        for j in 0..4 {
            let v =
                _mm512_broadcast_i64x4(_mm256_loadu_si256(x.add(qs_at + 32 * j) as *const __m256i));
            let v = _mm512_mask_srli_epi16::<4>(v, 0xFFFF_0000, v);
            q[j] = _mm512_and_si512(v, m4);
            if FIVE {
                let hit = _mm512_test_epi8_mask(qh, hsel[j]);
                q[j] = _mm512_mask_add_epi8(q[j], hit, q[j], sixteen);
            }
            scv[j] = _mm512_permutexvar_epi16(idx[j], scz);
        }
        let mm = _mm_set1_epi64x(i64::from_le_bytes(mn));
        let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mm, mm));
        for r in 0..R {
            let y = acts
                .bytes
                .as_ptr()
                .add((row0 + r) * acts.row_bytes + b * Q8K_BYTES);
            let yd = std::ptr::read_unaligned(y as *const f32);
            let yq = y.add(Q8K_QS);
            let mut acc = _mm512_setzero_si512();
            for j in 0..4 {
                let a = _mm512_loadu_si512(yq.add(64 * j) as *const __m512i);
                acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(q[j], a), scv[j]);
            }
            let bsums = _mm256_loadu_si256(y.add(Q8K_BSUMS) as *const __m256i);
            let isum = _mm512_reduce_add_epi32(acc);
            let summ = hsum_i32(_mm256_madd_epi16(bsums, mins));
            accd[r] += (dx * yd) * isum as f32;
            accm[r] += (dminx * yd) * summ as f32;
        }
    }
    for r in 0..R {
        out[r] = accd[r] - accm[r];
    }
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

/// Q6_K against Q8_K (ggml `ggml_vec_dot_q6_K_q8_K`): levels `value + 32`
/// in 0..64, offset removed as `32 * sum(scale_j * bsum_j)`, exactly.
///
/// # Safety
///
/// As for [`Kernel`], with `out.len() >= R`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k6<const R: usize>(k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]) {
    let nb = k / 256;
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    // Within a half of 128 values: values 0..64 take qh bits 0-1 (first
    // 32) and 2-3 (next 32), moved to bits 4-5; values 64..128 bits 4-5
    // and 6-7.
    let shl_lo = halves16(4, 2);
    let shr_hi = halves16(0, 2);
    // Chunk c (64 values, 4 sub-blocks of 16) takes scales 4c..4c + 4,
    // each for 8 pair sums.
    let mut idx = [_mm512_setzero_si512(); 4];
    for c in 0..4 {
        let base = 4 * c as i16;
        idx[c] = _mm512_mask_blend_epi16(
            0xFFFF_0000,
            _mm512_mask_blend_epi16(0xFF00, _mm512_set1_epi16(base), _mm512_set1_epi16(base + 1)),
            _mm512_mask_blend_epi16(
                0xFF00_0000,
                _mm512_set1_epi16(base + 2),
                _mm512_set1_epi16(base + 3),
            ),
        );
    }
    let mut accd = [0f32; R];
    for b in 0..nb {
        let x = w.as_ptr().add(b * 210);
        let d = f16_at(x.add(208));
        let mut q = [_mm512_setzero_si512(); 4];
        for h in 0..2 {
            let ql = _mm512_loadu_si512(x.add(64 * h) as *const __m512i);
            let qh =
                _mm512_broadcast_i64x4(_mm256_loadu_si256(x.add(128 + 32 * h) as *const __m256i));
            q[2 * h] = _mm512_or_si512(
                _mm512_and_si512(ql, m4),
                _mm512_and_si512(_mm512_sllv_epi16(qh, shl_lo), m30),
            );
            q[2 * h + 1] = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                _mm512_and_si512(_mm512_srlv_epi16(qh, shr_hi), m30),
            );
        }
        let sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192) as *const __m128i));
        let scz = _mm512_zextsi256_si512(sc_all);
        let mut scv = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            scv[c] = _mm512_permutexvar_epi16(idx[c], scz);
        }
        for r in 0..R {
            let y = acts
                .bytes
                .as_ptr()
                .add((row0 + r) * acts.row_bytes + b * Q8K_BYTES);
            let yd = std::ptr::read_unaligned(y as *const f32);
            let yq = y.add(Q8K_QS);
            let bsums = _mm256_loadu_si256(y.add(Q8K_BSUMS) as *const __m256i);
            let corr = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, sc_all));
            let mut acc = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(corr));
            for c in 0..4 {
                let a = _mm512_loadu_si512(yq.add(64 * c) as *const __m512i);
                acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(q[c], a), scv[c]);
            }
            accd[r] += (d * yd) * _mm512_reduce_add_epi32(acc) as f32;
        }
    }
    out[..R].copy_from_slice(&accd);
}
k_entry!(q6_k, k6);

// ---------------------------------------------------------------------------
// Float weights in 512-bit vectors: two accumulators of 16 lanes per row.

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// Sixteen values of format `F` at `p` as f32.
///
/// # Safety
///
/// 16 values readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn load16<const F: u8>(p: *const u8) -> __m512 {
    match F {
        F32 => _mm512_loadu_ps(p as *const f32),
        F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        _ => {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
    }
}

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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    let steps = k / 32;
    for i in 0..steps {
        let off = 32 * i * es;
        let w0 = load16::<F>(wp.add(off));
        let w1 = load16::<F>(wp.add(off + 16 * es));
        for r in 0..R {
            acc0[r] = _mm512_fmadd_ps(w0, load16::<F>(arow[r].add(off)), acc0[r]);
            acc1[r] = _mm512_fmadd_ps(w1, load16::<F>(arow[r].add(off + 16 * es)), acc1[r]);
        }
    }
    for r in 0..R {
        let mut tail = 0f32;
        for i in 32 * steps..k {
            tail += load1::<F>(wp.add(i * es)) * load1::<F>(arow[r].add(i * es));
        }
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + tail;
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
