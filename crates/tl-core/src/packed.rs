//! Weights repacked once for this CPU's matmul kernels, and the matmul that
//! reads them.
//!
//! [`PackedWeight::pack`] rearranges a weight of a 32-value block type
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) into the row-pair interleaved layout of the
//! AVX-512 VNNI kernels (the same bits, the same size: see
//! `quant::dot::x86::repack`), and a Q6_K or Q4_K weight into sixteen
//! interleaved rows per super-block (`quant::dot::x86::repack_k`; Q4_K's
//! scales kept decoded, +3%), so that no matmul has to unpack, transpose or
//! reduce across lanes again; ggml's CPU backend repacks some types at load for the
//! same reason. [`matmul_packed`] then gives, for every `m`, the same bits as
//! [`crate::matmul`] on the original blocks (and as `vec_dot`), so a model
//! computes the same tokens with or without repacking, alone or in a batch.
//!
//! Where the CPU lacks AVX-512 VNNI, or for other types, `pack` answers
//! `None` and the caller keeps the GGUF blocks.

use tl_gguf::GgmlType;

use crate::error::{CoreError, Result};
use crate::matmul::{MatmulScratch, Threading};
use crate::pool::ThreadPool;

/// A weight of `n` rows of `k` values in the layout of this CPU's packed
/// kernels. Owns its bytes (as many as the GGUF blocks; Q4_K 3% more).
pub struct PackedWeight {
    ty: GgmlType,
    k: usize,
    n: usize,
    #[cfg(target_arch = "x86_64")]
    kind: u8,
    #[cfg(target_arch = "x86_64")]
    rp: crate::quant::dot::x86::repack::Repacked,
    /// Q6_K in the 16-row layout of `repack_k` (empty for the other types).
    #[cfg(target_arch = "x86_64")]
    k6: Vec<crate::quant::dot::x86::repack_k::Line>,
}

/// The kind tags of Q6_K and Q4_K weights (the 32-value types use
/// `repack`'s).
#[cfg(target_arch = "x86_64")]
const K6: u8 = 255;
#[cfg(target_arch = "x86_64")]
const K4: u8 = 254;

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("ty", &self.ty)
            .field("k", &self.k)
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

/// Whether repacking is on: unless `TL_REPACK=0` (for comparisons) or the
/// reference numerics (whose generic kernels read the GGUF blocks).
fn repack_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !crate::numerics::reference() && std::env::var("TL_REPACK").map_or(true, |v| v != "0")
    })
}

impl PackedWeight {
    /// Repacks `w` (`n` rows of `k` values of `ty`, exactly), or `None` when
    /// this CPU has no packed kernel for `ty` (or `TL_REPACK=0`).
    pub fn pack(ty: GgmlType, k: usize, n: usize, w: &[u8]) -> Result<Option<PackedWeight>> {
        Self::pack_releasing(ty, k, n, w, &|_| {})
    }

    /// [`PackedWeight::pack`], calling `done(range)` for byte ranges of `w`
    /// that will not be read again, as soon as they are repacked (so that a
    /// caller can give a mapped file's pages back while a large weight is
    /// still being repacked). The ranges are disjoint and cover `w` when
    /// the weight is packed; nothing is called when it is not.
    pub fn pack_releasing(
        ty: GgmlType,
        k: usize,
        n: usize,
        w: &[u8],
        done: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Result<Option<PackedWeight>> {
        let size = |what: String| CoreError::SizeMismatch {
            op: "pack weight",
            what,
        };
        if !k.is_multiple_of(32) || k == 0 || n == 0 {
            return Ok(None);
        }
        match crate::quant::dot::row_bytes(ty, k) {
            Some(wb) if n.checked_mul(wb) == Some(w.len()) => {}
            _ => {
                return Err(size(format!(
                    "weight of {n} rows of {k} {ty} values, got {} bytes",
                    w.len()
                )))
            }
        }
        if !repack_enabled() {
            return Ok(None);
        }
        Self::pack_x86(ty, k, n, w, done)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn pack_x86(
        _: GgmlType,
        _: usize,
        _: usize,
        _: &[u8],
        _: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Result<Option<PackedWeight>> {
        Ok(None)
    }

    #[cfg(target_arch = "x86_64")]
    fn pack_x86(
        ty: GgmlType,
        k: usize,
        n: usize,
        w: &[u8],
        done: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Result<Option<PackedWeight>> {
        use crate::quant::dot::x86::gemm::packed_blocks;
        use crate::quant::dot::x86::repack::{self, Line, Repacked};
        if crate::quant::dot::simd_level() < crate::quant::dot::SimdLevel::Avx512Vnni {
            return Ok(None);
        }
        if matches!(ty, GgmlType::Q6_K | GgmlType::Q4_K) {
            return Ok(Self::pack_k(ty, k, n, w, done));
        }
        let Some(kind) = repack::kind_of(ty) else {
            return Ok(None);
        };
        let nb = k / 32;
        let wb = crate::quant::dot::x86::kind_bytes(kind);
        let (groups, _) = packed_blocks(nb);
        let pairs = n.div_ceil(2);
        let (pl, sw) = (
            repack::Geom::new(kind, nb).pair_lines,
            repack::scale_words(kind),
        );
        let mut q = vec![Line([0; 64]); pairs * pl];
        let mut d = vec![0u16; pairs * groups * sw];
        // Pairs in chunks over the pool: each chunk writes its own slices.
        let per = 256usize;
        let chunks = pairs.div_ceil(per);
        {
            let qp = SendPtr(q.as_mut_ptr());
            let dp = SendPtr(d.as_mut_ptr() as *mut Line);
            let job = |c: usize| {
                let ps = c * per..((c + 1) * per).min(pairs);
                let len = ps.len();
                // SAFETY: chunk `c` owns pairs `ps`, whose lines and scale
                // words are these disjoint ranges of `q` and `d`.
                let (qs, ds) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qp.get().add(ps.start * pl), len * pl),
                        std::slice::from_raw_parts_mut(
                            (dp.get() as *mut u16).add(ps.start * groups * sw),
                            len * groups * sw,
                        ),
                    )
                };
                let rows = 2 * ps.start..(2 * ps.end).min(n);
                repack::repack_pairs(kind, w, n, nb, ps, qs, ds);
                // The tail blocks of these rows are read once more below.
                if nb.is_multiple_of(4) {
                    done(rows.start * nb * wb..rows.end * nb * wb);
                }
            };
            // The pool runs a single chunk (or a one-thread pool) inline.
            ThreadPool::global().run(chunks, &job);
        }
        let tail = repack::tail_of(kind, w, n, nb);
        if !nb.is_multiple_of(4) {
            done(0..w.len());
        }
        Ok(Some(PackedWeight {
            ty,
            k,
            n,
            kind,
            rp: Repacked { q, d, tail },
            k6: Vec::new(),
        }))
    }

    /// Q6_K or Q4_K (`k` a multiple of 256, `w` checked) into the 16-row
    /// layout.
    #[cfg(target_arch = "x86_64")]
    fn pack_k(
        ty: GgmlType,
        k: usize,
        n: usize,
        w: &[u8],
        done: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Option<PackedWeight> {
        use crate::quant::dot::x86::repack_k::{self, Line, GROUP4_BYTES, GROUP_BYTES};
        if !k.is_multiple_of(256) {
            return None;
        }
        let four = ty == GgmlType::Q4_K;
        let (gb, wb) = if four {
            (GROUP4_BYTES, 144)
        } else {
            (GROUP_BYTES, 210)
        };
        let nb = k / 256;
        let groups = n.div_ceil(16);
        let per_group = nb * gb;
        let mut q = vec![Line([0; 64]); (groups * per_group).div_ceil(64)];
        let per = 16usize;
        let chunks = groups.div_ceil(per);
        {
            let qp = SendPtr(q.as_mut_ptr() as *mut u8);
            let job = |c: usize| {
                let gs = c * per..((c + 1) * per).min(groups);
                // SAFETY: chunk `c` owns row groups `gs`, whose bytes are
                // this range of `q` (sized above for all groups).
                let qs = unsafe {
                    std::slice::from_raw_parts_mut(
                        qp.get().add(gs.start * per_group),
                        gs.len() * per_group,
                    )
                };
                let rows = 16 * gs.start..(16 * gs.end).min(n);
                if four {
                    repack_k::repack4_groups(w, n, nb, gs, qs);
                } else {
                    repack_k::repack_groups(w, n, nb, gs, qs);
                }
                done(rows.start * nb * wb..rows.end * nb * wb);
            };
            // The pool runs a single chunk (or a one-thread pool) inline.
            ThreadPool::global().run(chunks, &job);
        }
        Some(PackedWeight {
            ty,
            k,
            n,
            kind: if four { K4 } else { K6 },
            rp: crate::quant::dot::x86::repack::Repacked {
                q: Vec::new(),
                d: Vec::new(),
                tail: Vec::new(),
            },
            k6: q,
        })
    }

    /// The block type of the original weight.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            self.rp.q.len() * 64 + self.rp.d.len() * 2 + self.rp.tail.len() + self.k6.len() * 64
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            0
        }
    }

    /// Row `r` as GGUF blocks, exactly the bytes it was packed from.
    pub fn row_blocks(&self, r: usize, out: &mut Vec<u8>) -> Result<()> {
        if r >= self.n {
            return Err(CoreError::SizeMismatch {
                op: "packed row",
                what: format!("row {r} of a weight of {} rows", self.n),
            });
        }
        #[cfg(target_arch = "x86_64")]
        if self.kind == K6 || self.kind == K4 {
            let nb = self.k / 256;
            out.resize(nb * self.ty.type_size(), 0);
            // SAFETY: the lines are `repr(C)` over `[u8; 64]`, so exactly
            // `64 * len` initialized bytes.
            let q = unsafe {
                std::slice::from_raw_parts(self.k6.as_ptr() as *const u8, self.k6.len() * 64)
            };
            if self.kind == K4 {
                crate::quant::dot::x86::repack_k::row4_of(q, nb, r, out);
            } else {
                crate::quant::dot::x86::repack_k::row_of(q, nb, r, out);
            }
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        {
            let nb = self.k / 32;
            let wb = self.ty.type_size();
            // Sized once; a caller's buffer is reused without allocating.
            out.resize(nb * wb, 0);
            for (b, blk) in out.chunks_exact_mut(wb).enumerate() {
                crate::quant::dot::x86::repack::block_of(self.kind, &self.rp, nb, r, b, blk);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        out.clear();
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint ranges of one buffer to the pool's
// threads (see `pack_x86`).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// `out[i * n + r] = dot(x[i * k..][..k], W row r)` for `i < m`, `r < n`,
/// for a repacked weight: the same bits as [`crate::matmul`] on the blocks
/// it was packed from. `x` and `out` may be longer than `m * k`, `m * n`.
pub fn matmul_packed(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<()> {
    crate::matmul::check_x_out(x, m, w.k, out, w.n)?;
    if m == 0 {
        return Ok(());
    }
    run_packed(x, m, w, out, scratch)
}

#[cfg(not(target_arch = "x86_64"))]
fn run_packed(
    _: &[f32],
    _: usize,
    _: &PackedWeight,
    _: &mut [f32],
    _: &mut MatmulScratch,
) -> Result<()> {
    Err(CoreError::SizeMismatch {
        op: "matmul",
        what: "packed weights exist only on x86-64".into(),
    })
}

#[cfg(target_arch = "x86_64")]
fn run_packed(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<()> {
    use crate::matmul::{chunk_rows, quantize_acts, OutPtr};
    use crate::quant::dot::{row_bytes, vec_dot_type, Acts};

    let (k, n) = (w.k, w.n);
    let act_ty = vec_dot_type(w.ty);
    let ab = row_bytes(act_ty, k).ok_or_else(|| CoreError::PartialBlock {
        op: "matmul",
        ty: act_ty,
        len: k,
        block: act_ty.block_size(),
    })?;
    let threads = ThreadPool::global().threads();
    if w.kind == K6 || w.kind == K4 {
        quantize_acts(Threading::Pool, x, m, k, w.ty, ab, 0, scratch);
        let acts = Acts {
            bytes: &scratch.act,
            row_bytes: ab,
            nb: 0,
            d: &[],
            s: &[],
            sums: &[],
        };
        let groups = n.div_ceil(16);
        let per = chunk_rows(
            n,
            m.min(crate::quant::dot::MAX_TILE),
            threads,
            k / 256 * w.ty.type_size(),
        )
        .div_ceil(16)
        .max(1);
        let chunks = groups.div_ceil(per);
        let outp = OutPtr(out.as_mut_ptr());
        let job = |c: usize| {
            let gs = c * per..((c + 1) * per).min(groups);
            // SAFETY: packed on this CPU, which runs AVX-512 VNNI; `acts`
            // holds the `m` rows just quantized to Q8_K; chunks hold
            // disjoint row groups, whose columns of `out` only they write.
            unsafe {
                use crate::quant::dot::x86::repack_k::groups_into;
                if w.kind == K4 {
                    groups_into::<true>(&w.k6, k / 256, n, &acts, m, gs, outp.get());
                } else {
                    groups_into::<false>(&w.k6, k / 256, n, &acts, m, gs, outp.get());
                }
            }
        };
        ThreadPool::global().run(chunks, &job);
        return Ok(());
    }
    run_32(x, m, &[w], &mut [out], scratch);
    Ok(())
}

/// Several repacked weights applied to the same activations, as if by one
/// [`matmul_packed`] each (the same bits in every output): `outs[j]` gets
/// `x · ws[j]ᵀ`. For 32-value weights with the same input width and
/// activation type (Q, K and V; gate and up) the activations are quantized
/// and packed once and the rows (row pairs, for a few activation rows) of
/// all the weights are spread over the pool in one dispatch, so the small
/// products balance against the large ones; otherwise the weights run one
/// by one.
pub fn matmul_packed_many(
    x: &[f32],
    m: usize,
    ws: &[&PackedWeight],
    outs: &mut [&mut [f32]],
    scratch: &mut MatmulScratch,
) -> Result<()> {
    if ws.len() != outs.len() {
        return Err(CoreError::SizeMismatch {
            op: "matmul",
            what: format!("{} weights for {} outputs", ws.len(), outs.len()),
        });
    }
    for (w, out) in ws.iter().zip(outs.iter()) {
        crate::matmul::check_x_out(x, m, w.k, out, w.n)?;
    }
    if m == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if fused_ok(ws) {
        run_32(x, m, ws, outs, scratch);
        return Ok(());
    }
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        run_packed(x, m, w, out, scratch)?;
    }
    Ok(())
}

/// Most weights [`matmul_packed_many`] fuses in one dispatch.
#[cfg(target_arch = "x86_64")]
const MANY: usize = 4;

/// Whether [`matmul_packed_many`] can share one quantization and dispatch.
#[cfg(target_arch = "x86_64")]
fn fused_ok(ws: &[&PackedWeight]) -> bool {
    use crate::quant::dot::vec_dot_type;
    let Some(first) = ws.first() else {
        return false;
    };
    ws.len() > 1
        && ws.len() <= MANY
        && ws.iter().all(|w| {
            w.kind != K6
                && w.kind != K4
                && w.k == first.k
                && vec_dot_type(w.ty) == vec_dot_type(first.ty)
        })
}

/// The 32-value types: `outs[j] = x · ws[j]ᵀ` for weights of one width and
/// activation type (one weight from [`matmul_packed`], several from
/// [`matmul_packed_many`] once `fused_ok` and the size checks passed), with
/// the activations quantized and packed once and one pool dispatch.
#[cfg(target_arch = "x86_64")]
fn run_32(
    x: &[f32],
    m: usize,
    ws: &[&PackedWeight],
    outs: &mut [&mut [f32]],
    scratch: &mut MatmulScratch,
) {
    use crate::matmul::{chunk_rows, quantize_acts, size_panels, with_free_panel, OutPtr};
    use crate::quant::dot::x86::gemm::{legacy_rows_for, pack_acts, Src, PANEL};
    use crate::quant::dot::x86::repack;
    use crate::quant::dot::{row_bytes, vec_dot_type, Acts};

    let first = ws[0];
    let k = first.k;
    let act_ty = vec_dot_type(first.ty);
    // `check_x_out` accepted `k` for every weight, so it is whole blocks.
    let ab = row_bytes(act_ty, k).unwrap_or(0);
    let nb = k / 32;
    let threads = ThreadPool::global().threads();
    quantize_acts(Threading::Pool, x, m, k, first.ty, ab, nb, scratch);
    let MatmulScratch {
        act,
        d,
        s,
        sums,
        packed,
        panels,
    } = scratch;
    let acts = Acts {
        bytes: act,
        row_bytes: ab,
        nb,
        d,
        s,
        sums,
    };
    pack_acts(&acts, m, act_ty == GgmlType::Q8_1, packed);
    let packed = &*packed;
    // Work units: row pairs for the row-pair kernel (few rows), rows for
    // the panel kernel (prefill), chunked as `matmul_packed` chunks one
    // weight but from the total width, so that all chunks are about equal.
    let pairs_mode = m <= PAIRS_UP_TO;
    let total: usize = ws.iter().map(|w| w.n).sum();
    let (per, units): (usize, fn(usize) -> usize) = if pairs_mode {
        let wb = row_bytes(first.ty, k).unwrap_or(1);
        (chunk_rows(total, m, threads, wb).div_ceil(2).max(1), |n| {
            n.div_ceil(2)
        })
    } else {
        size_panels(panels, threads, nb);
        (
            total.div_ceil(16 * threads).div_ceil(PANEL).max(1) * PANEL,
            |n| n,
        )
    };
    let panels = &*panels;
    // Chunks `ends[j - 1]..ends[j]` belong to weight `j` (at most
    // `MANY` weights, so nothing is allocated per call).
    let mut ends = [0usize; MANY];
    let mut outp = [OutPtr(std::ptr::null_mut()); MANY];
    let mut acc = 0;
    for (j, (w, o)) in ws.iter().zip(outs.iter_mut()).enumerate() {
        acc += units(w.n).div_ceil(per);
        ends[j] = acc;
        outp[j] = OutPtr(o.as_mut_ptr());
    }
    let job = |c: usize| {
        let j = ends.iter().position(|&e| c < e).unwrap_or(0);
        let w = ws[j];
        let c0 = if j == 0 { 0 } else { ends[j - 1] };
        let u0 = (c - c0) * per;
        let u1 = (u0 + per).min(units(w.n));
        // SAFETY: as in `run_packed`: `w` was packed on this CPU (AVX-512
        // VNNI), `acts`/`packed` hold the `m` rows quantized for its
        // activation type (the same for every weight here), and chunks hold
        // disjoint pairs or rows of one weight, whose columns of that
        // weight's output (size-checked) only this chunk writes.
        if pairs_mode {
            unsafe {
                repack::pairs_into_for(
                    w.kind,
                    &w.rp,
                    nb,
                    w.n,
                    &acts,
                    packed,
                    m,
                    u0..u1,
                    outp[j].get(),
                );
            }
        } else {
            with_free_panel(panels, |buf| unsafe {
                legacy_rows_for(
                    buf,
                    w.ty,
                    k,
                    Src::Repacked(&w.rp),
                    &acts,
                    packed,
                    m,
                    w.n,
                    u0..u1,
                    outp[j].get(),
                )
            });
        }
    };
    ThreadPool::global().run(acc, &job);
}

/// Up to this many activation rows the row-pair kernel runs; above it the
/// panel micro-kernel (measured with `examples/packed_bench`, and at batch
/// 16 on both models: the row-pair kernel up to 16 rows was 3% faster on
/// Qwen and 15% slower on Gemma, whose large tied output the panel suits).
#[cfg(target_arch = "x86_64")]
const PAIRS_UP_TO: usize = 8;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::quant::dot::row_bytes;

    /// Random blocks: random level bytes, finite scales and mins of either
    /// sign (the GGUF bytes of any real weight are a special case).
    fn weights(ty: GgmlType, n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let wb = row_bytes(ty, k).unwrap();
        let mut w: Vec<u8> = (0..n * wb).map(|_| rng.gen()).collect();
        let fields: &[usize] = match ty {
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            _ => &[0],
        };
        for blk in w.chunks_exact_mut(ty.type_size()) {
            for &at in fields {
                let d = half::f16::from_f32(rng.gen_range(-0.05f32..0.05));
                blk[at..at + 2].copy_from_slice(&d.to_le_bytes());
            }
        }
        w
    }

    /// Packs a random weight and checks every output of the packed matmul
    /// against the bits of the plain matmul on the original blocks, and the
    /// rows read back against the original bytes. `false` when this CPU has
    /// no packed kernels (only without AVX-512 VNNI, or with TL_REPACK=0).
    fn same_bits(ty: GgmlType, k: usize, m: usize, n: usize, rng: &mut ChaCha8Rng) -> bool {
        let w = weights(ty, n, k, rng);
        let Some(p) = PackedWeight::pack(ty, k, n, &w).unwrap() else {
            assert!(
                crate::quant::dot::simd_level() < crate::quant::dot::SimdLevel::Avx512Vnni
                    || std::env::var("TL_REPACK").is_ok_and(|v| v == "0")
            );
            eprintln!("no packed kernels on this CPU: nothing to compare");
            return false;
        };
        assert!(p.size_in_bytes() >= w.len());
        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        let mut want = vec![0f32; m * n];
        let mut s = MatmulScratch::new();
        crate::matmul(&x, m, k, &w, ty, n, &mut want, &mut s).unwrap();
        let mut got = vec![f32::NAN; m * n + 2];
        matmul_packed(&x, m, &p, &mut got, &mut s).unwrap();
        for (j, (g, e)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), e.to_bits(), "{ty} k={k} m={m} n={n} #{j}");
        }
        assert!(got[m * n..].iter().all(|v| v.is_nan()), "wrote past m * n");
        let wb = row_bytes(ty, k).unwrap();
        let mut row = Vec::new();
        for r in 0..n {
            p.row_blocks(r, &mut row).unwrap();
            assert_eq!(row, &w[r * wb..(r + 1) * wb], "{ty} k={k} row {r}");
        }
        true
    }

    /// The 32-value types: odd sizes, tails, odd row counts and every tile
    /// height.
    #[test]
    fn packed_matmul_is_the_plain_matmul_bit_for_bit() {
        use GgmlType::*;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut checked = 0;
        for ty in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0] {
            for blocks in [1usize, 3, 4, 5, 8, 9, 12, 13, 28] {
                for (m, n) in [
                    (1, 1),
                    (1, 37),
                    (2, 9),
                    (3, 6),
                    (8, 21),
                    (9, 13),
                    (17, 4),
                    (15, 35),
                    (22, 16),
                ] {
                    if !same_bits(ty, 32 * blocks, m, n, &mut rng) {
                        return;
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 5 * 9 * 9);
    }

    /// Several weights on the same activations give what each gives alone:
    /// fused (same width and activation type: Q5_0/Q8_0 mixed, odd and tiny
    /// widths, decode and prefill row counts) and not (Q4_1 beside Q5_0);
    /// mismatched lists are errors.
    #[test]
    fn many_weights_are_each_weight_alone_bit_for_bit() {
        use GgmlType::*;
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let k = 32 * 28;
        for set in [
            vec![(Q5_0, 64), (Q5_0, 7), (Q5_0, 9)],
            vec![(Q8_0, 33), (Q5_0, 2), (Q4_0, 1)],
            vec![(Q4_1, 10), (Q5_0, 12)],
            vec![(Q5_1, 5), (Q4_1, 31), (Q5_1, 6), (Q4_1, 3)],
        ] {
            let ws: Vec<_> = set
                .iter()
                .map(|&(ty, n)| (ty, n, weights(ty, n, k, &mut rng)))
                .collect();
            let mut packs = Vec::new();
            for (ty, n, w) in &ws {
                match PackedWeight::pack(*ty, k, *n, w).unwrap() {
                    Some(p) => packs.push(p),
                    None => return eprintln!("no packed kernels on this CPU: nothing to compare"),
                }
            }
            let refs: Vec<&PackedWeight> = packs.iter().collect();
            for m in [1usize, 2, 3, 5, 8, 9, 16] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
                let mut s = MatmulScratch::new();
                let want: Vec<Vec<f32>> = packs
                    .iter()
                    .map(|p| {
                        let mut o = vec![0f32; m * p.n];
                        matmul_packed(&x, m, p, &mut o, &mut s).unwrap();
                        o
                    })
                    .collect();
                let mut got: Vec<Vec<f32>> =
                    packs.iter().map(|p| vec![f32::NAN; m * p.n]).collect();
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|o| o.as_mut_slice()).collect();
                matmul_packed_many(&x, m, &refs, &mut outs, &mut s).unwrap();
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    for (i, (a, b)) in g.iter().zip(w).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{set:?} m={m} weight {j} #{i}");
                    }
                }
                let mut short: Vec<&mut [f32]> =
                    got.iter_mut().skip(1).map(|o| o.as_mut_slice()).collect();
                assert!(matmul_packed_many(&x, m, &refs, &mut short, &mut s).is_err());
            }
        }
    }

    /// Q6_K and Q4_K in their 16-row layouts: row counts around 16, one and
    /// several super-blocks, every tile height.
    #[test]
    fn packed_k_quants_are_the_plain_matmul_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for ty in [GgmlType::Q6_K, GgmlType::Q4_K] {
            for blocks in [1usize, 2, 3] {
                for (m, n) in [(1, 1), (1, 17), (3, 16), (8, 33), (9, 15), (17, 40)] {
                    if !same_bits(ty, 256 * blocks, m, n, &mut rng) {
                        return;
                    }
                }
            }
        }
    }

    #[test]
    fn bad_sizes_are_errors_and_other_types_are_not_packed() {
        let w = vec![0u8; 34 * 2];
        assert!(PackedWeight::pack(GgmlType::Q8_0, 32, 3, &w).is_err());
        assert!(PackedWeight::pack(GgmlType::Q3_K, 256, 1, &[0u8; 110])
            .unwrap()
            .is_none());
        if let Some(p) = PackedWeight::pack(GgmlType::Q8_0, 32, 2, &w).unwrap() {
            let mut s = MatmulScratch::new();
            let mut out = vec![0f32; 4];
            assert!(matmul_packed(&[0.0; 31], 1, &p, &mut out, &mut s).is_err());
            assert!(matmul_packed(&[0.0; 64], 2, &p, &mut out[..3], &mut s).is_err());
            assert!(p.row_blocks(2, &mut Vec::new()).is_err());
        }
    }
}
