//! The importance-weighted quantizers of ggml `ggml-quants.c`
//! (`quantize_row_*_impl` for Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K,
//! Q6_K): what `ggml_quantize_chunk` runs when it is given an importance
//! matrix. Without one it runs the `quantize_row_*_ref` reference
//! quantizers, which are [`super::legacy`] and [`super::k_quants`].
//!
//! An importance matrix holds one non-negative weight per column of the
//! matrix being quantized (llama-imatrix's mean squared activation of the
//! input feature that column multiplies). Each quantizer turns it into
//! per-value error weights, mostly `qw[j] * sqrt(sigma2 + x[j]^2)` with
//! `sigma2` the row's (or super-block's) mean square, and picks scales and
//! levels that minimise the weighted error.
//!
//! Each function quantizes one row of `x.len()` values (whole blocks) with
//! the weights `qw` of that row's columns (`qw.len() == x.len()`) into the
//! row's blocks `y`. As elsewhere in this module, the code keeps the shape of
//! the C loops, in f32, operation for operation, since every rounding shows
//! in the bytes.

// Index loops mirror the C code so that the port can be checked line by line.
#![allow(clippy::needless_range_loop)]

use half::f16;

use super::k_quants::{get_scale_min_k4, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use super::k_search::{make_qkx3_quants, make_qp_quants, make_qx_quants, nearest_int};
use super::legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1};

const QK: usize = 32;

/// `sum_x2 / n_per_row` over the whole row, as the 32-value quantizers
/// compute their `sigma2`.
fn row_sigma2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    sum_x2 / x.len() as f32
}

/// `weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j])`.
fn group_weights(x: &[f32], qw: &[f32], sigma2: f32, weight: &mut [f32]) {
    for j in 0..x.len() {
        weight[j] = qw[j] * (sigma2 + x[j] * x[j]).sqrt();
    }
}

/// Bit 4 of each of the 32 levels, packed as Q5_0/Q5_1 store it.
fn q5_high_bits(l: &[u8; QK]) -> [u8; 4] {
    let mut qh = 0u32;
    for j in 0..16 {
        qh |= u32::from((l[j] & 0x10) >> 4) << j;
        qh |= u32::from((l[j + 16] & 0x10) >> 4) << (j + QK / 2);
    }
    qh.to_le_bytes()
}

/// ggml `quantize_row_q4_0_impl` with weights.
pub fn quantize_row_q4_0(x: &[f32], y: &mut [BlockQ4_0], qw: &[f32]) {
    let sigma2 = row_sigma2(x);
    let mut weight = [0.0f32; QK];
    let mut l = [0i8; QK];
    for (ib, b) in y.iter_mut().enumerate() {
        let xb = &x[QK * ib..QK * ib + QK];
        group_weights(xb, &qw[QK * ib..QK * ib + QK], sigma2, &mut weight);
        let d = make_qx_quants(8, xb, &mut l, 1, Some(&weight));
        b.d = f16::from_f32(d);
        for j in 0..16 {
            b.qs[j] = (l[j] as u8) | ((l[j + 16] as u8) << 4);
        }
    }
}

/// ggml `quantize_row_q4_1_impl` with weights.
pub fn quantize_row_q4_1(x: &[f32], y: &mut [BlockQ4_1], qw: &[f32]) {
    let sigma2 = row_sigma2(x);
    let mut weight = [0.0f32; QK];
    let mut l = [0u8; QK];
    for (ib, b) in y.iter_mut().enumerate() {
        let xb = &x[QK * ib..QK * ib + QK];
        group_weights(xb, &qw[QK * ib..QK * ib + QK], sigma2, &mut weight);
        let (d, min) = make_qkx3_quants(15, xb, &weight, &mut l, -0.9, 0.05, 36, false);
        b.d = f16::from_f32(d);
        b.m = f16::from_f32(-min);
        for j in 0..16 {
            b.qs[j] = l[j] | (l[j + 16] << 4);
        }
    }
}

/// ggml `quantize_row_q5_0_impl` with weights.
pub fn quantize_row_q5_0(x: &[f32], y: &mut [BlockQ5_0], qw: &[f32]) {
    let sigma2 = row_sigma2(x);
    let mut weight = [0.0f32; QK];
    let mut l = [0i8; QK];
    for (ib, b) in y.iter_mut().enumerate() {
        let xb = &x[QK * ib..QK * ib + QK];
        group_weights(xb, &qw[QK * ib..QK * ib + QK], sigma2, &mut weight);
        let d = make_qx_quants(16, xb, &mut l, 1, Some(&weight));
        b.d = f16::from_f32(d);
        let lu: [u8; QK] = l.map(|v| v as u8);
        for j in 0..16 {
            b.qs[j] = (lu[j] & 0x0F) | ((lu[j + 16] & 0x0F) << 4);
        }
        b.qh = q5_high_bits(&lu);
    }
}

/// ggml `quantize_row_q5_1_impl` with weights.
pub fn quantize_row_q5_1(x: &[f32], y: &mut [BlockQ5_1], qw: &[f32]) {
    let sigma2 = row_sigma2(x);
    let mut weight = [0.0f32; QK];
    let mut l = [0u8; QK];
    for (ib, b) in y.iter_mut().enumerate() {
        let xb = &x[QK * ib..QK * ib + QK];
        group_weights(xb, &qw[QK * ib..QK * ib + QK], sigma2, &mut weight);
        let (d, min) = make_qkx3_quants(31, xb, &weight, &mut l, -0.9, 0.05, 36, false);
        b.d = f16::from_f32(d);
        b.m = f16::from_f32(-min);
        for j in 0..16 {
            b.qs[j] = (l[j] & 0x0F) | ((l[j + 16] & 0x0F) << 4);
        }
        b.qh = q5_high_bits(&l);
    }
}

/// `sum_x2` over one super-block.
fn block_sum_x2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for l in 0..QK_K {
        sum_x2 += x[l] * x[l];
    }
    sum_x2
}

/// ggml `quantize_row_q2_K_impl`.
pub fn quantize_row_q2_k(x: &[f32], y: &mut [BlockQ2K], quant_weights: &[f32]) {
    let mut l_all = [0u8; QK_K];
    let mut mins = [0.0f32; QK_K / 16];
    let mut scales = [0.0f32; QK_K / 16];
    let mut sw = [0.0f32; QK_K / 16];
    let mut weight = [0.0f32; 16];
    let mut ls = [0u8; QK_K / 16];
    let mut lm = [0u8; QK_K / 16];

    for (i, out) in y.iter_mut().enumerate() {
        let x = &x[QK_K * i..QK_K * i + QK_K];
        sw.fill(0.0);
        let sigma2 = block_sum_x2(x) / QK_K as f32;
        for j in 0..QK_K / 16 {
            let qw = &quant_weights[QK_K * i + 16 * j..QK_K * i + 16 * j + 16];
            group_weights(&x[16 * j..16 * j + 16], qw, sigma2, &mut weight);
            for l in 0..QK_K / 16 {
                sw[j] += weight[l];
            }
            let (scale, min) = make_qkx3_quants(
                3,
                &x[16 * j..16 * j + 16],
                &weight,
                &mut l_all[16 * j..16 * j + 16],
                -0.9,
                0.05,
                36,
                false,
            );
            scales[j] = scale;
            mins[j] = min;
        }

        let dm = make_qp_quants(15, &scales, &mut ls, &sw);
        let mm = make_qp_quants(15, &mins, &mut lm, &sw);
        out.d = f16::from_f32(dm);
        out.dmin = f16::from_f32(mm);
        let dm = out.d.to_f32();
        let mm = out.dmin.to_f32();

        for j in 0..QK_K / 16 {
            out.scales[j] = (u32::from(ls[j]) | (u32::from(lm[j]) << 4)) as u8;
        }

        for j in 0..QK_K / 16 {
            let d = dm * f32::from(out.scales[j] & 0xF);
            if d == 0.0 {
                continue;
            }
            let m = mm * f32::from(out.scales[j] >> 4);
            for ii in 0..16 {
                let l = nearest_int((x[16 * j + ii] + m) / d).clamp(0, 3);
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
    }
}

/// ggml `quantize_row_q3_K_impl` with weights.
pub fn quantize_row_q3_k(x: &[f32], y: &mut [BlockQ3K], quant_weights: &[f32]) {
    let mut l_all = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut weight = [0.0f32; 16];
    let mut sw = [0.0f32; QK_K / 16];
    let mut ls = [0i8; QK_K / 16];

    for (i, out) in y.iter_mut().enumerate() {
        let x = &x[QK_K * i..QK_K * i + QK_K];
        let sigma2 = 2.0 * block_sum_x2(x) / QK_K as f32;

        for j in 0..QK_K / 16 {
            let qw = &quant_weights[QK_K * i + 16 * j..QK_K * i + 16 * j + 16];
            group_weights(&x[16 * j..16 * j + 16], qw, sigma2, &mut weight);
            let mut sumw = 0.0f32;
            for l in 0..16 {
                sumw += weight[l];
            }
            sw[j] = sumw;
            scales[j] = make_qx_quants(
                4,
                &x[16 * j..16 * j + 16],
                &mut l_all[16 * j..16 * j + 16],
                1,
                Some(&weight),
            );
        }

        out.scales = [0; 12];
        let d_block = make_qx_quants(32, &scales, &mut ls, 1, Some(&sw));
        for j in 0..QK_K / 16 {
            let mut l = i32::from(ls[j]);
            if j < 8 {
                out.scales[j] = (l & 0xF) as u8;
            } else {
                out.scales[j - 8] |= ((l & 0xF) << 4) as u8;
            }
            l >>= 4;
            out.scales[j % 4 + 8] |= (l << (2 * (j / 4))) as u8;
        }
        out.d = f16::from_f32(d_block);

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

        out.hmask = [0; QK_K / 8];
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
    }
}

/// The part `quantize_row_q4_K_impl` and `quantize_row_q5_K_impl` share:
/// per-sub-block `make_qkx3_quants`, then the scales and mins themselves
/// quantized to 6 bits with `make_qp_quants`, packed, and the values
/// requantized against the stored scales. `clamp63` is Q5_K's extra
/// `MIN(63, ..)` on the 6-bit factors. Returns the levels, the packed
/// scales, `d` and `dmin`.
fn k4_impl(x: &[f32], qw: &[f32], nmax: i32, clamp63: bool) -> ([u8; QK_K], [u8; 12], f16, f16) {
    let mut l_all = [0u8; QK_K];
    let mut ls = [0u8; QK_K / 32];
    let mut lm = [0u8; QK_K / 32];
    let mut weights = [0.0f32; 32];
    let mut sw = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    let mut scales = [0.0f32; QK_K / 32];

    let sigma2 = 2.0 * block_sum_x2(x) / QK_K as f32;
    for j in 0..QK_K / 32 {
        group_weights(
            &x[32 * j..32 * j + 32],
            &qw[32 * j..32 * j + 32],
            sigma2,
            &mut weights,
        );
        let mut sumw = 0.0f32;
        for l in 0..32 {
            sumw += weights[l];
        }
        sw[j] = sumw;
        let (scale, min) = make_qkx3_quants(
            nmax,
            &x[32 * j..32 * j + 32],
            &weights,
            &mut l_all[32 * j..32 * j + 32],
            -0.9,
            0.05,
            36,
            false,
        );
        scales[j] = scale;
        mins[j] = min;
    }

    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    let mut packed = [0u8; 12];
    for j in 0..QK_K / 32 {
        let (mut ls, mut lm) = (ls[j], lm[j]);
        if clamp63 {
            ls = ls.min(63);
            lm = lm.min(63);
        }
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(d_block);
    let dmin = f16::from_f32(m_block);

    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let dd = d.to_f32() * f32::from(sc);
        if dd == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / dd).clamp(0, nmax);
            l_all[32 * j + ii] = l as u8;
        }
    }
    (l_all, packed, d, dmin)
}

/// ggml `quantize_row_q4_K_impl` with weights.
pub fn quantize_row_q4_k(x: &[f32], y: &mut [BlockQ4K], quant_weights: &[f32]) {
    for (i, out) in y.iter_mut().enumerate() {
        let xb = &x[QK_K * i..QK_K * i + QK_K];
        let qw = &quant_weights[QK_K * i..QK_K * i + QK_K];
        let (l_all, scales, d, dmin) = k4_impl(xb, qw, 15, false);
        out.d = d;
        out.dmin = dmin;
        out.scales = scales;
        for j in (0..QK_K).step_by(64) {
            for l in 0..32 {
                out.qs[j / 2 + l] = l_all[j + l] | (l_all[j + l + 32] << 4);
            }
        }
    }
}

/// ggml `quantize_row_q5_K_impl` with weights.
pub fn quantize_row_q5_k(x: &[f32], y: &mut [BlockQ5K], quant_weights: &[f32]) {
    for (i, out) in y.iter_mut().enumerate() {
        let xb = &x[QK_K * i..QK_K * i + QK_K];
        let qw = &quant_weights[QK_K * i..QK_K * i + QK_K];
        let (l_all, scales, d, dmin) = k4_impl(xb, qw, 31, true);
        out.d = d;
        out.dmin = dmin;
        out.scales = scales;
        out.qh = [0; QK_K / 8];
        let mut m1 = 1u8;
        let mut m2 = 2u8;
        for n in (0..QK_K).step_by(64) {
            let ql = &mut out.qs[n / 2..n / 2 + 32];
            for j in 0..32 {
                let mut l1 = l_all[n + j];
                if l1 > 15 {
                    l1 -= 16;
                    out.qh[j] |= m1;
                }
                let mut l2 = l_all[n + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    out.qh[j] |= m2;
                }
                ql[j] = l1 | (l2 << 4);
            }
            m1 = m1.wrapping_shl(2);
            m2 = m2.wrapping_shl(2);
        }
    }
}

/// ggml `quantize_row_q6_K_impl` with weights: the reference algorithm with
/// the importance weights (as they are, no `sigma2` term) as
/// `make_qx_quants`' error weights.
pub fn quantize_row_q6_k(x: &[f32], y: &mut [BlockQ6K], quant_weights: &[f32]) {
    for (i, out) in y.iter_mut().enumerate() {
        let xb = &x[QK_K * i..QK_K * i + QK_K];
        let qw = &quant_weights[QK_K * i..QK_K * i + QK_K];
        *out = BlockQ6K::quantize_with(xb, Some(qw));
    }
}
