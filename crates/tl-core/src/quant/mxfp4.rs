//! MXFP4 (`block_mxfp4` of ggml, the OCP microscaling FP4 format): 32
//! values share one E8M0 exponent byte `e`; each value is a 4-bit E2M1 code
//! (sign, two exponent bits, one mantissa bit), value `j` in the low nibble
//! of byte `j`, value `j + 16` in its high nibble.
//!
//! As in ggml the codes index [`KVALUES_MXFP4`], the E2M1 values doubled
//! (0, 0.5, 1, 1.5, 2, 3, 4, 6 become the integers 0..12), and the scale is
//! halved to compensate ([`e8m0_to_f32_half`], `2^(e - 128)`): value =
//! `K[code] * 2^(e - 128)`. Integer levels make the dot product against
//! Q8_0 activations an integer sum per block, as for IQ4_NL.
//!
//! Quantization is ggml's `quantize_row_mxfp4_ref` (no importance weights:
//! ggml's `quantize_mxfp4` ignores them too).

use tl_gguf::GgmlType;

use super::legacy::BlockQ8_0;
use super::Block;

/// ggml `kvalues_mxfp4`: the E2M1 values times two.
pub const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

const QK_MXFP4: usize = 32;

/// `block_mxfp4`: value = K[q] * 2^(e - 128), q in 0..16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockMXFP4 {
    /// The shared E8M0 exponent.
    pub e: u8,
    pub qs: [u8; QK_MXFP4 / 2],
}
const _: () = assert!(std::mem::size_of::<BlockMXFP4>() == 17);

/// ggml `ggml_e8m0_to_fp32_half`: `2^(e - 128)`, built from its bits (the
/// two smallest exponents are subnormal).
pub fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (u32::from(e) - 1) << 23
    };
    f32::from_bits(bits)
}

/// The shared exponent ggml picks for a block whose largest magnitude is
/// `amax`: `(uint8_t)(floorf(log2f(amax)) - 2 + 127)`, or 0 for `amax` 0.
///
/// C leaves the conversion undefined outside 0..=255; x86 builds convert
/// through a 32-bit integer and keep its low byte (an out-of-range or
/// non-finite value gives the integer 0x80000000, so 0), which is done here
/// so that the bytes match ggml's on the machines it runs on. Only blocks
/// whose largest magnitude is below 2^-125 (or infinite) get there.
fn shared_exponent(amax: f32) -> u8 {
    if amax <= 0.0 {
        return 0;
    }
    let v = amax.log2().floor() - 2.0 + 127.0;
    if v.is_finite() && v >= i32::MIN as f32 && v < i32::MAX as f32 {
        (v as i32) as u8
    } else {
        0
    }
}

/// ggml `best_index_mxfp4`: the code whose level times `d` is nearest `x`
/// (the first of equals).
fn best_index(x: f32, d: f32) -> u8 {
    let mut best = 0u8;
    let mut best_err = (f32::from(KVALUES_MXFP4[0]) * d - x).abs();
    for (i, &k) in KVALUES_MXFP4.iter().enumerate().skip(1) {
        let err = (f32::from(k) * d - x).abs();
        if err < best_err {
            best = i as u8;
            best_err = err;
        }
    }
    best
}

impl Block for BlockMXFP4 {
    const TYPE: GgmlType = GgmlType::MXFP4;
    const VALUES: usize = QK_MXFP4;

    /// ggml `dequantize_row_mxfp4`.
    fn dequantize(&self, y: &mut [f32]) {
        let d = e8m0_to_f32_half(self.e);
        let (lo, hi) = y[..QK_MXFP4].split_at_mut(QK_MXFP4 / 2);
        for ((&q, a), b) in self.qs.iter().zip(lo).zip(hi) {
            *a = f32::from(KVALUES_MXFP4[usize::from(q & 0xF)]) * d;
            *b = f32::from(KVALUES_MXFP4[usize::from(q >> 4)]) * d;
        }
    }

    /// ggml `quantize_row_mxfp4_ref`.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK_MXFP4];
        let mut amax = 0.0f32;
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
            }
        }
        let e = shared_exponent(amax);
        let d = e8m0_to_f32_half(e);
        let mut qs = [0u8; QK_MXFP4 / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            *q = best_index(x[j], d) | (best_index(x[j + QK_MXFP4 / 2], d) << 4);
        }
        BlockMXFP4 { e, qs }
    }
}

/// The integer dot of one block's 32 codes with 32 activation quants.
fn block_sum(qs: &[u8; 16], q8: &[i8; 32]) -> i32 {
    let mut sumi1 = 0i32;
    let mut sumi2 = 0i32;
    for j in 0..16 {
        sumi1 += i32::from(q8[j]) * i32::from(KVALUES_MXFP4[usize::from(qs[j] & 0xF)]);
        sumi2 += i32::from(q8[j + 16]) * i32::from(KVALUES_MXFP4[usize::from(qs[j] >> 4)]);
    }
    sumi1 + sumi2
}

/// ggml `ggml_vec_dot_mxfp4_q8_0_generic`: the weight row `w` (MXFP4
/// blocks) against the activation row `a` (as many Q8_0 blocks); each
/// block's integer sum scaled by `d_a * 2^(e - 128)` and added in order.
pub fn dot_mxfp4_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let wsize = std::mem::size_of::<BlockMXFP4>();
    let asize = std::mem::size_of::<BlockQ8_0>();
    let mut sumf = 0.0f32;
    for (wb, ab) in w.chunks_exact(wsize).zip(a.chunks_exact(asize)) {
        let x: BlockMXFP4 = bytemuck::pod_read_unaligned(wb);
        let y: BlockQ8_0 = bytemuck::pod_read_unaligned(ab);
        let d = y.d.to_f32() * e8m0_to_f32_half(x.e);
        sumf += d * block_sum(&x.qs, &y.qs) as f32;
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_half_is_two_to_the_e_minus_128() {
        for e in 0..=254u8 {
            assert_eq!(
                e8m0_to_f32_half(e),
                2f64.powi(i32::from(e) - 128) as f32,
                "{e}"
            );
        }
    }

    #[test]
    fn levels_are_the_doubled_e2m1_values() {
        let e2m1 = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for (i, &v) in e2m1.iter().enumerate() {
            assert_eq!(f32::from(KVALUES_MXFP4[i]), 2.0 * v);
            assert_eq!(f32::from(KVALUES_MXFP4[i + 8]), -2.0 * v);
        }
    }

    #[test]
    fn representable_values_round_trip_exactly() {
        // Every level at one exponent: the largest magnitude (12 * d) sets
        // the exponent back to the same one.
        let d = e8m0_to_f32_half(130);
        let mut x = [0f32; 32];
        for (i, v) in x.iter_mut().enumerate() {
            *v = f32::from(KVALUES_MXFP4[i % 16]) * d;
        }
        let b = BlockMXFP4::quantize(&x);
        assert_eq!(b.e, 130);
        let mut y = [0f32; 32];
        b.dequantize(&mut y);
        assert_eq!(x, y);
    }

    #[test]
    fn round_trip_error_is_small_and_zero_is_zero() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        for xb in x.chunks_exact(32) {
            let mut y = [0f32; 32];
            BlockMXFP4::quantize(xb).dequantize(&mut y);
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            // The scale is d = 2^(floor(log2 amax) - 3), so amax < 16 d:
            // the step between the top levels (8 d, 12 d) and the clamp at
            // 12 d bound the error by 4 d; up to 8 d, by half a step, d.
            let d = 2f32.powf(amax.log2().floor() - 3.0);
            for (a, b) in xb.iter().zip(&y) {
                let bound = if a.abs() <= 8.0 * d { d } else { 4.0 * d };
                assert!((a - b).abs() <= bound, "{a} -> {b}, d {d}");
            }
        }
        let b = BlockMXFP4::quantize(&[0.0; 32]);
        assert_eq!(b.e, 0);
        let mut z = [1f32; 32];
        b.dequantize(&mut z);
        assert!(z.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn tiny_and_infinite_blocks_quantize_without_panicking() {
        assert_eq!(shared_exponent(f32::INFINITY), 0);
        assert_eq!(shared_exponent(1.0), 125);
        // Below 2^-125 the C conversion wraps on x86.
        assert_eq!(shared_exponent(2f32.powi(-126)), 255);
        let b = BlockMXFP4::quantize(&[f32::MIN_POSITIVE; 32]);
        let mut y = [1f32; 32];
        b.dequantize(&mut y);
        assert!(y.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn dot_is_the_sum_of_dequantized_products() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1)
            .collect();
        let a: Vec<f32> = (0..96)
            .map(|i| ((i * 7 % 31) as f32 - 15.0) * 0.05)
            .collect();
        let mut w = Vec::new();
        let mut act = Vec::new();
        let mut wf = vec![0f32; 96];
        let mut af = vec![0f32; 96];
        for i in 0..3 {
            let b = BlockMXFP4::quantize(&x[32 * i..32 * i + 32]);
            b.dequantize(&mut wf[32 * i..32 * i + 32]);
            w.extend_from_slice(bytemuck::bytes_of(&b));
            let q = BlockQ8_0::quantize(&a[32 * i..32 * i + 32]);
            q.dequantize(&mut af[32 * i..32 * i + 32]);
            act.extend_from_slice(bytemuck::bytes_of(&q));
        }
        let want: f32 = wf.iter().zip(&af).map(|(p, q)| p * q).sum();
        let got = dot_mxfp4_q8_0(&w, &act);
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
}
