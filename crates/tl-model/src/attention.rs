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
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let lo = match p.window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    };
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
        let mut t = lo;
        while t <= pos {
            let Some((block, slot0)) = seq.slot(t) else {
                break;
            };
            let kb = cache.k_head(layer, block, g);
            let end_slot = BLOCK_SIZE.min(slot0 + (pos + 1 - t));
            for slot in slot0..end_slot {
                let k = &kb[slot * hd..(slot + 1) * hd];
                let mut dot = 0.0f32;
                for (a, b) in s.q16.iter().zip(k) {
                    dot += a * b.to_f32();
                }
                let sc = dot * p.scale;
                s.scores[t - lo + slot - slot0] = sc;
                max = max.max(sc);
            }
            t += end_slot - slot0;
        }
        // ggml `soft_max`: exponentials in f32, their sum in f64, then a
        // scale by the f32 reciprocal. The probabilities are rounded to f16
        // because ggml multiplies them with the f16 V cache in f16 (the f32
        // operand of an f16 matmul is converted to f16).
        let mut sum = 0.0f64;
        for sc in s.scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += f64::from(*sc);
        }
        let inv = (1.0 / sum) as f32;
        for sc in s.scores.iter_mut() {
            *sc = f16::from_f32(*sc * inv).to_f32();
        }
        let o = &mut out[hl * hd..(hl + 1) * hd];
        o.fill(0.0);
        let mut t = lo;
        while t <= pos {
            let Some((block, slot0)) = seq.slot(t) else {
                break;
            };
            let vb = cache.v_head(layer, block, g);
            let end_slot = BLOCK_SIZE.min(slot0 + (pos + 1 - t));
            for slot in slot0..end_slot {
                let w = s.scores[t - lo + slot - slot0];
                for (acc, v) in o.iter_mut().zip(&vb[slot * hd..(slot + 1) * hd]) {
                    *acc += w * v.to_f32();
                }
            }
            t += end_slot - slot0;
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
            let lo = window.map(|w| (pos + 1).saturating_sub(w)).unwrap_or(0);
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
}
