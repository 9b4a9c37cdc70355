//! Random weights for the matmul examples: random level bytes, then a
//! small finite scale in the f16 fields of each block (so timings see
//! ordinary values).

use tl_core::quant::dot::row_bytes;
use tl_core::GgmlType;

pub fn random_weights(ty: GgmlType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let wb = row_bytes(ty, k).unwrap_or(0);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes: Vec<u8> = (0..wb * n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let fields: &[usize] = match ty {
        GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q4_0 => &[0],
        GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::TQ1_0 => &[52],
        GgmlType::TQ2_0 => &[64],
        _ => &[],
    };
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    for block in bytes.chunks_exact_mut(ty.type_size()) {
        for &at in fields {
            block[at..at + 2].copy_from_slice(&scale);
        }
    }
    bytes
}
