//! The 1.5-bit formats of ggml: IQ1_S and IQ1_M. Each group of eight
//! values is one point of a fixed grid of levels -1, 0, 1 ([`IQ1S_GRID`]),
//! shifted by `±delta` (0.125), times an odd 3-bit scale and the
//! super-block scale.
//!
//! - IQ1_S (`block_iq1_s`, 50 bytes): f16 `d`; per group the low 8 bits of
//!   an 11-bit grid index in `qs`; per 32 values a u16 `qh` with the three
//!   high bits of each of its four indices, the 3-bit scale (bits 12..15)
//!   and the sign of the shift (bit 15).
//! - IQ1_M (`block_iq1_m`, 56 bytes): no separate `d`: its f16 bits are the
//!   top four bits of the four u16 of `scales`; per 16 values a 3-bit
//!   scale; per group the index's high three bits and the shift's sign in a
//!   nibble of `qh`.
//!
//! Quantization is ggml's `quantize_row_iq1_s_impl` and
//! `quantize_row_iq1_m_impl` (an exhaustive search of the two split points
//! of the sorted values into the three levels, then the nearest grid
//! points), operation for operation in f32. IQ1_S needs importance
//! weights, as in ggml.

#![allow(clippy::needless_range_loop)]

use bytemuck::Zeroable;
use half::f16;
use tl_gguf::GgmlType;

use super::iq_grids::IQ1S_GRID;
use super::iq_search::{self, GridSearch};
use super::k_quants::QK_K;
use super::k_search::nearest_int;
use super::Dequantize;

/// ggml `IQ1S_DELTA` (and `IQ1M_DELTA`).
pub const IQ1S_DELTA: f32 = 0.125;

/// `block_iq1_s`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ1S {
    pub d: f16,
    pub qs: [u8; QK_K / 8],
    pub qh: [u16; QK_K / 32],
}
const _: () = assert!(std::mem::size_of::<BlockIQ1S>() == 50);

/// `block_iq1_m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ1M {
    pub qs: [u8; QK_K / 8],
    pub qh: [u8; QK_K / 16],
    pub scales: [u8; QK_K / 32],
}
const _: () = assert!(std::mem::size_of::<BlockIQ1M>() == 56);

/// The eight signed levels of a grid point.
#[inline]
pub(crate) fn grid8(i: usize) -> [i8; 8] {
    IQ1S_GRID[i].to_le_bytes().map(|b| b as i8)
}

impl BlockIQ1S {
    /// The 11-bit grid index of group `l` (0..4) of sub-block `ib` (0..8).
    #[inline]
    pub fn index(&self, ib: usize, l: usize) -> usize {
        usize::from(self.qs[4 * ib + l]) | ((usize::from(self.qh[ib] >> (3 * l)) & 7) << 8)
    }

    /// The odd scale of sub-block `ib`.
    #[inline]
    pub fn sub_scale(&self, ib: usize) -> i32 {
        2 * i32::from((self.qh[ib] >> 12) & 7) + 1
    }
}

impl Dequantize for BlockIQ1S {
    const TYPE: GgmlType = GgmlType::IQ1_S;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_iq1_s`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for ib in 0..QK_K / 32 {
            let dl = d * self.sub_scale(ib) as f32;
            let delta = if self.qh[ib] & 0x8000 != 0 {
                -IQ1S_DELTA
            } else {
                IQ1S_DELTA
            };
            for l in 0..4 {
                let g = grid8(self.index(ib, l));
                let at = 32 * ib + 8 * l;
                for j in 0..8 {
                    y[at + j] = dl * (f32::from(g[j]) + delta);
                }
            }
        }
    }
}

impl BlockIQ1M {
    /// The four u16 of `scales`.
    #[inline]
    pub fn sc(&self) -> [u16; 4] {
        let s = &self.scales;
        [
            u16::from_le_bytes([s[0], s[1]]),
            u16::from_le_bytes([s[2], s[3]]),
            u16::from_le_bytes([s[4], s[5]]),
            u16::from_le_bytes([s[6], s[7]]),
        ]
    }

    /// The super-block scale, gathered from the top nibbles of `scales`.
    #[inline]
    pub fn d(&self) -> f16 {
        let sc = self.sc();
        f16::from_bits(
            (sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000),
        )
    }

    /// The odd scales of the two 16-value halves of sub-block `ib` (0..8).
    #[inline]
    pub fn sub_scales(&self, ib: usize) -> (i32, i32) {
        let s = self.sc()[ib / 2];
        let sh = 6 * (ib % 2);
        (
            2 * i32::from((s >> sh) & 7) + 1,
            2 * i32::from((s >> (sh + 3)) & 7) + 1,
        )
    }

    /// The 11-bit grid index of group `l` (0..4) of sub-block `ib`, and
    /// whether its shift is negative.
    #[inline]
    pub fn index(&self, ib: usize, l: usize) -> (usize, bool) {
        let qh = u16::from(self.qh[2 * ib + l / 2]);
        let idx = usize::from(self.qs[4 * ib + l]) | usize::from((qh << (8 - 4 * (l % 2))) & 0x700);
        let neg = qh & (0x08 << (4 * (l % 2))) != 0;
        (idx, neg)
    }
}

impl Dequantize for BlockIQ1M {
    const TYPE: GgmlType = GgmlType::IQ1_M;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_iq1_m`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d().to_f32();
        for ib in 0..QK_K / 32 {
            let (s1, s2) = self.sub_scales(ib);
            let dl = [d * s1 as f32, d * s2 as f32];
            for l in 0..4 {
                let (idx, neg) = self.index(ib, l);
                let delta = if neg { -IQ1S_DELTA } else { IQ1S_DELTA };
                let g = grid8(idx);
                let at = 32 * ib + 8 * l;
                for j in 0..8 {
                    y[at + j] = dl[l / 2] * (f32::from(g[j]) + delta);
                }
            }
        }
    }
}

/// ggml `GROUP_MAX_EPS_IQ1_S`.
const GROUP_MAX_EPS_IQ1_S: f32 = 1e-12;
/// ggml `GROUP_MAX_EPS_IQ1_M`.
const GROUP_MAX_EPS_IQ1_M: f32 = 1e-7;
/// The three levels shifted up (`x_p`) and down (`x_m`) by the delta.
const X_P: [f32; 3] = [-1.0 + IQ1S_DELTA, IQ1S_DELTA, 1.0 + IQ1S_DELTA];
const X_M: [f32; 3] = [-1.0 - IQ1S_DELTA, -IQ1S_DELTA, 1.0 - IQ1S_DELTA];

/// C's `MAX(a, b)`: `a > b ? a : b`.
#[inline]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// The indices of `xb` in ascending order of value, ties in index order (as
/// the merge sort of glibc's `qsort` leaves them).
fn sorted_order<const N: usize>(xb: &[f32]) -> [usize; N] {
    let mut idx: [usize; N] = std::array::from_fn(|i| i);
    idx.sort_by(|&a, &b| {
        xb[a]
            .partial_cmp(&xb[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx
}

/// Level indices 0, 1, 2 for the split of the sorted values at `i1`, `i2`.
fn split_levels<const N: usize>(idx: &[usize; N], i1: usize, i2: usize) -> [i8; N] {
    let mut l = [0i8; N];
    for (j, &i) in idx.iter().enumerate() {
        l[i] = if j < i1 {
            0
        } else if j < i2 {
            1
        } else {
            2
        };
    }
    l
}

/// The packed map index of eight level indices.
#[inline]
fn pack8(l: &[i8]) -> usize {
    let mut u = 0usize;
    for i in 0..8 {
        u |= (l[i] as usize) << (2 * i);
    }
    u
}

/// ggml `iq1_find_best_neighbour2`: of the neighbours of the off-grid point
/// `u`, the one nearest `xval` at `scale` with levels `xg`; writes its level
/// indices to `l`.
fn best_neighbour2(
    search: &GridSearch<8>,
    u: usize,
    xval: &[f32],
    weight: &[f32],
    scale: f32,
    xg: &[f32; 3],
    l: &mut [i8],
) -> usize {
    let list = search.neighbours(u);
    let mut best = f32::MAX;
    // ggml asserts that some neighbour is nearer than FLT_MAX; take the
    // first if none is (non-finite input).
    let mut index = list.first().map_or(0, |&j| usize::from(j));
    for &j in list {
        let pg = &search.grid[usize::from(j)];
        let mut d2 = 0.0f32;
        for i in 0..8 {
            let q = xg[((pg[i] - 1) / 2) as usize];
            let w = weight[i];
            let diff = scale * q - xval[i];
            d2 += w * diff * diff;
        }
        if d2 < best {
            best = d2;
            index = usize::from(j);
        }
    }
    search.levels_into(index, l);
    index
}

/// Grid indices for the groups of eight of `l` (finding the nearest
/// neighbours of off-grid groups, `xx(k)` the levels of group `k`), and the
/// refitted scale if any group was off the grid.
fn to_grid<const N: usize>(
    search: &GridSearch<8>,
    xb: &[f32],
    weight: &[f32],
    l: &mut [i8; N],
    mut scale: f32,
    xx: impl Fn(usize) -> &'static [f32; 3],
) -> ([usize; 4], f32) {
    let mut index = [0usize; 4];
    let mut all_on_grid = true;
    for k in 0..N / 8 {
        let r = 8 * k..8 * k + 8;
        let u = pack8(&l[r.clone()]);
        index[k] = match search.on_grid(u) {
            Some(g) => g,
            None => {
                all_on_grid = false;
                best_neighbour2(
                    search,
                    u,
                    &xb[r.clone()],
                    &weight[r.clone()],
                    scale,
                    xx(k),
                    &mut l[r],
                )
            }
        };
    }
    if !all_on_grid {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for k in 0..N / 8 {
            let pg = &search.grid[index[k]];
            let xg = xx(k);
            for j in 0..8 {
                let w = weight[8 * k + j];
                let q = xg[((pg[j] - 1) / 2) as usize];
                sumqx += w * q * xb[8 * k + j];
                sumq2 += w * q * q;
            }
        }
        if sumqx > 0.0 && sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    (index, scale)
}

/// ggml `quantize_row_iq1_s_impl` for one super-block with importance
/// weights `qw` (256).
pub(crate) fn quantize_block_s(x: &[f32], qw: &[f32]) -> BlockIQ1S {
    const BS: usize = 32;
    let search = iq_search::iq1s();
    let mut out = BlockIQ1S::zeroed();
    let mut scales = [0f32; QK_K / BS];
    let mut shifts = [1i8; QK_K / BS];
    let mut weight = [0f32; BS];
    let mut max_scale = 0.0f32;
    let mut sumx2 = 0.0f32;
    for &v in &x[..QK_K] {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;

    for ib in 0..QK_K / BS {
        let xb = &x[BS * ib..BS * ib + BS];
        let w = &qw[BS * ib..BS * ib + BS];
        for i in 0..BS {
            weight[i] = w[i] * (sigma2 + xb[i] * xb[i]).sqrt();
        }
        let mut max = xb[0].abs();
        for &v in &xb[1..] {
            max = fmax(max, v.abs());
        }
        if max < GROUP_MAX_EPS_IQ1_S {
            scales[ib] = 0.0;
            shifts[ib] = 1;
            continue;
        }
        let idx: [usize; BS] = sorted_order(xb);
        let mut sumx = [0f32; BS + 1];
        let mut sumw = [0f32; BS + 1];
        for j in 0..BS {
            let i = idx[j];
            sumx[j + 1] = sumx[j] + weight[i] * xb[i];
            sumw[j + 1] = sumw[j] + weight[i];
        }
        let mut best_score = -f32::MAX;
        let mut scale = max;
        let (mut besti1, mut besti2, mut best_shift) = (usize::MAX, usize::MAX, 0i8);
        for i1 in 0..=BS {
            for i2 in i1..=BS {
                for (xs, shift) in [(&X_P, 1i8), (&X_M, -1i8)] {
                    let sumqx = (sumx[i1] - sumx[0]) * xs[0]
                        + (sumx[i2] - sumx[i1]) * xs[1]
                        + (sumx[BS] - sumx[i2]) * xs[2];
                    let sumq2 = (sumw[i1] - sumw[0]) * xs[0] * xs[0]
                        + (sumw[i2] - sumw[i1]) * xs[1] * xs[1]
                        + (sumw[BS] - sumw[i2]) * xs[2] * xs[2];
                    if sumq2 > 0.0 && sumqx * sumqx > best_score * sumq2 {
                        scale = sumqx / sumq2;
                        best_score = scale * sumqx;
                        besti1 = i1;
                        besti2 = i2;
                        best_shift = shift;
                    }
                }
            }
        }
        if besti1 == usize::MAX || best_shift == 0 {
            scales[ib] = 0.0;
            shifts[ib] = 1;
            continue;
        }
        let mut l: [i8; BS] = split_levels(&idx, besti1, besti2);
        if scale < 0.0 {
            for v in &mut l {
                *v = 2 - *v;
            }
            scale = -scale;
            best_shift = -best_shift;
        }
        let xs: &'static [f32; 3] = if best_shift == 1 { &X_P } else { &X_M };
        let (index, scale) = to_grid(search, xb, &weight, &mut l, scale, |_| xs);
        let mut h = 0u16;
        for k in 0..BS / 8 {
            out.qs[(BS / 8) * ib + k] = (index[k] & 255) as u8;
            h |= ((index[k] >> 8) as u16) << (3 * k);
        }
        out.qh[ib] = h;
        scales[ib] = scale;
        shifts[ib] = best_shift;
        max_scale = fmax(max_scale, scale);
    }

    if max_scale == 0.0 {
        return out;
    }
    let d = max_scale / 15.0;
    out.d = f16::from_f32(d * 1.125);
    let id = 1.0 / d;
    for ib in 0..QK_K / BS {
        let mut l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7) as u16;
        if shifts[ib] == -1 {
            l |= 8;
        }
        out.qh[ib] |= l << 12;
    }
    out
}

/// The levels of the first and second group of eight of an IQ1_M half
/// sub-block for its shift choice `k` (0: +,+; 1: +,-; 2: -,+; 3: -,-).
fn m_levels(k: i8, group: usize) -> &'static [f32; 3] {
    let plus = if group == 0 { k < 2 } else { k % 2 == 0 };
    if plus {
        &X_P
    } else {
        &X_M
    }
}

/// Weights of 16 values for IQ1_M.
fn m_weights(xb: &[f32], qw: Option<&[f32]>, sigma2: f32) -> [f32; 16] {
    let mut weight = [0f32; 16];
    match qw {
        Some(qw) => {
            for i in 0..16 {
                weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
            }
        }
        None => {
            for i in 0..16 {
                weight[i] = xb[i] * xb[i];
            }
        }
    }
    weight
}

/// ggml `quantize_row_iq1_m_impl` for one super-block, with importance
/// weights `qw` (256) if given.
pub(crate) fn quantize_block_m(x: &[f32], qw: Option<&[f32]>) -> BlockIQ1M {
    const BS: usize = 16;
    const MASKS: [u8; 4] = [0x00, 0x80, 0x08, 0x88];
    let search = iq_search::iq1s();
    let mut out = BlockIQ1M::zeroed();
    let mut scales = [0f32; QK_K / BS];
    let mut shifts = [0i8; QK_K / BS];
    let mut max_scale = 0.0f32;
    let mut sumx2 = 0.0f32;
    for &v in &x[..QK_K] {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;

    let (p2, m2) = (X_P[2], X_M[2]);
    let cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1];
    let cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2];
    let cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1];
    let cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2];

    for ib in 0..QK_K / BS {
        let xb = &x[BS * ib..BS * ib + BS];
        let weight = m_weights(xb, qw.map(|w| &w[BS * ib..BS * ib + BS]), sigma2);
        let mut max = xb[0].abs();
        for &v in &xb[1..] {
            max = fmax(max, v.abs());
        }
        if max < GROUP_MAX_EPS_IQ1_M {
            scales[ib] = 0.0;
            shifts[ib] = 0;
            continue;
        }
        let idx: [usize; BS] = sorted_order(xb);
        let mut px = [[0f32; BS + 1]; 2];
        let mut pw = [[0f32; BS + 1]; 2];
        for j in 0..BS {
            let i = idx[j];
            let h = usize::from(i >= BS / 2);
            px[h][j + 1] = px[h][j] + weight[i] * xb[i];
            px[1 - h][j + 1] = px[1 - h][j];
            pw[h][j + 1] = pw[h][j] + weight[i];
            pw[1 - h][j + 1] = pw[1 - h][j];
        }
        let txs = [px[0][BS], px[1][BS]];
        let tws = [pw[0][BS], pw[1][BS]];
        let mut best_score = -f32::MAX;
        let mut scale = max;
        let (mut besti1, mut besti2, mut best_k) = (usize::MAX, usize::MAX, -1i8);
        for i1 in 0..=BS {
            for i2 in i1..=BS {
                let mut qx_p = [0f32; 2];
                let mut qx_m = [0f32; 2];
                let mut q2_p = [0f32; 2];
                let mut q2_m = [0f32; 2];
                for h in 0..2 {
                    let sx = px[h][i1] + px[h][i2];
                    qx_p[h] = txs[h] * p2 - sx;
                    qx_m[h] = txs[h] * m2 - sx;
                    q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                    q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
                }
                let sumqx = [
                    qx_p[0] + qx_p[1],
                    qx_p[0] + qx_m[1],
                    qx_m[0] + qx_p[1],
                    qx_m[0] + qx_m[1],
                ];
                let sumq2 = [
                    q2_p[0] + q2_p[1],
                    q2_p[0] + q2_m[1],
                    q2_m[0] + q2_p[1],
                    q2_m[0] + q2_m[1],
                ];
                for k in 0..4 {
                    if sumq2[k] > 0.0 && sumqx[k] * sumqx[k] > best_score * sumq2[k] {
                        scale = sumqx[k] / sumq2[k];
                        best_score = scale * sumqx[k];
                        besti1 = i1;
                        besti2 = i2;
                        best_k = k as i8;
                    }
                }
            }
        }
        if besti1 == usize::MAX || best_k < 0 {
            scales[ib] = 0.0;
            shifts[ib] = 0;
            continue;
        }
        let mut l: [i8; BS] = split_levels(&idx, besti1, besti2);
        if scale < 0.0 {
            for v in &mut l {
                *v = 2 - *v;
            }
            scale = -scale;
            best_k = 3 - best_k;
        }
        let (index, scale) = to_grid(search, xb, &weight, &mut l, scale, |k| m_levels(best_k, k));
        out.qs[2 * ib] = (index[0] & 255) as u8;
        out.qs[2 * ib + 1] = (index[1] & 255) as u8;
        out.qh[ib] = ((index[0] >> 8) | ((index[1] >> 8) << 4)) as u8;
        scales[ib] = scale;
        shifts[ib] = best_k;
        max_scale = fmax(max_scale, scale);
    }

    if max_scale == 0.0 {
        return out;
    }
    let mut sc = [0u16; 4];
    let mut d = max_scale / 15.0;
    let id = 1.0 / d;
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for ib in 0..QK_K / BS {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7);
        sc[ib / 4] |= (l as u16) << (3 * (ib % 4));
        out.qh[ib] |= MASKS[shifts[ib] as usize & 3];
        let xb = &x[BS * ib..BS * ib + BS];
        let weight = m_weights(xb, qw.map(|w| &w[BS * ib..BS * ib + BS]), sigma2);
        for k in 0..BS / 8 {
            let xg = m_levels(shifts[ib], k);
            let g = usize::from(out.qs[2 * ib + k])
                | ((usize::from(out.qh[ib]) << (8 - 4 * k)) & 0x700);
            let pg = &search.grid[g];
            for j in 0..8 {
                let w = weight[8 * k + j];
                let q = xg[((pg[j] - 1) / 2) as usize] * (2 * l + 1) as f32;
                sumqx += w * q * xb[8 * k + j];
                sumq2 += w * q * q;
            }
        }
    }
    if sumq2 > 0.0 {
        d = sumqx / sumq2;
    }
    let s = f16::from_f32(d * 1.1125).to_bits();
    sc[0] |= (s & 0x000F) << 12;
    sc[1] |= (s & 0x00F0) << 8;
    sc[2] |= (s & 0x0F00) << 4;
    sc[3] |= s & 0xF000;
    for (j, v) in sc.iter().enumerate() {
        out.scales[2 * j..2 * j + 2].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// ggml `quantize_iq1_s` for one row with the importance weights `qw` of its
/// columns.
pub fn quantize_row_iq1_s(x: &[f32], y: &mut [BlockIQ1S], qw: &[f32]) {
    iq_search::each_weighted_block(x, y, qw, quantize_block_s);
}

/// ggml `quantize_iq1_m` for one row, with the importance weights `qw` of
/// its columns if given.
pub fn quantize_row_iq1_m(x: &[f32], y: &mut [BlockIQ1M], qw: Option<&[f32]>) {
    iq_search::each_block(x, y, qw, quantize_block_m);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::quant::iq_search::test_rows::{rms, row};

    #[test]
    fn round_trip_error_is_small() {
        let x = row(512);
        let norm = rms(&x, &[0.0; 512]);
        let w: Vec<f32> = (0..512).map(|i| 1.0 + (i % 7) as f32).collect();
        let mut y = vec![0f32; 512];
        let mut b = [BlockIQ1S::zeroed(); 2];
        quantize_row_iq1_s(&x, &mut b, &w);
        for (bb, yb) in b.iter().zip(y.chunks_exact_mut(QK_K)) {
            bb.dequantize(yb);
        }
        assert!(rms(&x, &y) < 0.6 * norm, "IQ1_S {} of {norm}", rms(&x, &y));
        for qw in [None, Some(&w[..])] {
            let mut b = [BlockIQ1M::zeroed(); 2];
            quantize_row_iq1_m(&x, &mut b, qw);
            for (bb, yb) in b.iter().zip(y.chunks_exact_mut(QK_K)) {
                bb.dequantize(yb);
            }
            assert!(rms(&x, &y) < 0.6 * norm, "IQ1_M {} of {norm}", rms(&x, &y));
        }
    }

    #[test]
    fn zero_input_is_zero_block() {
        let w = [1.0f32; QK_K];
        assert_eq!(quantize_block_s(&[0.0; QK_K], &w), BlockIQ1S::zeroed());
        assert_eq!(quantize_block_m(&[0.0; QK_K], None), BlockIQ1M::zeroed());
    }
}
