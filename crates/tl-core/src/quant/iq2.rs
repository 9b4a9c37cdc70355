//! The 2-bit grid formats of ggml: IQ2_XXS, IQ2_XS and IQ2_S. Each group of
//! eight values is one point of a fixed grid of eight levels (1, 3 or 5
//! before the `0.125` factor; [`IQ2XXS_GRID`], [`IQ2XS_GRID`],
//! [`IQ2S_GRID`]) with eight signs, times a 4-bit scale of the 32-value
//! sub-block (or 16-value half for IQ2_XS/IQ2_S), times the super-block
//! scale `d`.
//!
//! - IQ2_XXS (`block_iq2_xxs`, 66 bytes): per 32 values two u32: four
//!   8-bit grid indices, then four 7-bit sign indices into
//!   [`KSIGNS_IQ2XS`] and the 4-bit scale in the top bits.
//! - IQ2_XS (`block_iq2_xs`, 74 bytes): per 8 values a u16 of a 9-bit grid
//!   index and a 7-bit sign index; a 4-bit scale per 16 values.
//! - IQ2_S (`block_iq2_s`, 82 bytes): per 8 values a 10-bit grid index (low
//!   8 bits in `qs`, high 2 in `qh`) and a full sign byte; a 4-bit scale per
//!   16 values.
//!
//! Quantization is ggml's `quantize_row_iq2_xxs_impl`,
//! `quantize_row_iq2_xs_impl` and `quantize_row_iq2_s_impl`, operation for
//! operation in f32, so that the bytes match ggml's. IQ2_XXS and IQ2_XS
//! need importance weights (as in ggml); IQ2_S takes them if given.

#![allow(clippy::needless_range_loop)]

use bytemuck::Zeroable;
use half::f16;
use tl_gguf::GgmlType;

use super::iq_grids::{IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, KMASK_IQ2XS, KSIGNS_IQ2XS};
use super::iq_search::{self, GridSearch};
use super::k_quants::QK_K;
use super::k_search::{make_qp_quants, nearest_int, GROUP_MAX_EPS};
use super::Dequantize;

/// `block_iq2_xxs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ2XXS {
    pub d: f16,
    pub qs: [u16; QK_K / 8],
}
const _: () = assert!(std::mem::size_of::<BlockIQ2XXS>() == 66);

/// `block_iq2_xs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ2XS {
    pub d: f16,
    pub qs: [u16; QK_K / 8],
    pub scales: [u8; QK_K / 32],
}
const _: () = assert!(std::mem::size_of::<BlockIQ2XS>() == 74);

/// `block_iq2_s`: `qs` holds 32 low index bytes then 32 sign bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ2S {
    pub d: f16,
    pub qs: [u8; QK_K / 4],
    pub qh: [u8; QK_K / 32],
    pub scales: [u8; QK_K / 32],
}
const _: () = assert!(std::mem::size_of::<BlockIQ2S>() == 82);

/// The eight level bytes of a grid point.
#[inline]
pub(crate) fn grid8(g: u64) -> [u8; 8] {
    g.to_le_bytes()
}

/// Writes `scale * level * sign` for one group of eight.
#[inline]
fn put8(y: &mut [f32], scale: f32, grid: u64, signs: u8) {
    let g = grid8(grid);
    for j in 0..8 {
        let s = if signs & KMASK_IQ2XS[j] != 0 {
            -1.0
        } else {
            1.0
        };
        y[j] = scale * f32::from(g[j]) * s;
    }
}

impl BlockIQ2XXS {
    /// The two u32 of sub-block `ib32` (0..8): grid indices, then signs and
    /// scale.
    #[inline]
    pub fn aux(&self, ib32: usize) -> (u32, u32) {
        let q = &self.qs[4 * ib32..4 * ib32 + 4];
        (
            u32::from(q[0]) | (u32::from(q[1]) << 16),
            u32::from(q[2]) | (u32::from(q[3]) << 16),
        )
    }
}

impl Dequantize for BlockIQ2XXS {
    const TYPE: GgmlType = GgmlType::IQ2_XXS;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_iq2_xxs`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for ib32 in 0..QK_K / 32 {
            let (a0, a1) = self.aux(ib32);
            let db = d * (0.5 + (a1 >> 28) as f32) * 0.25;
            let idx = a0.to_le_bytes();
            for l in 0..4 {
                let signs = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
                let at = 32 * ib32 + 8 * l;
                put8(
                    &mut y[at..at + 8],
                    db,
                    IQ2XXS_GRID[usize::from(idx[l])],
                    signs,
                );
            }
        }
    }
}

impl Dequantize for BlockIQ2XS {
    const TYPE: GgmlType = GgmlType::IQ2_XS;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_iq2_xs`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for ib32 in 0..QK_K / 32 {
            let db = [
                d * (0.5 + f32::from(self.scales[ib32] & 0xF)) * 0.25,
                d * (0.5 + f32::from(self.scales[ib32] >> 4)) * 0.25,
            ];
            for l in 0..4 {
                let q = self.qs[4 * ib32 + l];
                let signs = KSIGNS_IQ2XS[usize::from(q >> 9)];
                let at = 32 * ib32 + 8 * l;
                put8(
                    &mut y[at..at + 8],
                    db[l / 2],
                    IQ2XS_GRID[usize::from(q & 511)],
                    signs,
                );
            }
        }
    }
}

impl BlockIQ2S {
    /// The 10-bit grid index of group `l` (0..4) of sub-block `ib32`.
    #[inline]
    pub fn index(&self, ib32: usize, l: usize) -> usize {
        usize::from(self.qs[4 * ib32 + l]) | ((usize::from(self.qh[ib32]) << (8 - 2 * l)) & 0x300)
    }
}

impl Dequantize for BlockIQ2S {
    const TYPE: GgmlType = GgmlType::IQ2_S;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_iq2_s`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for ib32 in 0..QK_K / 32 {
            let db = [
                d * (0.5 + f32::from(self.scales[ib32] & 0xF)) * 0.25,
                d * (0.5 + f32::from(self.scales[ib32] >> 4)) * 0.25,
            ];
            for l in 0..4 {
                let signs = self.qs[QK_K / 8 + 4 * ib32 + l];
                let at = 32 * ib32 + 8 * l;
                put8(
                    &mut y[at..at + 8],
                    db[l / 2],
                    IQ2S_GRID[self.index(ib32, l)],
                    signs,
                );
            }
        }
    }
}

/// Largest level index + 1 (levels 1, 3, 5).
const KMAXQ: i32 = 3;
/// ggml `GROUP_MAX_EPS_IQ2_S`.
const GROUP_MAX_EPS_IQ2_S: f32 = 1e-8;

/// C's `MAX(a, b)`: `a > b ? a : b`.
#[inline]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// The level indices of eight values at inverse scale `id`, clamped, and
/// their packed map index.
#[inline]
fn round8(xval: &[f32], id: f32, l: &mut [i8]) -> usize {
    let mut u = 0usize;
    for i in 0..8 {
        let q = nearest_int(0.5 * (id * xval[i] - 1.0)).clamp(0, KMAXQ - 1);
        l[i] = q as i8;
        u |= (q as usize) << (2 * i);
    }
    u
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

/// `sum w x q` and `sum w q^2` of levels `2 l + 1`.
#[inline]
fn sums(weight: &[f32], xval: &[f32], l: &[i8]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for i in 0..weight.len() {
        let w = weight[i];
        let q = f32::from(2 * l[i] + 1);
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// The magnitudes of a group of eight and its sign bits; with `even`, the
/// value of least weighted square among an odd count of negatives keeps
/// its sign (flipped in `xval`), so that the count is even (the sign table
/// of IQ2_XXS/IQ2_XS has only those), and only seven bits are kept.
fn signs8(xb: &[f32], weight: &[f32], even: bool, xval: &mut [f32]) -> u8 {
    let mut nflip = 0;
    let mut s = 0u8;
    for i in 0..8 {
        if xb[i] >= 0.0 {
            xval[i] = xb[i];
        } else {
            xval[i] = -xb[i];
            nflip += 1;
            s |= 1 << i;
        }
    }
    if !even {
        return s;
    }
    if nflip % 2 == 1 {
        let mut imin = 0;
        let mut min = weight[0] * xb[0] * xb[0];
        for i in 1..8 {
            let ax = weight[i] * xb[i] * xb[i];
            if ax < min {
                min = ax;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= 1 << imin;
    }
    s & 127
}

/// ggml `quantize_row_iq2_xxs_impl` for one super-block with importance
/// weights `qw` (256).
pub(crate) fn quantize_block_xxs(x: &[f32], qw: &[f32]) -> BlockIQ2XXS {
    let search = iq_search::iq2xxs();
    let mut out = BlockIQ2XXS::zeroed();
    let mut scales = [0f32; QK_K / 32];
    let mut weight = [0f32; 32];
    let mut waux = [0f32; 32];
    let mut xval = [0f32; 32];
    let mut block_signs = [0u8; 4];
    let mut q2 = [0u32; 2 * (QK_K / 32)];
    let mut max_scale = 0.0f32;

    let mut sumx2 = 0.0f32;
    for &v in &x[..QK_K] {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;

    for ib in 0..QK_K / 32 {
        let xb = &x[32 * ib..32 * ib + 32];
        let w = &qw[32 * ib..32 * ib + 32];
        for i in 0..32 {
            weight[i] = w[i] * (sigma2 + xb[i] * xb[i]).sqrt();
        }
        for i in 0..32 {
            waux[i] = weight[i].sqrt();
        }
        for k in 0..4 {
            block_signs[k] = signs8(
                &xb[8 * k..8 * k + 8],
                &weight[8 * k..8 * k + 8],
                true,
                &mut xval[8 * k..8 * k + 8],
            );
        }
        let mut max = xval[0];
        for &v in &xval[1..] {
            max = fmax(max, v);
        }
        if max < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let mut lq = [0u8; 32];
        let mut scale = make_qp_quants(KMAXQ + 1, &xval, &mut lq, &weight);
        let mut l: [i8; 32] = lq.map(|v| v as i8);
        let eff_max = scale * KMAXQ as f32;
        if eff_max <= 0.0 {
            scales[ib] = 0.0;
            continue;
        }
        let mut laux = [0i8; 32];
        let mut best = 0.0f32;
        for is in -6..=6 {
            let id = ((2 * KMAXQ - 1) as f32 + is as f32 * 0.1) / eff_max;
            let this_scale = 1.0 / id;
            for k in 0..4 {
                let r = 8 * k..8 * k + 8;
                let u = round8(&xval[r.clone()], id, &mut laux[r.clone()]);
                if search.on_grid(u).is_none() {
                    search.best_neighbour(
                        u,
                        &xval[r.clone()],
                        &waux[r.clone()],
                        this_scale,
                        &mut laux[r],
                    );
                }
            }
            let (sumqx, sumq2) = sums(&weight, &xval, &laux);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                l = laux;
            }
        }
        if scale > 0.0 {
            let id = 1.0 / scale;
            for k in 0..4 {
                let r = 8 * k..8 * k + 8;
                let mut lk = [0i8; 8];
                let u = round8(&xval[r.clone()], id, &mut lk);
                let g = match search.on_grid(u) {
                    Some(g) => g,
                    None => search.best_neighbour(
                        u,
                        &xval[r.clone()],
                        &waux[r.clone()],
                        scale,
                        &mut l[r.clone()],
                    ),
                };
                search.levels_into(g, &mut l[r]);
            }
            let (sumqx, sumq2) = sums(&weight, &xval, &l);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        if scale < 0.0 {
            scale = -scale;
            for s in &mut block_signs {
                *s = !*s & 127;
            }
        }
        for k in 0..4 {
            let g = search.on_grid(pack8(&l[8 * k..8 * k + 8])).unwrap_or(0);
            q2[2 * ib] |= (g as u32) << (8 * k);
            q2[2 * ib + 1] |= u32::from(block_signs[k]) << (7 * k);
        }
        scales[ib] = scale;
        max_scale = fmax(max_scale, scale);
    }

    if max_scale == 0.0 {
        return BlockIQ2XXS::zeroed();
    }
    let d = max_scale / 31.0;
    out.d = f16::from_f32(d);
    let id = 1.0 / d;
    for ib in 0..QK_K / 32 {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
        q2[2 * ib + 1] |= (l as u32) << 28;
    }
    for (i, v) in q2.iter().enumerate() {
        out.qs[2 * i] = *v as u16;
        out.qs[2 * i + 1] = (*v >> 16) as u16;
    }
    out
}

/// Where the IQ2_XS and IQ2_S quantizers differ.
#[derive(Clone, Copy, PartialEq)]
enum Kind16 {
    Xs,
    S,
}

/// What the 16-value search of IQ2_XS/IQ2_S gives per half sub-block: its
/// scale, grid indices and sign bytes.
struct Half {
    scale: f32,
    grid: [usize; 2],
    signs: [u8; 2],
}

/// The scale search of `quantize_row_iq2_xs_impl` / `quantize_row_iq2_s_impl`
/// for 16 values `xb` with weights `weight` (`None`: all zero, skipped).
fn search16(kind: Kind16, search: &GridSearch<8>, xb: &[f32], weight: &[f32; 16]) -> Option<Half> {
    let mut waux = [0f32; 16];
    for i in 0..16 {
        waux[i] = weight[i].sqrt();
    }
    let mut xval = [0f32; 16];
    let even = kind == Kind16::Xs;
    let mut signs = [0u8; 2];
    for k in 0..2 {
        signs[k] = signs8(
            &xb[8 * k..8 * k + 8],
            &weight[8 * k..8 * k + 8],
            even,
            &mut xval[8 * k..8 * k + 8],
        );
    }
    let mut max = xval[0];
    for &v in &xval[1..] {
        max = fmax(max, v);
    }
    let eps = if even {
        GROUP_MAX_EPS
    } else {
        GROUP_MAX_EPS_IQ2_S
    };
    if max < eps {
        return None;
    }
    let mut l = [0i8; 16];
    let mut laux = [0i8; 16];
    let mut best = 0.0f32;
    let mut scale = max / (2 * KMAXQ - 1) as f32;
    let mut is_on_grid = [true; 2];
    let mut is_on_grid_aux = [true; 2];
    for is in -9..=9 {
        let id = ((2 * KMAXQ - 1) as f32 + is as f32 * 0.1) / max;
        let this_scale = 1.0 / id;
        for k in 0..2 {
            let r = 8 * k..8 * k + 8;
            let u = round8(&xval[r.clone()], id, &mut laux[r.clone()]);
            is_on_grid_aux[k] = true;
            if search.on_grid(u).is_none() {
                is_on_grid_aux[k] = false;
                search.best_neighbour(
                    u,
                    &xval[r.clone()],
                    &waux[r.clone()],
                    this_scale,
                    &mut laux[r],
                );
            }
        }
        let (sumqx, sumq2) = sums(weight, &xval, &laux);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            l = laux;
            is_on_grid = is_on_grid_aux;
        }
    }
    if is_on_grid.iter().any(|&g| !g) && scale > 0.0 {
        let id = 1.0 / scale;
        for k in 0..2 {
            if is_on_grid[k] {
                continue;
            }
            let r = 8 * k..8 * k + 8;
            let u = round8(&xval[r.clone()], id, &mut l[r.clone()]);
            if search.on_grid(u).is_none() {
                search.best_neighbour(u, &xval[r.clone()], &waux[r.clone()], scale, &mut l[r]);
            }
        }
        let (sumqx, sumq2) = sums(weight, &xval, &l);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    if scale < 0.0 {
        scale = -scale;
        for s in &mut signs {
            *s = if even { !*s & 127 } else { !*s };
        }
    }
    let grid = [
        search.on_grid(pack8(&l[..8])).unwrap_or(0),
        search.on_grid(pack8(&l[8..])).unwrap_or(0),
    ];
    Some(Half { scale, grid, signs })
}

/// Weights of 16 values for IQ2_XS (importance weights required) and IQ2_S.
fn weights16(xb: &[f32], qw: Option<&[f32]>, sigma2: f32) -> [f32; 16] {
    let mut weight = [0f32; 16];
    match qw {
        Some(qw) => {
            for i in 0..16 {
                weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
            }
        }
        None => {
            // Only IQ2_S runs without importance weights.
            for i in 0..16 {
                weight[i] = 0.25 * sigma2 + xb[i] * xb[i];
            }
        }
    }
    weight
}

/// The 4-bit scale nibbles of the 16 half sub-blocks for the super-block
/// scale `d`.
fn scale_nibbles(scales: &[f32; QK_K / 16], d: f32) -> [u8; QK_K / 32] {
    let id = 1.0 / d;
    let mut out = [0u8; QK_K / 32];
    for ib in 0..QK_K / 16 {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15) as u8;
        if ib % 2 == 0 {
            out[ib / 2] = l;
        } else {
            out[ib / 2] |= l << 4;
        }
    }
    out
}

/// ggml `quantize_row_iq2_xs_impl` for one super-block with importance
/// weights `qw` (256).
pub(crate) fn quantize_block_xs(x: &[f32], qw: &[f32]) -> BlockIQ2XS {
    let search = iq_search::iq2xs();
    let mut out = BlockIQ2XS::zeroed();
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut sumx2 = 0.0f32;
    for &v in &x[..QK_K] {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;
    for ib in 0..QK_K / 16 {
        let xb = &x[16 * ib..16 * ib + 16];
        let weight = weights16(xb, Some(&qw[16 * ib..16 * ib + 16]), sigma2);
        let Some(h) = search16(Kind16::Xs, search, xb, &weight) else {
            continue;
        };
        for k in 0..2 {
            out.qs[2 * ib + k] = h.grid[k] as u16 | (u16::from(h.signs[k]) << 9);
        }
        scales[ib] = h.scale;
        max_scale = fmax(max_scale, h.scale);
    }
    if max_scale == 0.0 {
        return BlockIQ2XS::zeroed();
    }
    let d = max_scale / 31.0;
    out.d = f16::from_f32(d);
    out.scales = scale_nibbles(&scales, d);
    out
}

/// ggml `quantize_row_iq2_s_impl` for one super-block, with importance
/// weights `qw` (256) if given.
pub(crate) fn quantize_block_s(x: &[f32], qw: Option<&[f32]>) -> BlockIQ2S {
    let search = iq_search::iq2s();
    let mut out = BlockIQ2S::zeroed();
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut sumx2 = 0.0f32;
    for &v in &x[..QK_K] {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;
    for ib in 0..QK_K / 16 {
        let xb = &x[16 * ib..16 * ib + 16];
        let weight = weights16(xb, qw.map(|w| &w[16 * ib..16 * ib + 16]), sigma2);
        let Some(h) = search16(Kind16::S, search, xb, &weight) else {
            continue;
        };
        for k in 0..2 {
            let i8 = 2 * ib + k;
            out.qs[i8] = (h.grid[k] & 255) as u8;
            out.qh[i8 / 4] |= ((h.grid[k] >> 8) as u8) << (2 * (i8 % 4));
            out.qs[QK_K / 8 + i8] = h.signs[k];
        }
        scales[ib] = h.scale;
        max_scale = fmax(max_scale, h.scale);
    }
    if max_scale == 0.0 {
        return out;
    }
    let d = max_scale / 31.0;
    out.d = f16::from_f32(d * 0.9875);
    out.scales = scale_nibbles(&scales, d);
    out
}

/// ggml `quantize_iq2_xxs` for one row with the importance weights `qw` of
/// its columns.
pub fn quantize_row_iq2_xxs(x: &[f32], y: &mut [BlockIQ2XXS], qw: &[f32]) {
    iq_search::each_weighted_block(x, y, qw, quantize_block_xxs);
}

/// ggml `quantize_iq2_xs` for one row with the importance weights `qw` of
/// its columns.
pub fn quantize_row_iq2_xs(x: &[f32], y: &mut [BlockIQ2XS], qw: &[f32]) {
    iq_search::each_weighted_block(x, y, qw, quantize_block_xs);
}

/// ggml `quantize_iq2_s` for one row, with the importance weights `qw` of
/// its columns if given.
pub fn quantize_row_iq2_s(x: &[f32], y: &mut [BlockIQ2S], qw: Option<&[f32]>) {
    iq_search::each_block(x, y, qw, quantize_block_s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Dequantize;

    use crate::quant::iq_search::test_rows::{rms, row};

    fn check<B: Dequantize>(name: &str, x: &[f32], blocks: &[B], bound: f32) {
        let mut y = vec![0f32; x.len()];
        for (b, yb) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
            b.dequantize(yb);
        }
        let norm = rms(x, &vec![0.0; x.len()]);
        assert!(rms(x, &y) < bound * norm, "{name} {} of {norm}", rms(x, &y));
    }

    #[test]
    fn round_trip_error_is_small() {
        let x = row(512);
        let w: Vec<f32> = (0..512).map(|i| 1.0 + (i % 7) as f32).collect();
        let mut b = [BlockIQ2XXS::zeroed(); 2];
        quantize_row_iq2_xxs(&x, &mut b, &w);
        check("IQ2_XXS", &x, &b, 0.45);
        let mut b = [BlockIQ2XS::zeroed(); 2];
        quantize_row_iq2_xs(&x, &mut b, &w);
        check("IQ2_XS", &x, &b, 0.4);
        for qw in [None, Some(&w[..])] {
            let mut b = [BlockIQ2S::zeroed(); 2];
            quantize_row_iq2_s(&x, &mut b, qw);
            check("IQ2_S", &x, &b, 0.35);
        }
    }

    #[test]
    fn zero_input_is_zero_block() {
        let w = [1.0f32; QK_K];
        assert_eq!(quantize_block_xxs(&[0.0; QK_K], &w), BlockIQ2XXS::zeroed());
        assert_eq!(quantize_block_xs(&[0.0; QK_K], &w), BlockIQ2XS::zeroed());
        assert_eq!(quantize_block_s(&[0.0; QK_K], None), BlockIQ2S::zeroed());
    }
}
