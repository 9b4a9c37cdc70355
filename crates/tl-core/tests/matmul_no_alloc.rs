//! `tl_core::matmul` allocates nothing once its scratch (and each pool
//! thread's packed-weight buffer) has grown to the shapes in use: decode
//! (m = 1), small tiles and prefill (m = 64, the packed path on VNNI), for
//! each kind of kernel. Counted by a global allocator wrapper over all
//! threads, the pool's workers included.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tl_core::quant::dot::row_bytes;
use tl_core::{matmul, GgmlType, MatmulScratch};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the counter is a static
// atomic, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_matmuls_allocate_nothing() {
    let shapes = [
        (GgmlType::Q5_0, 896, 96),
        (GgmlType::Q8_0, 896, 70),
        (GgmlType::Q4_K, 512, 40),
        (GgmlType::Q6_K, 512, 40),
        (GgmlType::F16, 128, 33),
    ];
    let weights: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(ty, k, n)| {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 997) as f32 / 500.0 - 1.0)
                .collect();
            let wb = row_bytes(ty, k).unwrap();
            let mut w = vec![0u8; wb * n];
            for (xr, wr) in x.chunks_exact(k).zip(w.chunks_exact_mut(wb)) {
                tl_core::quant::quantize(ty, xr, wr).unwrap();
            }
            w
        })
        .collect();
    let x: Vec<f32> = (0..64 * 896)
        .map(|i| ((i * 31) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut out = vec![0f32; 64 * 96];
    let mut scratch = MatmulScratch::new();
    let mut pass = |scratch: &mut MatmulScratch| {
        for ((ty, k, n), w) in shapes.iter().zip(&weights) {
            for m in [1, 3, 64, 1] {
                matmul(&x, m, *k, w, *ty, *n, &mut out, scratch).unwrap();
            }
        }
    };
    // Grows the scratch, starts the pool, and lets every worker grow its
    // buffer (chunks go to whichever thread claims them, so a few rounds).
    for _ in 0..8 {
        pass(&mut scratch);
    }
    // The counter sees every thread of the process, the test harness's
    // too, which now and then allocates on its own; a matmul that allocated
    // would do so in every round, so one clean round of several proves the
    // steady state.
    let mut counts = Vec::new();
    for _ in 0..5 {
        let before = ALLOCS.load(Ordering::SeqCst);
        for _ in 0..4 {
            pass(&mut scratch);
        }
        counts.push(ALLOCS.load(Ordering::SeqCst) - before);
        if counts.last() == Some(&0) {
            return;
        }
    }
    panic!("allocations in steady state, per round: {counts:?}");
}
