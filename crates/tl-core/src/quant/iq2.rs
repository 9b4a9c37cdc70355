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

#![allow(clippy::needless_range_loop)]

use half::f16;
use tl_gguf::GgmlType;

use super::iq_grids::{IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, KMASK_IQ2XS, KSIGNS_IQ2XS};
use super::k_quants::QK_K;
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
