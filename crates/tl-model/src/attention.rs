//! Causal attention of one token's queries over a sequence's paged KV cache,
//! read in place (no gather of the context into a contiguous buffer).
//!
//! Numerics follow llama.cpp's CPU path (without flash attention) with an
//! f16 cache: the query is rounded to f16 before the Q·K dot products (ggml
//! converts the f32 operand of an f16 matmul to f16), the softmax is ggml's
//! AVX-512 one (its vector `expf`, f32 sums per 16 values accumulated in
//! f64), the probabilities are rounded to f16 for the product with V, and
//! that weighted sum accumulates in f32.

use half::f16;

use crate::kv::{KvCache, SeqKv, BLOCK_SIZE};

/// Reusable buffers so a decode step allocates nothing.
#[derive(Default)]
pub struct AttnScratch {
    scores: Vec<f32>,
    q16: Vec<f32>,
    /// f64 sums of the reference numerics' weighted V.
    acc64: Vec<f64>,
    /// One block's K and V rows dequantized from a quantized cache.
    kbuf: Vec<f32>,
    vbuf: Vec<f32>,
    /// The queries rotated as a quantized cache's K is.
    qrot: Vec<f32>,
}

/// Parameters shared by every token of a layer.
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding window: a token at position p sees positions > p - window.
    pub window: Option<usize>,
    /// Scores soft-capped to `tanh(s / cap) * cap` before the softmax.
    pub softcap: Option<f32>,
    /// A learned logit per query head that takes part in the softmax
    /// without a value (gpt-oss's `attn_sinks`): the probabilities sum to
    /// less than 1. Indexed by the absolute head.
    pub sinks: Option<std::sync::Arc<[f32]>>,
}

impl AttnParams {
    /// The parameters of layer `il` (Gemma scales the query before
    /// attention, so its score scale is 1; sliding-window layers get the
    /// window).
    pub fn for_layer(c: &crate::config::Config, il: usize) -> Self {
        AttnParams {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: if c.prescale_q() { 1.0 } else { c.attn_scale },
            window: if c.is_swa_layer(il) {
                c.sliding_window
            } else {
                None
            },
            softcap: c.attn_logit_softcap,
            sinks: None,
        }
    }

    /// The sink logit of query head `h` (minus infinity without sinks,
    /// which changes nothing).
    pub fn sink(&self, h: usize) -> f32 {
        self.sinks
            .as_deref()
            .and_then(|s| s.get(h).copied())
            .unwrap_or(f32::NEG_INFINITY)
    }

    /// The first position a token at `pos` attends to.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// Attends query heads `heads` of the token at position `pos` over
/// positions `[lo, pos]` of `seq` in `layer`. `q` and `out` hold just those
/// heads (`heads.len() * head_dim`, head-major). Position `pos` must already
/// be in the cache. Callers split work by (token, head range) so that decode
/// of a single token still spreads over threads.
///
/// A quantized cache holds K and V rotated (`kv::rotations`): the queries
/// are rotated as K is, and the output rotated back as V was.
#[allow(clippy::too_many_arguments)] // the per-token hot call; a struct would be rebuilt per token
pub fn attend(
    cache: &KvCache,
    layer: usize,
    seq: &SeqKv,
    pos: usize,
    p: &AttnParams,
    heads: std::ops::Range<usize>,
    q: &[f32],
    out: &mut [f32],
    s: &mut AttnScratch,
) {
    rotated(cache, p, heads, q, out, s, |heads, q, out, s| {
        attend_unrotated(cache, layer, seq, pos, p, heads, q, out, s)
    });
}

/// Runs `f` with the queries rotated as the cache's K is, then rotates the
/// output back as its V was (nothing for an f16 cache).
fn rotated(
    cache: &KvCache,
    p: &AttnParams,
    heads: std::ops::Range<usize>,
    q: &[f32],
    out: &mut [f32],
    s: &mut AttnScratch,
    f: impl FnOnce(std::ops::Range<usize>, &[f32], &mut [f32], &mut AttnScratch),
) {
    let (kr, vr) = cache.rotations();
    let n = heads.len() * p.head_dim;
    if kr > 0 {
        let mut qr = std::mem::take(&mut s.qrot);
        qr.clear();
        qr.extend_from_slice(&q[..n]);
        crate::kv::hadamard(&mut qr, kr);
        f(heads, &qr, out, s);
        s.qrot = qr;
    } else {
        f(heads, q, out, s);
    }
    if vr > 0 {
        crate::kv::hadamard(&mut out[..n], vr);
    }
}

#[allow(clippy::too_many_arguments)]
fn attend_unrotated(
    cache: &KvCache,
    layer: usize,
    seq: &SeqKv,
    pos: usize,
    p: &AttnParams,
    heads: std::ops::Range<usize>,
    q: &[f32],
    out: &mut [f32],
    s: &mut AttnScratch,
) {
    if tl_core::numerics::reference() || p.softcap.is_some() {
        // Soft-capped scores (gemma2) take the plain path.
        let reference = tl_core::numerics::reference();
        attend_plain(cache, layer, seq, pos, p, heads, q, out, s, reference);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if p.head_dim.is_multiple_of(16) && simd::available() {
        // SAFETY: `available` checked the CPU features the function uses.
        unsafe { simd::attend(cache, layer, seq, pos, p, heads, q, out, s) };
        return;
    }
    // The queries are rotated already (`attend` did it): the plain loops,
    // not `attend_scalar`, which would rotate them a second time.
    attend_plain(cache, layer, seq, pos, p, heads, q, out, s, false);
}

/// ggml's `soft_max` as llama.cpp's portable x86-64 build computes it
/// (`ggml_vec_soft_max_f32`, its `__SSE2__` branch): exponentials by
/// ggml's vector `expf` without FMA ([`tl_core::cpu::kernels::vexpf`]), each
/// group of four (from the row's start, a partial last group padded with
/// the exact zeros of masked positions) added as `(e0 + e1) + (e2 + e3)` in
/// f32, the group sums accumulated in f64, then a scale by the f32
/// reciprocal; the probabilities end rounded to f16 (the operand of the
/// f16 product with V).
///
/// With a sink logit (ggml's `soft_max` with sinks), the maximum takes it
/// in and `expf(sink - max)` is added to the f64 sum; a sink of minus
/// infinity adds nothing.
pub fn softmax_reference(scores: &mut [f32], max: f32, sink: f32) {
    use tl_core::cpu::kernels::vexpf;
    let max = max.max(sink);
    let mut sum = 0.0f64;
    for chunk in scores.chunks_mut(4) {
        let mut e = [0.0f32; 4];
        for (l, sc) in e.iter_mut().zip(chunk.iter_mut()) {
            *sc = vexpf(*sc - max);
            *l = *sc;
        }
        sum += f64::from((e[0] + e[1]) + (e[2] + e[3]));
    }
    sum += sink_term(sink, max);
    let inv = (1.0 / sum) as f32;
    for sc in scores.iter_mut() {
        *sc = f16::from_f32(*sc * inv).to_f32();
    }
}

/// The portable reference of [`attend`] (and its fallback).
#[allow(clippy::too_many_arguments)]
pub fn attend_scalar(
    cache: &KvCache,
    layer: usize,
    seq: &SeqKv,
    pos: usize,
    p: &AttnParams,
    heads: std::ops::Range<usize>,
    q: &[f32],
    out: &mut [f32],
    s: &mut AttnScratch,
) {
    rotated(cache, p, heads, q, out, s, |heads, q, out, s| {
        attend_plain(cache, layer, seq, pos, p, heads, q, out, s, false)
    });
}

/// The plain loops of [`attend_scalar`] (f32 sums, [`softmax_f16`]) and,
/// with `f64_sums`, of [`attend`] under the reference numerics
/// (`tl_core::numerics`): what llama.cpp's portable CPU code computes
/// without flash attention. There the query is rounded to f16; each Q·K is
/// `ggml_vec_dot_f16`'s generic loop (the products of the f16 values, exact
/// in f32, summed in f64 in order), rounded to f32 and scaled; the softmax is
/// [`softmax_reference`]; each output value is again `ggml_vec_dot_f16`, of
/// the f16 probabilities with the values of one dimension, summed in f64 in
/// position order (the positions ggml masks add exact zeros, which change
/// nothing).
#[allow(clippy::too_many_arguments)]
fn attend_plain(
    cache: &KvCache,
    layer: usize,
    seq: &SeqKv,
    pos: usize,
    p: &AttnParams,
    heads: std::ops::Range<usize>,
    q: &[f32],
    out: &mut [f32],
    s: &mut AttnScratch,
    f64_sums: bool,
) {
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let lo = p.first_visible(pos);
    let n = pos + 1 - lo;
    s.scores.resize(n, 0.0);
    s.q16.resize(hd, 0.0);
    s.acc64.resize(hd, 0.0);
    let h0 = heads.start;
    for h in heads {
        let g = h / group;
        let hl = h - h0;
        for (d, &x) in s.q16.iter_mut().zip(&q[hl * hd..(hl + 1) * hd]) {
            *d = f16::from_f32(x).to_f32();
        }
        // Q·K over the blocks covering [lo, pos].
        let mut max = f32::NEG_INFINITY;
        for (block, slots, i0) in Runs::new(seq, lo, pos) {
            let kb = cache.k_rows(layer, block, g, slots.clone(), &mut s.kbuf);
            for (i, slot) in slots.clone().enumerate() {
                let k = s
                    .q16
                    .iter()
                    .enumerate()
                    .map(|(d, a)| (a, kb.at(slot * hd + d)));
                let dot = if f64_sums {
                    k.fold(0.0f64, |acc, (a, b)| acc + f64::from(a * b)) as f32
                } else {
                    k.fold(0.0f32, |acc, (a, b)| acc + a * b)
                };
                let mut sc = dot * p.scale;
                if let Some(cap) = p.softcap {
                    // ggml: scale by 1/cap, tanh, scale by cap.
                    sc = (sc * (1.0 / cap)).tanh() * cap;
                }
                s.scores[i0 + i] = sc;
                max = max.max(sc);
            }
        }
        // ggml `soft_max`: exponentials in f32, their sum in f64, then a
        // scale by the f32 reciprocal. The probabilities are rounded to f16
        // because ggml multiplies them with the f16 V cache in f16 (the f32
        // operand of an f16 matmul is converted to f16).
        if f64_sums {
            softmax_reference(&mut s.scores, max, p.sink(h));
        } else {
            softmax_f16_sink(&mut s.scores, max, p.sink(h));
        }
        let o = &mut out[hl * hd..(hl + 1) * hd];
        o.fill(0.0);
        s.acc64.fill(0.0);
        for (block, slots, i0) in Runs::new(seq, lo, pos) {
            let vb = cache.v_rows(layer, block, g, slots.clone(), &mut s.vbuf);
            for (i, slot) in slots.clone().enumerate() {
                let w = s.scores[i0 + i];
                let v = (0..hd).map(|d| vb.at(slot * hd + d));
                if f64_sums {
                    for (acc, v) in s.acc64.iter_mut().zip(v) {
                        *acc += f64::from(w * v);
                    }
                } else {
                    for (acc, v) in o.iter_mut().zip(v) {
                        *acc += w * v;
                    }
                }
            }
        }
        if f64_sums {
            for (o, a) in o.iter_mut().zip(&s.acc64) {
                *o = *a as f32;
            }
        }
    }
}

/// The runs of cache slots holding positions `[lo, pos]` of a sequence:
/// `(block, slots, i0)` with `slots` the slots of `block` in order and `i0`
/// the index (from `lo`) of the first.
struct Runs<'a> {
    seq: &'a SeqKv,
    t: usize,
    lo: usize,
    end: usize,
}

impl<'a> Runs<'a> {
    fn new(seq: &'a SeqKv, lo: usize, pos: usize) -> Self {
        Runs {
            seq,
            t: lo,
            lo,
            end: pos + 1,
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = (u32, std::ops::Range<usize>, usize);
    fn next(&mut self) -> Option<Self::Item> {
        if self.t >= self.end {
            return None;
        }
        let (block, slot0) = self.seq.slot(self.t)?;
        let end_slot = BLOCK_SIZE.min(slot0 + (self.end - self.t));
        let i0 = self.t - self.lo;
        self.t += end_slot - slot0;
        Some((block, slot0..end_slot, i0))
    }
}

/// Softmax of `scores` in place with the numerics of ggml's AVX-512
/// `soft_max` (see the module docs): exponentials by [`v_expf`] 16 at a
/// time, each 16-value chunk (from the start of the row, a partial last one
/// padded with zeros) summed in f32 by the halving tree of
/// `_mm512_reduce_add_ps`, the chunk sums accumulated in f64, then a scale by
/// the f32 reciprocal; the probabilities end rounded to f16.
#[cfg(test)]
pub(crate) fn softmax_f16(scores: &mut [f32], max: f32) {
    softmax_f16_sink(scores, max, f32::NEG_INFINITY);
}

/// [`softmax_f16`] with a sink logit (see [`softmax_reference`]).
pub(crate) fn softmax_f16_sink(scores: &mut [f32], max: f32, sink: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: `available` checked the CPU features the function uses.
        unsafe { simd::softmax_f16(scores, max, sink) };
        return;
    }
    softmax_f16_scalar(scores, max, sink);
}

/// What a sink logit adds to the softmax's sum once the maximum (which
/// took it in) is `max`: ggml's `(ggml_float) expf(sink - max)`.
fn sink_term(sink: f32, max: f32) -> f64 {
    if sink == f32::NEG_INFINITY {
        0.0
    } else {
        f64::from((sink - max).exp())
    }
}

/// The portable reference of [`softmax_f16`], the same bits.
fn softmax_f16_scalar(scores: &mut [f32], max: f32, sink: f32) {
    let max = max.max(sink);
    let mut sum = 0.0f64;
    for chunk in scores.chunks_mut(16) {
        let mut lanes = [0.0f32; 16];
        for (l, sc) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *sc = v_expf(*sc - max);
            *l = *sc;
        }
        sum += f64::from(tree_sum16(&lanes));
    }
    sum += sink_term(sink, max);
    let inv = (1.0 / sum) as f32;
    for sc in scores.iter_mut() {
        *sc = f16::from_f32(*sc * inv).to_f32();
    }
}

/// The lanes of a vector added as `_mm512_reduce_add_ps` adds them.
fn tree_sum16(l: &[f32; 16]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let b: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    (b[0] + b[2]) + (b[1] + b[3])
}

/// Constants of ggml's vector `expf`, shared with tl-core's copy of it.
use tl_core::cpu::kernels::vexp as expc;

/// One lane of ggml's AVX-512 `ggml_v_expf`: `x = n·ln2 + b` with `n`
/// rounded by the 1.5·2^23 trick, a degree-5 polynomial in `b` by FMAs, and
/// `2^n` applied with a single rounding (`vscalefps`); `|n| > 192` gives 0 or
/// infinity. Within 1.5 ulp of `exp`.
pub fn v_expf(x: f32) -> f32 {
    use expc::*;
    let c = f32::from_bits;
    let z = x.mul_add(c(LOG2E), c(ROUND));
    let n = z - c(ROUND);
    let b = (-n).mul_add(c(LN2_LO), (-n).mul_add(c(LN2_HI), x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = c(P5)
        .mul_add(b, c(P4))
        .mul_add(u, c(P3).mul_add(b, c(P2)))
        .mul_add(u, c(P1).mul_add(b, 1.0));
    if n.is_nan() {
        return f32::NAN;
    }
    // j · 2^n in f64 is exact (|n| ≤ 192); one rounding to f32, as scalef.
    (f64::from(j) * 2f64.powi(n as i32)) as f32
}

/// AVX-512 attention. Each output is computed with exactly the operations
/// of the plain 16-lane kernel (the shape of llamafile's tinyBLAS kernel that
/// llama.cpp uses for these products): per score, 16-lane FMAs over the head
/// dimension then the halving horizontal sum of `_mm512_reduce_add_ps`; per
/// output lane, FMAs slot after slot. What changes is the blocking: the query
/// heads of a KV group share each converted K and V vector (tiles of up to 4
/// heads × 4 slots), and the 16 sums of a tile are reduced together by a
/// transposed tree that pairs the lanes as the single-vector sum does. Same
/// softmax as the scalar path.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{expc, sink_term, AttnParams, AttnScratch, Runs};
    use crate::kv::{KvCache, SeqKv, BLOCK_SIZE};

    /// Query heads per tile.
    const TILE: usize = 4;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
    }

    /// As [`super::attend`].
    ///
    /// # Safety
    ///
    /// The CPU runs AVX-512F/VL, F16C and FMA; `p.head_dim` is a multiple of 16.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
    pub(super) unsafe fn attend(
        cache: &KvCache,
        layer: usize,
        seq: &SeqKv,
        pos: usize,
        p: &AttnParams,
        heads: std::ops::Range<usize>,
        q: &[f32],
        out: &mut [f32],
        s: &mut AttnScratch,
    ) {
        let hd = p.head_dim;
        let group = p.n_heads / p.n_kv_heads;
        let lo = p.first_visible(pos);
        let n = pos + 1 - lo;
        let rows = heads.len();
        debug_assert!(q.len() >= rows * hd && out.len() >= rows * hd);
        s.scores.resize(rows * n, 0.0);
        s.q16.resize(rows * hd, 0.0);
        // The queries rounded to f16, as ggml converts them.
        for i in 0..rows * hd / 16 {
            let v = _mm512_loadu_ps(q.as_ptr().add(16 * i));
            let r = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
            _mm512_storeu_ps(s.q16.as_mut_ptr().add(16 * i), r);
        }
        // A quantized cache is read block by block, dequantized to f32.
        let quant = cache.kv_type != crate::kv::KvType::F16;
        if quant {
            s.kbuf.resize(BLOCK_SIZE * hd, 0.0);
            s.vbuf.resize(BLOCK_SIZE * hd, 0.0);
        }
        let t = Tile {
            cache,
            layer,
            seq,
            lo,
            pos,
            hd,
            n,
            scale: p.scale,
            sinks: p.sinks.as_deref(),
            kbuf: s.kbuf.as_mut_ptr(),
            vbuf: s.vbuf.as_mut_ptr(),
        };
        let mut h = heads.start;
        while h < heads.end {
            let g = h / group;
            let r = ((g + 1) * group).min(heads.end).min(h + TILE) - h;
            let hl = h - heads.start;
            let qp = s.q16.as_ptr().add(hl * hd);
            let sp = s.scores.as_mut_ptr().add(hl * n);
            let op = out.as_mut_ptr().add(hl * hd);
            match (r, quant) {
                (1, false) => t.run::<1, false>(g, h, qp, sp, op),
                (2, false) => t.run::<2, false>(g, h, qp, sp, op),
                (3, false) => t.run::<3, false>(g, h, qp, sp, op),
                (_, false) => t.run::<4, false>(g, h, qp, sp, op),
                (1, true) => t.run::<1, true>(g, h, qp, sp, op),
                (2, true) => t.run::<2, true>(g, h, qp, sp, op),
                (3, true) => t.run::<3, true>(g, h, qp, sp, op),
                (_, true) => t.run::<4, true>(g, h, qp, sp, op),
            }
            h += r;
        }
    }

    /// What the heads of one tile share.
    struct Tile<'a> {
        cache: &'a KvCache,
        layer: usize,
        seq: &'a SeqKv,
        lo: usize,
        pos: usize,
        hd: usize,
        n: usize,
        scale: f32,
        /// Sink logits by absolute head (see [`AttnParams::sinks`]).
        sinks: Option<&'a [f32]>,
        /// Scratch for one block's K and V head rows (a quantized cache).
        kbuf: *mut f32,
        vbuf: *mut f32,
    }

    /// 16 values of a head row: f16 in place, or f32 when `F32` (rows
    /// dequantized from a quantized cache).
    #[inline(always)]
    unsafe fn ld<const F32: bool>(row: *const u8, c: usize) -> __m512 {
        if F32 {
            _mm512_loadu_ps((row as *const f32).add(16 * c))
        } else {
            _mm512_cvtph_ps(_mm256_loadu_si256((row as *const __m256i).add(c)))
        }
    }

    impl Tile<'_> {
        /// The rows `slots` of KV head `g` in `block`: the f16 cache in
        /// place, or (`F32`) dequantized into the scratch. Row `j` starts
        /// `j * hd` elements in.
        #[inline]
        unsafe fn rows<const F32: bool>(
            &self,
            v: bool,
            block: u32,
            g: usize,
            slots: std::ops::Range<usize>,
        ) -> *const u8 {
            if F32 {
                let buf = if v { self.vbuf } else { self.kbuf };
                let out = std::slice::from_raw_parts_mut(buf, BLOCK_SIZE * self.hd);
                self.cache
                    .dequantize_rows(v, self.layer, block, g, slots, out);
                buf as *const u8
            } else if v {
                self.cache.v_head(self.layer, block, g).as_ptr() as *const u8
            } else {
                self.cache.k_head(self.layer, block, g).as_ptr() as *const u8
            }
        }

        /// Attends `R` heads of KV group `g`: queries at `q` (rows of `hd`),
        /// scores at `sc` (rows of `n`), outputs at `out` (rows of `hd`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
        unsafe fn run<const R: usize, const F32: bool>(
            &self,
            g: usize,
            h0: usize,
            q: *const f32,
            sc: *mut f32,
            out: *mut f32,
        ) {
            let (hd, n) = (self.hd, self.n);
            let es = if F32 { 4 } else { 2 };
            let nc = hd / 16;
            let scale = _mm512_set1_ps(self.scale);
            // Q·K, four slots at a time.
            for (block, slots, i0) in Runs::new(self.seq, self.lo, self.pos) {
                let kb = self.rows::<F32>(false, block, g, slots.clone());
                let mut j = slots.start;
                while j < slots.end {
                    let cnt = (slots.end - j).min(4);
                    // Missing slots repeat the last one; their sums are dropped.
                    let mut kp = [std::ptr::null::<u8>(); 4];
                    for (s, k) in kp.iter_mut().enumerate() {
                        *k = kb.add((j + s.min(cnt - 1)) * hd * es);
                    }
                    // Two slots per pass keep the accumulators of a pass in
                    // registers (the compiler spills a 4 x 4 tile).
                    let mut all = [_mm512_setzero_ps(); 16];
                    for half in 0..2 {
                        let (ka, kb) = (kp[2 * half], kp[2 * half + 1]);
                        let mut acc = [[_mm512_setzero_ps(); 2]; R];
                        let mut qc = q;
                        for c in 0..nc {
                            let k0 = ld::<F32>(ka, c);
                            let k1 = ld::<F32>(kb, c);
                            for ar in acc.iter_mut() {
                                let qv = _mm512_loadu_ps(qc);
                                ar[0] = _mm512_fmadd_ps(qv, k0, ar[0]);
                                ar[1] = _mm512_fmadd_ps(qv, k1, ar[1]);
                                qc = qc.add(hd);
                            }
                            qc = qc.sub(R * hd).add(16);
                        }
                        for (r, ar) in acc.iter().enumerate() {
                            all[4 * r + 2 * half] = ar[0];
                            all[4 * r + 2 * half + 1] = ar[1];
                        }
                    }
                    let z = _mm512_mul_ps(reduce16(&all), scale);
                    let m = (1u8 << cnt) - 1;
                    let at = i0 + (j - slots.start);
                    for r in 0..R {
                        let part = match r {
                            0 => _mm512_extractf32x4_ps::<0>(z),
                            1 => _mm512_extractf32x4_ps::<1>(z),
                            2 => _mm512_extractf32x4_ps::<2>(z),
                            _ => _mm512_extractf32x4_ps::<3>(z),
                        };
                        _mm_mask_storeu_ps(sc.add(r * n + at), m, part);
                    }
                    j += cnt;
                }
            }
            for r in 0..R {
                let row = std::slice::from_raw_parts_mut(sc.add(r * n), n);
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let sink = self
                    .sinks
                    .and_then(|s| s.get(h0 + r).copied())
                    .unwrap_or(f32::NEG_INFINITY);
                softmax_f16(row, max, sink);
            }
            // P·V, four 16-lane chunks of the head dimension at a time.
            let mut c0 = 0;
            while c0 < nc {
                match nc - c0 {
                    1 => self.pv::<R, 1, F32>(g, c0, sc, out),
                    2 => self.pv::<R, 2, F32>(g, c0, sc, out),
                    3 => self.pv::<R, 3, F32>(g, c0, sc, out),
                    _ => self.pv::<R, 4, F32>(g, c0, sc, out),
                }
                c0 += 4;
            }
        }

        /// Chunks `c0..c0 + C` of the `R` outputs: Σ over slots, in order,
        /// of probability × V.
        #[inline]
        #[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
        unsafe fn pv<const R: usize, const C: usize, const F32: bool>(
            &self,
            g: usize,
            c0: usize,
            sc: *const f32,
            out: *mut f32,
        ) {
            let (hd, n) = (self.hd, self.n);
            let es = if F32 { 4 } else { 2 };
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for (block, slots, i0) in Runs::new(self.seq, self.lo, self.pos) {
                let vb = self.rows::<F32>(true, block, g, slots.clone());
                for (i, slot) in slots.enumerate() {
                    let vp = vb.add(slot * hd * es);
                    let mut v = [_mm512_setzero_ps(); C];
                    for (c, vv) in v.iter_mut().enumerate() {
                        *vv = ld::<F32>(vp, c0 + c);
                    }
                    for (r, ar) in acc.iter_mut().enumerate() {
                        let w = _mm512_set1_ps(*sc.add(r * n + i0 + i));
                        for (a, vv) in ar.iter_mut().zip(&v) {
                            *a = _mm512_fmadd_ps(w, *vv, *a);
                        }
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                for (c, a) in ar.iter().enumerate() {
                    _mm512_storeu_ps(out.add(r * hd + 16 * (c0 + c)), *a);
                }
            }
        }
    }

    /// As [`super::softmax_f16`].
    ///
    /// # Safety
    ///
    /// The CPU runs AVX-512F/VL and F16C.
    #[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
    pub(super) unsafe fn softmax_f16(scores: &mut [f32], max: f32, sink: f32) {
        let max = max.max(sink);
        let n = scores.len();
        let p = scores.as_mut_ptr();
        let mx = _mm512_set1_ps(max);
        let mut sum = 0.0f64;
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            let x = _mm512_maskz_loadu_ps(m, p.add(i));
            let e = _mm512_maskz_mov_ps(m, v_expf(_mm512_sub_ps(x, mx)));
            _mm512_mask_storeu_ps(p.add(i), m, e);
            sum += f64::from(_mm512_reduce_add_ps(e));
            i += 16;
        }
        sum += sink_term(sink, max);
        let inv = _mm512_set1_ps((1.0 / sum) as f32);
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), inv);
            let r = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
            _mm512_mask_storeu_ps(p.add(i), m, r);
            i += 16;
        }
    }

    /// The first `left` lanes (all 16 when `left >= 16`).
    fn lanes(left: usize) -> __mmask16 {
        if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    /// ggml's AVX-512 `ggml_v_expf`, 16 lanes (see [`super::v_expf`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    pub(super) unsafe fn v_expf(x: __m512) -> __m512 {
        use expc::*;
        let c = |b: u32| _mm512_set1_ps(f32::from_bits(b));
        let r = c(ROUND);
        let z = _mm512_fmadd_ps(x, c(LOG2E), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(n, c(LN2_LO), _mm512_fnmadd_ps(n, c(LN2_HI), x));
        let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(c(P5), b, c(P4)),
                u,
                _mm512_fmadd_ps(c(P3), b, c(P2)),
            ),
            u,
            _mm512_fmadd_ps(c(P1), b, _mm512_set1_ps(1.0)),
        );
        let res = _mm512_scalef_ps(j, n);
        if d == 0 {
            return res;
        }
        let zero = _mm512_setzero_ps();
        let alt = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
            _mm512_set1_ps(f32::INFINITY),
            zero,
        );
        _mm512_mask_blend_ps(d, res, alt)
    }

    /// Lane `j` of the result is the horizontal sum of `a[j]`, with the
    /// additions of `_mm512_reduce_add_ps` (lane i + lane i+8, then i + i+4,
    /// i + i+2, i + i+1), done for all 16 vectors at once.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) unsafe fn reduce16(a: &[__m512; 16]) -> __m512 {
        // i + i+8: the 256-bit halves of a pair side by side, then added.
        let mut w = [_mm512_setzero_ps(); 8];
        for (i, wi) in w.iter_mut().enumerate() {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            *wi = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
            );
        }
        // i + i+4 inside each half: w[k] holds vectors 2k, 2k+1; x[k] holds
        // 4k..4k+3, one 128-bit chunk each.
        let mut x = [_mm512_setzero_ps(); 4];
        for (k, xk) in x.iter_mut().enumerate() {
            let (u, v) = (w[2 * k], w[2 * k + 1]);
            *xk = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(u, v),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(u, v),
            );
        }
        // i + i+2 inside each chunk: y[0] holds chunk c = vectors c and 4+c
        // (two lanes each), y[1] vectors 8+c and 12+c.
        let mut y = [_mm512_setzero_ps(); 2];
        for (k, yk) in y.iter_mut().enumerate() {
            let (u, v) = (_mm512_castps_pd(x[2 * k]), _mm512_castps_pd(x[2 * k + 1]));
            *yk = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(u, v)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(u, v)),
            );
        }
        // i + i+1: lane 4c + m now holds vector 4m + c.
        let z = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(y[0], y[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(y[0], y[1]),
        );
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(idx, z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockManager;

    /// Naive attention over explicit K/V rows, for comparison.
    fn naive(q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let sc: Vec<f32> = ks
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (w, v) in e.iter().zip(vs) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += w / z * x;
            }
        }
        out
    }

    #[test]
    fn matches_naive_attention_across_blocks_with_gqa_and_window() {
        let (n_heads, n_kv, hd) = (4, 2, 8);
        let mut cache = KvCache::new(1, n_kv, hd, 8).expect("alloc");
        let mut mgr = BlockManager::new(8);
        let mut seq = SeqKv::new();
        let n_tok = 40; // spans 3 blocks
        seq.reserve(&mut mgr, n_tok).expect("fits");
        let val = |t: usize, i: usize, sgn: f32| {
            // Values exactly representable in f16 so the comparison is tight.
            sgn * (((t * 7 + i * 3) % 11) as f32 - 5.0) / 8.0
        };
        let mut ks = vec![vec![]; n_kv];
        let mut vs = vec![vec![]; n_kv];
        for t in 0..n_tok {
            let k: Vec<f32> = (0..n_kv * hd).map(|i| val(t, i, 1.0)).collect();
            let v: Vec<f32> = (0..n_kv * hd).map(|i| val(t, i + 1, -1.0)).collect();
            let (b, slot) = seq.slot(t).expect("reserved");
            cache.write(0, b, slot, &k, &v);
            for g in 0..n_kv {
                ks[g].push(k[g * hd..(g + 1) * hd].to_vec());
                vs[g].push(v[g * hd..(g + 1) * hd].to_vec());
            }
        }
        seq.len = n_tok;
        let q: Vec<f32> = (0..n_heads * hd)
            .map(|i| ((i % 5) as f32 - 2.0) / 4.0)
            .collect();
        let mut s = AttnScratch::default();
        for (pos, window) in [
            (0, None),
            (17, None),
            (39, None),
            (39, Some(5)),
            (20, Some(30)),
        ] {
            let p = AttnParams {
                n_heads,
                n_kv_heads: n_kv,
                head_dim: hd,
                scale: 0.35,
                window,
                softcap: None,
                sinks: None,
            };
            let mut out = vec![0.0; n_heads * hd];
            attend(&cache, 0, &seq, pos, &p, 0..n_heads, &q, &mut out, &mut s);
            let lo = p.first_visible(pos);
            for h in 0..n_heads {
                let g = h / 2;
                let want = naive(
                    &q[h * hd..(h + 1) * hd],
                    &ks[g][lo..=pos],
                    &vs[g][lo..=pos],
                    0.35,
                );
                for (a, b) in out[h * hd..(h + 1) * hd].iter().zip(&want) {
                    // Probabilities are rounded to f16 (relative error 2^-11)
                    // as in ggml; outputs are convex combinations of values
                    // of magnitude ≤ 5/8, so the error stays below 1e-3.
                    assert!(
                        (a - b).abs() < 1e-3,
                        "pos {pos} window {window:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// A sequence of `n_tok` random K rows (in ±3) and V rows (±1) in a fresh
    /// single-layer cache, and random queries (±2) for `n_heads` heads.
    fn random_context(
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        n_tok: usize,
        seed: u64,
    ) -> (KvCache, SeqKv, Vec<f32>) {
        random_context_of(crate::kv::KvType::F16, n_heads, n_kv, hd, n_tok, seed)
    }

    /// [`random_context`] in a cache of type `ty`.
    fn random_context_of(
        ty: crate::kv::KvType,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        n_tok: usize,
        seed: u64,
    ) -> (KvCache, SeqKv, Vec<f32>) {
        let n_blocks = n_tok.div_ceil(BLOCK_SIZE);
        let mut cache = KvCache::new_typed(ty, 1, n_kv, hd, n_blocks).expect("alloc");
        let mut mgr = BlockManager::new(n_blocks);
        let mut seq = SeqKv::new();
        seq.reserve(&mut mgr, n_tok).expect("fits");
        let mut x = seed;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
        };
        for t in 0..n_tok {
            let k: Vec<f32> = (0..n_kv * hd).map(|_| rnd() * 3.0).collect();
            let v: Vec<f32> = (0..n_kv * hd).map(|_| rnd()).collect();
            let (b, slot) = seq.slot(t).expect("reserved");
            cache.write(0, b, slot, &k, &v);
        }
        seq.len = n_tok;
        let q: Vec<f32> = (0..n_heads * hd).map(|_| rnd() * 2.0).collect();
        (cache, seq, q)
    }

    /// The plain 16-lane kernel, one head and one slot at a time: the blocked
    /// kernel must give its results bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn one_head_at_a_time(
        cache: &KvCache,
        layer: usize,
        seq: &SeqKv,
        pos: usize,
        p: &AttnParams,
        heads: std::ops::Range<usize>,
        q: &[f32],
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let hd = p.head_dim;
        let nc = hd / 16;
        let group = p.n_heads / p.n_kv_heads;
        let lo = p.first_visible(pos);
        let n = pos + 1 - lo;
        let mut scores = vec![0.0f32; n];
        let mut q16 = vec![0.0f32; hd];
        for h in heads.clone() {
            let (g, hl) = (h / group, h - heads.start);
            for c in 0..nc {
                let v = _mm512_loadu_ps(q.as_ptr().add(hl * hd + 16 * c));
                let r = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
                _mm512_storeu_ps(q16.as_mut_ptr().add(16 * c), r);
            }
            let mut max = f32::NEG_INFINITY;
            for (block, slots, i0) in Runs::new(seq, lo, pos) {
                let kb = cache.k_head(layer, block, g);
                for (i, slot) in slots.clone().enumerate() {
                    let kp = kb.as_ptr().add(slot * hd) as *const __m256i;
                    let mut acc = _mm512_setzero_ps();
                    for c in 0..nc {
                        let k = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(c)));
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q16.as_ptr().add(16 * c)), k, acc);
                    }
                    let sc = _mm512_reduce_add_ps(acc) * p.scale;
                    scores[i0 + i] = sc;
                    max = max.max(sc);
                }
            }
            softmax_f16_sink(&mut scores, max, p.sink(h));
            for c in 0..nc {
                let mut o = _mm512_setzero_ps();
                for (block, slots, i0) in Runs::new(seq, lo, pos) {
                    let vb = cache.v_head(layer, block, g);
                    for (i, slot) in slots.clone().enumerate() {
                        let w = _mm512_set1_ps(scores[i0 + i]);
                        let vp = vb.as_ptr().add(slot * hd) as *const __m256i;
                        o = _mm512_fmadd_ps(w, _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(c))), o);
                    }
                }
                _mm512_storeu_ps(out.as_mut_ptr().add(hl * hd + 16 * c), o);
            }
        }
    }

    /// The scalar `v_expf` is an exponential (within 2 ulp of libm's over
    /// the range a softmax feeds it, 0 below ggml's cutoff) and the 16-lane
    /// one gives its bits, special values included.
    #[test]
    fn vector_expf_is_exp_and_lanes_agree_with_the_scalar_one() {
        let mut xs: Vec<f32> = vec![
            0.0, -0.0, -1e-30, -87.3, -88.7, -103.9, -104.1, -150.0, -1e4,
        ];
        xs.extend([
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            1.0,
            10.0,
            88.0,
            89.0,
            200.0,
        ]);
        // Every 61st bit pattern of the negative floats down to -2^7.
        let mut b = 0x8000_0000u32;
        while b < 0xc300_0000 {
            xs.push(f32::from_bits(b));
            b += 61;
        }
        for &x in &xs {
            let y = v_expf(x);
            if x.is_nan() {
                assert!(y.is_nan());
                continue;
            }
            let e = x.exp();
            if e >= f32::MIN_POSITIVE && e.is_finite() {
                let ulps = (y.to_bits() as i64 - e.to_bits() as i64).abs();
                assert!(ulps <= 2, "exp({x}): {y} vs {e}");
            } else if x < -104.0 {
                assert_eq!(y, 0.0, "exp({x})");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            use std::arch::x86_64::*;
            for ch in xs.chunks(16) {
                let mut lane = [0.0f32; 16];
                lane[..ch.len()].copy_from_slice(ch);
                let mut got = [0.0f32; 16];
                // SAFETY: the features were checked above.
                unsafe {
                    _mm512_storeu_ps(
                        got.as_mut_ptr(),
                        simd::v_expf(_mm512_loadu_ps(lane.as_ptr())),
                    )
                };
                for (x, g) in lane.iter().zip(&got) {
                    let want = v_expf(*x);
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "exp({x}): lanes {g} vs scalar {want}"
                    );
                }
            }
        }
    }

    /// The vector softmax gives the scalar reference's bits for rows of
    /// every length around the 16-lane chunks.
    #[test]
    fn softmax_paths_agree_bit_for_bit() {
        let mut x = 4242u64;
        for n in (1..70).chain([511, 512, 513]) {
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 11) as f64 / (1u64 << 53) as f64) as f32 * 40.0 - 30.0
                })
                .collect();
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut a = row.clone();
            let mut b = row.clone();
            softmax_f16(&mut a, max);
            softmax_f16_scalar(&mut b, max, f32::NEG_INFINITY);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "n {n}"
            );
            let total: f32 = a.iter().sum();
            assert!(
                (total - 1.0).abs() < 1e-2,
                "n {n}: probabilities sum to {total}"
            );
            // A sink above every score (as ggml: the maximum takes it in)
            // takes its share: the rest sum to 1 - p(sink), on every path.
            let sink = max + 1.5;
            let mut c = row.clone();
            let mut d = row.clone();
            let mut r = row.clone();
            softmax_f16_sink(&mut c, max, sink);
            softmax_f16_scalar(&mut d, max, sink);
            softmax_reference(&mut r, max, sink);
            assert_eq!(
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "n {n} with a sink"
            );
            let z: f64 = row.iter().map(|&v| f64::from(v - sink).exp()).sum::<f64>() + 1.0;
            let want = 1.0 - 1.0 / z;
            for (name, p) in [("fast", &c), ("reference", &r)] {
                let total: f64 = p.iter().map(|&v| f64::from(v)).sum();
                assert!(
                    (total - want).abs() < 1e-2,
                    "n {n} {name}: probabilities sum to {total}, want {want}"
                );
            }
        }
    }

    /// The transposed reduction adds the lanes exactly as
    /// `_mm512_reduce_add_ps` does, for every one of the 16 vectors.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transposed_reduction_is_the_single_vector_sum() {
        use std::arch::x86_64::*;
        if !simd::available() {
            eprintln!("skipped: no AVX-512F/VL, F16C or FMA on this CPU");
            return;
        }
        let mut x = 99u64;
        for _ in 0..2000 {
            let mut v = [[0.0f32; 16]; 16];
            for l in v.iter_mut().flatten() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Wide exponents so that the order of the additions shows.
                let m = ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                *l = m * 2f32.powi(((x >> 8) % 40) as i32 - 20);
            }
            // SAFETY: the features were checked above.
            unsafe {
                let a: [__m512; 16] = std::array::from_fn(|j| _mm512_loadu_ps(v[j].as_ptr()));
                let mut got = [0.0f32; 16];
                _mm512_storeu_ps(got.as_mut_ptr(), simd::reduce16(&a));
                for j in 0..16 {
                    let want = _mm512_reduce_add_ps(a[j]);
                    assert_eq!(got[j].to_bits(), want.to_bits(), "vector {j}");
                }
            }
        }
    }

    /// The blocked kernel gives the plain kernel's bits: head counts that
    /// leave partial tiles (7 = 4 + 3, 5, 2), head dims with partial chunk
    /// groups (48, 80) and the 256 of Gemma 3, runs that end mid-tile,
    /// windows, and head ranges crossing KV groups.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blocked_kernel_is_bit_identical_to_one_head_at_a_time() {
        if !simd::available() {
            eprintln!("skipped: no AVX-512F/VL, F16C or FMA on this CPU");
            return;
        }
        for (hd, n_heads, n_kv) in [
            (64usize, 14usize, 2usize),
            (256, 4, 1),
            (48, 5, 1),
            (80, 4, 2),
            (16, 2, 2),
        ] {
            let (cache, seq, q) = random_context(n_heads, n_kv, hd, 181, 777);
            let mut s = AttnScratch::default();
            let group = n_heads / n_kv;
            let sink_logits: std::sync::Arc<[f32]> =
                (0..n_heads).map(|h| h as f32 * 0.7 - 1.0).collect();
            for ((pos, window), sinks) in [
                (0, None),
                (2, None),
                (17, None),
                (180, None),
                (180, Some(37)),
                (99, Some(6)),
            ]
            .into_iter()
            .flat_map(|c| [(c, None), (c, Some(sink_logits.clone()))])
            {
                let p = AttnParams {
                    n_heads,
                    n_kv_heads: n_kv,
                    head_dim: hd,
                    scale: 1.0 / (hd as f32).sqrt(),
                    window,
                    softcap: None,
                    sinks,
                };
                for heads in [0..n_heads, 0..group, (group - 1)..n_heads] {
                    let rows = heads.len();
                    let qs = &q[heads.start * hd..heads.end * hd];
                    let mut a = vec![f32::NAN; rows * hd];
                    let mut b = vec![f32::NAN; rows * hd];
                    attend(&cache, 0, &seq, pos, &p, heads.clone(), qs, &mut a, &mut s);
                    // SAFETY: the features were checked above.
                    unsafe {
                        one_head_at_a_time(&cache, 0, &seq, pos, &p, heads.clone(), qs, &mut b)
                    };
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        assert_eq!(
                            x.to_bits(),
                            y.to_bits(),
                            "hd {hd} heads {heads:?} pos {pos} {window:?} #{i}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    /// The SIMD path (where the CPU has it) agrees with the scalar reference
    /// up to float summation order: both round q and the probabilities to
    /// f16 the same way; only the order of the f32 sums differs.
    #[test]
    fn simd_path_matches_scalar_reference() {
        for (hd, n_heads, n_kv) in [(64usize, 14usize, 2usize), (256, 4, 1), (48, 2, 1)] {
            let (cache, seq, q) = random_context(n_heads, n_kv, hd, 600, 12345);
            let (mut s1, mut s2) = (AttnScratch::default(), AttnScratch::default());
            let sink_logits: std::sync::Arc<[f32]> =
                (0..n_heads).map(|h| 1.5 - h as f32 * 0.4).collect();
            for ((pos, window), sinks) in [
                (0, None),
                (15, None),
                (16, None),
                (599, None),
                (599, Some(512)),
                (300, Some(7)),
            ]
            .into_iter()
            .flat_map(|c| [(c, None), (c, Some(sink_logits.clone()))])
            {
                let p = AttnParams {
                    n_heads,
                    n_kv_heads: n_kv,
                    head_dim: hd,
                    scale: 1.0 / (hd as f32).sqrt(),
                    window,
                    softcap: None,
                    sinks,
                };
                let mut a = vec![f32::NAN; n_heads * hd];
                let mut b = vec![f32::NAN; n_heads * hd];
                attend(&cache, 0, &seq, pos, &p, 0..n_heads, &q, &mut a, &mut s1);
                attend_scalar(&cache, 0, &seq, pos, &p, 0..n_heads, &q, &mut b, &mut s2);
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    // Outputs are convex combinations of values in [-1, 1];
                    // a score that moves by an f32 ulp can flip one f16
                    // rounding of a probability (2^-11 relative).
                    assert!(
                        (x - y).abs() < 2e-3,
                        "hd {hd} pos {pos} {window:?} #{i}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// With a quantized cache, the SIMD and the scalar kernels both attend
    /// over the cache's dequantized rows (rotated back where the type
    /// rotates them): each equals naive attention over those rows, up to the
    /// f16 roundings of the query and the probabilities that every path
    /// makes.
    #[test]
    fn quantized_caches_attend_over_their_dequantized_rows() {
        use crate::kv::KvType;
        for ty in [KvType::Q8_0, KvType::Q4_0, KvType::Fp8] {
            for (hd, n_heads, n_kv) in [(64usize, 14usize, 2usize), (256, 4, 1)] {
                let n_tok = 300;
                let (cache, seq, q) = random_context_of(ty, n_heads, n_kv, hd, n_tok, 777);
                // The dequantized rows, per KV head.
                let rows = |v: bool, g: usize| -> Vec<Vec<f32>> {
                    let mut buf = Vec::new();
                    (0..n_tok)
                        .map(|t| {
                            let (b, slot) = seq.slot(t).expect("reserved");
                            let r = if v {
                                cache.v_rows(0, b, g, slot..slot + 1, &mut buf)
                            } else {
                                cache.k_rows(0, b, g, slot..slot + 1, &mut buf)
                            };
                            let mut row: Vec<f32> = (0..hd).map(|d| r.at(slot * hd + d)).collect();
                            // The cache holds rotated rows; the rotation is
                            // its own inverse.
                            let (kr, vr) = cache.rotations();
                            let n = if v { vr } else { kr };
                            if n > 0 {
                                crate::kv::hadamard(&mut row, n);
                            }
                            row
                        })
                        .collect()
                };
                let kv_rows: Vec<_> = (0..n_kv).map(|g| (rows(false, g), rows(true, g))).collect();
                let (mut s1, mut s2) = (AttnScratch::default(), AttnScratch::default());
                for (pos, window) in [(0, None), (17, None), (299, None), (299, Some(40))] {
                    let p = AttnParams {
                        n_heads,
                        n_kv_heads: n_kv,
                        head_dim: hd,
                        scale: 1.0 / (hd as f32).sqrt(),
                        window,
                        softcap: None,
                        sinks: None,
                    };
                    let mut a = vec![f32::NAN; n_heads * hd];
                    let mut b = vec![f32::NAN; n_heads * hd];
                    attend(&cache, 0, &seq, pos, &p, 0..n_heads, &q, &mut a, &mut s1);
                    attend_scalar(&cache, 0, &seq, pos, &p, 0..n_heads, &q, &mut b, &mut s2);
                    let lo = p.first_visible(pos);
                    let group = n_heads / n_kv;
                    for h in 0..n_heads {
                        let g = h / group;
                        let (ks, vs) = &kv_rows[g];
                        let want = naive(
                            &q[h * hd..(h + 1) * hd],
                            &ks[lo..=pos],
                            &vs[lo..=pos],
                            p.scale,
                        );
                        for d in 0..hd {
                            let (x, y, w) = (a[h * hd + d], b[h * hd + d], want[d]);
                            // Values in ±1: the f16 query (2^-11 relative on
                            // scores of magnitude ≲ 4) and the f16
                            // probabilities keep the outputs within 4e-3.
                            assert!(
                                (x - w).abs() < 4e-3 && (y - w).abs() < 4e-3,
                                "{ty} hd {hd} pos {pos} {window:?} head {h} dim {d}: simd {x} scalar {y} naive {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
