//! Prefill path for the 32-value weight types under AVX-512 VNNI: a packed
//! GEMM micro-kernel that needs no horizontal reductions.
//!
//! The tile kernels (`legacy_kernel!`) reduce each block's eight partial
//! sums across lanes, which costs as much as the products themselves once
//! a weight block is shared by several activation rows. Here activations
//! are repacked per group of eight blocks into a *dword-transposed* layout
//! (32-byte vector `t` of a group holds bytes `4t..4t + 4` of blocks 0..7,
//! one block per 32-bit lane), and weight rows first into the same layout,
//! then into panels with one row per lane: eight `vpdpbusd` over
//! `t = 0..8` leave each row's exact integer sum of a block in its lane,
//! ready for the per-block scales.
//!
//! Activations are packed once per matmul ([`pack_acts`]). Weights go one
//! panel of [`PANEL`] = 16 rows at a time into a per-thread [`PanelBuf`],
//! one weight row per 32-bit lane, so that a `vpdpbusd` against four
//! broadcast activation bytes advances 16 rows at once and every panel
//! meets eight activation rows per micro-kernel call (the lane-per-row
//! shape of the K-quant kernels; it replaced a 2 x 4 tile whose loads and
//! per-call setup cost as much as its products).
//!
//! The per-block float products, their order within each of the tile
//! kernel's eight lanes, its final pairwise lane sum and the per-block tail
//! are exactly those of the tile kernel, so both paths give the same bits
//! (checked by the matmul and packed tests).

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::f16xn;
use super::kind::{self, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::{f16_at, ActRow};
use crate::quant::dot::Acts;

/// Weight rows per packed panel (the micro-kernel's columns): one per
/// 32-bit lane of a 512-bit vector.
pub(crate) const PANEL: usize = 16;
/// Most activation rows per micro-kernel call.
const ROWS: usize = 8;

/// Blocks of a row that go through packed groups: whole groups of 8, then
/// one group of 4 if at least 4 remain; the last `nb % 4` blocks are the
/// tail, done one by one as in the tile kernel.
pub(crate) fn packed_blocks(nb: usize) -> (usize, usize) {
    let full = nb / 8;
    let half = usize::from(nb % 8 >= 4);
    let groups = full + half;
    (groups, 8 * full + 4 * half)
}

/// The packed activations of one matmul.
#[derive(Default)]
pub(crate) struct PackedActs {
    /// `m * groups` groups of 256 bytes.
    pub q: Vec<u8>,
    /// `m * groups * 8` scales, block sums and (Q8_1) `s`, zero past the
    /// blocks of a final group of 4.
    pub d: Vec<f32>,
    pub sums: Vec<i32>,
    pub s: Vec<f32>,
    pub groups: usize,
}

/// Packs `m` activation rows of `acts` (Q8_0 or Q8_1, `nb` blocks each).
pub(crate) fn pack_acts(acts: &Acts<'_>, m: usize, q8_1: bool, out: &mut PackedActs) {
    let nb = acts.nb;
    let (groups, nbp) = packed_blocks(nb);
    let (ab, aq) = if q8_1 { (36, 4) } else { (34, 2) };
    out.groups = groups;
    out.q.resize(m * groups * 256, 0);
    out.d.resize(m * groups * 8, 0.0);
    out.sums.resize(m * groups * 8, 0);
    out.s.resize(m * groups * 8, 0.0);
    for i in 0..m {
        let row = &acts.bytes[i * acts.row_bytes..(i + 1) * acts.row_bytes];
        let q = &mut out.q[i * groups * 256..(i + 1) * groups * 256];
        let lanes = i * groups * 8..(i + 1) * groups * 8;
        let (d, sums, s) = (
            &mut out.d[lanes.clone()],
            &mut out.sums[lanes.clone()],
            &mut out.s[lanes],
        );
        for g in 0..groups {
            for l in 0..8 {
                let b = 8 * g + l;
                let at = g * 256 + 4 * l;
                if b < nbp {
                    let blk = &row[b * ab + aq..b * ab + aq + 32];
                    for t in 0..8 {
                        q[at + 32 * t..at + 32 * t + 4].copy_from_slice(&blk[4 * t..4 * t + 4]);
                    }
                    d[8 * g + l] = acts.d[i * nb + b];
                    sums[8 * g + l] = acts.sums[i * nb + b];
                    if q8_1 {
                        s[8 * g + l] = acts.s[i * nb + b];
                    }
                } else {
                    for t in 0..8 {
                        q[at + 32 * t..at + 32 * t + 4].fill(0);
                    }
                    d[8 * g + l] = 0.0;
                    sums[8 * g + l] = 0;
                    s[8 * g + l] = 0.0;
                }
            }
        }
    }
}

/// Transposes eight rows of eight dwords: vector `t` of the result holds
/// dword `t` of rows 0..7.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn transpose8(r: &[__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
    let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
    let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
    let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
    let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256::<0x20>(u0, u4),
        _mm256_permute2x128_si256::<0x20>(u1, u5),
        _mm256_permute2x128_si256::<0x20>(u2, u6),
        _mm256_permute2x128_si256::<0x20>(u3, u7),
        _mm256_permute2x128_si256::<0x31>(u0, u4),
        _mm256_permute2x128_si256::<0x31>(u1, u5),
        _mm256_permute2x128_si256::<0x31>(u2, u6),
        _mm256_permute2x128_si256::<0x31>(u3, u7),
    ]
}

/// Packs weight row `w` (kind `T`) into `q` (`groups * 256` bytes), `d`
/// and `m` (`groups * 8` lanes each).
///
/// # Safety
///
/// The CPU runs the features; `w` holds the whole row of `nb` blocks and
/// the outputs have the sizes above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pack_weight_row<const T: u8>(
    w: *const u8,
    nb: usize,
    q: *mut u8,
    d: *mut f32,
    m: *mut f32,
) {
    let (groups, nbp) = packed_blocks(nb);
    let wb = kind::w_bytes(T);
    for g in 0..groups {
        let cnt = (nbp - 8 * g).min(8);
        let wblk = w.add(8 * g * wb);
        let mut r = [_mm256_setzero_si256(); 8];
        for l in 0..cnt {
            r[l] = super::avx512::unpack::<T>(wblk.add(l * wb));
        }
        let cols = transpose8(&r);
        for t in 0..8 {
            _mm256_storeu_si256(q.add(g * 256 + 32 * t) as *mut __m256i, cols[t]);
        }
        let (dv, mv) = if cnt == 8 {
            (f16xn::<8>(wblk, wb), f16xn::<8>(wblk.add(2), wb))
        } else {
            (f16xn::<4>(wblk, wb), f16xn::<4>(wblk.add(2), wb))
        };
        _mm256_storeu_ps(d.add(8 * g), dv);
        let mv = if kind::has_min(T) {
            mv
        } else {
            _mm256_setzero_ps()
        };
        _mm256_storeu_ps(m.add(8 * g), mv);
    }
}

/// `R` packed activation rows (from `i0`) against one wide panel of
/// [`PANEL`] weight rows, one row per 32-bit lane: `out[r]` holds the 16
/// rows' sums over all packed blocks, as the tile kernel forms them before
/// its tail.
///
/// Every block's exact integer sum lands in its row's lane after eight
/// `vpdpbusd` against broadcast activation dwords (the level offset enters
/// first, through the activation block sums: the same integer). The float
/// side keeps the tile kernel's order: its lane `l` accumulates the blocks
/// `8g + l` group after group, so here blocks run with `l` outer and `g`
/// inner, one accumulator per activation row, and the eight lane totals
/// are then added pairwise as `hsum_ps` adds them, for 16 rows at once.
/// The missing blocks of a final group of four add the tile kernel's zero
/// lanes, which change nothing, so they are skipped.
///
/// # Safety
///
/// The CPU runs the features; `pq`, `pd`, `pm` hold the panel's `nbp`
/// packed blocks (see [`PanelBuf`]); `a` holds packed rows
/// `i0..i0 + R` of `groups` groups.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn micro<const T: u8, const R: usize>(
    groups: usize,
    nbp: usize,
    pq: *const u8,
    pd: *const f32,
    pm: *const f32,
    a: &PackedActs,
    i0: usize,
) -> [__m512; R] {
    let shift = offset_shift::<T>();
    let aq = a.q.as_ptr().add(i0 * groups * 256);
    let ad = a.d.as_ptr().add(i0 * groups * 8);
    let asu = a.sums.as_ptr().add(i0 * groups * 8);
    let ass = a.s.as_ptr().add(i0 * groups * 8);
    let mut lanes = [[_mm512_setzero_ps(); R]; 8];
    for l in 0..8 {
        let mut acc = [_mm512_setzero_ps(); R];
        let mut accm = [_mm512_setzero_ps(); R];
        let mut g = 0;
        while g < groups && 8 * g + l < nbp {
            let b = 8 * g + l;
            // Activation row `r`'s lane `l` of group `g`.
            let at = |r: usize| (r * groups + g) * 8 + l;
            let mut p = [_mm512_setzero_si512(); R];
            if let Some(sh) = shift {
                for r in 0..R {
                    p[r] =
                        _mm512_set1_epi32((*asu.add(at(r))).wrapping_shl(sh as u32).wrapping_neg());
                }
            }
            let wq = pq.add(b * 512);
            for t in 0..8 {
                let w = _mm512_loadu_si512(wq.add(64 * t) as *const __m512i);
                for r in 0..R {
                    let x = std::ptr::read_unaligned(
                        aq.add((r * groups + g) * 256 + 32 * t + 4 * l) as *const i32,
                    );
                    p[r] = _mm512_dpbusd_epi32(p[r], w, _mm512_set1_epi32(x));
                }
            }
            let dw = _mm512_loadu_ps(pd.add(16 * b));
            for r in 0..R {
                let da = _mm512_set1_ps(*ad.add(at(r)));
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(p[r]), acc[r]);
            }
            if kind::has_min(T) {
                let mw = _mm512_loadu_ps(pm.add(16 * b));
                for r in 0..R {
                    accm[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*ass.add(at(r))), accm[r]);
                }
            }
            g += 1;
        }
        for r in 0..R {
            lanes[l][r] = _mm512_add_ps(acc[r], accm[r]);
        }
    }
    let mut out = [_mm512_setzero_ps(); R];
    for r in 0..R {
        let v = |l: usize| lanes[l][r];
        let u0 = _mm512_add_ps(v(0), v(4));
        let u1 = _mm512_add_ps(v(1), v(5));
        let u2 = _mm512_add_ps(v(2), v(6));
        let u3 = _mm512_add_ps(v(3), v(7));
        out[r] = _mm512_add_ps(_mm512_add_ps(u0, u2), _mm512_add_ps(u1, u3));
    }
    out
}

/// Lane `j` of the result is `hsum_ps(v[j])` with the same additions (lane
/// i + i+4, then i + i+2, then i + i+1), for eight vectors at once.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum8(v: &[__m256; 8]) -> __m256 {
    // i + i+4: w[k] holds the four sums of v[2k], then of v[2k + 1].
    let mut w = [_mm256_setzero_ps(); 4];
    for k in 0..4 {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        w[k] = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        );
    }
    // i + i+2 in each 128-bit half: x[0] holds v0..v3 (half h: v[h], v[2 + h]),
    // x[1] holds v4..v7.
    let mut x = [_mm256_setzero_ps(); 2];
    for k in 0..2 {
        let (a, b) = (_mm256_castps_pd(w[2 * k]), _mm256_castps_pd(w[2 * k + 1]));
        x[k] = _mm256_add_ps(
            _mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
            _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)),
        );
    }
    // i + i+1: element 4h + m now holds v[2m + h].
    let z = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(x[0], x[1]),
        _mm256_shuffle_ps::<0b11_01_11_01>(x[0], x[1]),
    );
    _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// log2 of the level offset (see the `avx512` unpacking).
pub(super) const fn offset_shift<const T: u8>() -> Option<i32> {
    match T {
        Q4_0 => Some(3),
        Q5_0 => Some(4),
        Q8_0 => Some(7),
        _ => None,
    }
}

/// The signed values of one weight block (level minus offset; Q4_1/Q5_1
/// levels as they are), for the tail blocks.
pub(crate) fn block_values<const T: u8>(b: &[u8]) -> [i32; 32] {
    let mut v = [0i32; 32];
    let nib = |qs: &[u8], j: usize| {
        if j < 16 {
            i32::from(qs[j] & 0xF)
        } else {
            i32::from(qs[j - 16] >> 4)
        }
    };
    let hbit = |qh: &[u8], j: usize| {
        let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        (((h >> j) & 1) as i32) << 4
    };
    for j in 0..32 {
        v[j] = match T {
            Q4_0 => nib(&b[2..], j) - 8,
            Q4_1 => nib(&b[4..], j),
            Q5_0 => (nib(&b[6..], j) | hbit(&b[2..], j)) - 16,
            Q5_1 => nib(&b[8..], j) | hbit(&b[4..], j),
            _ => i32::from(b[2 + j] as i8),
        };
    }
    v
}

/// Adds weight block `wblk` (kind `T`) dotted with block `b` of `arow` to
/// `tail`, as the tile kernel adds the blocks past its last group.
///
/// # Safety
///
/// `arow` covers block `b` of an activation row with its extras.
pub(super) unsafe fn tail_block<const T: u8>(wblk: &[u8], arow: &ActRow, b: usize, tail: &mut f32) {
    let v = block_values::<T>(wblk);
    let aq = arow.bytes.add(b * kind::act_bytes(T) + kind::act_qs(T));
    let mut sumi = 0i32;
    for (j, &x) in v.iter().enumerate() {
        sumi += x * i32::from(*aq.add(j) as i8);
    }
    *tail += (f16_at(wblk.as_ptr()) * *arow.d.add(b)) * sumi as f32;
    if kind::has_min(T) {
        *tail += f16_at(wblk.as_ptr().add(2)) * *arow.s.add(b);
    }
}

/// One thread's packed weight panel: levels, scales and mins of [`PANEL`]
/// rows, one row per 32-bit lane. Block `b`'s levels are eight 64-byte
/// vectors (vector `t`: bytes `4t..4t + 4` of the block of rows 0..16),
/// its scales and mins 16 f32 each. Owned by the matmul scratch (one per
/// thread) so that the steady state allocates nothing; `row_*` hold one
/// row in the per-row layout on its way in.
#[derive(Default)]
pub(crate) struct PanelBuf {
    q: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
    row_q: Vec<u8>,
    row_d: Vec<f32>,
    row_m: Vec<f32>,
}

impl PanelBuf {
    /// Sizes the buffer for rows of `nb` blocks (grows, never shrinks).
    pub(crate) fn size_for(&mut self, nb: usize) {
        let (groups, _) = packed_blocks(nb);
        let g = groups.max(self.row_d.len() / 8);
        self.q.resize(g * 8 * 512, 0);
        self.d.resize(g * 8 * PANEL, 0.0);
        self.m.resize(g * 8 * PANEL, 0.0);
        self.row_q.resize(g * 256, 0);
        self.row_d.resize(g * 8, 0.0);
        self.row_m.resize(g * 8, 0.0);
    }
}

/// Where the weight rows of [`legacy_rows`] come from.
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    /// GGUF blocks, `n` rows.
    Blocks(&'a [u8]),
    /// The load-time layout of [`super::repack`].
    Repacked(&'a super::repack::Repacked),
}

/// Weight rows `rows` (kind `T`, `k` values, `wb` bytes each, in `w`)
/// against all `m` activation rows: `out[i * n + r]`.
///
/// # Safety
///
/// The CPU runs AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; `acts` passed
/// `check_kernel_args` for all `m` rows and `packed` was packed from it;
/// `rows` lies within the `n` rows of `w`; `out` points at `m * n`
/// writable f32 of which no other thread writes the columns `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn legacy_rows<const T: u8>(
    buf: &mut PanelBuf,
    k: usize,
    w: Src<'_>,
    acts: &Acts<'_>,
    packed: &PackedActs,
    m: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    out: *mut f32,
) {
    let nb = k / 32;
    let wb = kind::w_bytes(T);
    let row_bytes = nb * wb;
    let (groups, nbp) = packed_blocks(nb);
    buf.size_for(nb);
    let PanelBuf {
        q: pq,
        d: pd,
        m: pm,
        row_q,
        row_d,
        row_m,
    } = buf;
    // Sums of rows with tail blocks, on their way to the tail (zeroed once
    // per call, not per tile).
    let mut res = [[0f32; PANEL]; ROWS];
    let mut r0 = rows.start;
    while r0 < rows.end {
        let cols = (rows.end - r0).min(PANEL);
        match w {
            // Repacked rows: straight from the pair lines, 16 at a time.
            Src::Repacked(rp) => super::repack::fill_panel16::<T>(
                rp,
                nb,
                n,
                r0,
                pq.as_mut_ptr(),
                pd.as_mut_ptr(),
                pm.as_mut_ptr(),
            ),
            // GGUF blocks: each row in the per-row layout, then dword by
            // dword into its lane (rows past `cols` are zero and dropped).
            Src::Blocks(w) => {
                for c in 0..PANEL {
                    if c < cols {
                        let (q, d, mm) =
                            (row_q.as_mut_ptr(), row_d.as_mut_ptr(), row_m.as_mut_ptr());
                        pack_weight_row::<T>(w.as_ptr().add((r0 + c) * row_bytes), nb, q, d, mm);
                    } else {
                        row_q.fill(0);
                        row_d.fill(0.0);
                        row_m.fill(0.0);
                    }
                    let (rq, rd, rm) =
                        (row_q.as_ptr() as *const u32, row_d.as_ptr(), row_m.as_ptr());
                    let dst = pq.as_mut_ptr() as *mut u32;
                    for b in 0..nbp {
                        let (g, l) = (b / 8, b % 8);
                        for t in 0..8 {
                            *dst.add((b * 8 + t) * PANEL + c) = *rq.add(g * 64 + 8 * t + l);
                        }
                        pd[b * PANEL + c] = *rd.add(8 * g + l);
                        pm[b * PANEL + c] = *rm.add(8 * g + l);
                    }
                }
            }
        }
        let mut i0 = 0;
        while i0 < m {
            let rr = (m - i0).min(ROWS);
            // Rows with no tail blocks are written straight from the
            // vectors (the tile kernel's `+ 0.0` included); the others
            // add their tail blocks one by one, as the tile kernel does.
            let mask: __mmask16 = if cols == PANEL {
                !0
            } else {
                (1u16 << cols) - 1
            };
            macro_rules! call {
                ($r:literal) => {{
                    let o = micro::<T, $r>(
                        groups,
                        nbp,
                        pq.as_ptr(),
                        pd.as_ptr(),
                        pm.as_ptr(),
                        packed,
                        i0,
                    );
                    for r in 0..$r {
                        if nbp == nb {
                            let v = _mm512_add_ps(o[r], _mm512_setzero_ps());
                            _mm512_mask_storeu_ps(out.add((i0 + r) * n + r0), mask, v);
                        } else {
                            _mm512_storeu_ps(res[r].as_mut_ptr(), o[r]);
                        }
                    }
                    $r
                }};
            }
            let done = match rr {
                8.. => call!(8),
                4..=7 => call!(4),
                2 | 3 => call!(2),
                _ => call!(1),
            };
            if nbp < nb {
                for r in 0..done {
                    let i = i0 + r;
                    let o = out.add(i * n + r0);
                    let arow = ActRow::new(acts, i);
                    for c in 0..cols {
                        let row = r0 + c;
                        let mut tail = 0f32;
                        for b in nbp..nb {
                            let wblk = match w {
                                Src::Blocks(w) => &w[row * row_bytes + b * wb..][..wb],
                                Src::Repacked(rp) => {
                                    &rp.tail[(row * (nb - nbp) + b - nbp) * wb..][..wb]
                                }
                            };
                            tail_block::<T>(wblk, &arow, b, &mut tail);
                        }
                        *o.add(c) = res[r][c] + tail;
                    }
                }
            }
            i0 += done;
        }
        r0 += cols;
    }
}

/// [`legacy_rows`] for weight kind `ty`, or `false` if this path does not
/// take it.
///
/// # Safety
///
/// As for [`legacy_rows`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn legacy_rows_for(
    buf: &mut PanelBuf,
    ty: tl_gguf::GgmlType,
    k: usize,
    w: Src<'_>,
    acts: &Acts<'_>,
    packed: &PackedActs,
    m: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    out: *mut f32,
) -> bool {
    use tl_gguf::GgmlType as G;
    match ty {
        G::Q4_0 => legacy_rows::<Q4_0>(buf, k, w, acts, packed, m, n, rows, out),
        G::Q4_1 => legacy_rows::<Q4_1>(buf, k, w, acts, packed, m, n, rows, out),
        G::Q5_0 => legacy_rows::<Q5_0>(buf, k, w, acts, packed, m, n, rows, out),
        G::Q5_1 => legacy_rows::<Q5_1>(buf, k, w, acts, packed, m, n, rows, out),
        G::Q8_0 => legacy_rows::<Q8_0>(buf, k, w, acts, packed, m, n, rows, out),
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::super::avx2::hsum_ps;
    use super::*;

    /// `hsum8` adds each vector's lanes exactly as `hsum_ps` does.
    #[test]
    fn transposed_hsum_is_hsum_ps() {
        if !is_x86_feature_detected!("avx2") || !is_x86_feature_detected!("fma") {
            eprintln!("skipped: no AVX2/FMA on this CPU");
            return;
        }
        let mut x = 5u64;
        for _ in 0..2000 {
            let mut v = [[0f32; 8]; 8];
            for l in v.iter_mut().flatten() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let m = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                *l = m * 2f32.powi(((x >> 8) % 40) as i32 - 20);
            }
            // SAFETY: the features were checked above.
            unsafe {
                let a: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(v[j].as_ptr()));
                let mut got = [0f32; 8];
                _mm256_storeu_ps(got.as_mut_ptr(), hsum8(&a));
                for j in 0..8 {
                    assert_eq!(got[j].to_bits(), hsum_ps(a[j]).to_bits(), "vector {j}");
                }
            }
        }
    }
}
