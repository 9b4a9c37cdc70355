//! Causal attention of one token's queries over a sequence's paged KV cache,
//! read in place (no gather of the context into a contiguous buffer).
//!
//! Numerics follow llama.cpp's CPU path (without flash attention) with an
//! f16 cache: the query is rounded to f16 before the Q·K dot products (ggml
//! converts the f32 operand of an f16 matmul to f16), the softmax is f32 with
//! an f64 sum, the probabilities are rounded to f16 for the product with V,
//! and that weighted sum accumulates in f32.

use half::f16;

use crate::kv::{KvCache, SeqKv, BLOCK_SIZE};

/// Reusable buffers so a decode step allocates nothing.
#[derive(Default)]
pub struct AttnScratch {
    scores: Vec<f32>,
    q16: Vec<f32>,
}

/// Parameters shared by every token of a layer.
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding window: a token at position p sees positions > p - window.
    pub window: Option<usize>,
}

impl AttnParams {
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
    #[cfg(target_arch = "x86_64")]
    if p.head_dim.is_multiple_of(16) && p.head_dim <= simd::MAX_HEAD_DIM && simd::available() {
        // SAFETY: `available` checked the CPU features the function uses.
        unsafe { simd::attend(cache, layer, seq, pos, p, heads, q, out, s) };
        return;
    }
    attend_scalar(cache, layer, seq, pos, p, heads, q, out, s);
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
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let lo = p.first_visible(pos);
    let n = pos + 1 - lo;
    s.scores.resize(n, 0.0);
    s.q16.resize(hd, 0.0);
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
            let kb = cache.k_head(layer, block, g);
            for (i, slot) in slots.clone().enumerate() {
                let k = &kb[slot * hd..(slot + 1) * hd];
                let mut dot = 0.0f32;
                for (a, b) in s.q16.iter().zip(k) {
                    dot += a * b.to_f32();
                }
                let sc = dot * p.scale;
                s.scores[i0 + i] = sc;
                max = max.max(sc);
            }
        }
        // ggml `soft_max`: exponentials in f32, their sum in f64, then a
        // scale by the f32 reciprocal. The probabilities are rounded to f16
        // because ggml multiplies them with the f16 V cache in f16 (the f32
        // operand of an f16 matmul is converted to f16).
        softmax_f16(&mut s.scores, max);
        let o = &mut out[hl * hd..(hl + 1) * hd];
        o.fill(0.0);
        for (block, slots, i0) in Runs::new(seq, lo, pos) {
            let vb = cache.v_head(layer, block, g);
            for (i, slot) in slots.clone().enumerate() {
                let w = s.scores[i0 + i];
                for (acc, v) in o.iter_mut().zip(&vb[slot * hd..(slot + 1) * hd]) {
                    *acc += w * v.to_f32();
                }
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

/// Softmax of `scores` in place with ggml's numerics (see the module docs),
/// ending with the probabilities rounded to f16.
fn softmax_f16(scores: &mut [f32], max: f32) {
    let mut sum = 0.0f64;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += f64::from(*sc);
    }
    let inv = (1.0 / sum) as f32;
    for sc in scores.iter_mut() {
        *sc = f16::from_f32(*sc * inv).to_f32();
    }
}

/// AVX-512 attention: the f16 cache converted 16 values at a time
/// (`vcvtph2ps`), Q·K as 16-lane FMAs over the head dimension then one
/// horizontal sum (the shape of llamafile's tinyBLAS kernel that llama.cpp
/// uses for these products), and the P·V sum as 16-lane FMAs over the head
/// dimension, slot after slot. Same softmax as the scalar path.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{softmax_f16, AttnParams, AttnScratch, Runs};
    use crate::kv::{KvCache, SeqKv};

    /// Largest head dimension kept in registers (Gemma 3 uses 256).
    pub(super) const MAX_HEAD_DIM: usize = 256;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
    }

    /// As [`super::attend`].
    ///
    /// # Safety
    ///
    /// The CPU runs AVX-512F, F16C and FMA; `p.head_dim` is a multiple of 16
    /// and at most [`MAX_HEAD_DIM`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,f16c,fma")]
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
        let nc = hd / 16;
        let group = p.n_heads / p.n_kv_heads;
        let lo = p.first_visible(pos);
        let n = pos + 1 - lo;
        s.scores.resize(n, 0.0);
        s.q16.resize(hd, 0.0);
        let h0 = heads.start;
        for h in heads {
            let g = h / group;
            let hl = h - h0;
            let qh = &q[hl * hd..(hl + 1) * hd];
            // The query rounded to f16, as ggml converts it.
            for c in 0..nc {
                let v = _mm512_loadu_ps(qh.as_ptr().add(16 * c));
                let r = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
                _mm512_storeu_ps(s.q16.as_mut_ptr().add(16 * c), r);
            }
            let qp = s.q16.as_ptr();
            let mut max = f32::NEG_INFINITY;
            for (block, slots, i0) in Runs::new(seq, lo, pos) {
                let kb = cache.k_head(layer, block, g);
                // The block holds BLOCK_SIZE rows of `hd` values.
                debug_assert!(kb.len() >= slots.end * hd);
                for (i, slot) in slots.clone().enumerate() {
                    let kp = kb.as_ptr().add(slot * hd) as *const __m256i;
                    let mut acc = _mm512_setzero_ps();
                    for c in 0..nc {
                        let k = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(c)));
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(16 * c)), k, acc);
                    }
                    let sc = _mm512_reduce_add_ps(acc) * p.scale;
                    s.scores[i0 + i] = sc;
                    max = max.max(sc);
                }
            }
            softmax_f16(&mut s.scores[..n], max);
            let mut o = [_mm512_setzero_ps(); MAX_HEAD_DIM / 16];
            for (block, slots, i0) in Runs::new(seq, lo, pos) {
                let vb = cache.v_head(layer, block, g);
                debug_assert!(vb.len() >= slots.end * hd);
                for (i, slot) in slots.clone().enumerate() {
                    let w = _mm512_set1_ps(s.scores[i0 + i]);
                    let vp = vb.as_ptr().add(slot * hd) as *const __m256i;
                    for (c, oc) in o.iter_mut().enumerate().take(nc) {
                        let v = _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(c)));
                        *oc = _mm512_fmadd_ps(w, v, *oc);
                    }
                }
            }
            let op = out[hl * hd..(hl + 1) * hd].as_mut_ptr();
            for (c, oc) in o.iter().enumerate().take(nc) {
                _mm512_storeu_ps(op.add(16 * c), *oc);
            }
        }
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

    /// The SIMD path (where the CPU has it) agrees with the scalar reference
    /// up to float summation order: both round q and the probabilities to
    /// f16 the same way; only the order of the f32 sums differs.
    #[test]
    fn simd_path_matches_scalar_reference() {
        for (hd, n_heads, n_kv) in [(64usize, 14usize, 2usize), (256, 4, 1), (48, 2, 1)] {
            let n_blocks = 40;
            let mut cache = KvCache::new(1, n_kv, hd, n_blocks).expect("alloc");
            let mut mgr = BlockManager::new(n_blocks);
            let mut seq = SeqKv::new();
            let n_tok = 600;
            seq.reserve(&mut mgr, n_tok).expect("fits");
            let mut x = 12345u64;
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
            let (mut s1, mut s2) = (AttnScratch::default(), AttnScratch::default());
            for (pos, window) in [
                (0, None),
                (15, None),
                (16, None),
                (599, None),
                (599, Some(512)),
                (300, Some(7)),
            ] {
                let p = AttnParams {
                    n_heads,
                    n_kv_heads: n_kv,
                    head_dim: hd,
                    scale: 1.0 / (hd as f32).sqrt(),
                    window,
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
}
