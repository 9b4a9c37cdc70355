//! The original 32-value GGML blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.
//!
//! Layouts from ggml `ggml-common.h`; algorithms from ggml `ggml-quants.c`
//! (`dequantize_row_*`, `quantize_row_*_ref`). Each block stores its first 16
//! values in the low nibbles of `qs` and the last 16 in the high nibbles.
//!
//! Products such as `x * d + m` are left unfused, as in gguf-py; a C build of
//! ggml that contracts them into an FMA can differ from this in the last bit.

use half::f16;
use tl_gguf::GgmlType;

use super::Block;

const QK: usize = 32;

/// `block_q4_0`: value = d * (q - 8), q in 0..16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(non_camel_case_types)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

/// `block_q4_1`: value = d * q + m, q in 0..16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(non_camel_case_types)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// `block_q5_0`: value = d * (q - 16), q in 0..32; bit 4 of value j is bit j
/// of the little-endian `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(non_camel_case_types)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

/// `block_q5_1`: value = d * q + m, q in 0..32, high bits as in Q5_0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(non_camel_case_types)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

/// `block_q8_0`: value = d * q.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(non_camel_case_types)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// `block_q8_1`: value = d * q, and `s = d * sum(q)` precomputed for the dot
/// products with Q4_1/Q5_1, whose `m` term needs the sum of the other side.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(non_camel_case_types)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

/// The value of largest magnitude, the first one on ties, with its sign:
/// the `amax`/`max` loop of `quantize_row_q4_0_ref` and `quantize_row_q5_0_ref`.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Minimum and maximum, starting from ±FLT_MAX as `quantize_row_q4_1_ref` does.
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Bit 4 of each of the 32 values packed into `qh` the way Q5_0/Q5_1 store it.
fn pack_high_bits(q: &[u8; QK]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= u32::from((v & 0x10) >> 4) << j;
    }
    qh.to_le_bytes()
}

impl Block for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const VALUES: usize = QK;

    /// ggml `dequantize_row_q4_0`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, &q) in self.qs.iter().enumerate() {
            let x0 = i32::from(q & 0x0F) - 8;
            let x1 = i32::from(q >> 4) - 8;
            y[j] = x0 as f32 * d;
            y[j + QK / 2] = x1 as f32 * d;
        }
    }

    /// ggml `quantize_row_q4_0_ref`: the scale maps the signed extreme to -8,
    /// so the other side gets the 8th level for free.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let d = signed_absmax(x) / -8.0;
        let id = inverse_or_zero(d);
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            // The C code truncates through int8_t before clamping; `as i8`
            // saturates instead, which only differs where the C cast is
            // undefined (NaN or out-of-range input).
            let xi0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
            let xi1 = ((x[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            *q = xi0 | (xi1 << 4);
        }
        Self {
            d: f16::from_f32(d),
            qs,
        }
    }
}

impl Block for BlockQ4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const VALUES: usize = QK;

    /// ggml `dequantize_row_q4_1`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let m = self.m.to_f32();
        for (j, &q) in self.qs.iter().enumerate() {
            let x0 = i32::from(q & 0x0F);
            let x1 = i32::from(q >> 4);
            y[j] = x0 as f32 * d + m;
            y[j + QK / 2] = x1 as f32 * d + m;
        }
    }

    /// ggml `quantize_row_q4_1_ref`.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inverse_or_zero(d);
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            let xi0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
            let xi1 = (((x[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
            *q = xi0 | (xi1 << 4);
        }
        Self {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qs,
        }
    }
}

impl Block for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const VALUES: usize = QK;

    /// ggml `dequantize_row_q5_0`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let qh = u32::from_le_bytes(self.qh);
        for (j, &q) in self.qs.iter().enumerate() {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = i32::from((q & 0x0F) | xh_0) - 16;
            let x1 = i32::from((q >> 4) | xh_1) - 16;
            y[j] = x0 as f32 * d;
            y[j + QK / 2] = x1 as f32 * d;
        }
    }

    /// ggml `quantize_row_q5_0_ref`.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let d = signed_absmax(x) / -16.0;
        let id = inverse_or_zero(d);
        let mut q = [0u8; QK];
        for (qi, &v) in q.iter_mut().zip(x) {
            *qi = ((v * id + 16.5) as i8).min(31) as u8;
        }
        let mut qs = [0u8; QK / 2];
        for (j, b) in qs.iter_mut().enumerate() {
            *b = (q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4);
        }
        Self {
            d: f16::from_f32(d),
            qh: pack_high_bits(&q),
            qs,
        }
    }
}

impl Block for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const VALUES: usize = QK;

    /// ggml `dequantize_row_q5_1`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let m = self.m.to_f32();
        let qh = u32::from_le_bytes(self.qh);
        for (j, &q) in self.qs.iter().enumerate() {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = i32::from((q & 0x0F) | xh_0);
            let x1 = i32::from((q >> 4) | xh_1);
            y[j] = x0 as f32 * d + m;
            y[j + QK / 2] = x1 as f32 * d + m;
        }
    }

    /// ggml `quantize_row_q5_1_ref`.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse_or_zero(d);
        let mut q = [0u8; QK];
        for (qi, &v) in q.iter_mut().zip(x) {
            // ggml casts straight to uint8_t here and gguf-py clips to 31;
            // they agree since the largest value lands on 31.5 at most.
            *qi = (((v - min) * id + 0.5) as u8).min(31);
        }
        let mut qs = [0u8; QK / 2];
        for (j, b) in qs.iter_mut().enumerate() {
            *b = (q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4);
        }
        Self {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qh: pack_high_bits(&q),
            qs,
        }
    }
}

/// The scale and quants shared by Q8_0 and Q8_1: `amax / 127`, and
/// `roundf` (halves away from zero, like `f32::round`).
fn quantize_q8(x: &[f32]) -> (f32, [i8; QK]) {
    let x = &x[..QK];
    // MAX(amax, fabsf(v)) as ggml writes it, NaN propagation included.
    let amax = x
        .iter()
        .fold(0.0f32, |a, v| if a > v.abs() { a } else { v.abs() });
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    let mut qs = [0i8; QK];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    (d, qs)
}

impl Block for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const VALUES: usize = QK;

    /// ggml `dequantize_row_q8_0`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (y, &q) in y.iter_mut().zip(&self.qs) {
            *y = f32::from(q) * d;
        }
    }

    /// ggml `quantize_row_q8_0_ref`.
    fn quantize(x: &[f32]) -> Self {
        let (d, qs) = quantize_q8(x);
        Self {
            d: f16::from_f32(d),
            qs,
        }
    }
}

impl Block for BlockQ8_1 {
    const TYPE: GgmlType = GgmlType::Q8_1;
    const VALUES: usize = QK;

    /// ggml has no `dequantize_row_q8_1` (Q8_1 only ever holds activations
    /// for dot products); this is the same `q * d` as Q8_0.
    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (y, &q) in y.iter_mut().zip(&self.qs) {
            *y = f32::from(q) * d;
        }
    }

    /// ggml `quantize_row_q8_1_ref`: `s` uses the f32 `d`, not its f16
    /// rounding.
    fn quantize(x: &[f32]) -> Self {
        let (d, qs) = quantize_q8(x);
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        Self {
            d: f16::from_f32(d),
            s: f16::from_f32(sum as f32 * d),
            qs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequant<B: Block>(b: &B) -> Vec<f32> {
        let mut y = vec![0.0; B::VALUES];
        b.dequantize(&mut y);
        y
    }

    #[test]
    fn q8_0_by_hand() {
        let mut qs = [0i8; QK];
        for (i, q) in qs.iter_mut().enumerate() {
            *q = i as i8 - 16;
        }
        qs[31] = 127;
        qs[30] = -128;
        let b = BlockQ8_0 {
            d: f16::from_f32(0.5),
            qs,
        };
        let y = dequant(&b);
        assert_eq!(y[0], -8.0); // -16 * 0.5
        assert_eq!(y[16], 0.0);
        assert_eq!(y[17], 0.5);
        assert_eq!(y[29], 6.5); // 13 * 0.5
        assert_eq!(y[30], -64.0);
        assert_eq!(y[31], 63.5);
    }

    #[test]
    fn q4_0_by_hand() {
        // Byte j holds value j in its low nibble and value j + 16 in its high
        // nibble; each value is d * (nibble - 8).
        let mut qs = [0u8; QK / 2];
        qs[0] = 0x0F; // value 0: 15 - 8 = 7, value 16: 0 - 8 = -8
        qs[1] = 0x80; // value 1: -8, value 17: 0
        qs[15] = 0x9A; // value 15: 10 - 8 = 2, value 31: 9 - 8 = 1
        let b = BlockQ4_0 {
            d: f16::from_f32(-0.25),
            qs,
        };
        let y = dequant(&b);
        assert_eq!(y[0], -1.75);
        assert_eq!(y[16], 2.0);
        assert_eq!(y[1], 2.0);
        assert_eq!(y[17], -0.0);
        assert_eq!(y[15], -0.5);
        assert_eq!(y[31], -0.25);
        // Untouched bytes are zero: nibble 0 is -8, times -0.25.
        assert_eq!(y[5], 2.0);
    }

    #[test]
    fn q5_0_high_bits_by_hand() {
        // qh bit j is bit 4 of value j.
        let b = BlockQ5_0 {
            d: f16::from_f32(1.0),
            qh: (1u32 << 3 | 1 << 20).to_le_bytes(),
            qs: [0x21; QK / 2],
        };
        let y = dequant(&b);
        assert_eq!(y[3], (16 + 1 - 16) as f32);
        assert_eq!(y[4], (1 - 16) as f32);
        assert_eq!(y[20], (16 + 2 - 16) as f32);
        assert_eq!(y[21], (2 - 16) as f32);
    }

    #[test]
    fn q4_0_quantize_by_hand() {
        // The extreme -4 maps to q = 0 with d = -4 / -8 = 0.5.
        let mut x = [0.0f32; QK];
        x[0] = -4.0;
        x[1] = 3.5;
        x[16] = 1.0;
        let b = BlockQ4_0::quantize(&x);
        assert_eq!(b.d.to_f32(), 0.5);
        // x * id + 8.5 with id = 2: -4 -> 0, 3.5 -> 15, 1 -> 10, 0 -> 8.
        assert_eq!(b.qs[0], 10 << 4);
        assert_eq!(b.qs[1], 0x8F);
        assert_eq!(b.qs[2], 0x88);
    }

    #[test]
    fn q8_1_sum_is_d_times_sum_of_quants() {
        let x: Vec<f32> = (0..QK).map(|i| (i as f32 - 10.3) * 0.71).collect();
        let b = BlockQ8_1::quantize(&x);
        let q8_0 = BlockQ8_0::quantize(&x);
        assert_eq!(b.qs, q8_0.qs);
        assert_eq!(b.d, q8_0.d);
        let sum: i32 = b.qs.iter().map(|&q| i32::from(q)).sum();
        let d = x.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
        assert_eq!(b.s, f16::from_f32(sum as f32 * d));
    }
}
