//! The non-linear 4-bit formats IQ4_NL and IQ4_XS of ggml: each value is a
//! 4-bit index into the fixed table [`KVALUES_IQ4NL`] of 16 levels (denser
//! near zero), times a scale.
//!
//! - IQ4_NL (`block_iq4_nl`): 32 values, one f16 scale `d`, 16 bytes of
//!   indices (value `j` in the low nibble of byte `j`, value `j + 16` in its
//!   high nibble). Value = `d * K[index]`.
//! - IQ4_XS (`block_iq4_xs`): 256 values in eight 32-value sub-blocks, an
//!   f16 super-scale `d`, and a 6-bit signed scale per sub-block (low four
//!   bits in `scales_l`, two per byte; high two bits in `scales_h`, two per
//!   sub-block). Value = `d * (ls - 32) * K[index]`.
//!
//! Quantization follows ggml's `quantize_row_iq4_nl_impl` (the scale search
//! over 15 candidate scales, `ntry = 7`), operation for operation in f32,
//! with or without an importance matrix, so that the bytes match ggml's.

// Index loops mirror the C code so that the port can be checked line by line.
#![allow(clippy::needless_range_loop)]

use half::f16;
use tl_gguf::GgmlType;

use super::k_quants::QK_K;
use super::k_search::{nearest_int, GROUP_MAX_EPS};
use super::Block;

/// ggml `kvalues_iq4nl`: the 16 levels of IQ4_NL and IQ4_XS.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

const QK4_NL: usize = 32;
/// Candidate scales tried on each side of the first guess.
const NTRY: i32 = 7;

/// `block_iq4_nl`: value = d * K[q], q in 0..16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ4NL {
    pub d: f16,
    pub qs: [u8; QK4_NL / 2],
}
const _: () = assert!(std::mem::size_of::<BlockIQ4NL>() == 18);

/// `block_iq4_xs`: value = d * (ls - 32) * K[q], with the 6-bit sub-block
/// scale `ls`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ4XS {
    pub d: f16,
    pub scales_h: u16,
    pub scales_l: [u8; QK_K / 64],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockIQ4XS>() == 136);

impl BlockIQ4XS {
    /// The 6-bit scale of sub-block `ib` (0..8), 0..64 (stored with +32).
    pub fn sub_scale(&self, ib: usize) -> i32 {
        let lo = (self.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
        let hi = (self.scales_h >> (2 * ib)) & 3;
        i32::from(lo) | (i32::from(hi) << 4)
    }
}

/// Writes the 32 values of one 16-byte group of indices scaled by `d`.
fn dequantize_group(qs: &[u8], d: f32, y: &mut [f32]) {
    for j in 0..16 {
        y[j] = d * f32::from(KVALUES_IQ4NL[usize::from(qs[j] & 0xF)]);
        y[j + 16] = d * f32::from(KVALUES_IQ4NL[usize::from(qs[j] >> 4)]);
    }
}

impl Block for BlockIQ4NL {
    const TYPE: GgmlType = GgmlType::IQ4_NL;
    const VALUES: usize = QK4_NL;

    /// ggml `dequantize_row_iq4_nl`.
    fn dequantize(&self, y: &mut [f32]) {
        dequantize_group(&self.qs, self.d.to_f32(), &mut y[..QK4_NL]);
    }

    /// ggml `quantize_row_iq4_nl_ref` (no importance weights).
    fn quantize(x: &[f32]) -> Self {
        quantize_block_nl(&x[..QK4_NL], None)
    }
}

impl Block for BlockIQ4XS {
    const TYPE: GgmlType = GgmlType::IQ4_XS;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_iq4_xs`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for ib in 0..QK_K / 32 {
            let dl = d * (self.sub_scale(ib) - 32) as f32;
            dequantize_group(
                &self.qs[16 * ib..16 * ib + 16],
                dl,
                &mut y[32 * ib..32 * ib + 32],
            );
        }
    }

    /// ggml `quantize_row_iq4_xs_ref` (no importance weights).
    fn quantize(x: &[f32]) -> Self {
        quantize_block_xs(&x[..QK_K], None)
    }
}

/// ggml `best_index_int8`: the index of the level of `val` nearest `x`
/// (ties to the upper one, as ggml's comparison falls).
fn best_index_int8(val: &[i8; 16], x: f32) -> u8 {
    let n = val.len();
    if x <= f32::from(val[0]) {
        return 0;
    }
    if x >= f32::from(val[n - 1]) {
        return (n - 1) as u8;
    }
    let (mut ml, mut mu) = (0usize, n - 1);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < f32::from(val[mav]) {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - f32::from(val[mu - 1]) < f32::from(val[mu]) - x {
        (mu - 1) as u8
    } else {
        mu as u8
    }
}

/// What `quantize_row_iq4_nl_impl` produces for one super-block.
struct Quantized {
    dh: f16,
    scales_h: u16,
    scales_l: [u8; QK_K / 64],
}

/// ggml `quantize_row_iq4_nl_impl(super_block_size = x.len(), block_size =
/// 32, ..., kvalues_iq4nl, quant_weights, ntry = 7)`: fills `q4` (x.len() /
/// 2 bytes) and returns the scales. `qw` holds `x.len()` weights when given.
fn quantize_impl(x: &[f32], qw: Option<&[f32]>, q4: &mut [u8]) -> Quantized {
    const BS: usize = 32;
    let values = &KVALUES_IQ4NL;
    let sbs = x.len();
    let nblocks = sbs / BS;
    let mut out = Quantized {
        dh: f16::from_f32(0.0),
        scales_h: 0,
        scales_l: [0; QK_K / 64],
    };
    let mut l_all = [0u8; QK_K];
    let mut scales = [0f32; QK_K / 32];
    let mut weight = [0f32; BS];

    let mut sigma2 = 0.0f32;
    for &v in x {
        sigma2 += v * v;
    }
    sigma2 *= 2.0 / sbs as f32;

    q4.fill(0);

    let v0 = f32::from(values[0]);
    let mut max_scale = 0.0f32;
    let mut amax_scale = 0.0f32;
    for ib in 0..nblocks {
        let xb = &x[ib * BS..ib * BS + BS];
        let lb = &mut l_all[ib * BS..ib * BS + BS];
        match qw {
            Some(qw) => {
                let qw = &qw[ib * BS..ib * BS + BS];
                for j in 0..BS {
                    weight[j] = qw[j] * (sigma2 + xb[j] * xb[j]).sqrt();
                }
            }
            None => {
                for j in 0..BS {
                    weight[j] = xb[j] * xb[j];
                }
            }
        }
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in xb {
            let ax = v.abs();
            if ax > amax {
                amax = ax;
                max = v;
            }
        }
        if amax < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        // ntry > 0 here.
        let mut d = -max / v0;
        let mut id = 1.0 / d;
        let mut sumqx = 0.0f32;
        let mut sumq2 = 0.0f32;
        for j in 0..BS {
            let al = id * xb[j];
            let l = best_index_int8(values, al);
            lb[j] = l;
            let q = f32::from(values[usize::from(l)]);
            let w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        d = sumqx / sumq2;
        let mut best = d * sumqx;
        for itry in -NTRY..=NTRY {
            id = (itry + i32::from(values[0])) as f32 / max;
            sumqx = 0.0;
            sumq2 = 0.0;
            for j in 0..BS {
                let al = id * xb[j];
                let l = best_index_int8(values, al);
                let q = f32::from(values[usize::from(l)]);
                let w = weight[j];
                sumqx += w * q * xb[j];
                sumq2 += w * q * q;
            }
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        let abs_d = d.abs();
        if abs_d > amax_scale {
            amax_scale = abs_d;
            max_scale = d;
        }
    }

    if nblocks > 1 {
        let d = -max_scale / 32.0;
        out.dh = f16::from_f32(d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for ib in 0..nblocks {
            let mut l = nearest_int(id * scales[ib]);
            l = l.clamp(-32, 31);
            let dl = d * l as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            let xb = &x[ib * BS..ib * BS + BS];
            for j in 0..BS {
                l_all[ib * BS + j] = best_index_int8(values, idl * xb[j]);
            }
            let l = (l + 32) as u8;
            let l_l = l & 0xF;
            let l_h = l >> 4;
            if ib % 2 == 0 {
                out.scales_l[ib / 2] = l_l;
            } else {
                out.scales_l[ib / 2] |= l_l << 4;
            }
            out.scales_h |= u16::from(l_h) << (2 * (ib % 8));
        }
    } else {
        out.dh = f16::from_f32(scales[0]);
        let id = if scales[0] != 0.0 {
            1.0 / scales[0]
        } else {
            0.0
        };
        for j in 0..sbs {
            l_all[j] = best_index_int8(values, id * x[j]);
        }
    }

    for i in 0..sbs / 32 {
        for j in 0..16 {
            q4[16 * i + j] = l_all[32 * i + j] | (l_all[32 * i + 16 + j] << 4);
        }
    }
    out
}

/// One IQ4_NL block of 32 values, with importance weights `qw` (32) if given.
pub(crate) fn quantize_block_nl(x: &[f32], qw: Option<&[f32]>) -> BlockIQ4NL {
    let mut qs = [0u8; QK4_NL / 2];
    let q = quantize_impl(&x[..QK4_NL], qw.map(|w| &w[..QK4_NL]), &mut qs);
    BlockIQ4NL { d: q.dh, qs }
}

/// One IQ4_XS super-block of 256 values, with importance weights `qw` (256)
/// if given.
pub(crate) fn quantize_block_xs(x: &[f32], qw: Option<&[f32]>) -> BlockIQ4XS {
    let mut qs = [0u8; QK_K / 2];
    let q = quantize_impl(&x[..QK_K], qw.map(|w| &w[..QK_K]), &mut qs);
    BlockIQ4XS {
        d: q.dh,
        scales_h: q.scales_h,
        scales_l: q.scales_l,
        qs,
    }
}

/// ggml `quantize_iq4_nl` for one row with the importance weights `qw` of
/// its columns.
pub fn quantize_row_iq4_nl(x: &[f32], y: &mut [BlockIQ4NL], qw: &[f32]) {
    for ((xb, b), w) in x
        .chunks_exact(QK4_NL)
        .zip(y.iter_mut())
        .zip(qw.chunks_exact(QK4_NL))
    {
        *b = quantize_block_nl(xb, Some(w));
    }
}

/// ggml `quantize_iq4_xs` for one row with the importance weights `qw` of
/// its columns.
pub fn quantize_row_iq4_xs(x: &[f32], y: &mut [BlockIQ4XS], qw: &[f32]) {
    for ((xb, b), w) in x
        .chunks_exact(QK_K)
        .zip(y.iter_mut())
        .zip(qw.chunks_exact(QK_K))
    {
        *b = quantize_block_xs(xb, Some(w));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_index_picks_the_nearest_level() {
        let v = &KVALUES_IQ4NL;
        assert_eq!(best_index_int8(v, -1000.0), 0);
        assert_eq!(best_index_int8(v, 1000.0), 15);
        for (i, &l) in v.iter().enumerate() {
            assert_eq!(usize::from(best_index_int8(v, f32::from(l))), i);
        }
        // Halfway between 1 and 13 goes up; just below goes down.
        assert_eq!(best_index_int8(v, 7.0), 9);
        assert_eq!(best_index_int8(v, 6.9), 8);
    }

    #[test]
    fn round_trip_error_is_small() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for xs in [false, true] {
            let mut y = vec![0f32; 512];
            if xs {
                for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(QK_K)) {
                    BlockIQ4XS::quantize(xb).dequantize(yb);
                }
            } else {
                for (xb, yb) in x.chunks_exact(32).zip(y.chunks_exact_mut(32)) {
                    BlockIQ4NL::quantize(xb).dequantize(yb);
                }
            }
            let err = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < amax * 0.1, "xs={xs} err {err} amax {amax}");
        }
    }

    #[test]
    fn zero_input_is_zero_block() {
        let b = BlockIQ4XS::quantize(&[0.0; QK_K]);
        let mut y = [1f32; QK_K];
        b.dequantize(&mut y);
        assert!(y.iter().all(|&v| v == 0.0));
        let b = BlockIQ4NL::quantize(&[0.0; 32]);
        let mut y = [1f32; 32];
        b.dequantize(&mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
