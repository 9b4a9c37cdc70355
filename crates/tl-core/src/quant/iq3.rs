//! The 3-bit grid formats of ggml: IQ3_XXS and IQ3_S. Each group of four
//! values is one point of a fixed grid of four levels ([`IQ3XXS_GRID`],
//! [`IQ3S_GRID`]), with signs, times a sub-block scale and the super-block
//! scale `d`.
//!
//! - IQ3_XXS (`block_iq3_xxs`, 98 bytes): 64 8-bit grid indices, then per
//!   32 values a u32 of four 7-bit sign indices into [`KSIGNS_IQ2XS`] and a
//!   4-bit scale in the top bits.
//! - IQ3_S (`block_iq3_s`, 110 bytes): 9-bit grid indices (low 8 bits in
//!   `qs`, high bit in `qh`), a full sign byte per 8 values, a 4-bit scale
//!   per 32 values.
//!
//! Quantization is ggml's `quantize_row_iq3_xxs_impl` and
//! `quantize_row_iq3_s_impl`, operation for operation in f32, with or
//! without an importance matrix, so that the bytes match ggml's.

#![allow(clippy::needless_range_loop)]

use bytemuck::Zeroable;
use half::f16;
use tl_gguf::GgmlType;

use super::iq_grids::{IQ3S_GRID, IQ3XXS_GRID, KMASK_IQ2XS, KSIGNS_IQ2XS};
use super::iq_search::{self, GridSearch};
use super::k_quants::QK_K;
use super::k_search::nearest_int;
use super::Dequantize;

/// `block_iq3_xxs`: `qs` holds 64 grid indices then 8 u32 of signs and
/// scales.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ3XXS {
    pub d: f16,
    pub qs: [u8; 3 * QK_K / 8],
}
const _: () = assert!(std::mem::size_of::<BlockIQ3XXS>() == 98);

/// `block_iq3_s`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ3S {
    pub d: f16,
    pub qs: [u8; QK_K / 4],
    pub qh: [u8; QK_K / 32],
    pub signs: [u8; QK_K / 8],
    pub scales: [u8; QK_K / 64],
}
const _: () = assert!(std::mem::size_of::<BlockIQ3S>() == 110);

/// Writes `scale * level * sign` for two grid points (eight values).
#[inline]
fn put8(y: &mut [f32], scale: f32, g1: u32, g2: u32, signs: u8) {
    let a = g1.to_le_bytes();
    let b = g2.to_le_bytes();
    for j in 0..4 {
        let s1 = if signs & KMASK_IQ2XS[j] != 0 {
            -1.0
        } else {
            1.0
        };
        let s2 = if signs & KMASK_IQ2XS[j + 4] != 0 {
            -1.0
        } else {
            1.0
        };
        y[j] = scale * f32::from(a[j]) * s1;
        y[j + 4] = scale * f32::from(b[j]) * s2;
    }
}

impl BlockIQ3XXS {
    /// The signs-and-scale word of sub-block `ib32` (0..8).
    #[inline]
    pub fn aux(&self, ib32: usize) -> u32 {
        let at = QK_K / 4 + 4 * ib32;
        u32::from_le_bytes([
            self.qs[at],
            self.qs[at + 1],
            self.qs[at + 2],
            self.qs[at + 3],
        ])
    }
}

impl Dequantize for BlockIQ3XXS {
    const TYPE: GgmlType = GgmlType::IQ3_XXS;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_iq3_xxs`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for ib32 in 0..QK_K / 32 {
            let aux = self.aux(ib32);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
            let q = &self.qs[8 * ib32..8 * ib32 + 8];
            for l in 0..4 {
                let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                let at = 32 * ib32 + 8 * l;
                put8(
                    &mut y[at..at + 8],
                    db,
                    IQ3XXS_GRID[usize::from(q[2 * l])],
                    IQ3XXS_GRID[usize::from(q[2 * l + 1])],
                    signs,
                );
            }
        }
    }
}

impl BlockIQ3S {
    /// The two 9-bit grid indices of group `l` (0..4) of sub-block `ib32`.
    #[inline]
    pub fn indices(&self, ib32: usize, l: usize) -> (usize, usize) {
        let qs = &self.qs[8 * ib32..8 * ib32 + 8];
        let qh = usize::from(self.qh[ib32]);
        (
            usize::from(qs[2 * l]) | ((qh << (8 - 2 * l)) & 256),
            usize::from(qs[2 * l + 1]) | ((qh << (7 - 2 * l)) & 256),
        )
    }

    /// The odd scale `1 + 2 * s` of sub-block `ib32` (0..8).
    #[inline]
    pub fn sub_scale(&self, ib32: usize) -> u32 {
        let s = self.scales[ib32 / 2] >> (4 * (ib32 % 2));
        1 + 2 * u32::from(s & 0xF)
    }
}

impl Dequantize for BlockIQ3S {
    const TYPE: GgmlType = GgmlType::IQ3_S;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_iq3_s`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for ib32 in 0..QK_K / 32 {
            let db = d * self.sub_scale(ib32) as f32;
            for l in 0..4 {
                let (i1, i2) = self.indices(ib32, l);
                let at = 32 * ib32 + 8 * l;
                put8(
                    &mut y[at..at + 8],
                    db,
                    IQ3S_GRID[i1],
                    IQ3S_GRID[i2],
                    self.signs[4 * ib32 + l],
                );
            }
        }
    }
}

/// ggml `GROUP_MAX_EPS_IQ3_XXS`.
const GROUP_MAX_EPS_IQ3_XXS: f32 = 1e-8;
/// Largest level index + 1 (levels 1, 3, ..., 15).
const KMAXQ: i32 = 8;

/// Weights of one 32-value sub-block: `qw * sqrt(sigma2 + x^2)` with
/// importance weights, `x^2` without; and their square roots.
fn sub_weights(
    xb: &[f32],
    qw: Option<&[f32]>,
    sigma2: f32,
    weight: &mut [f32; 32],
    waux: &mut [f32; 32],
) {
    match qw {
        Some(qw) => {
            for i in 0..32 {
                weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
            }
        }
        None => {
            for i in 0..32 {
                weight[i] = xb[i] * xb[i];
            }
        }
    }
    for i in 0..32 {
        waux[i] = weight[i].sqrt();
    }
}

/// The level indices of four values at inverse scale `id`, clamped, and
/// their packed map index.
#[inline]
fn round4(xval: &[f32], id: f32, l: &mut [i8]) -> usize {
    let mut u = 0usize;
    for i in 0..4 {
        let q = nearest_int(0.5 * (id * xval[i] - 1.0)).clamp(0, KMAXQ - 1);
        l[i] = q as i8;
        u |= (q as usize) << (3 * i);
    }
    u
}

/// The packed map index of four level indices.
#[inline]
fn pack4(l: &[i8]) -> usize {
    let mut u = 0usize;
    for i in 0..4 {
        u |= (l[i] as usize) << (3 * i);
    }
    u
}

/// `sum w x q` and `sum w q^2` of levels `2 l + 1`.
#[inline]
fn sums(weight: &[f32; 32], xval: &[f32; 32], l: &[i8; 32]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for i in 0..32 {
        let w = weight[i];
        let q = f32::from(2 * l[i] + 1);
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// Where the IQ3_XXS and IQ3_S scale searches differ.
struct Variant {
    /// Scales tried: `15 + 0.2 * is` for `is` in `-is_range..=is_range`.
    is_range: i32,
    /// What a point counts as before any scale is taken (on the grid or not).
    on_grid_start: bool,
    /// The second pass skips the points found on the grid.
    skip_on_grid: bool,
}

/// IQ3_XXS: 31 scales; points start on the grid; the second pass redoes
/// only the off-grid ones.
const XXS: Variant = Variant {
    is_range: 15,
    on_grid_start: true,
    skip_on_grid: true,
};

/// IQ3_S: 19 scales; points start off the grid; the second pass redoes
/// all of them.
const S: Variant = Variant {
    is_range: 9,
    on_grid_start: false,
    skip_on_grid: false,
};

/// The scale search shared by IQ3_XXS and IQ3_S for one 32-value
/// sub-block of magnitudes `xval` (ggml's loop over `is`, then the second
/// pass over the points that were off the grid). Returns the scale and
/// leaves the level indices, all on the grid, in `l`.
fn search_scale(
    search: &GridSearch<4>,
    xval: &[f32; 32],
    weight: &[f32; 32],
    waux: &[f32; 32],
    max: f32,
    v: &Variant,
    l: &mut [i8; 32],
) -> f32 {
    let Variant {
        is_range,
        on_grid_start,
        skip_on_grid,
    } = *v;
    let mut laux = [0i8; 32];
    let mut is_on_grid = [on_grid_start; 8];
    let mut is_on_grid_aux = [true; 8];
    let mut best = 0.0f32;
    let mut scale = max / (2 * KMAXQ - 1) as f32;
    for is in -is_range..=is_range {
        let id = ((2 * KMAXQ - 1) as f32 + is as f32 * 0.2) / max;
        let this_scale = 1.0 / id;
        for k in 0..8 {
            let u = round4(&xval[4 * k..4 * k + 4], id, &mut laux[4 * k..4 * k + 4]);
            is_on_grid_aux[k] = true;
            if search.on_grid(u).is_none() {
                is_on_grid_aux[k] = false;
                search.best_neighbour(
                    u,
                    &xval[4 * k..4 * k + 4],
                    &waux[4 * k..4 * k + 4],
                    this_scale,
                    &mut laux[4 * k..4 * k + 4],
                );
            }
        }
        let (sumqx, sumq2) = sums(weight, xval, &laux);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            *l = laux;
            is_on_grid = is_on_grid_aux;
        }
    }
    let n_not_ongrid = is_on_grid.iter().filter(|&&g| !g).count();
    if n_not_ongrid > 0 && scale > 0.0 {
        let id = 1.0 / scale;
        for k in 0..8 {
            if skip_on_grid && is_on_grid[k] {
                continue;
            }
            let mut lk = [0i8; 4];
            let u = round4(&xval[4 * k..4 * k + 4], id, &mut lk);
            let grid_index = match search.on_grid(u) {
                Some(g) => g,
                None => search.best_neighbour(
                    u,
                    &xval[4 * k..4 * k + 4],
                    &waux[4 * k..4 * k + 4],
                    scale,
                    &mut l[4 * k..4 * k + 4],
                ),
            };
            search.levels_into(grid_index, &mut l[4 * k..4 * k + 4]);
        }
        let (sumqx, sumq2) = sums(weight, xval, l);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    scale
}

/// ggml `quantize_row_iq3_xxs_impl(256, ...)` for one super-block, with
/// importance weights `qw` (256) if given.
pub(crate) fn quantize_block_xxs(x: &[f32], qw: Option<&[f32]>) -> BlockIQ3XXS {
    let search = iq_search::iq3xxs();
    let mut out = BlockIQ3XXS::zeroed();
    let mut scales = [0f32; QK_K / 32];
    let mut weight = [0f32; 32];
    let mut waux = [0f32; 32];
    let mut xval = [0f32; 32];
    let mut block_signs = [0u8; 4];
    let mut signs_scales = [0u32; QK_K / 32];
    let mut max_scale = 0.0f32;

    let mut sumx2 = 0.0f32;
    for &v in &x[..QK_K] {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;

    for ib in 0..QK_K / 32 {
        let xb = &x[32 * ib..32 * ib + 32];
        sub_weights(
            xb,
            qw.map(|w| &w[32 * ib..32 * ib + 32]),
            sigma2,
            &mut weight,
            &mut waux,
        );
        for k in 0..4 {
            let mut nflip = 0;
            let mut s = 0u8;
            for i in 0..8 {
                let v = xb[8 * k + i];
                if v >= 0.0 {
                    xval[8 * k + i] = v;
                } else {
                    xval[8 * k + i] = -v;
                    nflip += 1;
                    s |= 1 << i;
                }
            }
            if nflip % 2 == 1 {
                let mut imin = 0;
                let mut min = weight[8 * k] * xb[8 * k] * xb[8 * k];
                for i in 1..8 {
                    let ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                    if ax < min {
                        min = ax;
                        imin = i;
                    }
                }
                xval[8 * k + imin] = -xval[8 * k + imin];
                s ^= 1 << imin;
            }
            block_signs[k] = s & 127;
        }
        let mut max = xval[0];
        for &v in &xval[1..] {
            max = fmax(max, v);
        }
        if max < GROUP_MAX_EPS_IQ3_XXS {
            scales[ib] = 0.0;
            continue;
        }
        let mut l = [0i8; 32];
        let mut scale = search_scale(search, &xval, &weight, &waux, max, &XXS, &mut l);
        if scale < 0.0 {
            scale = -scale;
            for s in &mut block_signs {
                *s = !*s & 127;
            }
        }
        for k in 0..8 {
            // Every point is on the grid after the search.
            let g = search.on_grid(pack4(&l[4 * k..4 * k + 4])).unwrap_or(0);
            out.qs[8 * ib + k] = g as u8;
        }
        signs_scales[ib] = u32::from(block_signs[0])
            | (u32::from(block_signs[1]) << 7)
            | (u32::from(block_signs[2]) << 14)
            | (u32::from(block_signs[3]) << 21);
        scales[ib] = scale;
        max_scale = fmax(max_scale, scale);
    }

    if max_scale == 0.0 {
        return BlockIQ3XXS::zeroed();
    }
    let d = max_scale / 31.0;
    out.d = f16::from_f32(d * 1.0125);
    let id = 1.0 / d;
    for ib in 0..QK_K / 32 {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
        let v = signs_scales[ib] | ((l as u32) << 28);
        out.qs[QK_K / 4 + 4 * ib..QK_K / 4 + 4 * ib + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// ggml `quantize_row_iq3_s_impl(32, ...)` for one super-block, with
/// importance weights `qw` (256) if given.
pub(crate) fn quantize_block_s(x: &[f32], qw: Option<&[f32]>) -> BlockIQ3S {
    let search = iq_search::iq3s();
    let mut out = BlockIQ3S::zeroed();
    let mut scales = [0f32; QK_K / 32];
    let mut weight = [0f32; 32];
    let mut waux = [0f32; 32];
    let mut xval = [0f32; 32];
    let mut block_signs = [0u8; 4];
    let mut max_scale = 0.0f32;
    // As in ggml, the grid indices and signs of a sub-block follow those of
    // the last sub-block written: an all-zero sub-block takes no room and
    // the later ones move up.
    let (mut qs_at, mut signs_at) = (0usize, 0usize);

    let mut sumx2 = 0.0f32;
    for &v in &x[..QK_K] {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;

    for ib in 0..QK_K / 32 {
        let xb = &x[32 * ib..32 * ib + 32];
        sub_weights(
            xb,
            qw.map(|w| &w[32 * ib..32 * ib + 32]),
            sigma2,
            &mut weight,
            &mut waux,
        );
        for k in 0..4 {
            let mut s = 0u8;
            for i in 0..8 {
                let v = xb[8 * k + i];
                if v >= 0.0 {
                    xval[8 * k + i] = v;
                } else {
                    xval[8 * k + i] = -v;
                    s |= 1 << i;
                }
            }
            block_signs[k] = s;
        }
        let mut max = xval[0];
        for &v in &xval[1..] {
            max = fmax(max, v);
        }
        if max == 0.0 {
            scales[ib] = 0.0;
            continue;
        }
        let mut l = [0i8; 32];
        let mut scale = search_scale(search, &xval, &weight, &waux, max, &S, &mut l);
        if scale < 0.0 {
            scale = -scale;
            for s in &mut block_signs {
                *s = !*s;
            }
        }
        for k in 0..8 {
            let g = search.on_grid(pack4(&l[4 * k..4 * k + 4])).unwrap_or(0);
            out.qs[qs_at + k] = (g & 255) as u8;
            out.qh[ib] |= ((g >> 8) as u8) << k;
        }
        qs_at += 8;
        out.signs[signs_at..signs_at + 4].copy_from_slice(&block_signs);
        signs_at += 4;
        scales[ib] = scale;
        max_scale = fmax(max_scale, scale);
    }

    if max_scale == 0.0 {
        return out;
    }
    let d = max_scale / 31.0;
    out.d = f16::from_f32(d * 1.033);
    let id = 1.0 / d;
    for ib in (0..QK_K / 32).step_by(2) {
        let l1 = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
        let l2 = nearest_int(0.5 * (id * scales[ib + 1] - 1.0)).clamp(0, 15);
        out.scales[ib / 2] = (l1 | (l2 << 4)) as u8;
    }
    out
}

/// C's `MAX(a, b)`: `a > b ? a : b` (NaN handling as in ggml).
#[inline]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// ggml `quantize_iq3_xxs` for one row, with the importance weights `qw` of
/// its columns if given.
pub fn quantize_row_iq3_xxs(x: &[f32], y: &mut [BlockIQ3XXS], qw: Option<&[f32]>) {
    iq_search::each_block(x, y, qw, quantize_block_xxs);
}

/// ggml `quantize_iq3_s` for one row, with the importance weights `qw` of
/// its columns if given.
pub fn quantize_row_iq3_s(x: &[f32], y: &mut [BlockIQ3S], qw: Option<&[f32]>) {
    iq_search::each_block(x, y, qw, quantize_block_s);
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
        for qw in [None, Some(&w[..])] {
            let mut y = vec![0f32; 512];
            let mut b = [BlockIQ3XXS::zeroed(); 2];
            quantize_row_iq3_xxs(&x, &mut b, qw);
            for (bb, yb) in b.iter().zip(y.chunks_exact_mut(QK_K)) {
                bb.dequantize(yb);
            }
            assert!(rms(&x, &y) < 0.25 * norm, "IQ3_XXS {}", rms(&x, &y));
            let mut b = [BlockIQ3S::zeroed(); 2];
            quantize_row_iq3_s(&x, &mut b, qw);
            for (bb, yb) in b.iter().zip(y.chunks_exact_mut(QK_K)) {
                bb.dequantize(yb);
            }
            assert!(rms(&x, &y) < 0.2 * norm, "IQ3_S {}", rms(&x, &y));
        }
    }

    #[test]
    fn zero_input_is_zero_block() {
        assert_eq!(
            quantize_block_xxs(&[0.0; QK_K], None),
            BlockIQ3XXS::zeroed()
        );
        assert_eq!(quantize_block_s(&[0.0; QK_K], None), BlockIQ3S::zeroed());
    }

    #[test]
    fn iq3_s_packs_grid_indices_after_an_all_zero_sub_block() {
        // ggml writes the grid indices and signs of the sub-blocks that are
        // not all zero one after the other.
        let mut x = row(QK_K);
        x[..32].fill(0.0);
        let b = quantize_block_s(&x, None);
        let full = quantize_block_s(&row(QK_K), None);
        assert_eq!(b.qs[QK_K / 4 - 8..], [0u8; 8]);
        assert_eq!(b.signs[QK_K / 8 - 4..], [0u8; 4]);
        assert_eq!(b.qs[..8], full.qs[8..16]);
    }
}
