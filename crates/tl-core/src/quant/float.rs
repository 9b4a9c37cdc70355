//! F32, F16 and BF16: one value per element, little-endian.
//!
//! The conversions are `half`'s, which round to nearest-even like ggml's
//! `GGML_FP32_TO_FP16` and `ggml_compute_fp32_to_bf16` (ggml-impl.h), NaN
//! handling of the bf16 path included (quiet bit forced, payload kept); the
//! fixtures in `tests/quant_fixtures.rs` hold them to gguf-py's port of those.
//!
//! Callers have checked that `src` and `dst` hold the same number of elements.

use half::{bf16, f16};

pub(crate) fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub(crate) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

/// ggml `ggml_compute_bf16_to_fp32`: the 16 bits become the high half of an
/// f32. Done by hand because `half`'s `bf16::to_f32` sets the quiet bit of a
/// signalling NaN, which ggml (and gguf-py) pass through unchanged.
pub(crate) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

pub(crate) fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
        b.copy_from_slice(&x.to_le_bytes());
    }
}

pub(crate) fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
    }
}

pub(crate) fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan_quiet() {
        let cases: [(u32, u16); 6] = [
            (0x3F80_8000, 0x3F80), // tie, even stays
            (0x3F81_8000, 0x3F82), // tie, odd rounds up
            (0x3F80_8001, 0x3F81), // above the tie
            (0x7F7F_FFFF, 0x7F80), // rounds to infinity, as ggml does
            (0x7F80_0001, 0x7FC0), // signalling NaN made quiet
            (0xFFC1_2345, 0xFFC1), // quiet NaN keeps its payload's top bits
        ];
        for (bits, want) in cases {
            let mut out = [0u8; 2];
            quantize_bf16(&[f32::from_bits(bits)], &mut out);
            assert_eq!(u16::from_le_bytes(out), want, "{bits:#010x}");
        }
    }

    #[test]
    fn f16_round_trip_is_exact_on_f16_values() {
        // 2^-24 is the smallest f16 subnormal.
        let tiny = f32::from_bits(0x3380_0000);
        let x = [0.0f32, -0.0, 1.0, -2.5, 65504.0, tiny, f32::INFINITY];
        let mut q = [0u8; 14];
        quantize_f16(&x, &mut q);
        let mut y = [0f32; 7];
        dequantize_f16(&q, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }
}
