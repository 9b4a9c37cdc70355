//! Times `tl_core::matmul` on the weight shapes of Qwen2.5 0.5B at m = 1
//! (decode) and m = 64 (prefill), printing the 10th-percentile and median
//! time per call, and at the 10th percentile GFLOP/s (2·m·n·k per call)
//! and GB/s of weight bytes read.
//!
//! For m = 1 the weights are "cold": enough copies of the matrix are
//! rotated that they cannot stay in the last-level cache (105 MiB on the
//! development machine), which is how decode reads them. m = 64 reuses one
//! copy: prefill is compute-bound and the weights stream once per call.
//!
//!     cargo run --release -p tl-core --example matmul_bench [-- ARGS]
//!
//! ARGS: `rayon` / `single` (threading; default the pool), `hot` (m = 1
//! without rotation), `m=N` (only that m; m ≤ 16 reads cold weights),
//! `types=A,B,…` (instead of the Qwen shapes, a 4864 × 896 matrix of each
//! named type, e.g. `types=Q4_0,TQ1_0,TQ2_0`). `TL_SIMD=avx2|scalar` picks a
//! lower kernel level, `TL_NUM_THREADS` the pool size.

use std::time::{Duration, Instant};

use tl_core::quant::dot::{row_bytes, simd_level};

#[path = "support/random_weights.rs"]
mod random_weights;
use random_weights::random_weights;
use tl_core::{matmul_with, GgmlType, MatmulScratch, Threading};

/// Bytes of weights rotated for cold reads: well above the L3 cache.
const COLD_BYTES: usize = 512 << 20;

/// Nanoseconds this thread has spent on a CPU (Linux schedstat), if known.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threading = if args.iter().any(|a| a == "rayon") {
        Threading::Rayon
    } else if args.iter().any(|a| a == "single") {
        Threading::Single
    } else {
        Threading::Pool
    };
    let hot = args.iter().any(|a| a == "hot");
    let only_m: Option<usize> = args
        .iter()
        .find_map(|a| a.strip_prefix("m=").and_then(|v| v.parse().ok()));
    let threads = match threading {
        Threading::Pool => tl_core::pool::ThreadPool::global().threads(),
        Threading::Rayon => rayon::current_num_threads(),
        Threading::Single => 1,
    };
    println!(
        "kernels {:?}, threading {threading:?} ({threads} threads), m=1 weights {}",
        simd_level(),
        if hot {
            "hot (one copy)"
        } else {
            "cold (rotated copies)"
        }
    );
    println!(
        "{:>6} {:>7} {:>5} {:>3} {:>10} {:>10} {:>10} {:>9} {:>8}",
        "k", "n", "type", "m", "p10 us", "median us", "cpu us", "GFLOP/s", "GB/s"
    );
    let mut shapes = vec![
        (896, 896, GgmlType::Q5_0),
        (896, 4864, GgmlType::Q5_0),
        (4864, 896, GgmlType::Q6_K),
        (4864, 896, GgmlType::Q4_K),
        (896, 151_936, GgmlType::Q8_0),
    ];
    if let Some(list) = args.iter().find_map(|a| a.strip_prefix("types=")) {
        shapes.clear();
        for name in list.split(',') {
            let Some(ty) = GgmlType::from_name(&name.to_ascii_uppercase()) else {
                eprintln!("unknown type {name}");
                std::process::exit(2);
            };
            shapes.push((4864, 896, ty));
        }
    }
    let mut scratch = MatmulScratch::new();
    for (k, n, ty) in shapes {
        let wbytes = row_bytes(ty, k).unwrap_or(0) * n;
        for m in only_m.map_or(vec![1usize, 64], |m| vec![m]) {
            // Decode-sized calls (batched decode included) read weights
            // from memory; prefill-sized ones are compute-bound.
            let copies = if m <= 16 && !hot {
                COLD_BYTES.div_ceil(wbytes).max(2)
            } else {
                1
            };
            let ws: Vec<Vec<u8>> = (0..copies)
                .map(|c| random_weights(ty, n, k, c as u64 + 1))
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut out = vec![0f32; m * n];
            let mut call = |i: usize| {
                let w = &ws[i % copies];
                if let Err(e) = matmul_with(threading, &x, m, k, w, ty, n, &mut out, &mut scratch) {
                    eprintln!("matmul failed: {e}");
                    std::process::exit(1);
                }
            };
            // Warm up (first touch of every copy, thread start-up).
            for i in 0..copies.max(3) {
                call(i);
            }
            // Per-call times; the 10th percentile stands for the machine's
            // speed when other processes leave it alone, the median for a
            // typical call.
            let budget = Duration::from_millis(if m <= 16 { 800 } else { 1500 });
            let start = Instant::now();
            let cpu0 = thread_cpu_ns();
            let mut times = Vec::new();
            while start.elapsed() < budget || times.len() < 7 {
                let t0 = Instant::now();
                call(times.len());
                times.push(t0.elapsed().as_secs_f64());
            }
            // On-CPU time of this thread per call: immune to being
            // descheduled, meaningful for single-threaded runs only.
            let cpu = match (cpu0, thread_cpu_ns()) {
                (Some(a), Some(b)) if threading == Threading::Single => {
                    format!("{:>10.1}", (b - a) as f64 / 1e3 / times.len() as f64)
                }
                _ => format!("{:>10}", "-"),
            };
            times.sort_by(f64::total_cmp);
            let p10 = times[times.len() / 10];
            let med = times[times.len() / 2];
            let flops = 2.0 * (m * n * k) as f64 / p10 / 1e9;
            let gbs = wbytes as f64 / p10 / 1e9;
            println!(
                "{k:>6} {n:>7} {:>5} {m:>3} {:>10.1} {:>10.1} {cpu} {flops:>9.1} {gbs:>8.2}",
                ty.name(),
                p10 * 1e6,
                med * 1e6
            );
        }
    }
}
