//! A decode step built from `_into` / `_inplace` ops allocates nothing once
//! its buffers exist: counted by a global allocator wrapper, per thread so
//! the test harness's own threads do not interfere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tl_core::{Activation, Backend, CpuBackend, DType, Result, RopeConfig, RopeMode, Tensor};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the counter is a
// const-initialized thread-local `Cell`, which itself never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded as received (see the impl's comment).
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded as received (see the impl's comment).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCS.with(|c| c.get())
}

/// Buffers of a toy one-layer model, allocated once.
struct Step {
    embd: Tensor,
    norm: Tensor,
    wq: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    ids: Tensor,
    pos: Tensor,
    x: Tensor,
    xb: Tensor,
    q: Tensor,
    scores: Tensor,
    gate: Tensor,
    up: Tensor,
    logits: Tensor,
    next: Tensor,
}

const D: usize = 8;
const HEADS: usize = 2;
const FF: usize = 16;
const VOCAB: usize = 10;

fn weights(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.37).sin() * 0.5)
        .collect()
}

impl Step {
    fn new(b: &dyn Backend) -> Result<Self> {
        Ok(Step {
            embd: Tensor::from_vec(weights(VOCAB * D, 1.0), &[VOCAB, D])?,
            norm: Tensor::from_vec(vec![1.0; D], &[D])?,
            wq: Tensor::from_vec(weights(D * D, 2.0), &[D, D])?,
            w_up: Tensor::from_vec(weights(FF * D, 3.0), &[FF, D])?,
            w_down: Tensor::from_vec(weights(D * FF, 4.0), &[D, FF])?,
            ids: b.zeros(DType::I32, &[1])?,
            pos: b.zeros(DType::I32, &[1])?,
            x: b.zeros(DType::F32, &[1, D])?,
            xb: b.zeros(DType::F32, &[1, D])?,
            q: b.zeros(DType::F32, &[1, D])?,
            scores: b.zeros(DType::F32, &[HEADS, 1, 4])?,
            gate: b.zeros(DType::F32, &[1, FF])?,
            up: b.zeros(DType::F32, &[1, FF])?,
            logits: b.zeros(DType::F32, &[1, VOCAB])?,
            next: b.zeros(DType::I32, &[1])?,
        })
    }

    fn run(&mut self, b: &dyn Backend, token: i32, position: i32) -> Result<()> {
        self.ids.copy_from_slice(&[token])?;
        self.pos.copy_from_slice(&[position])?;
        b.embedding_into(&self.embd, &self.ids, &mut self.x)?;
        b.rms_norm_into(&self.x, &self.norm, 1e-6, &mut self.xb)?;
        b.matmul_into(&self.xb, &self.wq, &mut self.q)?;
        let mut q_heads = self.q.reshape(&[1, HEADS, D / HEADS])?;
        let rope = RopeConfig::new(RopeMode::Neox, D / HEADS, 10000.0);
        b.rope_inplace(&mut q_heads, &self.pos, None, &rope)?;
        b.scale_inplace(&mut self.scores, 0.5)?;
        b.softmax_causal_inplace(&mut self.scores, 3)?;
        b.add_inplace(&mut self.x, &self.q)?;
        b.rms_norm_into(&self.x, &self.norm, 1e-6, &mut self.xb)?;
        b.matmul_into(&self.xb, &self.w_up, &mut self.gate)?;
        b.matmul_into(&self.xb, &self.w_up, &mut self.up)?;
        b.gated_inplace(Activation::Silu, &mut self.gate, &self.up)?;
        b.matmul_into(&self.gate, &self.w_down, &mut self.xb)?;
        b.add_inplace(&mut self.x, &self.xb)?;
        b.matmul_into(&self.x, &self.embd, &mut self.logits)?;
        b.argmax_into(&self.logits, &mut self.next)
    }
}

#[test]
fn decode_step_allocates_nothing() -> Result<()> {
    let b: &dyn Backend = &CpuBackend;
    let mut step = Step::new(b)?;
    // The first step grows this thread's scratch buffers.
    step.run(b, 3, 0)?;
    let before = allocations();
    for p in 1..5 {
        step.run(b, p, p)?;
    }
    assert_eq!(allocations() - before, 0, "allocations during decode steps");
    // The counter does see allocations: the allocating form of an op makes one.
    let before = allocations();
    let _ = b.softmax(&step.scores)?;
    assert!(allocations() > before);
    Ok(())
}
