//! `out[m, n] = x[m, k] · W[n, k]ᵀ` against a weight in its GGUF block
//! format, the way ggml-cpu's `ggml_compute_forward_mul_mat` does it: the
//! f32 activations are quantized once to the weight type's vec-dot type
//! (into a reusable [`MatmulScratch`]), then every output is a quantized dot
//! product ([`crate::quant::dot`]).
//!
//! Work is split over weight rows: chunks of rows are claimed one at a time
//! by the threads, so none idles while rows remain. Within a chunk, each
//! weight row is dotted with up to [`MAX_TILE`] activation rows per kernel
//! call, so a weight block is loaded and unpacked once for all of them —
//! what makes prefill (m > 1) cheaper per token than decode.
//!
//! # Threads: the persistent pool against rayon
//!
//! Decode (m = 1) issues ~170 matmuls per token, each only tens of
//! microseconds long, so the cost of waking threads matters. Measured with
//! `examples/matmul_bench.rs m=1` (and `rayon`), runs alternated, on the
//! 2-core AMD EPYC (AVX-512 VNNI) of 2026-12-01 while neighbours loaded the
//! machine, AVX-512 VNNI kernels on the GGUF blocks, weights cold in memory
//! (rotated copies larger than L3), median microseconds per call over two
//! runs each:
//!
//! | shape (k x n, type)   | pool, 2 threads | rayon, 2 threads |
//! |-----------------------|-----------------|------------------|
//! | 896 x 896 Q5_0        | 47.3, 41.5      | 42.6, 42.5       |
//! | 896 x 4864 Q5_0       | 139.5, 173.2    | 165.5, 196.0     |
//! | 4864 x 896 Q6_K       | 125.1, 136.2    | 137.3, 133.5     |
//! | 4864 x 896 Q4_K       | 104.3, 114.9    | 134.6, 124.6     |
//! | 896 x 151936 Q8_0     | 4480, 4924      | 4851, 5282       |
//!
//! The pool is as fast or faster on every shape but the smallest, where the
//! two are within the noise; it also spins briefly before parking, so a
//! decode step's back-to-back matmuls find their workers awake.
//!
//! The pool is the default ([`Threading::Pool`]); [`matmul_with`] takes
//! rayon or a single thread for comparison.

use std::ops::Range;

use tl_gguf::GgmlType;

use crate::error::{CoreError, Result};
use crate::pool::ThreadPool;
use crate::quant::dot::{
    self, check_kernel_args, prepare_extras, row_bytes, vec_dot_type, Acts, MAX_TILE,
};

/// Reusable buffers of [`matmul`]: the quantized activations and their
/// per-block extras. They grow to the largest matmul seen and are reused,
/// so a steady decode or prefill loop allocates nothing.
#[derive(Default)]
pub struct MatmulScratch {
    pub(crate) act: Vec<u8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) sums: Vec<i32>,
    /// Activations in the packed layout of the AVX-512 prefill path.
    #[cfg(target_arch = "x86_64")]
    pub(crate) packed: crate::quant::dot::x86::gemm::PackedActs,
    /// One packed weight panel per thread of the packed path; a chunk takes
    /// whichever is free.
    #[cfg(target_arch = "x86_64")]
    pub(crate) panels: Vec<std::sync::Mutex<crate::quant::dot::x86::gemm::PanelBuf>>,
}

impl MatmulScratch {
    pub fn new() -> MatmulScratch {
        MatmulScratch::default()
    }
}

/// How [`matmul_with`] spreads the rows over threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threading {
    /// [`ThreadPool::global`]: spin-then-park workers (the default).
    Pool,
    /// rayon's global pool.
    Rayon,
    /// The calling thread only.
    Single,
}

/// `out[i * n + r] = dot(x[i * k..][..k], W row r)` for `i < m`, `r < n`,
/// where `w` holds `n` rows of `k` values of type `ty` (exactly). `x` and
/// `out` may be longer than `m * k` and `m * n`; the rest is left alone.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    ty: GgmlType,
    n: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<()> {
    matmul_with(Threading::Pool, x, m, k, w, ty, n, out, scratch)
}

/// Checks that `x` holds `[m, k]` and `out` `[m, n]` values (or more).
pub(crate) fn check_x_out(x: &[f32], m: usize, k: usize, out: &[f32], n: usize) -> Result<()> {
    let too_small = |what: String| CoreError::SizeMismatch { op: "matmul", what };
    if m.checked_mul(k).is_none_or(|need| x.len() < need) {
        return Err(too_small(format!(
            "x holds {} values, [{m}, {k}] needed",
            x.len()
        )));
    }
    if m.checked_mul(n).is_none_or(|need| out.len() < need) {
        return Err(too_small(format!(
            "out holds {} values, [{m}, {n}] needed",
            out.len()
        )));
    }
    Ok(())
}

/// A raw output pointer shared by the threads; each writes only the
/// columns of its own weight rows.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: the threads write disjoint elements (distinct weight rows `r`
// give distinct `i * n + r`), and `matmul_with` does not touch `out` until
// they are all done.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// [`matmul`] with a choice of [`Threading`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    threading: Threading,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    ty: GgmlType,
    n: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<()> {
    let table = dot::table();
    let kernel = table.kernel(ty).ok_or_else(|| CoreError::UnsupportedType {
        ty,
        tensor: crate::quant::UNNAMED.to_owned(),
    })?;
    let act_ty = vec_dot_type(ty);
    let partial = |t: GgmlType| CoreError::PartialBlock {
        op: "matmul",
        ty: t,
        len: k,
        block: t.block_size(),
    };
    let wb = row_bytes(ty, k).ok_or_else(|| partial(ty))?;
    let ab = row_bytes(act_ty, k).ok_or_else(|| partial(act_ty))?;
    check_x_out(x, m, k, out, n)?;
    let too_small = |what: String| CoreError::SizeMismatch { op: "matmul", what };
    if n.checked_mul(wb) != Some(w.len()) {
        return Err(too_small(format!(
            "weight of {n} rows of {k} {ty} values takes {} bytes, got {}",
            n.saturating_mul(wb),
            w.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return Ok(());
    }

    // Quantize the activations once (in parallel when there are many).
    let legacy = matches!(act_ty, GgmlType::Q8_0 | GgmlType::Q8_1);
    let nb = if legacy { k / 32 } else { 0 };
    quantize_acts(threading, x, m, k, ty, ab, nb, scratch);
    let acts = Acts {
        bytes: &scratch.act,
        row_bytes: ab,
        nb,
        d: &scratch.d,
        s: &scratch.s,
        sums: &scratch.sums,
    };
    // One check covers every tile: all m rows and their extras are there.
    for i0 in (0..m).step_by(MAX_TILE) {
        check_kernel_args(ty, k, &w[..wb], &acts, i0, (m - i0).min(MAX_TILE))?;
    }

    // Prefill of the 32-value types under VNNI: the packed micro-kernel.
    #[cfg(target_arch = "x86_64")]
    let packed = if legacy
        && !matches!(ty, GgmlType::IQ4_NL | GgmlType::MXFP4)
        && m > PACKED_FROM
        && table.level >= dot::SimdLevel::Avx512Vnni
        && packed_prefill_enabled()
    {
        let q8_1 = act_ty == GgmlType::Q8_1;
        crate::quant::dot::x86::gemm::pack_acts(&acts, m, q8_1, &mut scratch.packed);
        Some(&scratch.packed)
    } else {
        None
    };

    let threads = match threading {
        Threading::Pool => ThreadPool::global().threads(),
        Threading::Rayon => rayon::current_num_threads(),
        Threading::Single => 1,
    };
    #[cfg(target_arch = "x86_64")]
    if packed.is_some() {
        // At most `threads` chunks run at once, so one panel each suffices.
        size_panels(&mut scratch.panels, threads, nb);
    }
    #[cfg(target_arch = "x86_64")]
    let panels = &scratch.panels;
    let rows_per_chunk = chunk_rows(n, m, threads, wb);
    #[cfg(target_arch = "x86_64")]
    let rows_per_chunk = if packed.is_some() {
        let panel = crate::quant::dot::x86::gemm::PANEL;
        n.div_ceil(16 * threads).div_ceil(panel).max(1) * panel
    } else {
        rows_per_chunk
    };
    let n_chunks = n.div_ceil(rows_per_chunk);
    let outp = OutPtr(out.as_mut_ptr());
    let job = |c: usize| {
        let rows = c * rows_per_chunk..((c + 1) * rows_per_chunk).min(n);
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = packed {
            // SAFETY: the level is AVX-512 VNNI (checked above, from the
            // detected features); `acts` passed the checks for all m rows
            // and `p` was packed from it; chunks hold disjoint rows.
            let done = with_free_panel(panels, |buf| unsafe {
                crate::quant::dot::x86::gemm::legacy_rows_for(
                    buf,
                    ty,
                    k,
                    crate::quant::dot::x86::gemm::Src::Blocks(w),
                    &acts,
                    p,
                    m,
                    n,
                    rows.clone(),
                    outp.get(),
                )
            });
            if done {
                return;
            }
        }
        // SAFETY: see `rows_into`.
        unsafe { rows_into(kernel, k, w, wb, &acts, m, n, rows, outp) };
    };
    if threads > 1 && n_chunks > 1 {
        run(threading, n_chunks, &job);
    } else {
        (0..n_chunks).for_each(job);
    }
    Ok(())
}

/// Runs `f` on a free panel buffer of `panels`: there are as many as
/// threads, and a thread holds one only while it runs a chunk.
#[cfg(target_arch = "x86_64")]
pub(crate) fn with_free_panel<R>(
    panels: &[std::sync::Mutex<crate::quant::dot::x86::gemm::PanelBuf>],
    f: impl FnOnce(&mut crate::quant::dot::x86::gemm::PanelBuf) -> R,
) -> R {
    let mut buf = loop {
        if let Some(b) = panels.iter().find_map(|b| match b.try_lock() {
            Ok(g) => Some(g),
            // A panel is rewritten before each use, so a poisoned one is
            // as good as any.
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }) {
            break b;
        }
        std::hint::spin_loop();
    };
    f(&mut buf)
}

/// Sizes one panel buffer per thread for rows of `nb` blocks.
#[cfg(target_arch = "x86_64")]
pub(crate) fn size_panels(
    panels: &mut Vec<std::sync::Mutex<crate::quant::dot::x86::gemm::PanelBuf>>,
    threads: usize,
    nb: usize,
) {
    panels.resize_with(threads.max(1), Default::default);
    for p in panels.iter_mut() {
        p.get_mut().unwrap_or_else(|e| e.into_inner()).size_for(nb);
    }
}

/// Quantizes the `m` rows of `k` values of `x` into `scratch` for weight
/// type `ty` (`ab` bytes per row; `nb` blocks of extras per row for the
/// 32-value types, else 0), with their per-block extras. The caller checked
/// that `x` holds `m * k` values of whole blocks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_acts(
    threading: Threading,
    x: &[f32],
    m: usize,
    k: usize,
    ty: GgmlType,
    ab: usize,
    nb: usize,
    scratch: &mut MatmulScratch,
) {
    scratch.act.resize(m * ab, 0);
    scratch.d.resize(m * nb, 0.0);
    scratch.s.resize(m * nb, 0.0);
    scratch.sums.resize(m * nb, 0);
    {
        let act = OutBytes(scratch.act.as_mut_ptr());
        let quantize_row = |i: usize| {
            // SAFETY: row `i` of `act` (`ab` bytes at `i * ab`, inside the
            // `m * ab` just sized) is written by this call only.
            let row = unsafe { std::slice::from_raw_parts_mut(act.get().add(i * ab), ab) };
            // Sizes were checked by the caller, so this cannot fail.
            let _ = dot::quantize_activations(ty, &x[i * k..(i + 1) * k], row);
        };
        if m * k >= 1 << 15 && threading != Threading::Single {
            run(threading, m, &quantize_row);
        } else {
            (0..m).for_each(quantize_row);
        }
    }
    prepare_extras(
        vec_dot_type(ty),
        &scratch.act,
        &mut scratch.d,
        &mut scratch.s,
        &mut scratch.sums,
    );
}

/// Above this many activation rows the 32-value types take the packed path:
/// measured with `examples/matmul_bench` at m = 8 (2026-12), packing beats
/// 8-row tiles there (Q8_0 896 x 151936: 18 ms against 24 ms), while the
/// K-quants, which have no packed path, gain from 8-row tiles over two of 4
/// (Q6_K 4864 x 896: 620 us against 850 us).
#[cfg(target_arch = "x86_64")]
pub(crate) const PACKED_FROM: usize = 4;

#[cfg(target_arch = "x86_64")]
/// The packed prefill path is on unless `TL_PACKED_PREFILL=0` (for
/// comparisons).
fn packed_prefill_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !crate::numerics::reference()
            && std::env::var("TL_PACKED_PREFILL").map_or(true, |v| v != "0")
    })
}

#[derive(Clone, Copy)]
struct OutBytes(*mut u8);
// SAFETY: each activation row is written by exactly one task (see the
// quantization loop of `matmul_with`).
unsafe impl Send for OutBytes {}
unsafe impl Sync for OutBytes {}
impl OutBytes {
    fn get(self) -> *mut u8 {
        self.0
    }
}

impl OutPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

pub(crate) fn run(threading: Threading, n: usize, f: &(dyn Fn(usize) + Sync)) {
    match threading {
        Threading::Pool => ThreadPool::global().run(n, f),
        Threading::Rayon => {
            use rayon::prelude::*;
            (0..n).into_par_iter().for_each(f);
        }
        Threading::Single => (0..n).for_each(f),
    }
}

/// Weight rows per claimed chunk. For one activation row (decode) about 16
/// chunks per thread, so the last chunks to finish are short, but at least
/// 4 rows so that claiming stays negligible. With more activation rows a
/// chunk is sized to stay in L1 (about 16 KiB of weights) while every
/// activation tile passes over it.
pub(crate) fn chunk_rows(n: usize, m: usize, threads: usize, wb: usize) -> usize {
    let balanced = n.div_ceil(16 * threads).max(1);
    if m <= MAX_TILE {
        return balanced.clamp(4.min(n), 1024);
    }
    let l1 = ((16 << 10) / wb.max(1)).max(1);
    balanced.min(l1)
}

/// Dots weight rows `rows` with all `m` activation rows, writing
/// `out[i * n + r]`.
///
/// # Safety
///
/// `check_kernel_args` passed for every tile of `acts` (all `m` rows), `w`
/// holds `n` rows of `wb` bytes, `rows` lies within `0..n`, `out` points at
/// `m * n` writable f32 of which no other thread writes columns `rows`, and
/// `kernel` is from the table of a level the CPU runs.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_into(
    kernel: dot::Kernel,
    k: usize,
    w: &[u8],
    wb: usize,
    acts: &Acts<'_>,
    m: usize,
    n: usize,
    rows: Range<usize>,
    out: OutPtr,
) {
    let mut tile = [0f32; MAX_TILE];
    // Activation tiles outside, weight rows inside: the chunk's weights and
    // one tile of activations both stay in L1.
    for i0 in (0..m).step_by(MAX_TILE) {
        let t = (m - i0).min(MAX_TILE);
        for r in rows.clone() {
            let w_row = &w[r * wb..(r + 1) * wb];
            kernel(k, w_row, acts, i0, &mut tile[..t]);
            for (j, &v) in tile[..t].iter().enumerate() {
                *out.get().add((i0 + j) * n + r) = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::quant::dot::{quantize_activations, vec_dot};

    fn weights(ty: GgmlType, n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let x: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut w = vec![0u8; row_bytes(ty, k).unwrap() * n];
        for (xr, wr) in x
            .chunks_exact(k)
            .zip(w.chunks_exact_mut(row_bytes(ty, k).unwrap()))
        {
            crate::quant::quantize(ty, xr, wr).unwrap();
        }
        w
    }

    /// Every output equals the single-row `vec_dot` of its row pair, bit for
    /// bit, whatever the threading and tile.
    #[test]
    fn matmul_is_vec_dot_of_each_pair() {
        use GgmlType::*;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (ty, k) in [
            (Q5_0, 96),
            (Q5_0, 896),
            (Q8_0, 64),
            (Q8_0, 448),
            (Q4_0, 320),
            (Q4_0, 128),
            (Q4_1, 32),
            (Q4_1, 384),
            (Q5_1, 64),
            (Q5_1, 480),
            (Q4_K, 512),
            (Q6_K, 256),
            (Q5_K, 256),
            (Q3_K, 256),
            (Q2_K, 256),
            (IQ4_NL, 96),
            (IQ4_NL, 320),
            (IQ4_XS, 512),
            (MXFP4, 96),
            (MXFP4, 320),
            (TQ1_0, 256),
            (TQ2_0, 512),
            (F16, 37),
            (F32, 19),
            (BF16, 8),
        ] {
            for (m, n) in [
                (1, 1),
                (1, 37),
                (2, 9),
                (3, 5),
                (6, 70),
                (8, 21),
                (9, 13),
                (15, 35),
            ] {
                let w = weights(ty, n, k, &mut rng);
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
                let act_ty = vec_dot_type(ty);
                let ab = row_bytes(act_ty, k).unwrap();
                let wb = row_bytes(ty, k).unwrap();
                let mut want = vec![0f32; m * n];
                for i in 0..m {
                    let mut a = vec![0u8; ab];
                    quantize_activations(ty, &x[i * k..(i + 1) * k], &mut a).unwrap();
                    for r in 0..n {
                        want[i * n + r] = vec_dot(ty, k, &w[r * wb..(r + 1) * wb], &a);
                    }
                }
                let mut scratch = MatmulScratch::new();
                for threading in [Threading::Pool, Threading::Rayon, Threading::Single] {
                    let mut out = vec![f32::NAN; m * n + 3];
                    matmul_with(threading, &x, m, k, &w, ty, n, &mut out, &mut scratch).unwrap();
                    for (j, (g, e)) in out.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "{ty} k={k} {threading:?} m={m} n={n} #{j}"
                        );
                    }
                    assert!(out[m * n..].iter().all(|v| v.is_nan()), "wrote past m * n");
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut s = MatmulScratch::new();
        let w = vec![0u8; 34 * 2];
        let x = vec![0f32; 64];
        let mut out = vec![0f32; 4];
        let ok = matmul(&x, 2, 32, &w, GgmlType::Q8_0, 2, &mut out, &mut s);
        assert!(ok.is_ok());
        assert!(matmul(&x, 3, 32, &w, GgmlType::Q8_0, 2, &mut out, &mut s).is_err());
        assert!(matmul(&x, 2, 32, &w, GgmlType::Q8_0, 3, &mut out, &mut s).is_err());
        assert!(matmul(&x, 2, 31, &w, GgmlType::Q8_0, 2, &mut out, &mut s).is_err());
        assert!(matmul(&x, 2, 32, &w[..67], GgmlType::Q8_0, 2, &mut out, &mut s).is_err());
        assert!(matmul(&x, 1, 256, &w, GgmlType::IQ2_XXS, 1, &mut out, &mut s).is_err());
    }

    #[test]
    fn scratch_stops_growing() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (k, n) = (256, 8);
        let w = weights(GgmlType::Q4_K, n, k, &mut rng);
        let x = vec![0.5f32; 4 * k];
        let mut out = vec![0f32; 4 * n];
        let mut s = MatmulScratch::new();
        matmul(&x, 4, k, &w, GgmlType::Q4_K, n, &mut out, &mut s).unwrap();
        let cap = (s.act.capacity(), s.act.as_ptr());
        for m in [1, 2, 4, 3] {
            matmul(&x, m, k, &w, GgmlType::Q4_K, n, &mut out, &mut s).unwrap();
        }
        assert_eq!(cap, (s.act.capacity(), s.act.as_ptr()));
    }
}
