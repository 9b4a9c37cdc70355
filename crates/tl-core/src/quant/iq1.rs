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

#![allow(clippy::needless_range_loop)]

use half::f16;
use tl_gguf::GgmlType;

use super::iq_grids::IQ1S_GRID;
use super::k_quants::QK_K;
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
