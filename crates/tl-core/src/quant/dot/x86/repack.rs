//! Weights of the 32-value types repacked once, at load, for the AVX-512
//! VNNI kernels: the same bits as the GGUF blocks, rearranged so that a
//! 512-bit vector holds four level bytes of eight blocks of *two* weight
//! rows, the dword-transposed layout of [`super::gemm`] with no packing left
//! to do per matmul.
//!
//! Layout, per pair of weight rows `2p, 2p + 1` and group `g` of eight
//! blocks (lanes `8h + l`: row `2p + h`, block `8g + l`):
//!
//! - Q8_0: eight lines of 64 bytes; line `t` holds quants `4t..4t + 4` of
//!   each lane's block with the sign bit flipped (`+ 128`, the unsigned
//!   levels of `vpdpbusd`);
//! - Q4_0, Q4_1: four lines; line `j` holds quant bytes `4j..4j + 4` (low
//!   nibbles: values `4j..`, high nibbles: values `16 + 4j..`);
//! - Q5_0, Q5_1: those four lines and a fifth of high bits, one dword per
//!   lane, with bit `8b + t` = the high bit of value `4t + b`, so that vector
//!   `t`'s bits are one shift and a mask away;
//!
//! and, apart, 16 f16 scales per pair and group (and 16 mins for Q4_1 and
//! Q5_1). A final group of four blocks is stored in half lines of 32 bytes
//! (lanes `4h + l`, `l < 4`), so no padding is streamed (k = 896 and 640,
//! the real models' widths, end in one), and its scales have zeros in lanes
//! `4..8`; each pair's bytes are rounded up to whole 64-byte lines. Blocks
//! past the last group of four (`nb % 4`, none for `k` a multiple of 128)
//! stay as GGUF blocks in a tail array, and a missing second row of an odd
//! `n` is zero.
//!
//! The kernel forms every lane, group and sum exactly as the tile kernel and
//! the per-matmul packed path do, so the outputs are the same bits as
//! `vec_dot` (checked by the tests of [`crate::packed`]).

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::hsum_ps;
use super::gemm::{offset_shift, packed_blocks, tail_block, PackedActs};
use super::kind::{self, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::ActRow;
use crate::quant::dot::Acts;

/// Activation rows per kernel call.
pub(crate) const ROWS: usize = 8;

/// 64-byte lines of levels per pair and group.
pub(crate) const fn lines(t: u8) -> usize {
    match t {
        Q8_0 => 8,
        Q4_0 | Q4_1 => 4,
        _ => 5,
    }
}

/// One 64-byte, 64-aligned line of levels.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [u8; 64]);

/// Repacked levels, scales and tail of one weight.
pub(crate) struct Repacked {
    pub q: Vec<Line>,
    /// Per pair and group: 16 scales, then (Q4_1/Q5_1) 16 mins.
    pub d: Vec<u16>,
    /// `n` rows of `nb - nbp` raw blocks.
    pub tail: Vec<u8>,
}

/// The kind tag of `ty`, if it is a 32-value type.
pub(crate) fn kind_of(ty: tl_gguf::GgmlType) -> Option<u8> {
    use tl_gguf::GgmlType as G;
    Some(match ty {
        G::Q4_0 => Q4_0,
        G::Q4_1 => Q4_1,
        G::Q5_0 => Q5_0,
        G::Q5_1 => Q5_1,
        G::Q8_0 => Q8_0,
        _ => return None,
    })
}

/// Where the quants, high bits and min of a block of kind `t` start.
const fn fields(t: u8) -> (usize, usize, usize) {
    // (qs, qh, m)
    match t {
        Q4_0 => (2, 0, 0),
        Q4_1 => (4, 0, 2),
        Q5_0 => (6, 2, 0),
        Q5_1 => (8, 4, 2),
        _ => (2, 0, 0),
    }
}

/// Scale words per pair and group.
pub(crate) const fn scale_words(t: u8) -> usize {
    if kind::has_min(t) {
        32
    } else {
        16
    }
}

/// Byte geometry of one weight's repacked levels.
#[derive(Clone, Copy)]
pub(crate) struct Geom {
    /// Whole groups of eight blocks.
    pub full: usize,
    /// Whether a group of four follows them.
    pub half: bool,
    /// Lines per group.
    pub nl: usize,
    /// 64-byte lines per pair.
    pub pair_lines: usize,
}

impl Geom {
    pub(crate) fn new(t: u8, nb: usize) -> Geom {
        let (full, half, nl) = (nb / 8, nb % 8 >= 4, lines(t));
        let bytes = full * nl * 64 + usize::from(half) * nl * 32;
        Geom {
            full,
            half,
            nl,
            pair_lines: bytes.div_ceil(64),
        }
    }

    /// Byte offset, within the levels, of byte `i` of lane `(h, l)` of line
    /// `j` of group `g` of pair `p`.
    pub(crate) fn at(&self, p: usize, g: usize, j: usize, h: usize, l: usize, i: usize) -> usize {
        let base = p * self.pair_lines * 64;
        if g < self.full {
            base + (g * self.nl + j) * 64 + 32 * h + 4 * l + i
        } else {
            base + self.full * self.nl * 64 + j * 32 + 16 * h + 4 * l + i
        }
    }
}

/// Repacks `n` rows of `nb` blocks of kind `t` (`w` holds exactly them).
/// Pairs `pairs` only: the caller splits the work and owns disjoint slices
/// `q`, `d` of those pairs, which arrive zeroed (padding lanes stay zero).
pub(crate) fn repack_pairs(
    t: u8,
    w: &[u8],
    n: usize,
    nb: usize,
    pairs: std::ops::Range<usize>,
    q: &mut [Line],
    d: &mut [u16],
) {
    let (groups, nbp) = packed_blocks(nb);
    let geo = Geom::new(t, nb);
    let wb = kind::w_bytes(t);
    let sw = scale_words(t);
    let (qs, qh, mo) = fields(t);
    let p0 = pairs.start;
    // SAFETY: `Line` is `repr(C)` over `[u8; 64]` (no padding), so the
    // lines are exactly `64 * q.len()` initialized bytes.
    let qb = unsafe { std::slice::from_raw_parts_mut(q.as_mut_ptr() as *mut u8, q.len() * 64) };
    for p in pairs {
        let mut put = |g: usize, j: usize, h: usize, l: usize, bytes: [u8; 4]| {
            let at = geo.at(p - p0, g, j, h, l, 0);
            qb[at..at + 4].copy_from_slice(&bytes);
        };
        for g in 0..groups {
            let ld = &mut d[((p - p0) * groups + g) * sw..][..sw];
            for h in 0..2 {
                let r = 2 * p + h;
                if r >= n {
                    continue;
                }
                for l in 0..8 {
                    let b = 8 * g + l;
                    if b >= nbp {
                        continue;
                    }
                    let blk = &w[(r * nb + b) * wb..][..wb];
                    let word = |at: usize| [blk[at], blk[at + 1], blk[at + 2], blk[at + 3]];
                    ld[8 * h + l] = u16::from_le_bytes([blk[0], blk[1]]);
                    if kind::has_min(t) {
                        ld[16 + 8 * h + l] = u16::from_le_bytes([blk[mo], blk[mo + 1]]);
                    }
                    if t == Q8_0 {
                        for j in 0..8 {
                            put(g, j, h, l, word(qs + 4 * j).map(|v| v ^ 0x80));
                        }
                        continue;
                    }
                    for j in 0..4 {
                        put(g, j, h, l, word(qs + 4 * j));
                    }
                    if matches!(t, Q5_0 | Q5_1) {
                        let hb = u32::from_le_bytes(word(qh));
                        // Nibble t of `hb` (bits b) to bit t of bytes b.
                        const SPREAD: [u32; 16] = {
                            let mut t = [0u32; 16];
                            let mut v = 0;
                            while v < 16 {
                                let mut b = 0;
                                while b < 4 {
                                    if v >> b & 1 == 1 {
                                        t[v] |= 1 << (8 * b);
                                    }
                                    b += 1;
                                }
                                v += 1;
                            }
                            t
                        };
                        let mut perm = 0u32;
                        for tt in 0..8 {
                            perm |= SPREAD[((hb >> (4 * tt)) & 0xF) as usize] << tt;
                        }
                        put(g, 4, h, l, perm.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// The tail blocks (`nbp..nb`) of every row, as GGUF blocks.
pub(crate) fn tail_of(t: u8, w: &[u8], n: usize, nb: usize) -> Vec<u8> {
    let (_, nbp) = packed_blocks(nb);
    let wb = kind::w_bytes(t);
    let mut out = Vec::with_capacity(n * (nb - nbp) * wb);
    for r in 0..n {
        out.extend_from_slice(&w[(r * nb + nbp) * wb..(r + 1) * nb * wb]);
    }
    out
}

/// The GGUF block `b` of row `r`, rebuilt from the repacked arrays into
/// `blk` (one block's bytes).
pub(crate) fn block_of(t: u8, rp: &Repacked, nb: usize, r: usize, b: usize, blk: &mut [u8]) {
    let (groups, nbp) = packed_blocks(nb);
    let wb = kind::w_bytes(t);
    if b >= nbp {
        let tl = nb - nbp;
        blk.copy_from_slice(&rp.tail[(r * tl + b - nbp) * wb..][..wb]);
        return;
    }
    let (p, h, g, l) = (r / 2, r % 2, b / 8, b % 8);
    let geo = Geom::new(t, nb);
    let sw = scale_words(t);
    let ld = &rp.d[(p * groups + g) * sw..][..sw];
    let get = |j: usize| -> [u8; 4] {
        std::array::from_fn(|i| {
            let at = geo.at(p, g, j, h, l, i);
            rp.q[at / 64].0[at % 64]
        })
    };
    let (qs, qh, mo) = fields(t);
    blk.fill(0);
    blk[..2].copy_from_slice(&ld[8 * h + l].to_le_bytes());
    if kind::has_min(t) {
        blk[mo..mo + 2].copy_from_slice(&ld[16 + 8 * h + l].to_le_bytes());
    }
    if t == Q8_0 {
        for j in 0..8 {
            let v = get(j).map(|v| v ^ 0x80);
            blk[qs + 4 * j..qs + 4 * j + 4].copy_from_slice(&v);
        }
        return;
    }
    for j in 0..4 {
        blk[qs + 4 * j..qs + 4 * j + 4].copy_from_slice(&get(j));
    }
    if matches!(t, Q5_0 | Q5_1) {
        let perm = u32::from_le_bytes(get(4));
        let mut hb = 0u32;
        for tt in 0..8 {
            for bb in 0..4 {
                hb |= ((perm >> (8 * bb + tt)) & 1) << (4 * tt + bb);
            }
        }
        blk[qh..qh + 4].copy_from_slice(&hb.to_le_bytes());
    }
}

/// Vector `t` (0..8) of unsigned levels of one pair and whole group.
///
/// # Safety
///
/// The CPU runs the features; `q` points at the group's `lines(T)` lines.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn levels<const T: u8>(q: *const u8, t: usize) -> __m512i {
    levels_from::<T>(|j| _mm512_loadu_si512(q.add(64 * j) as *const __m512i), t)
}

/// [`levels`] of a half group: lanes `4h + l` of 32-byte half lines. Every
/// step works within 32-bit lanes, so the 512-bit body on zero-extended
/// half lines gives them in its low half.
///
/// # Safety
///
/// As for [`levels`], with `lines(T)` half lines at `q`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn levels_half<const T: u8>(q: *const u8, t: usize) -> __m256i {
    let line =
        |j: usize| _mm512_zextsi256_si512(_mm256_loadu_si256(q.add(32 * j) as *const __m256i));
    _mm512_castsi512_si256(levels_from::<T>(line, t))
}

/// Vector `t` of levels from the group's lines (`line(j)`): Q8_0's as they
/// are; nibbles of lines `t % 4`, low for `t < 4`; Q5's fifth bits from
/// line 4 (bit `8b + t` of each lane to bit 4 of byte `b`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn levels_from<const T: u8>(line: impl Fn(usize) -> __m512i, t: usize) -> __m512i {
    if T == Q8_0 {
        return line(t);
    }
    let low = _mm512_set1_epi8(0x0F);
    let nib = if t < 4 {
        _mm512_and_si512(line(t), low)
    } else {
        _mm512_and_si512(_mm512_srli_epi16::<4>(line(t - 4)), low)
    };
    if !matches!(T, Q5_0 | Q5_1) {
        return nib;
    }
    let h = line(4);
    let moved = if t <= 4 {
        _mm512_sll_epi32(h, _mm_cvtsi32_si128(4 - t as i32))
    } else {
        _mm512_srl_epi32(h, _mm_cvtsi32_si128(t as i32 - 4))
    };
    // nib | (moved & 0x10): ternary-logic table A | (B & C).
    _mm512_ternarylogic_epi32::<0xF8>(nib, moved, _mm512_set1_epi8(0x10))
}

/// Eight vectors of eight qwords transposed: qword `j` of result `l` is
/// qword `l` of input `j`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn transpose_qwords(w: &[__m512i; 8]) -> [__m512i; 8] {
    let mut a = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        a[2 * k] = _mm512_unpacklo_epi64(w[2 * k], w[2 * k + 1]);
        a[2 * k + 1] = _mm512_unpackhi_epi64(w[2 * k], w[2 * k + 1]);
    }
    // a[2k + e] holds qwords e, e + 2, e + 4, e + 6 of inputs 2k, 2k + 1.
    let lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    let hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    let mut b = [_mm512_setzero_si512(); 8];
    for half in 0..2 {
        for e in 0..2 {
            let (x, y) = (a[4 * half + e], a[4 * half + 2 + e]);
            b[4 * half + e] = _mm512_permutex2var_epi64(x, lo, y);
            b[4 * half + 2 + e] = _mm512_permutex2var_epi64(x, hi, y);
        }
    }
    // b[4 * half + f] holds qwords f and f + 4 of inputs 4 * half .. + 4.
    let first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    let second = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    let mut out = [_mm512_setzero_si512(); 8];
    for f in 0..4 {
        out[f] = _mm512_permutex2var_epi64(b[f], first, b[4 + f]);
        out[f + 4] = _mm512_permutex2var_epi64(b[f], second, b[4 + f]);
    }
    out
}

/// Sixteen rows `r0..r0 + 16` (`r0` even; rows past `n` zero) in the wide
/// panel layout of [`super::gemm`]: for packed block `b`, vector `t` at
/// `q + (8b + t) * 64` holds the unsigned levels `4t..4t + 4` of the
/// block of each row in lane `row - r0`; `d + 16b`, `m + 16b` its scales
/// and mins as f32. The same bytes the per-row path writes, from the
/// pair lines by a dword transpose (lanes `8h + l` of pair `j` go to lane
/// `2j + h` of block `l`'s vector).
///
/// # Safety
///
/// The CPU runs the features; `rp` holds a weight of `nb` blocks per row
/// and `n` rows; `q` has `nbp * 512` bytes, `d` and `m` `nbp * 16` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn fill_panel16<const T: u8>(
    rp: &Repacked,
    nb: usize,
    n: usize,
    r0: usize,
    q: *mut u8,
    d: *mut f32,
    m: *mut f32,
) {
    let (groups, nbp) = packed_blocks(nb);
    let geo = Geom::new(T, nb);
    let sw = scale_words(T);
    let pairs = n.div_ceil(2);
    let p0 = r0 / 2;
    let base = rp.q.as_ptr() as *const u8;
    // Pair `j`'s lane `8h + l` to qword `l`, dword `h`.
    let spread = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    // The same from a half group's lanes `4h + l` (`l < 4`; the rest zero).
    let spread_half = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 8, 8, 8, 8, 8, 8, 8);
    let live = pairs.saturating_sub(p0).min(8);
    // The weight streams through once per call: ask for the next panel's
    // lines while this one is transposed and multiplied (a hint; past the
    // end it is dropped, never faulted).
    super::prefetch(
        base.wrapping_add((p0 + 8) * geo.pair_lines * 64),
        8 * geo.pair_lines * 64,
    );
    for g in 0..groups {
        let full = g < geo.full;
        let blocks = if full { 8 } else { 4 };
        for t in 0..8 {
            let mut w = [_mm512_setzero_si512(); 8];
            for j in 0..live {
                let qg = base.add(geo.at(p0 + j, g, 0, 0, 0, 0));
                w[j] = if full {
                    _mm512_permutexvar_epi32(spread, levels::<T>(qg, t))
                } else {
                    let v = _mm512_zextsi256_si512(levels_half::<T>(qg, t));
                    _mm512_maskz_permutexvar_epi32(0x00FF, spread_half, v)
                };
            }
            let cols = transpose_qwords(&w);
            for l in 0..blocks {
                _mm512_storeu_si512(q.add(((8 * g + l) * 8 + t) * 64) as *mut __m512i, cols[l]);
            }
        }
        let mut sv = [[_mm512_setzero_si512(); 8]; 2];
        let kinds = if kind::has_min(T) { 2 } else { 1 };
        for (e, v) in sv.iter_mut().enumerate().take(kinds) {
            for j in 0..live {
                let dg = rp.d.as_ptr().add(((p0 + j) * groups + g) * sw + 16 * e);
                let x = _mm512_cvtph_ps(_mm256_loadu_si256(dg as *const __m256i));
                v[j] = _mm512_permutexvar_epi32(spread, _mm512_castps_si512(x));
            }
        }
        let dv = transpose_qwords(&sv[0]);
        let mv = transpose_qwords(&sv[1]);
        for l in 0..blocks {
            _mm512_storeu_si512(d.add((8 * g + l) * 16) as *mut __m512i, dv[l]);
            _mm512_storeu_si512(m.add((8 * g + l) * 16) as *mut __m512i, mv[l]);
        }
    }
    debug_assert!(8 * geo.full + 4 * usize::from(geo.half) == nbp);
}

/// Both halves of one 256-bit vector.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn both_i(p: *const u8) -> __m512i {
    _mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn both_f(p: *const f32) -> __m512 {
    _mm512_castsi512_ps(both_i(p as *const u8))
}

/// `R` packed activation rows against one repacked pair of weight rows:
/// `out[r][h]`, the sum over all packed blocks as the tile kernel forms it
/// before its tail (including its final `hsum(acc + accm)`).
///
/// # Safety
///
/// The CPU runs the features; `q` and `d` cover the pair's groups,
/// `a` holds packed rows `i0..i0 + R`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn micro<const T: u8, const R: usize>(
    geo: Geom,
    q: *const u8,
    d: *const u16,
    a: &PackedActs,
    i0: usize,
    ahead: *const u8,
) -> [[f32; 2]; R] {
    let nl = geo.nl;
    let sw = scale_words(T);
    let groups = geo.full + usize::from(geo.half);
    // Activation row `i0 + r` starts `r * groups` groups after row `i0`.
    let ab = a.q.as_ptr().add(i0 * groups * 256);
    let ad = a.d.as_ptr().add(i0 * groups * 8);
    let asm = a.sums.as_ptr().add(i0 * groups * 8);
    let ass = a.s.as_ptr().add(i0 * groups * 8);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm512_setzero_ps(); R];
    for g in 0..groups {
        // A group's share of the pair fetched ahead (see `pairs_into`),
        // spread over the work so that the requests never queue up in one
        // burst.
        super::prefetch(ahead.wrapping_add(g * nl * 64), nl * 64);
        let mut p = [_mm512_setzero_si512(); R];
        if g < geo.full {
            let qg = q.add(g * nl * 64);
            // Each lane's sum starts at minus its offset times the
            // activation sum: the same exact integer as subtracting it
            // afterwards.
            if let Some(sh) = offset_shift::<T>() {
                for r in 0..R {
                    let sums = both_i(asm.add((r * groups + g) * 8) as *const u8);
                    p[r] = _mm512_sub_epi32(p[r], _mm512_sll_epi32(sums, _mm_cvtsi32_si128(sh)));
                }
            }
            for t in 0..8 {
                let w = levels::<T>(qg, t);
                for r in 0..R {
                    let av = both_i(ab.add((r * groups + g) * 256 + 32 * t));
                    p[r] = _mm512_dpbusd_epi32(p[r], w, av);
                }
            }
        } else {
            // The half group: lanes 0..4 of each row in one 256-bit vector,
            // then spread to lanes 8h + l (zero elsewhere, as the padded
            // lanes of the full layout would be).
            let qg = q.add(geo.full * nl * 64);
            let mut ph = [_mm256_setzero_si256(); R];
            if let Some(sh) = offset_shift::<T>() {
                for r in 0..R {
                    let sums = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                        asm.add((r * groups + g) * 8) as *const __m128i,
                    ));
                    ph[r] = _mm256_sub_epi32(ph[r], _mm256_sll_epi32(sums, _mm_cvtsi32_si128(sh)));
                }
            }
            for t in 0..8 {
                let w = levels_half::<T>(qg, t);
                for r in 0..R {
                    let av = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                        ab.add((r * groups + g) * 256 + 32 * t) as *const __m128i,
                    ));
                    ph[r] = _mm256_dpbusd_epi32(ph[r], w, av);
                }
            }
            let idx = _mm512_setr_epi32(0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7, 0, 0, 0, 0);
            for r in 0..R {
                p[r] = _mm512_maskz_permutexvar_epi32(0x0F0F, idx, _mm512_castsi256_si512(ph[r]));
            }
        }
        let dg = d.add(g * sw);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(dg as *const __m256i));
        for r in 0..R {
            let lane = (r * groups + g) * 8;
            let da = both_f(ad.add(lane));
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(p[r]), acc[r]);
            if kind::has_min(T) {
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(dg.add(16) as *const __m256i));
                accm[r] = _mm512_fmadd_ps(mw, both_f(ass.add(lane)), accm[r]);
            }
        }
    }
    let mut out = [[0f32; 2]; R];
    if R < 4 {
        for r in 0..R {
            let lo = _mm256_add_ps(
                _mm512_castps512_ps256(acc[r]),
                _mm512_castps512_ps256(accm[r]),
            );
            let hi = _mm256_add_ps(
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[r]))),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(accm[r]))),
            );
            out[r] = [hsum_ps(lo), hsum_ps(hi)];
        }
        return out;
    }
    // Both rows of every activation row reduced together, lanes paired as
    // `hsum_ps` pairs them (`hsum8`); unused inputs are zero and dropped.
    let mut lo = [_mm256_setzero_ps(); 8];
    let mut hi = [_mm256_setzero_ps(); 8];
    for r in 0..R {
        let t = _mm512_add_ps(acc[r], accm[r]);
        lo[r] = _mm512_castps512_ps256(t);
        hi[r] = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(t)));
    }
    let mut sl = [0f32; 8];
    let mut sh = [0f32; 8];
    _mm256_storeu_ps(sl.as_mut_ptr(), super::gemm::hsum8(&lo));
    _mm256_storeu_ps(sh.as_mut_ptr(), super::gemm::hsum8(&hi));
    for r in 0..R {
        out[r] = [sl[r], sh[r]];
    }
    out
}

/// Weight row pairs `pairs` of a repacked weight (kind `T`, `nb` blocks,
/// `n` rows) against all `m` activation rows: `out[i * n + r]`.
///
/// # Safety
///
/// The CPU runs AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; `rp` was built by
/// [`repack_pairs`] and [`tail_of`] for this weight; `acts` holds `m` rows
/// of `nb` blocks of the weight's activation type with their extras, and
/// `packed` was packed from it; `pairs` lies within the `n.div_ceil(2)`
/// pairs; `out` points at `m * n` writable f32 of which no other thread
/// writes the columns of `pairs`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pairs_into<const T: u8>(
    rp: &Repacked,
    nb: usize,
    n: usize,
    acts: &Acts<'_>,
    packed: &PackedActs,
    m: usize,
    pairs: std::ops::Range<usize>,
    out: *mut f32,
) {
    let (groups, nbp) = packed_blocks(nb);
    let geo = Geom::new(T, nb);
    let sw = scale_words(T);
    let wb = kind::w_bytes(T);
    let tl = nb - nbp;
    for p in pairs {
        let q = rp.q.as_ptr().add(p * geo.pair_lines) as *const u8;
        // The weight streams through once per call: the kernel asks for
        // the pair after next while it computes this one (a hint; past the
        // end it is dropped, never faulted).
        let ahead = q.wrapping_add(2 * geo.pair_lines * 64);
        let d = rp.d.as_ptr().add(p * groups * sw);
        let cols = (n - 2 * p).min(2);
        let mut i0 = 0;
        while i0 < m {
            let rr = (m - i0).min(ROWS);
            let mut res = [[0f32; 2]; ROWS];
            macro_rules! call {
                ($r:literal) => {{
                    let o = micro::<T, $r>(geo, q, d, packed, i0, ahead);
                    res[..$r].copy_from_slice(&o);
                }};
            }
            super::by_rows!(rr, call);
            for r in 0..rr {
                let i = i0 + r;
                // Only a width not a multiple of 128 has tail blocks.
                let arow = (tl > 0).then(|| ActRow::new(acts, i));
                for h in 0..cols {
                    let row = 2 * p + h;
                    // The tail blocks, as the tile kernel adds them (its
                    // `+ 0.0` included when there are none).
                    let mut tail = 0f32;
                    if let Some(arow) = &arow {
                        for b in nbp..nb {
                            let wblk = &rp.tail[(row * tl + b - nbp) * wb..][..wb];
                            tail_block::<T>(wblk, arow, b, &mut tail);
                        }
                    }
                    *out.add(i * n + row) = res[r][h] + tail;
                }
            }
            i0 += rr;
        }
    }
}

/// [`pairs_into`] for kind tag `t`.
///
/// # Safety
///
/// As for [`pairs_into`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pairs_into_for(
    t: u8,
    rp: &Repacked,
    nb: usize,
    n: usize,
    acts: &Acts<'_>,
    packed: &PackedActs,
    m: usize,
    pairs: std::ops::Range<usize>,
    out: *mut f32,
) {
    match t {
        Q4_0 => pairs_into::<Q4_0>(rp, nb, n, acts, packed, m, pairs, out),
        Q4_1 => pairs_into::<Q4_1>(rp, nb, n, acts, packed, m, pairs, out),
        Q5_0 => pairs_into::<Q5_0>(rp, nb, n, acts, packed, m, pairs, out),
        Q5_1 => pairs_into::<Q5_1>(rp, nb, n, acts, packed, m, pairs, out),
        _ => pairs_into::<Q8_0>(rp, nb, n, acts, packed, m, pairs, out),
    }
}
