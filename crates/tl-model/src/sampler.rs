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
}

/// A stateful sampler (its RNG advances with each draw).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    cand: Vec<(f32, u32)>,
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
            counts: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies repetition, presence and frequency penalties in place
    /// (llama.cpp `llama_sampler_penalties_apply`: positive logits are divided
    /// by the repeat penalty, negative ones multiplied).
    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        if p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
            return;
        }
        let window = match p.penalty_last_n {
            -1 => history,
            0 => return,
            n => &history[history.len().saturating_sub(n as usize)..],
        };
        self.counts.clear();
        for &t in window {
            match self.counts.iter_mut().find(|(id, _)| *id == t) {
                Some((_, c)) => *c += 1,
                None => self.counts.push((t, 1)),
            }
        }
        for &(t, c) in &self.counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if *l > 0.0 {
                *l /= p.repeat_penalty;
            } else {
                *l *= p.repeat_penalty;
            }
            *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }

    /// Picks the next token from `logits` (modified in place by penalties).
    /// `history` is the sequence so far (prompt and generated tokens).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_penalties(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let p = self.params.clone();
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let by_logit_desc =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            self.cand.truncate(p.top_k);
        }
        self.cand.sort_unstable_by(by_logit_desc);
        if self.cand.is_empty() {
            return 0;
        }
        // Softmax over the survivors (at the unscaled logits, as llama.cpp's
        // top-p and min-p see them before temperature).
        let max = self.cand[0].0;
        let mut sum = 0.0f64;
        for c in &self.cand {
            sum += ((c.0 - max) as f64).exp();
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0f64;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                cum += ((c.0 - max) as f64).exp() / sum;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            // p_i / p_max >= min_p  ⇔  l_i - l_max >= ln(min_p)
            let cut = max + p.min_p.ln();
            let keep = self.cand.iter().take_while(|c| c.0 >= cut).count();
            self.cand.truncate(keep.max(1));
        }
        let inv_t = 1.0 / p.temperature;
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
}

/// Index of the largest value; the first one on ties (as ggml's argmax).
pub fn argmax(v: &[f32]) -> u32 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
