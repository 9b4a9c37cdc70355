//! Token sampling: penalties, top-k, top-p, min-p, temperature, seeded draw.
//!
//! The order follows llama.cpp's default sampler chain (`common/sampling.cpp`):
//! penalties → top-k → top-p → min-p → temperature → distribution. A
//! temperature ≤ 0 means greedy (argmax after penalties). The sampler owns
//! its scratch buffers, so sampling a token allocates nothing.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};

/// Sampling options. `Default` is greedy with no penalties.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at (0 = none, -1 = all).
    pub penalty_last_n: i64,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges once at the edge so the sampler never sees nonsense.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: String| {
            Err(ModelError::BadSampling(format!(
                "{what} = {v} is out of range"
            )))
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature (≥ 0)", self.temperature.to_string());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p (0 < p ≤ 1)", self.top_p.to_string());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p (0 ≤ p ≤ 1)", self.min_p.to_string());
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repeat_penalty (> 0)", self.repeat_penalty.to_string());
        }
        for (n, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(&format!("{n} (-2 ≤ x ≤ 2)"), v.to_string());
            }
        }
        if self.penalty_last_n < -1 {
            return bad("penalty_last_n (≥ -1)", self.penalty_last_n.to_string());
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Greedy with no penalty: the pick is the plain argmax of the logits,
    /// so it can be taken where the logits are (on the GPU).
    pub fn is_plain_argmax(&self) -> bool {
        self.is_greedy()
            && (self.repeat_penalty == 1.0 || self.penalty_last_n == 0)
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
    }
}

/// One pick to be taken on the device (see [`Sampler::device_draw`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceDraw {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Uniform in [0, 1).
    pub u: f64,
    /// The penalty window's distinct tokens with their counts.
    pub penalties: Vec<(u32, u32)>,
}

impl DeviceDraw {
    /// Greedy without penalties: the plain argmax.
    pub fn is_plain_argmax(&self) -> bool {
        self.temperature <= 0.0 && self.penalties.is_empty()
    }
}

/// Sets every logit of `row` whose bit in `words` is clear to −∞ (token
/// `t` is bit `t % 32` of word `t / 32`; tokens past the words are
/// refused): a grammar's mask. 32 logits a word, whole words allowed or
/// refused at once.
pub fn apply_mask(row: &mut [f32], words: &[u32]) {
    for (w, chunk) in row.chunks_mut(32).enumerate() {
        match words.get(w).copied().unwrap_or(0) {
            u32::MAX => {}
            0 => chunk.fill(f32::NEG_INFINITY),
            d => {
                for (bit, l) in chunk.iter_mut().enumerate() {
                    if d & (1 << bit) == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// [`pick`] after `mask` (a grammar's bits, see [`apply_mask`]), if any.
pub fn pick_masked(row: &mut [f32], d: &DeviceDraw, mask: Option<&[u32]>) -> u32 {
    if let Some(words) = mask {
        apply_mask(row, words);
    }
    pick(row, d)
}

/// A stateful sampler (its RNG advances with each draw).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    cand: Vec<(f32, u32)>,
    /// Unnormalised probabilities of the untruncated draw.
    weights: Vec<f64>,
    counts: Vec<(u32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            cand: Vec::new(),
            weights: Vec::new(),
            counts: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The penalty window's distinct tokens and their counts into
    /// `self.counts` (empty when no penalty applies).
    fn count_penalties(&mut self, history: &[u32]) {
        self.counts.clear();
        let p = &self.params;
        if p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
            return;
        }
        let window = match p.penalty_last_n {
            -1 => history,
            0 => return,
            n => &history[history.len().saturating_sub(n as usize)..],
        };
        for &t in window {
            match self.counts.iter_mut().find(|(id, _)| *id == t) {
                Some((_, c)) => *c += 1,
                None => self.counts.push((t, 1)),
            }
        }
    }

    /// Applies repetition, presence and frequency penalties in place
    /// (llama.cpp `llama_sampler_penalties_apply`: positive logits are divided
    /// by the repeat penalty, negative ones multiplied).
    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        self.count_penalties(history);
        let p = &self.params;
        penalize(
            logits,
            &self.counts,
            p.repeat_penalty,
            p.presence_penalty,
            p.frequency_penalty,
        );
    }

    /// What a device needs to take this sampler's next pick where the
    /// logits are: the parameters, the penalty window's counts over
    /// `history`, and a uniform draw from this sampler's generator (one
    /// per pick, as [`Sampler::sample`] takes; none when greedy). The
    /// device draws from the same distribution as [`Sampler::sample`] by
    /// the inverse CDF in token order, so a seed gives a different (equally
    /// distributed) sequence than on the CPU.
    pub fn device_draw(&mut self, history: &[u32]) -> DeviceDraw {
        self.count_penalties(history);
        let p = &self.params;
        let u = if p.is_greedy() {
            0.0
        } else {
            self.rng.gen::<f64>()
        };
        let p = &self.params;
        DeviceDraw {
            temperature: p.temperature,
            top_k: p.top_k.min(i32::MAX as usize) as i32,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            u,
            penalties: self.counts.clone(),
        }
    }

    /// Picks the next token from `logits` (modified in place by penalties).
    /// `history` is the sequence so far (prompt and generated tokens).
    ///
    /// Never sorts the whole vocabulary: with nothing to truncate the draw
    /// is one pass in index order; otherwise only the sorted prefix that
    /// top-k / top-p / min-p can keep is built (see [`Sampler::kept_prefix`]).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_penalties(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        if logits.is_empty() {
            return 0;
        }
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let truncating = (p.top_k > 0 && p.top_k < logits.len()) || p.top_p < 1.0 || p.min_p > 0.0;
        if !truncating {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            self.weights.clear();
            self.weights
                .extend(logits.iter().map(|&l| (((l - max) * inv_t) as f64).exp()));
            let total: f64 = self.weights.iter().sum();
            let mut r = self.rng.gen::<f64>() * total;
            let mut last = 0;
            for (i, &w) in self.weights.iter().enumerate() {
                if w > 0.0 {
                    last = i;
                }
                r -= w;
                if r <= 0.0 && w > 0.0 {
                    return i as u32;
                }
            }
            return last as u32;
        }
        self.kept_prefix(logits);
        let max = self.cand[0].0;
        let mut total = 0.0f64;
        for c in self.cand.iter_mut() {
            c.0 = (((c.0 - max) * inv_t) as f64).exp() as f32;
            total += c.0 as f64;
        }
        let mut r = self.rng.gen::<f64>() * total;
        for c in &self.cand {
            r -= c.0 as f64;
            if r <= 0.0 {
                return c.1;
            }
        }
        self.cand[self.cand.len() - 1].1
    }

    /// The distribution [`Sampler::sample`] draws from, as `(token, p)`
    /// pairs with p > 0 summing to 1: penalties applied to `logits` in
    /// place, then greedy (a point mass on the argmax) or the temperature
    /// softmax over the tokens that survive top-k / top-p / min-p.
    pub fn distribution(&mut self, logits: &mut [f32], history: &[u32], out: &mut Vec<(u32, f64)>) {
        out.clear();
        self.apply_penalties(logits, history);
        if logits.is_empty() {
            return;
        }
        if self.params.is_greedy() {
            out.push((argmax(logits), 1.0));
            return;
        }
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let truncating = (p.top_k > 0 && p.top_k < logits.len()) || p.top_p < 1.0 || p.min_p > 0.0;
        if truncating {
            self.kept_prefix(logits);
            let max = self.cand[0].0;
            out.extend(
                self.cand
                    .iter()
                    .map(|c| (c.1, (((c.0 - max) * inv_t) as f64).exp())),
            );
        } else {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            out.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, (((l - max) * inv_t) as f64).exp())),
            );
        }
        out.retain(|c| c.1 > 0.0);
        let total: f64 = out.iter().map(|c| c.1).sum();
        out.iter_mut().for_each(|c| c.1 /= total);
    }

    /// A uniform draw in [0, 1) from the sampler's generator.
    pub fn uniform(&mut self) -> f64 {
        self.rng.gen::<f64>()
    }

    /// A draw from `(token, weight)` pairs (weights need not sum to 1).
    pub fn draw(&mut self, dist: &[(u32, f64)]) -> u32 {
        let total: f64 = dist.iter().map(|c| c.1).sum();
        let mut r = self.rng.gen::<f64>() * total;
        for c in dist {
            r -= c.1;
            if r <= 0.0 && c.1 > 0.0 {
                return c.0;
            }
        }
        dist.iter().rev().find(|c| c.1 > 0.0).map_or(0, |c| c.0)
    }

    /// Leaves in `cand`, sorted by logit (descending, ties by id), the
    /// tokens that survive top-k → top-p → min-p, as llama.cpp's chain
    /// keeps them: top-p and min-p see the softmax of the top-k survivors
    /// at the unscaled logits; at least one token is kept.
    ///
    /// Only a prefix is sorted: the first `PREFIX` survivors are selected
    /// in O(n) and sorted; if top-p's mass is not reached within them (and
    /// min-p does not cut earlier) the rest is sorted too. The result is
    /// the same as sorting everything.
    fn kept_prefix(&mut self, logits: &[f32]) {
        const PREFIX: usize = 512;
        let p = &self.params;
        let by_logit_desc =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            self.cand.truncate(p.top_k);
        }
        let max = self
            .cand
            .iter()
            .map(|c| c.0)
            .fold(f32::NEG_INFINITY, f32::max);
        // min-p keeps p_i / p_max >= min_p  ⇔  l_i - l_max >= ln(min_p).
        let cut = if p.min_p > 0.0 {
            max + p.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        let n_min_p = self.cand.iter().filter(|c| c.0 >= cut).count();
        let sum: f64 = if p.top_p < 1.0 {
            self.cand.iter().map(|c| ((c.0 - max) as f64).exp()).sum()
        } else {
            0.0
        };
        // Everything past the min-p count goes anyway, so only that many
        // (and at first at most PREFIX) need sorting.
        let want = if p.top_p < 1.0 {
            n_min_p.min(PREFIX)
        } else {
            n_min_p
        };
        let mut sorted = want.max(1).min(self.cand.len());
        loop {
            if sorted < self.cand.len() {
                self.cand.select_nth_unstable_by(sorted - 1, by_logit_desc);
            }
            self.cand[..sorted].sort_unstable_by(by_logit_desc);
            let mut keep = sorted.min(n_min_p);
            let mut reached = p.top_p >= 1.0;
            if !reached {
                let mut cum = 0.0f64;
                for (i, c) in self.cand[..sorted].iter().enumerate() {
                    cum += ((c.0 - max) as f64).exp() / sum;
                    if cum >= p.top_p as f64 {
                        keep = keep.min(i + 1);
                        reached = true;
                        break;
                    }
                }
            }
            if reached || sorted >= n_min_p.min(self.cand.len()) {
                self.cand.truncate(keep.max(1));
                return;
            }
            // top-p needs more than the prefix: sort up to the min-p count.
            sorted = n_min_p.min(self.cand.len());
        }
    }
}

/// Repetition, presence and frequency penalties over `(token, count)`
/// pairs, in place (llama.cpp `llama_sampler_penalties_apply`: positive
/// logits are divided by the repeat penalty, negative ones multiplied).
fn penalize(logits: &mut [f32], counts: &[(u32, u32)], rep: f32, pres: f32, freq: f32) {
    for &(t, c) in counts {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if *l > 0.0 {
            *l /= rep;
        } else {
            *l *= rep;
        }
        *l -= c as f32 * freq + pres;
    }
}

/// The pick a device takes for `d` from one logits row (modified in place
/// by the penalties): penalties, then greedy or the kept set of the
/// sampler chain, then the inverse CDF of the temperature softmax in token
/// order at `d.u`. The host reference of the CUDA sampling kernel, and
/// the same distribution as [`Sampler::sample`] (tested below).
pub fn pick(logits: &mut [f32], d: &DeviceDraw) -> u32 {
    penalize(
        logits,
        &d.penalties,
        d.repeat_penalty,
        d.presence_penalty,
        d.frequency_penalty,
    );
    for l in logits.iter_mut() {
        if l.is_nan() {
            *l = f32::NEG_INFINITY;
        }
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if d.temperature <= 0.0 || logits.is_empty() || max == f32::NEG_INFINITY {
        return argmax(logits);
    }
    let params = SamplingParams {
        temperature: d.temperature,
        top_k: d.top_k.max(0) as usize,
        top_p: d.top_p,
        min_p: d.min_p,
        ..Default::default()
    };
    let truncating = (params.top_k > 0 && params.top_k < logits.len())
        || params.top_p < 1.0
        || params.min_p > 0.0;
    let mut kept: Vec<(f32, u32)> = if truncating {
        let mut s = Sampler {
            params: params.clone(),
            rng: ChaCha8Rng::seed_from_u64(0),
            cand: Vec::new(),
            weights: Vec::new(),
            counts: Vec::new(),
        };
        s.kept_prefix(logits);
        s.cand
    } else {
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect()
    };
    kept.sort_unstable_by_key(|c| c.1);
    let inv_t = 1.0 / d.temperature;
    let w = |l: f32| (((l - max) * inv_t) as f64).exp();
    let total: f64 = kept.iter().map(|c| w(c.0)).sum();
    let mut r = d.u * total;
    let mut last = kept.first().map_or(0, |c| c.1);
    for c in &kept {
        let x = w(c.0);
        if x > 0.0 {
            last = c.1;
            r -= x;
            if r < 0.0 {
                return c.1;
            }
        }
    }
    last
}

/// Index of the largest value; the first one on ties (as ggml's argmax).
pub fn argmax(v: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if v.len() >= 64 && is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just checked.
        return unsafe { argmax_avx512(v) };
    }
    argmax_scalar(v)
}

/// [`argmax`] one value at a time: the first index of the largest value,
/// NaN never chosen, 0 when nothing beats negative infinity.
fn argmax_scalar(v: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best_v = x;
            best = i;
        }
    }
    best as u32
}

/// [`argmax_scalar`] 16 lanes at a time: each lane keeps its first largest
/// value (a strict `>`, so NaN never wins), then the lanes' best are
/// compared by value and, on equal values, by index.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn argmax_avx512(v: &[f32]) -> u32 {
    use std::arch::x86_64::*;
    let n = v.len();
    let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut bidx = _mm512_setzero_si512();
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let step = _mm512_set1_epi32(16);
    let mut i = 0;
    while i + 16 <= n {
        let x = _mm512_loadu_ps(v.as_ptr().add(i));
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, best);
        best = _mm512_mask_mov_ps(best, gt, x);
        bidx = _mm512_mask_mov_epi32(bidx, gt, idx);
        idx = _mm512_add_epi32(idx, step);
        i += 16;
    }
    let mut bv = [0f32; 16];
    let mut bi = [0u32; 16];
    _mm512_storeu_ps(bv.as_mut_ptr(), best);
    _mm512_storeu_si512(bi.as_mut_ptr() as *mut __m512i, bidx);
    let (mut best_v, mut best_i) = (f32::NEG_INFINITY, 0u32);
    for (&x, &j) in bv.iter().zip(&bi) {
        if x > best_v || (x == best_v && x > f32::NEG_INFINITY && j < best_i) {
            best_v = x;
            best_i = j;
        }
    }
    for (j, &x) in v.iter().enumerate().skip(i) {
        if x > best_v {
            best_v = x;
            best_i = j as u32;
        }
    }
    best_i
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The vector argmax picks what the scalar loop picks: first index of
    /// the largest, ties, NaN and infinities included, any length.
    #[test]
    fn vector_argmax_is_the_scalar_one() {
        let mut x = 31u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for len in (1..100).chain([1000, 4099]) {
            for case in 0..6 {
                let v: Vec<f32> = (0..len)
                    .map(|_| {
                        let r = rnd();
                        match (case, r % 13) {
                            (0, _) => (r % 1000) as f32 / 7.0,
                            (1, _) => (r % 5) as f32, // many ties
                            (2, 0) => f32::NAN,
                            (3, _) => f32::NEG_INFINITY,
                            (4, 0) => f32::INFINITY,
                            (5, 1) => f32::NAN,
                            (5, _) => f32::NEG_INFINITY,
                            _ => -((r % 1000) as f32),
                        }
                    })
                    .collect();
                assert_eq!(argmax(&v), argmax_scalar(&v), "len {len} case {case}");
            }
        }
    }

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_picks_argmax_and_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::default()).expect("valid");
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
        assert_eq!(s.sample(&mut [5.0, 5.0, 1.0], &[]), 0);
    }

    #[test]
    fn repeat_penalty_changes_greedy_choice() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        })
        .expect("valid");
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0], &[1]), 2);
        let mut logits = [-1.0f32, 3.0];
        s.apply_penalties(&mut logits, &[0]);
        assert_eq!(logits[0], -2.0);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        })
        .expect("valid");
        let mut logits = [1.0f32, 1.0, 1.0];
        s.apply_penalties(&mut logits, &[0, 0, 2]);
        assert_eq!(logits, [1.0 - 0.5 - 0.5, 1.0, 1.0 - 0.25 - 0.5]);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params()
        })
        .expect("valid");
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.9, -3.0], &[]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ≈ [0.665, 0.245, 0.09]
        let logits = [2.0f32, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.6,
            ..params()
        })
        .expect("valid");
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.3,
            seed: 3,
            ..params()
        })
        .expect("valid");
        for _ in 0..200 {
            assert_ne!(s.sample(&mut logits.clone(), &[]), 2, "0.09/0.665 < 0.3");
        }
    }

    #[test]
    fn same_seed_same_draws_and_distribution_is_sane() {
        let logits = [0.0f32, (2.0f32).ln()];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params() }).expect("valid");
            (0..3000)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 2.0 / 3.0).abs() < 0.04, "{ones}");
    }

    /// The survivors as a full sort finds them (llama.cpp's chain, literally).
    fn reference_kept(logits: &[f32], p: &SamplingParams) -> Vec<(f32, u32)> {
        let mut c: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect();
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if p.top_k > 0 {
            c.truncate(p.top_k);
        }
        let max = c[0].0;
        let sum: f64 = c.iter().map(|x| ((x.0 - max) as f64).exp()).sum();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                cum += ((x.0 - max) as f64).exp() / sum;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let cut = max + p.min_p.ln();
            let keep = c.iter().take_while(|x| x.0 >= cut).count();
            c.truncate(keep.max(1));
        }
        c
    }

    #[test]
    fn partial_sort_keeps_what_a_full_sort_keeps() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        for case in 0..300 {
            let n = [3usize, 100, 600, 5000][case % 4];
            // Peaked and flat distributions, with ties.
            let spread = [0.1f32, 1.0, 8.0][case % 3];
            let logits: Vec<f32> = (0..n)
                .map(|_| (rng.gen_range(-1.0f32..1.0) * spread * 8.0).round() / 8.0)
                .collect();
            let p = SamplingParams {
                temperature: 0.8,
                top_k: [0, 1, 40, 700][rng.gen_range(0..4)],
                top_p: [1.0, 0.5, 0.9, 0.999][rng.gen_range(0..4)],
                min_p: [0.0, 0.05, 0.001][rng.gen_range(0..3)],
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone()).expect("valid");
            if !((p.top_k > 0 && p.top_k < n) || p.top_p < 1.0 || p.min_p > 0.0) {
                continue;
            }
            s.kept_prefix(&logits);
            let want = reference_kept(&logits, &p);
            assert_eq!(s.cand.len(), want.len(), "case {case} n={n} {p:?}");
            assert!(s.cand == want, "case {case} n={n} {p:?}");
        }
    }

    #[test]
    fn untruncated_draws_follow_the_distribution() {
        // No top-k/top-p/min-p: the one-pass draw in index order.
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut s = Sampler::new(SamplingParams {
            seed: 5,
            ..params()
        })
        .expect("valid");
        let draws: Vec<u32> = (0..4000)
            .map(|_| s.sample(&mut logits.clone(), &[]))
            .collect();
        assert!(draws.iter().all(|&t| t < 2), "a -inf logit is never drawn");
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / draws.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    /// The device pick over a grid of u values draws each token as often
    /// as [`Sampler::distribution`] gives it (within one grid step), with
    /// and without truncation, penalties included.
    #[test]
    fn device_pick_follows_the_sampler_distribution() {
        let mut x = 7u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 10_000) as f32 / 1000.0 - 5.0
        };
        let logits: Vec<f32> = (0..300).map(|_| rnd()).collect();
        let history: Vec<u32> = vec![3, 3, 17, 250, 4];
        for (t, k, tp, mp, rep) in [
            (1.0, 0, 1.0, 0.0, 1.0),
            (0.7, 40, 1.0, 0.0, 1.0),
            (1.3, 0, 0.9, 0.0, 1.1),
            (0.8, 20, 0.5, 0.05, 1.0),
            (1.0, 0, 1.0, 0.2, 1.3),
        ] {
            let p = SamplingParams {
                temperature: t,
                top_k: k,
                top_p: tp,
                min_p: mp,
                repeat_penalty: rep,
                presence_penalty: 0.1,
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone()).unwrap();
            let mut dist = Vec::new();
            s.distribution(&mut logits.clone(), &history, &mut dist);
            let draw = s.device_draw(&history);
            let n = 20_000;
            let mut counts = std::collections::HashMap::new();
            for i in 0..n {
                let d = DeviceDraw {
                    u: (i as f64 + 0.5) / n as f64,
                    ..draw.clone()
                };
                *counts
                    .entry(pick(&mut logits.clone(), &d))
                    .or_insert(0usize) += 1;
            }
            for &(tok, pr) in &dist {
                let got = counts.remove(&tok).unwrap_or(0) as f64 / n as f64;
                assert!(
                    (got - pr).abs() <= 1.5 / n as f64,
                    "{p:?}: token {tok} p {pr} got {got}"
                );
            }
            assert!(
                counts.is_empty(),
                "{p:?}: picked outside the distribution: {counts:?}"
            );
        }
    }

    #[test]
    fn out_of_range_params_are_rejected() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 3.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }
}
