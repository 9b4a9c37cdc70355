//! Q6_K weights repacked once, at load, sixteen rows at a time, for an
//! AVX-512 VNNI kernel without horizontal reductions: a 512-bit vector holds
//! four consecutive 6-bit levels of each of 16 weight rows (one row per
//! 32-bit lane), so `vpdpbusd` against four broadcast activation bytes
//! leaves every row's partial sum in its own lane.
//!
//! Layout, per group of 16 rows and super-block (256 values), the same
//! 3360 bytes as the 16 GGUF blocks:
//!
//! - 32 nibble lines of 64 bytes: line `i`, lane `r`, byte `c`: the low four
//!   bits of level `8i + c` in the low nibble, of level `8i + 4 + c` in the
//!   high one;
//! - 16 high-bit lines: line `i`, lane `r`, byte `c`: bits `2k, 2k + 1` are
//!   the top two bits of level `16i + 4k + c`;
//! - the 16 sub-block scales of each row (`[j][r]`, i8), then the 16 rows'
//!   f16 `d`.
//!
//! Per super-block the kernel forms each lane's exact integer sum
//! `sum_j scale_j * sum_{i in j} (level_i - 32) * a_i` (the offset through
//! the activations' block sums, as the tile kernel does) and then adds
//! `(d * d_a) * sum` to the lane's f32 total, super-block after
//! super-block: the operations of the tile kernel, so the same bits
//! (checked by the tests of [`crate::packed`]). Rows past `n` are zero.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::quant::dot::Acts;

/// Bytes of a Q6_K block and of a Q8_K activation block, and where the
/// activation quants and block sums start.
const W_BYTES: usize = 210;
const A_BYTES: usize = 292;
const A_QS: usize = 4;
const A_BSUMS: usize = 4 + 256;

/// Bytes per group of 16 rows and super-block.
pub(crate) const GROUP_BYTES: usize = 16 * W_BYTES;
const NIB: usize = 0;
const HIGH: usize = 32 * 64;
const SCALES: usize = HIGH + 16 * 64;
const DS: usize = SCALES + 256;

/// Activation rows per kernel call.
const ROWS: usize = 8;

/// One 64-aligned line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [u8; 64]);

/// The 256 levels (0..64) of one GGUF Q6_K block.
fn levels_of(blk: &[u8]) -> [u8; 256] {
    let mut u = [0u8; 256];
    for v in 0..256 {
        let (n, w) = (v / 128, v % 128);
        let (qq, l) = (w / 32, w % 32);
        let ql = blk[64 * n + l + if qq % 2 == 1 { 32 } else { 0 }];
        let nib = if qq < 2 { ql & 0xF } else { ql >> 4 };
        let hi = (blk[128 + 32 * n + l] >> (2 * qq)) & 3;
        u[v] = nib | (hi << 4);
    }
    u
}

/// One GGUF Q6_K block from its levels, scales and `d` bytes.
fn block_from(u: &[u8; 256], scales: &[u8], d: [u8; 2], blk: &mut [u8]) {
    blk.fill(0);
    for v in 0..256 {
        let (n, w) = (v / 128, v % 128);
        let (qq, l) = (w / 32, w % 32);
        let at = 64 * n + l + if qq % 2 == 1 { 32 } else { 0 };
        if qq < 2 {
            blk[at] |= u[v] & 0xF;
        } else {
            blk[at] |= (u[v] & 0xF) << 4;
        }
        blk[128 + 32 * n + l] |= (u[v] >> 4) << (2 * qq);
    }
    blk[192..208].copy_from_slice(scales);
    blk[208..210].copy_from_slice(&d);
}

/// Lane `r` of the 32 nibble lines of `o` from 256 levels (low four bits).
fn put_nibbles(o: &mut [u8], u: &[u8; 256], r: usize) {
    for i in 0..32 {
        for c in 0..4 {
            o[NIB + 64 * i + 4 * r + c] = (u[8 * i + c] & 0xF) | ((u[8 * i + 4 + c] & 0xF) << 4);
        }
    }
}

/// Runs `put(o, blk, r)` for every row `r < 16` of row groups `groups`
/// (of `n` rows of `nb` super-blocks of `wb` bytes in `w`) and every
/// super-block: `blk` is the GGUF block, `o` its group's `gb` bytes of
/// `q`, which holds those groups' bytes and arrives zeroed (rows past `n`
/// stay zero).
fn each_row_block(
    w: &[u8],
    n: usize,
    nb: usize,
    (wb, gb): (usize, usize),
    groups: std::ops::Range<usize>,
    q: &mut [u8],
    mut put: impl FnMut(&mut [u8], &[u8], usize),
) {
    let g0 = groups.start;
    for g in groups {
        for b in 0..nb {
            let o = &mut q[((g - g0) * nb + b) * gb..][..gb];
            for r in 0..(n - 16 * g).min(16) {
                put(o, &w[((16 * g + r) * nb + b) * wb..][..wb], r);
            }
        }
    }
}

/// Repacks Q6_K row groups `groups` (16 rows each) of `n` rows of `nb`
/// super-blocks (`w` holds exactly them) into `q`, zeroed, which holds
/// those groups' `nb * GROUP_BYTES` bytes each.
pub(crate) fn repack_groups(
    w: &[u8],
    n: usize,
    nb: usize,
    groups: std::ops::Range<usize>,
    q: &mut [u8],
) {
    each_row_block(w, n, nb, (W_BYTES, GROUP_BYTES), groups, q, |o, blk, r| {
        let u = levels_of(blk);
        put_nibbles(o, &u, r);
        for i in 0..16 {
            for c in 0..4 {
                let mut hb = 0u8;
                for k in 0..4 {
                    hb |= (u[16 * i + 4 * k + c] >> 4) << (2 * k);
                }
                o[HIGH + 64 * i + 4 * r + c] = hb;
            }
        }
        for j in 0..16 {
            o[SCALES + 16 * j + r] = blk[192 + j];
        }
        o[DS + 2 * r..DS + 2 * r + 2].copy_from_slice(&blk[208..210]);
    });
}

/// Lane `r`'s 256 low nibbles from the 32 nibble lines of `o` (the inverse
/// of [`put_nibbles`]).
fn lane_nibbles(o: &[u8], r: usize) -> [u8; 256] {
    std::array::from_fn(|v| {
        let (grp, c) = (v / 4, v % 4);
        (o[NIB + 64 * (grp / 2) + 4 * r + c] >> (4 * (grp % 2))) & 0xF
    })
}

/// Row `r`'s GGUF blocks, rebuilt from the repacked bytes `q` into `out`
/// (`nb * 210` bytes).
pub(crate) fn row_of(q: &[u8], nb: usize, r: usize, out: &mut [u8]) {
    let (g, lane) = (r / 16, r % 16);
    for b in 0..nb {
        let o = &q[(g * nb + b) * GROUP_BYTES..][..GROUP_BYTES];
        let mut u = lane_nibbles(o, lane);
        for (v, u) in u.iter_mut().enumerate() {
            let (grp, c) = (v / 4, v % 4);
            *u |= ((o[HIGH + 64 * (grp / 4) + 4 * lane + c] >> (2 * (grp % 4))) & 3) << 4;
        }
        let scales: [u8; 16] = std::array::from_fn(|j| o[SCALES + 16 * j + lane]);
        let d = [o[DS + 2 * lane], o[DS + 2 * lane + 1]];
        block_from(&u, &scales, d, &mut out[b * W_BYTES..(b + 1) * W_BYTES]);
    }
}

/// Levels of group `grp` (0..64: values `4grp..4grp + 4`) of 16 rows.
///
/// # Safety
///
/// The CPU runs the features; `o` points at one group-and-super-block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn levels(o: *const u8, grp: usize) -> __m512i {
    let nl = _mm512_loadu_si512(o.add(NIB + 64 * (grp / 2)) as *const __m512i);
    let nib = if grp.is_multiple_of(2) {
        _mm512_and_si512(nl, _mm512_set1_epi8(0x0F))
    } else {
        _mm512_and_si512(_mm512_srli_epi16::<4>(nl), _mm512_set1_epi8(0x0F))
    };
    let h = _mm512_loadu_si512(o.add(HIGH + 64 * (grp / 4)) as *const __m512i);
    // Bits 2k, 2k + 1 of each byte to bits 4, 5 (bits from the neighbour
    // byte land outside the mask).
    let moved = match grp % 4 {
        0 => _mm512_slli_epi16::<4>(h),
        1 => _mm512_slli_epi16::<2>(h),
        2 => h,
        _ => _mm512_srli_epi16::<2>(h),
    };
    _mm512_ternarylogic_epi32::<0xF8>(nib, moved, _mm512_set1_epi8(0x30))
}

/// Bytes `i` of two 16-byte rows at `at` and `at + 16`, interleaved
/// (`[a0, b0, a1, b1, ..]`): widened to 16 bits, lane `i` of a 512-bit
/// vector then holds the pair as the two halves `vpdpwssd` multiplies.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn byte_pairs(at: *const u8) -> __m256i {
    let (a, b) = (
        _mm_loadu_si128(at as *const __m128i),
        _mm_loadu_si128(at.add(16) as *const __m128i),
    );
    _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b))
}

/// `R` activation rows (`row0..`) against one group of 16 weight rows:
/// the 16 lane totals per activation row.
///
/// # Safety
///
/// The CPU runs the features; `q` points at the group's `nb` super-blocks;
/// `acts` holds rows `row0..row0 + R` of `nb` Q8_K blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn micro<const R: usize>(
    nb: usize,
    q: *const u8,
    acts: &Acts<'_>,
    row0: usize,
) -> [__m512; R] {
    let mut tot = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let o = q.add(b * GROUP_BYTES);
        // The super-block after next, while this one is computed.
        super::prefetch(o.wrapping_add(2 * GROUP_BYTES), GROUP_BYTES);
        let mut isum = [_mm512_setzero_si512(); R];
        for j in 0..16 {
            let sc =
                _mm512_cvtepi8_epi32(_mm_loadu_si128(o.add(SCALES + 16 * j) as *const __m128i));
            let mut p = [_mm512_setzero_si512(); R];
            for k in 0..4 {
                let grp = 4 * j + k;
                let wv = levels(o, grp);
                for r in 0..R {
                    let y = acts
                        .bytes
                        .as_ptr()
                        .add((row0 + r) * acts.row_bytes + b * A_BYTES);
                    let a = _mm512_set1_epi32(std::ptr::read_unaligned(
                        y.add(A_QS + 4 * grp) as *const i32
                    ));
                    p[r] = _mm512_dpbusd_epi32(p[r], wv, a);
                }
            }
            for r in 0..R {
                isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(p[r], sc));
            }
        }
        // The level offset 32 through the block sums, exactly: minus
        // 32 * sum_j scale_j * bsum_j, two sub-blocks per `vpdpwssd` (each
        // lane holds scale_2i and scale_2i+1 as 16-bit halves; the block
        // sums of a pair are one 32-bit word). The same integer as
        // starting each sub-block's sum at -32 * bsum_j.
        let mut scw = [_mm512_setzero_si512(); 8];
        for (i, v) in scw.iter_mut().enumerate() {
            *v = _mm512_cvtepi8_epi16(byte_pairs(o.add(SCALES + 32 * i)));
        }
        for r in 0..R {
            let y = acts
                .bytes
                .as_ptr()
                .add((row0 + r) * acts.row_bytes + b * A_BYTES);
            let mut off = _mm512_setzero_si512();
            for (i, &sv) in scw.iter().enumerate() {
                let word = std::ptr::read_unaligned(y.add(A_BSUMS + 4 * i) as *const i32);
                off = _mm512_dpwssd_epi32(off, sv, _mm512_set1_epi32(word));
            }
            isum[r] = _mm512_sub_epi32(isum[r], _mm512_slli_epi32::<5>(off));
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(o.add(DS) as *const __m256i));
        for r in 0..R {
            let y = acts
                .bytes
                .as_ptr()
                .add((row0 + r) * acts.row_bytes + b * A_BYTES);
            let yd = _mm512_set1_ps(std::ptr::read_unaligned(y as *const f32));
            // (d * d_a) * sum, then added: the tile kernel's operations.
            let t = _mm512_mul_ps(_mm512_mul_ps(d, yd), _mm512_cvtepi32_ps(isum[r]));
            tot[r] = _mm512_add_ps(tot[r], t);
        }
    }
    tot
}

/// Row groups `groups` of a repacked Q6_K (or, `FOUR`, Q4_K) weight (`nb` super-blocks per
/// row, `n` rows) against all `m` activation rows: `out[i * n + r]`.
///
/// # Safety
///
/// The CPU runs AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; `q` was built by
/// [`repack_groups`] for this weight; `acts` holds `m` rows of
/// `nb` Q8_K blocks; `groups` lies within `n.div_ceil(16)`; `out` points at
/// `m * n` writable f32 of which no other thread writes these groups' rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn groups_into<const FOUR: bool>(
    q: &[Line],
    nb: usize,
    n: usize,
    acts: &Acts<'_>,
    m: usize,
    groups: std::ops::Range<usize>,
    out: *mut f32,
) {
    let base = q.as_ptr() as *const u8;
    for g in groups {
        let gb = if FOUR { GROUP4_BYTES } else { GROUP_BYTES };
        let qg = base.add(g * nb * gb);
        let rows = (n - 16 * g).min(16);
        let mut i0 = 0;
        while i0 < m {
            let rr = (m - i0).min(ROWS);
            let mut res = [[0f32; 16]; ROWS];
            macro_rules! call {
                ($r:literal) => {{
                    let t = if FOUR {
                        micro4::<$r>(nb, qg, acts, i0)
                    } else {
                        micro::<$r>(nb, qg, acts, i0)
                    };
                    for r in 0..$r {
                        _mm512_storeu_ps(res[r].as_mut_ptr(), t[r]);
                    }
                }};
            }
            super::by_rows!(rr, call);
            for r in 0..rr {
                for l in 0..rows {
                    *out.add((i0 + r) * n + 16 * g + l) = res[r][l];
                }
            }
            i0 += rr;
        }
    }
}

// ---------------------------------------------------------------------------
// Q4_K in the same 16-row shape: the 32 nibble lines as above (levels
// 0..16, no high bits), then the decoded 6-bit scales and mins of the 8
// sub-blocks (`[j][r]`, u8 each), then the 16 rows' f16 `d` and `dmin`:
// 2368 bytes per group of 16 rows and super-block (16 GGUF blocks take 2304;
// the scales are kept decoded, 8 bits for 6).

const W4_BYTES: usize = 144;
/// Bytes per group of 16 rows and super-block (Q4_K).
pub(crate) const GROUP4_BYTES: usize = 32 * 64 + 128 + 128 + 32 + 32;
const SC4: usize = 32 * 64;
const MN4: usize = SC4 + 128;
const D4: usize = MN4 + 128;
const DMIN4: usize = D4 + 32;

/// The 256 levels (0..16) of one GGUF Q4_K block.
fn levels4_of(blk: &[u8]) -> [u8; 256] {
    std::array::from_fn(|v| {
        let (j, w) = (v / 64, v % 64);
        let q = blk[16 + 32 * j + w % 32];
        if w < 32 {
            q & 0xF
        } else {
            q >> 4
        }
    })
}

/// Repacks Q4_K row groups `groups`; see [`repack_groups`].
pub(crate) fn repack4_groups(
    w: &[u8],
    n: usize,
    nb: usize,
    groups: std::ops::Range<usize>,
    q: &mut [u8],
) {
    each_row_block(
        w,
        n,
        nb,
        (W4_BYTES, GROUP4_BYTES),
        groups,
        q,
        |o, blk, r| {
            put_nibbles(o, &levels4_of(blk), r);
            let s: &[u8; 12] = blk[4..16].try_into().unwrap_or(&[0; 12]);
            for j in 0..8 {
                let (sc, mn) = crate::quant::k_quants::get_scale_min_k4(j, s);
                o[SC4 + 16 * j + r] = sc;
                o[MN4 + 16 * j + r] = mn;
            }
            o[D4 + 2 * r..D4 + 2 * r + 2].copy_from_slice(&blk[0..2]);
            o[DMIN4 + 2 * r..DMIN4 + 2 * r + 2].copy_from_slice(&blk[2..4]);
        },
    );
}

/// Row `r`'s GGUF Q4_K blocks from the repacked bytes (`nb * 144` bytes).
pub(crate) fn row4_of(q: &[u8], nb: usize, r: usize, out: &mut [u8]) {
    let (g, lane) = (r / 16, r % 16);
    for b in 0..nb {
        let o = &q[(g * nb + b) * GROUP4_BYTES..][..GROUP4_BYTES];
        let blk = &mut out[b * W4_BYTES..(b + 1) * W4_BYTES];
        blk.fill(0);
        blk[0..2].copy_from_slice(&o[D4 + 2 * lane..D4 + 2 * lane + 2]);
        blk[2..4].copy_from_slice(&o[DMIN4 + 2 * lane..DMIN4 + 2 * lane + 2]);
        // ggml's 6-bit packing of 8 scales and 8 mins into 12 bytes (the
        // inverse of `get_scale_min_k4`).
        let s = &mut blk[4..16];
        for j in 0..8 {
            let (ls, lm) = (o[SC4 + 16 * j + lane], o[MN4 + 16 * j + lane]);
            if j < 4 {
                s[j] |= ls;
                s[j + 4] |= lm;
            } else {
                s[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                s[j - 4] |= (ls >> 4) << 6;
                s[j] |= (lm >> 4) << 6;
            }
        }
        for (v, &u) in lane_nibbles(o, lane).iter().enumerate() {
            let (j, w) = (v / 64, v % 64);
            blk[16 + 32 * j + w % 32] |= if w < 32 { u } else { u << 4 };
        }
    }
}

/// `R` activation rows against one group of 16 Q4_K rows; see [`micro`].
///
/// # Safety
///
/// As for [`micro`], for the Q4_K layout.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn micro4<const R: usize>(
    nb: usize,
    q: *const u8,
    acts: &Acts<'_>,
    row0: usize,
) -> [__m512; R] {
    let mut accd = [_mm512_setzero_ps(); R];
    let mut accm = [_mm512_setzero_ps(); R];
    let low = _mm512_set1_epi8(0x0F);
    for b in 0..nb {
        let o = q.add(b * GROUP4_BYTES);
        super::prefetch(o.wrapping_add(2 * GROUP4_BYTES), GROUP4_BYTES);
        let mut isum = [_mm512_setzero_si512(); R];
        for j in 0..8 {
            let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(o.add(SC4 + 16 * j) as *const __m128i));
            let mut p = [_mm512_setzero_si512(); R];
            for k in 0..8 {
                let grp = 8 * j + k;
                let nl = _mm512_loadu_si512(o.add(NIB + 64 * (grp / 2)) as *const __m512i);
                let wv = if grp % 2 == 0 {
                    _mm512_and_si512(nl, low)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(nl), low)
                };
                for r in 0..R {
                    let y = acts
                        .bytes
                        .as_ptr()
                        .add((row0 + r) * acts.row_bytes + b * A_BYTES);
                    let a = _mm512_set1_epi32(std::ptr::read_unaligned(
                        y.add(A_QS + 4 * grp) as *const i32
                    ));
                    p[r] = _mm512_dpbusd_epi32(p[r], wv, a);
                }
            }
            for r in 0..R {
                isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(p[r], sc));
            }
        }
        // The mins' integer sum, sum_j min_j * (bsum_2j + bsum_2j+1), two
        // sub-blocks per `vpdpwssd`: each lane holds min_2i and min_2i+1
        // as 16-bit halves, the activation word the two block-sum pairs
        // (all within 16 bits: mins < 64, a pair's sum |.| <= 4096). The
        // same exact integer as one product per sub-block.
        let mut mnw = [_mm512_setzero_si512(); 4];
        for (i, v) in mnw.iter_mut().enumerate() {
            *v = _mm512_cvtepu8_epi16(byte_pairs(o.add(MN4 + 32 * i)));
        }
        let mut summ = [_mm512_setzero_si512(); R];
        for r in 0..R {
            let y = acts
                .bytes
                .as_ptr()
                .add((row0 + r) * acts.row_bytes + b * A_BYTES);
            let bs = y.add(A_BSUMS) as *const i16;
            let pair = |j: usize| {
                i32::from(std::ptr::read_unaligned(bs.add(2 * j)))
                    + i32::from(std::ptr::read_unaligned(bs.add(2 * j + 1)))
            };
            for (i, &m) in mnw.iter().enumerate() {
                let word = (pair(2 * i) & 0xFFFF) | (pair(2 * i + 1) << 16);
                summ[r] = _mm512_dpwssd_epi32(summ[r], m, _mm512_set1_epi32(word));
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(o.add(D4) as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(o.add(DMIN4) as *const __m256i));
        for r in 0..R {
            let y = acts
                .bytes
                .as_ptr()
                .add((row0 + r) * acts.row_bytes + b * A_BYTES);
            let yd = _mm512_set1_ps(std::ptr::read_unaligned(y as *const f32));
            let t = _mm512_mul_ps(_mm512_mul_ps(d, yd), _mm512_cvtepi32_ps(isum[r]));
            accd[r] = _mm512_add_ps(accd[r], t);
            let tm = _mm512_mul_ps(_mm512_mul_ps(dmin, yd), _mm512_cvtepi32_ps(summ[r]));
            accm[r] = _mm512_add_ps(accm[r], tm);
        }
    }
    let mut out = [_mm512_setzero_ps(); R];
    for r in 0..R {
        out[r] = _mm512_sub_ps(accd[r], accm[r]);
    }
    out
}
