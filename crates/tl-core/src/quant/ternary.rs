//! The ternary formats TQ1_0 and TQ2_0 (`block_tq1_0`, `block_tq2_0` of
//! ggml): 256 values in {-1, 0, 1} times one f16 scale `d`, for models
//! trained ternary (BitNet b1.58 and the like).
//!
//! - TQ2_0 stores each value as two bits `q` (value `q - 1`): byte `m` of
//!   the 32-byte half `j` holds values `j * 128 + 32 * l + m` at bits
//!   `2l..2l + 2`.
//! - TQ1_0 packs five trits per byte (1.6875 bits per value): a byte holds
//!   the five-digit base-3 number of its trits, scaled by 256 / 243 and
//!   rounded up, so that the `n`-th trit is the top base-3 digit of
//!   `byte * 3^n` (mod 256), read as `(q * 3) >> 8`. The first 32 bytes of
//!   `qs` hold values 0..160 (byte `m`, trit `n` is value `32n + m`), the
//!   next 16 values 160..240 (`160 + 16n + m`), and the four bytes of `qh`
//!   four trits each (value `240 + 4n + j`).
//!
//! Quantization is ggml's `quantize_row_tq1_0_ref` / `quantize_row_tq2_0_ref`:
//! `d` is the block's largest magnitude and each value rounds (half away
//! from zero, `lroundf`) to `x / d`. ggml's `quantize_tq1_0`/`quantize_tq2_0`
//! ignore importance weights, and so does [`super::quantize_weighted`].
//!
//! The dot products against Q8_K are ggml's `ggml_vec_dot_tq1_0_q8_K_generic`
//! and `ggml_vec_dot_tq2_0_q8_K_generic`: one exact integer sum per
//! super-block, scaled by `d_w * d_a` and added in block order.

use half::f16;
use tl_gguf::GgmlType;

use super::k_quants::{BlockQ8K, QK_K};
use super::Block;

/// Bytes of TQ1_0's five-trit part (`(QK_K - 4 * QK_K / 64) / 5`).
pub const TQ1_QS: usize = (QK_K - 4 * QK_K / 64) / 5;
/// Bytes of TQ1_0's four-trit part.
pub const TQ1_QH: usize = QK_K / 64;

/// `block_tq1_0`: 240 values at five trits per byte, 16 at four per byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockTQ1_0 {
    pub qs: [u8; TQ1_QS],
    pub qh: [u8; TQ1_QH],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockTQ1_0>() == 54);

/// `block_tq2_0`: 256 values at two bits each.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockTQ2_0 {
    pub qs: [u8; QK_K / 4],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockTQ2_0>() == 66);

/// ggml's `pow3`.
const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// The `n`-th trit (0, 1 or 2) of a TQ1_0 byte: `((q * 3^n mod 256) * 3) >> 8`.
#[inline(always)]
pub fn trit(q: u8, n: usize) -> i32 {
    let q = q.wrapping_mul(POW3[n]);
    i32::from((u16::from(q) * 3) >> 8)
}

/// The level ggml's quantizers give `x` scaled by `id`: `lroundf(x * id) + 1`
/// (0, 1 or 2 for |x| <= d). C's `lroundf` rounds halves away from zero, as
/// `f32::round` does; a NaN input (undefined in C) gives level 1 here.
#[inline(always)]
fn level(x: f32, id: f32) -> u8 {
    ((x * id).round() as i32 + 1) as u8
}

/// `d = max |x|` and its inverse (0 for an all-zero block), as ggml forms
/// them (its `MAX(a, b)` is `a > b ? a : b`, kept for NaN inputs).
fn scale(x: &[f32]) -> (f32, f32) {
    let mut amax = 0.0f32;
    for &v in &x[..QK_K] {
        amax = if amax > v.abs() { amax } else { v.abs() };
    }
    let id = if amax != 0.0 { 1.0 / amax } else { 0.0 };
    (amax, id)
}

/// Packs `N` trits into one byte as ggml does: the base-3 number of the
/// levels (first level most significant), scaled by 256/243 rounding up.
#[inline(always)]
fn pack_trits<const N: usize>(levels: [u8; N]) -> u8 {
    let mut q = 0u8;
    for l in levels {
        q = q.wrapping_mul(3).wrapping_add(l);
    }
    // Four trits are shifted up to the top of the five-trit number.
    if N == 4 {
        q = q.wrapping_mul(3);
    }
    // ggml: `(q * 256 + (243 - 1)) / 243`, a ceiling division.
    (u16::from(q) * 256).div_ceil(243) as u8
}

impl Block for BlockTQ1_0 {
    const TYPE: GgmlType = GgmlType::TQ1_0;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_tq1_0`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let mut i = 0;
        for n in 0..5 {
            for &q in &self.qs[..32] {
                y[i] = (trit(q, n) - 1) as f32 * d;
                i += 1;
            }
        }
        for n in 0..5 {
            for &q in &self.qs[32..] {
                y[i] = (trit(q, n) - 1) as f32 * d;
                i += 1;
            }
        }
        for n in 0..4 {
            for &q in &self.qh {
                y[i] = (trit(q, n) - 1) as f32 * d;
                i += 1;
            }
        }
    }

    /// ggml `quantize_row_tq1_0_ref`.
    fn quantize(x: &[f32]) -> Self {
        let (d, id) = scale(x);
        let mut b = BlockTQ1_0 {
            qs: [0; TQ1_QS],
            qh: [0; TQ1_QH],
            d: f16::from_f32(d),
        };
        for m in 0..32 {
            b.qs[m] = pack_trits::<5>(std::array::from_fn(|n| level(x[m + 32 * n], id)));
        }
        for m in 0..16 {
            b.qs[32 + m] = pack_trits::<5>(std::array::from_fn(|n| level(x[160 + m + 16 * n], id)));
        }
        for j in 0..TQ1_QH {
            b.qh[j] = pack_trits::<4>(std::array::from_fn(|n| level(x[240 + j + 4 * n], id)));
        }
        b
    }
}

impl Block for BlockTQ2_0 {
    const TYPE: GgmlType = GgmlType::TQ2_0;
    const VALUES: usize = QK_K;

    /// ggml `dequantize_row_tq2_0`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, half) in self.qs.chunks_exact(32).enumerate() {
            for l in 0..4 {
                for (m, &q) in half.iter().enumerate() {
                    let v = i32::from((q >> (2 * l)) & 3) - 1;
                    y[128 * j + 32 * l + m] = v as f32 * d;
                }
            }
        }
    }

    /// ggml `quantize_row_tq2_0_ref`.
    fn quantize(x: &[f32]) -> Self {
        let (d, id) = scale(x);
        let mut qs = [0u8; QK_K / 4];
        for (j, half) in qs.chunks_exact_mut(32).enumerate() {
            for (m, q) in half.iter_mut().enumerate() {
                for n in 0..4 {
                    let xi = level(x[128 * j + m + 32 * n], id);
                    *q = q.wrapping_add((xi & 3) << (2 * n));
                }
            }
        }
        BlockTQ2_0 {
            qs,
            d: f16::from_f32(d),
        }
    }
}

/// The integer dot of one TQ1_0 super-block with its 256 Q8_K quants, as
/// `ggml_vec_dot_tq1_0_q8_K_generic` forms it.
pub(crate) fn tq1_0_sum(x: &BlockTQ1_0, q8: &[i8; QK_K]) -> i32 {
    let mut sum = 0i32;
    for l in 0..5 {
        for m in 0..32 {
            sum += (trit(x.qs[m], l) - 1) * i32::from(q8[32 * l + m]);
        }
    }
    for l in 0..5 {
        for m in 0..16 {
            sum += (trit(x.qs[32 + m], l) - 1) * i32::from(q8[160 + 16 * l + m]);
        }
    }
    for l in 0..4 {
        for j in 0..TQ1_QH {
            sum += (trit(x.qh[j], l) - 1) * i32::from(q8[240 + 4 * l + j]);
        }
    }
    sum
}

/// The integer dot of one TQ2_0 super-block with its 256 Q8_K quants, as
/// `ggml_vec_dot_tq2_0_q8_K_generic` forms it.
pub(crate) fn tq2_0_sum(x: &BlockTQ2_0, q8: &[i8; QK_K]) -> i32 {
    let mut sum = 0i32;
    for j in 0..2 {
        for l in 0..4 {
            for k in 0..32 {
                let v = i32::from((x.qs[32 * j + k] >> (2 * l)) & 3) - 1;
                sum += i32::from(q8[128 * j + 32 * l + k]) * v;
            }
        }
    }
    sum
}

/// ggml `ggml_vec_dot_tq1_0_q8_K_generic`: `sumf += sum * (d_w * d_a)` per
/// super-block, in order.
pub fn dot_tq1_0_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, ab) in w
        .chunks_exact(std::mem::size_of::<BlockTQ1_0>())
        .zip(a.chunks_exact(std::mem::size_of::<BlockQ8K>()))
    {
        let x: BlockTQ1_0 = bytemuck::pod_read_unaligned(wb);
        let y: BlockQ8K = bytemuck::pod_read_unaligned(ab);
        sumf += tq1_0_sum(&x, &y.qs) as f32 * (x.d.to_f32() * y.d);
    }
    sumf
}

/// ggml `ggml_vec_dot_tq2_0_q8_K_generic`: `sumf += sumi * (d_a * d_w)` per
/// super-block, in order.
pub fn dot_tq2_0_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, ab) in w
        .chunks_exact(std::mem::size_of::<BlockTQ2_0>())
        .zip(a.chunks_exact(std::mem::size_of::<BlockQ8K>()))
    {
        let x: BlockTQ2_0 = bytemuck::pod_read_unaligned(wb);
        let y: BlockQ8K = bytemuck::pod_read_unaligned(ab);
        let d = y.d * x.d.to_f32();
        sumf += tq2_0_sum(&x, &y.qs) as f32 * d;
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte's five trits, read back, are the base-3 digits that
    /// `pack_trits` was given, for all 243 five-trit numbers and all 81
    /// four-trit ones.
    #[test]
    fn trits_round_trip() {
        for v in 0..243u32 {
            let digits: [u8; 5] = std::array::from_fn(|n| ((v / 3u32.pow(4 - n as u32)) % 3) as u8);
            let q = pack_trits::<5>(digits);
            for (n, &dgt) in digits.iter().enumerate() {
                assert_eq!(trit(q, n), i32::from(dgt), "{v} {n}");
            }
        }
        for v in 0..81u32 {
            let digits: [u8; 4] = std::array::from_fn(|n| ((v / 3u32.pow(3 - n as u32)) % 3) as u8);
            let q = pack_trits::<4>(digits);
            for (n, &dgt) in digits.iter().enumerate() {
                assert_eq!(trit(q, n), i32::from(dgt), "{v} {n}");
            }
        }
    }

    /// Ternary input with a unit maximum comes back exactly.
    #[test]
    fn ternary_values_round_trip() {
        let x: Vec<f32> = (0..QK_K)
            .map(|i| ((i * 7 + i / 5) % 3) as f32 - 1.0)
            .collect();
        let mut y = vec![0f32; QK_K];
        BlockTQ1_0::quantize(&x).dequantize(&mut y);
        assert_eq!(x, y);
        BlockTQ2_0::quantize(&x).dequantize(&mut y);
        assert_eq!(x, y);
    }
}
