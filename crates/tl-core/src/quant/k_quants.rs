//! The K-quant super-blocks of 256 values: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K.
//!
//! Layouts from ggml `ggml-common.h` (QK_K = 256, K_SCALE_SIZE = 12);
//! `dequantize` ports ggml `ggml-quants.c` `dequantize_row_*`, `quantize`
//! ports `quantize_row_*_ref` (the path ggml takes without an importance
//! matrix), with the scale searches in [`super::k_search`].
//!
//! Each super-block splits into sub-blocks (16 of 16 values or 8 of 32) with
//! their own small integer scale (and min), themselves scaled by the f16
//! `d` (and `dmin`). As in ggml, `d * scale` is formed first and the level is
//! multiplied in after, unfused.

// Index loops mirror the C code so that the port can be checked line by line.
#![allow(clippy::needless_range_loop)]

use half::f16;
use tl_gguf::GgmlType;

use super::k_search::{
    make_q3_quants, make_qkx2_quants, make_qx_quants, nearest_int, GROUP_MAX_EPS,
};
use super::Block;

pub const QK_K: usize = 256;
pub const K_SCALE_SIZE: usize = 12;

/// `block_q2_K`: 16 sub-blocks of 16; value = d * (sc & 0xF) * q - dmin *
/// (sc >> 4), q in 0..4, four 2-bit levels per byte of `qs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);

/// `block_q3_K`: 16 sub-blocks of 16; value = d * (sc - 32) * (q - 4 * !h),
/// with 2 low bits in `qs`, the high bit in `hmask` and 6-bit scales packed
/// into 12 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);

/// `block_q4_K`: 8 sub-blocks of 32; value = d * sc * q - dmin * m, with
/// 6-bit `sc`/`m` packed into 12 bytes (see [`get_scale_min_k4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

/// `block_q5_K`: Q4_K plus a fifth bit per value in `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

/// `block_q6_K`: 16 sub-blocks of 16; value = d * sc * (q - 32), 4 low bits
/// in `ql`, 2 high bits in `qh`, 8-bit signed scales.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

/// `block_q8_K`: value = d * q with an f32 `d`, and `bsums[j]` = the sum of
/// `qs[16 * j..16 * j + 16]`, which the K-quant dot products use to apply the
/// sub-block mins without touching every value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

/// ggml `get_scale_min_k4`: scale and min of sub-block `j` (0..8) of Q4_K and
/// Q5_K. Bytes 0..4 hold the scales of sub-blocks 0..4 and bytes 4..8 their
/// mins, 6 bits each; sub-blocks 4..8 keep their low 4 bits in bytes 8..12
/// (scale low nibble, min high nibble) and their top 2 bits in the spare top
/// bits of bytes 0..8.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 16 six-bit scales of Q3_K, still offset by 32, decoded with the
/// `kmask1`/`kmask2` word shuffle of ggml `dequantize_row_q3_K`: the low
/// nibbles of scales 0..8 and the high nibbles of scales 8..16 share bytes
/// 0..8, and bytes 8..12 hold the top 2 bits of all 16.
pub fn unpack_q3_scales(s: &[u8; 12]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let a0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let a1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let tmp = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0i8; 16];
    for (o, b) in out.chunks_exact_mut(4).zip(aux) {
        for (o, b) in o.iter_mut().zip(b.to_le_bytes()) {
            *o = b as i8;
        }
    }
    out
}

impl Block for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2_K;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_q2_K`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        let mut is = 0;
        let mut yi = 0;
        for n in (0..QK_K).step_by(128) {
            let q = &self.qs[n / 4..n / 4 + 32];
            for shift in [0, 2, 4, 6] {
                for half in [0, 16] {
                    let sc = self.scales[is];
                    is += 1;
                    let dl = d * f32::from(sc & 0xF);
                    let ml = min * f32::from(sc >> 4);
                    for l in 0..16 {
                        y[yi] = dl * f32::from((q[l + half] >> shift) & 3) - ml;
                        yi += 1;
                    }
                }
            }
        }
    }

    /// ggml `quantize_row_q2_K_ref`.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK_K];
        let mut out: Self = bytemuck::Zeroable::zeroed();
        let mut l_all = [0u8; QK_K];
        let mut weights = [0.0f32; 16];
        let mut mins = [0.0f32; QK_K / 16];
        let mut scales = [0.0f32; QK_K / 16];
        let q4scale = 15.0f32;

        // Scales are never negative once the min is taken out.
        let mut max_scale = 0.0f32;
        let mut max_min = 0.0f32;
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            for l in 0..16 {
                weights[l] = xs[l].abs();
            }
            let (scale, min) = make_qkx2_quants(
                3,
                xs,
                &weights,
                &mut l_all[16 * j..16 * j + 16],
                -0.5,
                0.1,
                15,
                true,
            );
            scales[j] = scale;
            mins[j] = min;
            if scale > max_scale {
                max_scale = scale;
            }
            if min > max_min {
                max_min = min;
            }
        }

        if max_scale > 0.0 {
            let iscale = q4scale / max_scale;
            for j in 0..QK_K / 16 {
                out.scales[j] = nearest_int(iscale * scales[j]) as u8;
            }
            out.d = f16::from_f32(max_scale / q4scale);
        } else {
            out.d = f16::from_f32(0.0);
        }
        if max_min > 0.0 {
            let iscale = q4scale / max_min;
            for j in 0..QK_K / 16 {
                let l = nearest_int(iscale * mins[j]);
                out.scales[j] |= (l << 4) as u8;
            }
            out.dmin = f16::from_f32(max_min / q4scale);
        } else {
            out.dmin = f16::from_f32(0.0);
        }

        // Requantize against the scales as stored (f16 d, 4-bit factors).
        for j in 0..QK_K / 16 {
            let d = out.d.to_f32() * f32::from(out.scales[j] & 0xF);
            if d == 0.0 {
                continue;
            }
            let dm = out.dmin.to_f32() * f32::from(out.scales[j] >> 4);
            for ii in 0..16 {
                let l = nearest_int((x[16 * j + ii] + dm) / d).clamp(0, 3);
                l_all[16 * j + ii] = l as u8;
            }
        }

        for j in (0..QK_K).step_by(128) {
            for l in 0..32 {
                out.qs[j / 4 + l] = l_all[j + l]
                    | (l_all[j + l + 32] << 2)
                    | (l_all[j + l + 64] << 4)
                    | (l_all[j + l + 96] << 6);
            }
        }
        out
    }
}

impl Block for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3_K;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_q3_K`.
    fn dequantize(&self, y: &mut [f32]) {
        let d_all = self.d.to_f32();
        let scales = unpack_q3_scales(&self.scales);
        let hm = &self.hmask;
        let mut m = 1u8;
        let mut is = 0;
        let mut yi = 0;
        for n in (0..QK_K).step_by(128) {
            let q = &self.qs[n / 4..n / 4 + 32];
            for shift in [0, 2, 4, 6] {
                for half in [0, 16] {
                    let dl = d_all * (i32::from(scales[is]) - 32) as f32;
                    is += 1;
                    for l in 0..16 {
                        let low = i32::from((q[l + half] >> shift) & 3);
                        let high = if hm[l + half] & m != 0 { 0 } else { 4 };
                        y[yi] = dl * (low - high) as f32;
                        yi += 1;
                    }
                }
                // Wraps to 0 after the last sub-block, as the C uint8_t does.
                m = m.wrapping_shl(1);
            }
        }
    }

    /// ggml `quantize_row_q3_K_ref`.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK_K];
        let mut out: Self = bytemuck::Zeroable::zeroed();
        let mut l_all = [0i8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];

        let mut max_scale = 0.0f32;
        let mut amax = 0.0f32;
        for j in 0..QK_K / 16 {
            scales[j] = make_q3_quants(
                4,
                &x[16 * j..16 * j + 16],
                &mut l_all[16 * j..16 * j + 16],
                true,
            );
            let scale = scales[j].abs();
            if scale > amax {
                amax = scale;
                max_scale = scales[j];
            }
        }

        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for j in 0..QK_K / 16 {
                // `int8_t l = nearest_int(..)` truncates before clamping.
                let l = i32::from(nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
                if j < 8 {
                    out.scales[j] = (l & 0xF) as u8;
                } else {
                    out.scales[j - 8] |= ((l & 0xF) << 4) as u8;
                }
                let l = l >> 4;
                out.scales[j % 4 + 8] |= (l << (2 * (j / 4))) as u8;
            }
            out.d = f16::from_f32(1.0 / iscale);
        } else {
            out.d = f16::from_f32(0.0);
        }

        for j in 0..QK_K / 16 {
            let low = if j < 8 {
                out.scales[j] & 0xF
            } else {
                out.scales[j - 8] >> 4
            };
            let sc = i32::from(low | (((out.scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
            let d = out.d.to_f32() * sc as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let l = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
                l_all[16 * j + ii] = (l + 4) as i8;
            }
        }

        // The high bit of value j goes to bit j / 32 of hmask[j % 32].
        let mut m = 0;
        let mut hm = 1u8;
        for j in 0..QK_K {
            if l_all[j] > 3 {
                out.hmask[m] |= hm;
                l_all[j] -= 4;
            }
            m += 1;
            if m == QK_K / 8 {
                m = 0;
                hm = hm.wrapping_shl(1);
            }
        }
        for j in (0..QK_K).step_by(128) {
            for l in 0..32 {
                let v = i32::from(l_all[j + l])
                    | (i32::from(l_all[j + l + 32]) << 2)
                    | (i32::from(l_all[j + l + 64]) << 4)
                    | (i32::from(l_all[j + l + 96]) << 6);
                out.qs[j / 4 + l] = v as u8;
            }
        }
        out
    }
}

/// Sub-block scales and mins of Q4_K/Q5_K from `make_qkx2_quants`, and the
/// packing that `quantize_row_q4_K_ref` and `quantize_row_q5_K_ref` share.
/// Returns the levels (before requantization) with the packed `scales`, `d`
/// and `dmin`.
fn k4_scales(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ([u8; QK_K], [u8; K_SCALE_SIZE], f16, f16) {
    let mut l_all = [0u8; QK_K];
    let mut weights = [0.0f32; 32];
    let mut mins = [0.0f32; QK_K / 32];
    let mut scales = [0.0f32; QK_K / 32];
    let mut packed = [0u8; K_SCALE_SIZE];

    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for l in 0..32 {
            sum_x2 += xs[l] * xs[l];
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for l in 0..32 {
            weights[l] = av_x + xs[l].abs();
        }
        let (scale, min) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l_all[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    for j in 0..QK_K / 32 {
        // `uint8_t ls = nearest_int(..)` truncates to 8 bits before the MIN.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    (
        l_all,
        packed,
        f16::from_f32(max_scale / 63.0),
        f16::from_f32(max_min / 63.0),
    )
}

/// Requantizes each sub-block of 32 against its stored scale and min, as the
/// second half of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` does.
fn k4_requantize(
    x: &[f32],
    l_all: &mut [u8; QK_K],
    scales: &[u8; K_SCALE_SIZE],
    d: f16,
    dmin: f16,
    nmax: i32,
) {
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let d = d.to_f32() * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            l_all[32 * j + ii] = l as u8;
        }
    }
}

impl Block for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_q4_K`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        for j in 0..QK_K / 64 {
            let q = &self.qs[32 * j..32 * j + 32];
            let (sc, m) = get_scale_min_k4(2 * j, &self.scales);
            let d1 = d * f32::from(sc);
            let m1 = min * f32::from(m);
            let (sc, m) = get_scale_min_k4(2 * j + 1, &self.scales);
            let d2 = d * f32::from(sc);
            let m2 = min * f32::from(m);
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                y[l] = d1 * f32::from(q[l] & 0xF) - m1;
            }
            for l in 0..32 {
                y[32 + l] = d2 * f32::from(q[l] >> 4) - m2;
            }
        }
    }

    /// ggml `quantize_row_q4_K_ref`.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK_K];
        let (mut l_all, scales, d, dmin) = k4_scales(x, 15, -1.0, 20);
        k4_requantize(x, &mut l_all, &scales, d, dmin, 15);
        let mut qs = [0u8; QK_K / 2];
        for j in (0..QK_K).step_by(64) {
            for l in 0..32 {
                qs[j / 2 + l] = l_all[j + l] | (l_all[j + l + 32] << 4);
            }
        }
        Self {
            d,
            dmin,
            scales,
            qs,
        }
    }
}

impl Block for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_q5_K`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let min = self.dmin.to_f32();
        let qh = &self.qh;
        let mut u1 = 1u8;
        let mut u2 = 2u8;
        for j in 0..QK_K / 64 {
            let ql = &self.qs[32 * j..32 * j + 32];
            let (sc, m) = get_scale_min_k4(2 * j, &self.scales);
            let d1 = d * f32::from(sc);
            let m1 = min * f32::from(m);
            let (sc, m) = get_scale_min_k4(2 * j + 1, &self.scales);
            let d2 = d * f32::from(sc);
            let m2 = min * f32::from(m);
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                let h = if qh[l] & u1 != 0 { 16 } else { 0 };
                y[l] = d1 * f32::from((ql[l] & 0xF) + h) - m1;
            }
            for l in 0..32 {
                let h = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[32 + l] = d2 * f32::from((ql[l] >> 4) + h) - m2;
            }
            u1 = u1.wrapping_shl(2);
            u2 = u2.wrapping_shl(2);
        }
    }

    /// ggml `quantize_row_q5_K_ref`.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK_K];
        let (mut l_all, scales, d, dmin) = k4_scales(x, 31, -0.5, 15);
        k4_requantize(x, &mut l_all, &scales, d, dmin, 31);
        let mut qh = [0u8; QK_K / 8];
        let mut qs = [0u8; QK_K / 2];
        let mut m1 = 1u8;
        let mut m2 = 2u8;
        for n in (0..QK_K).step_by(64) {
            let ql = &mut qs[n / 2..n / 2 + 32];
            for j in 0..32 {
                let mut l1 = l_all[n + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = l_all[n + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = l1 | (l2 << 4);
            }
            m1 = m1.wrapping_shl(2);
            m2 = m2.wrapping_shl(2);
        }
        Self {
            d,
            dmin,
            scales,
            qh,
            qs,
        }
    }
}

impl Block for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_q6_K`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for n in 0..QK_K / 128 {
            let ql = &self.ql[64 * n..64 * n + 64];
            let qh = &self.qh[32 * n..32 * n + 32];
            let sc = &self.scales[8 * n..8 * n + 8];
            let y = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                y[l] = d * f32::from(sc[is]) * f32::from(q1);
                y[l + 32] = d * f32::from(sc[is + 2]) * f32::from(q2);
                y[l + 64] = d * f32::from(sc[is + 4]) * f32::from(q3);
                y[l + 96] = d * f32::from(sc[is + 6]) * f32::from(q4);
            }
        }
    }

    /// ggml `quantize_row_q6_K_ref`.
    fn quantize(x: &[f32]) -> Self {
        Self::quantize_with(x, None)
    }
}

impl BlockQ6K {
    /// ggml `quantize_row_q6_K_impl`: with `qw = None` the same as
    /// `quantize_row_q6_K_ref`; with the 256 importance weights of this
    /// super-block they are `make_qx_quants`' error weights.
    pub fn quantize_with(x: &[f32], qw: Option<&[f32]>) -> Self {
        let x = &x[..QK_K];
        let mut out: Self = bytemuck::Zeroable::zeroed();
        let mut l_all = [0i8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];

        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for ib in 0..QK_K / 16 {
            let scale = make_qx_quants(
                32,
                &x[16 * ib..16 * ib + 16],
                &mut l_all[16 * ib..16 * ib + 16],
                1,
                qw.map(|w| &w[16 * ib..16 * ib + 16]),
            );
            scales[ib] = scale;
            let abs_scale = scale.abs();
            if abs_scale > max_abs_scale {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }

        if max_abs_scale < GROUP_MAX_EPS {
            return out;
        }

        let iscale = -128.0 / max_scale;
        out.d = f16::from_f32(1.0 / iscale);
        for ib in 0..QK_K / 16 {
            out.scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }

        for j in 0..QK_K / 16 {
            let d = out.d.to_f32() * f32::from(out.scales[j]);
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let l = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
                l_all[16 * j + ii] = (l + 32) as i8;
            }
        }

        for (n, j) in (0..QK_K).step_by(128).enumerate() {
            let ql = &mut out.ql[64 * n..64 * n + 64];
            for l in 0..32 {
                let q1 = l_all[j + l] as u8 & 0xF;
                let q2 = l_all[j + l + 32] as u8 & 0xF;
                let q3 = l_all[j + l + 64] as u8 & 0xF;
                let q4 = l_all[j + l + 96] as u8 & 0xF;
                ql[l] = q1 | (q3 << 4);
                ql[l + 32] = q2 | (q4 << 4);
            }
            let qh = &mut out.qh[32 * n..32 * n + 32];
            for l in 0..32 {
                qh[l] = (l_all[j + l] as u8 >> 4)
                    | ((l_all[j + l + 32] as u8 >> 4) << 2)
                    | ((l_all[j + l + 64] as u8 >> 4) << 4)
                    | ((l_all[j + l + 96] as u8 >> 4) << 6);
            }
        }
        out
    }
}

impl Block for BlockQ8K {
    const TYPE: GgmlType = GgmlType::Q8_K;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_q8_K`.
    fn dequantize(&self, y: &mut [f32]) {
        for (y, &q) in y.iter_mut().zip(&self.qs) {
            *y = self.d * f32::from(q);
        }
    }

    /// ggml `quantize_row_q8_K_ref`. The scale is `max / -127` of the signed
    /// extreme (not -128, so that IQ2_XXS dot products can negate freely).
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK_K];
        // ggml leaves `bsums` untouched for an all-zero block; they are
        // zeroed here so that the output never depends on the buffer's
        // previous contents.
        let mut out: Self = bytemuck::Zeroable::zeroed();
        let mut max = 0.0f32;
        let mut amax = 0.0f32;
        for &v in x {
            let ax = v.abs();
            if ax > amax {
                amax = ax;
                max = v;
            }
        }
        if amax == 0.0 {
            return out;
        }
        let iscale = -127.0 / max;
        for (q, &v) in out.qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (sum, qs) in out.bsums.iter_mut().zip(out.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| i16::from(q)).sum();
        }
        out.d = 1.0 / iscale;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_scale_packing_round_trips() {
        // Every 6-bit scale/min pair survives the packing of k4_scales as
        // read back by get_scale_min_k4.
        for seed in 0..64u32 {
            let sc: Vec<u8> = (0..8).map(|j| ((seed * 7 + j * 13) % 64) as u8).collect();
            let mn: Vec<u8> = (0..8)
                .map(|j| ((seed * 11 + j * 5 + 3) % 64) as u8)
                .collect();
            let mut packed = [0u8; K_SCALE_SIZE];
            for j in 0..8usize {
                let (ls, lm) = (sc[j], mn[j]);
                if j < 4 {
                    packed[j] = ls;
                    packed[j + 4] = lm;
                } else {
                    packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                    packed[j - 4] |= (ls >> 4) << 6;
                    packed[j] |= (lm >> 4) << 6;
                }
            }
            for j in 0..8 {
                assert_eq!(get_scale_min_k4(j, &packed), (sc[j], mn[j]));
            }
        }
    }

    #[test]
    fn q3_k_scales_unpack_as_documented() {
        // Scale j: low nibble in byte j (j < 8) or the high nibble of byte
        // j - 8, top 2 bits at bit 2 * (j / 4) of byte 8 + j % 4.
        let mut s = [0u8; 12];
        let want: Vec<u8> = (0..16).map(|j| (j * 4 + 3) as u8 % 64).collect();
        for (j, &v) in want.iter().enumerate() {
            if j < 8 {
                s[j] |= v & 0xF;
            } else {
                s[j - 8] |= (v & 0xF) << 4;
            }
            s[8 + j % 4] |= (v >> 4) << (2 * (j / 4));
        }
        let got = unpack_q3_scales(&s);
        for j in 0..16 {
            assert_eq!(got[j] as u8, want[j], "scale {j}");
        }
    }

    #[test]
    fn q6_k_all_zero_block_is_all_zero_bytes() {
        let b = BlockQ6K::quantize(&[0.0; QK_K]);
        assert_eq!(bytemuck::bytes_of(&b), &[0u8; 210][..]);
    }
}
