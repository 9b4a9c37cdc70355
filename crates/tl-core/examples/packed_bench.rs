//! Times `tl_core::matmul` on GGUF blocks against `tl_core::matmul_packed`
//! on the same weight repacked, for the Q5_0, Q8_0, Q6_K and Q4_K shapes of the real models,
//! at m = 1, 8 and 64 (weights hot in cache: this compares the kernels, not
//! memory). Prints the median microseconds per call of each and the ratio.
//!
//!     cargo run --release -p tl-core --example packed_bench

use std::time::Instant;

use tl_core::quant::dot::row_bytes;
use tl_core::{matmul, matmul_packed, GgmlType, MatmulScratch, PackedWeight};

fn weights(ty: GgmlType, n: usize, k: usize) -> Vec<u8> {
    let wb = row_bytes(ty, k).unwrap_or(0);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut w: Vec<u8> = (0..wb * n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let fields: &[usize] = match ty {
        GgmlType::Q6_K => &[208],
        GgmlType::Q4_K => &[0, 2],
        _ => &[0],
    };
    for b in w.chunks_exact_mut(ty.type_size()) {
        for &at in fields {
            b[at..at + 2].copy_from_slice(&scale);
        }
    }
    w
}

fn median_us(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("| shape (k x n, type) | m | blocks us | packed us | blocks / packed |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (ty, k, n) in [
        (GgmlType::Q6_K, 4864, 896),
        (GgmlType::Q4_K, 4864, 896),
        (GgmlType::Q5_0, 896, 4864),
        (GgmlType::Q5_0, 896, 896),
        (GgmlType::Q8_0, 896, 128),
        (GgmlType::Q8_0, 640, 32768),
        // Qwen's output matrix: 145 MB, far above the L3, so it streams
        // from memory at every call.
        (GgmlType::Q8_0, 896, 151936),
    ] {
        let w = weights(ty, n, k);
        let p = PackedWeight::pack(ty, k, n, &w)?.ok_or("no packed kernels on this CPU")?;
        for m in [1usize, 8, 64] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
                .collect();
            let mut out = vec![0f32; m * n];
            let mut s = MatmulScratch::new();
            let reps = if m == 64 || n > 100_000 { 10 } else { 200 };
            let a = median_us(
                || matmul(&x, m, k, &w, ty, n, &mut out, &mut s).unwrap_or(()),
                reps,
            );
            let b = median_us(
                || matmul_packed(&x, m, &p, &mut out, &mut s).unwrap_or(()),
                reps,
            );
            println!("| {k} x {n} {ty} | {m} | {a:.1} | {b:.1} | {:.2}x |", a / b);
        }
    }
    Ok(())
}
