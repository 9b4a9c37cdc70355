//! Times `tl_core::matmul` on GGUF blocks against `tl_core::matmul_packed`
//! on the same weight repacked, for the Q5_0, Q8_0, Q6_K and Q4_K shapes of the real models,
//! at m = 1, 8 and 64 (weights hot in cache: this compares the kernels, not
//! memory). Prints the median microseconds per call of each and the ratio.
//!
//!     cargo run --release -p tl-core --example packed_bench

use std::time::Instant;

#[path = "support/random_weights.rs"]
mod random_weights;
use random_weights::random_weights;
use tl_core::{matmul, matmul_packed, GgmlType, MatmulScratch, PackedWeight};

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
        let w = random_weights(ty, n, k, 1);
        let p = PackedWeight::pack(ty, k, n, &w)?.ok_or("no packed kernels on this CPU")?;
        for m in [1usize, 8, 16, 24, 32, 64] {
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
