//! Speculative decoding: cheap guesses of the next few tokens, verified by
//! one forward of the target model over all of them.
//!
//! A round for one sequence feeds `[next, d1, …, dk]` (the token already
//! chosen, then k drafted ones) with logits for every position, so row `i`
//! is the target's distribution after `d1..di`. [`verify`] walks the rows
//! with the speculative-sampling rule of Leviathan et al. 2023 ("Fast
//! Inference from Transformers via Speculative Decoding", algorithm 1) and
//! Chen et al. 2023: draft `di` with draft probability `q(di)` is accepted
//! with probability `min(1, p(di) / q(di))` under the target's processed
//! distribution `p` (after penalties, temperature, top-k/top-p/min-p); at
//! the first rejection the replacement is drawn from `max(0, p − q)`
//! renormalised and the round ends; if all k are accepted one more token is
//! drawn from the last row. The emitted tokens then follow exactly the
//! target's distribution. Greedy decoding is the one-hot case: a draft is
//! accepted iff it is the target's argmax, so the output is the same text
//! as without speculation.
//!
//! Rejected tokens need no KV work: their entries sit past the sequence's
//! new length and are overwritten by the next step (the paged cache is
//! written in place, never copied).
//!
//! Draft sources: prompt lookup ([`NgramDrafter`], no second model: the
//! last n tokens are looked up earlier in the prompt and the text so far,
//! and what followed them is proposed) and a draft model decoding greedily
//! (`Runner::with_draft`, its own paged cache kept in step with the accepted
//! text). Both draft deterministically, so the draft distribution is a
//! point mass (`q(di) = 1`) and the rule above stays exact at any
//! temperature.

use crate::constrain::Constraint;
use crate::sampler::Sampler;

/// Which drafter a request uses.
#[derive(Clone, Debug, PartialEq)]
pub enum SpecMethod {
    /// Prompt lookup: n-gram matches in the prompt and the output so far.
    Ngram,
    /// A smaller model of the same vocabulary drafts greedily (attach it
    /// with `Runner::with_draft` / `Llm::generate_with_draft`).
    Draft,
    /// Self-speculation: the target drafts for itself with a subset of its
    /// layers (see [`self_draft_layers`]); no second model.
    SelfDraft,
}

impl std::fmt::Display for SpecMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpecMethod::Ngram => "ngram",
            SpecMethod::Draft => "draft",
            SpecMethod::SelfDraft => "self",
        })
    }
}

impl std::str::FromStr for SpecMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ngram" | "lookup" | "prompt-lookup" => Ok(SpecMethod::Ngram),
            "draft" => Ok(SpecMethod::Draft),
            "self" => Ok(SpecMethod::SelfDraft),
            other => Err(format!(
                "unknown speculation method '{other}' (supported: ngram, draft, self)"
            )),
        }
    }
}

/// Speculation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecConfig {
    pub method: SpecMethod,
    /// Most tokens drafted per round (the round's k adapts below it).
    pub k: usize,
    /// A draft model stops drafting a sequence's round at the first
    /// position where its top probability is below this (llama.cpp's
    /// `--draft-p-min`); 0 drafts the whole budget.
    pub p_min: f32,
    /// Longest and shortest n-gram looked up.
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl SpecConfig {
    /// Largest accepted `k`.
    pub const MAX_K: usize = 32;

    pub fn new(method: SpecMethod, k: usize) -> Result<Self, String> {
        if k == 0 || k > Self::MAX_K {
            return Err(format!(
                "speculation k = {k} is out of range (1..={})",
                Self::MAX_K
            ));
        }
        Ok(SpecConfig {
            method,
            k,
            p_min: 0.0,
            ngram_max: 4,
            ngram_min: 2,
        })
    }

    /// These settings with the draft model's stopping probability `p`
    /// (0 ≤ p < 1).
    pub fn with_p_min(mut self, p: f32) -> Result<Self, String> {
        if !(0.0..1.0).contains(&p) {
            return Err(format!(
                "draft p-min = {p} is out of range (0 ≤ p < 1; 0 turns it off)"
            ));
        }
        self.p_min = p;
        Ok(self)
    }
}

/// Whether the softmax of `row`, whose largest value is `max`, gives that
/// value a probability of at least `p_min`: `Σ exp(x − max) ≤ 1 / p_min`,
/// summed in chunks with an early exit once the sum is past the bound (an
/// unsure row is usually found in the first chunks). A row with NaN or
/// infinite values is not sure.
pub fn top_prob_at_least(row: &[f32], max: f32, p_min: f32) -> bool {
    if p_min <= 0.0 {
        return true;
    }
    if !max.is_finite() {
        return false;
    }
    let bound = 1.0 / p_min;
    let mut sum = 0f32;
    for chunk in row.chunks(2048) {
        sum += chunk.iter().map(|&x| (x - max).exp()).sum::<f32>();
        if sum > bound || sum.is_nan() {
            return false;
        }
    }
    true
}

/// The layers the self-speculation draft leaves out (`skip[il]`) for a
/// model of `n_layers`: a run of middle layers, the first and last layers
/// kept (they map tokens in and out of the residual stream and matter
/// most). `TL_SELF_SKIP=a-b,c` overrides the choice (layer ranges).
pub fn self_draft_layers(n_layers: usize) -> Vec<bool> {
    let mut skip = vec![false; n_layers];
    if let Ok(v) = std::env::var("TL_SELF_SKIP") {
        for part in v.split(',').filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                for s in skip.iter_mut().take(b + 1).skip(a) {
                    *s = true;
                }
            }
        }
        return skip;
    }
    // Every other layer of the middle half.
    let (from, to) = (n_layers / 4, n_layers - n_layers / 4);
    for il in (from..to).step_by(2) {
        skip[il] = true;
    }
    skip
}

/// Most tokens the layer-skipping self-draft proposes per round (its
/// acceptance is low: each drafted token costs most of a target step).
/// Prompt lookup drafts first; this draft only where it finds nothing.
pub const SELF_DRAFT_K: usize = 2;

/// Activation rows the CPU's quantized matmul kernels carry through one
/// pass over a weight (tl-core's tile of 8 rows): a verify step over 8
/// tokens costs about 2 one-token steps on the 2-core AVX-512 machine, one
/// over 9 about 3 (a second pass over every weight). Draft lengths are
/// chosen so that the verify feed (the drafts and the token before them)
/// fills whole tiles.
pub const VERIFY_TILE: usize = 8;

/// Drafts to ask for in a round whose budget is `k`: `k` itself while the
/// feed fits one tile, else the largest count whose feed fills whole tiles.
pub fn tile_k(k: usize) -> usize {
    if k < VERIFY_TILE {
        k
    } else {
        (k + 1) / VERIFY_TILE * VERIFY_TILE - 1
    }
}

/// The next round's budget after one that drafted `drafted` tokens and
/// had `accepted` of them accepted, at most `max_k`: one more after a fully
/// accepted round (past one tile: up to the next whole tile, so that
/// [`tile_k`] can use it), half after a round that accepted nothing, the
/// same otherwise.
pub fn adapt_k(k: usize, drafted: usize, accepted: usize, max_k: usize) -> usize {
    if accepted >= drafted {
        let next = if k + 1 < VERIFY_TILE {
            k + 1
        } else {
            (k + 1) / VERIFY_TILE * VERIFY_TILE + VERIFY_TILE - 1
        };
        next.min(max_k).max(1)
    } else if accepted == 0 {
        (k / 2).max(1)
    } else {
        k
    }
}

/// Drafted and accepted counts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpecStats {
    /// Verification rounds that carried at least one draft.
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
}

impl SpecStats {
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    pub fn add(&mut self, o: &SpecStats) {
        self.rounds += o.rounds;
        self.drafted += o.drafted;
        self.accepted += o.accepted;
    }
}

/// Prompt-lookup drafts.
#[derive(Clone, Debug)]
pub struct NgramDrafter {
    pub n_max: usize,
    pub n_min: usize,
}

impl NgramDrafter {
    /// Up to `k` tokens that followed the latest earlier occurrence of the
    /// longest suffix of `history` (between `n_max` and `n_min` tokens long)
    /// that occurs earlier; nothing when no suffix recurs.
    pub fn draft(&self, history: &[u32], k: usize, out: &mut Vec<u32>) {
        out.clear();
        let len = history.len();
        for n in (self.n_min.max(1)..=self.n_max).rev() {
            if n >= len {
                continue;
            }
            let pat = &history[len - n..];
            // Latest earlier start `j` (j + n < len, so the match is not the
            // suffix itself) with something after it.
            let mut j = len - n;
            while j > 0 {
                j -= 1;
                if &history[j..j + n] == pat {
                    let from = j + n;
                    let to = (from + k).min(len);
                    out.extend_from_slice(&history[from..to]);
                    return;
                }
            }
        }
    }
}

/// The outcome of one verification round.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    /// Drafts accepted (a prefix of the drafts).
    pub accepted: usize,
    /// Tokens to emit: the accepted drafts, then the replacement or bonus
    /// token (never empty).
    pub tokens: Vec<u32>,
}

/// Runs the acceptance rule over `rows` (`drafts.len() + 1` logits rows of
/// `vocab`, modified in place by the sampler's penalties) for drafts from a
/// point-mass drafter. `history` is the sequence before `drafts[0]` (its
/// last token is the one fed at row 0), used for the penalties.
pub fn verify(
    sampler: &mut Sampler,
    rows: &mut [f32],
    vocab: usize,
    drafts: &[u32],
    history: &[u32],
) -> Verified {
    let mut hist = history.to_vec();
    let mut tokens = Vec::with_capacity(drafts.len() + 1);
    let mut dist = Vec::new();
    for (i, row) in rows.chunks_exact_mut(vocab).enumerate() {
        sampler.distribution(row, &hist, &mut dist);
        let Some(&d) = drafts.get(i) else {
            // Every draft accepted: one more token from the last row.
            let t = sampler.draw(&dist);
            tokens.push(t);
            return Verified {
                accepted: drafts.len(),
                tokens,
            };
        };
        let p = dist.iter().find(|c| c.0 == d).map_or(0.0, |c| c.1);
        // q(d) = 1: accept with probability p(d).
        if p > 0.0 && (p >= 1.0 || sampler.uniform() < p) {
            tokens.push(d);
            hist.push(d);
            continue;
        }
        // Rejected: draw from max(0, p - q) = p without d, renormalised.
        dist.retain(|c| c.0 != d);
        let t = if dist.is_empty() {
            d
        } else {
            sampler.draw(&dist)
        };
        tokens.push(t);
        return Verified {
            accepted: i,
            tokens,
        };
    }
    // `rows` held fewer than drafts + 1 rows: emit what was accepted.
    Verified {
        accepted: tokens.len(),
        tokens,
    }
}

/// [`verify`] for a sequence under a lazy grammar whose trigger has not
/// fired yet ([`Constraint::is_waiting`]). Each row's token is drawn as
/// the plain step draws it — [`Constraint::pick`] around the sampler's
/// draw: free text, with the reply's opening watched for a text trigger —
/// and a draft is accepted iff it is that token. For a point-mass draft
/// that is the acceptance rule itself (`d` is accepted with probability
/// `p(d)`, and a token drawn other than `d` follows `p` without `d`,
/// renormalised), so the emitted tokens keep the plain step's
/// distribution, and greedy picks give the same text.
///
/// The round ends with the token that turns the grammar on: what follows
/// it is the grammar's (the tokens it forces, then masked picks), which
/// the next steps produce as they do without speculation, so every draft
/// after it is rejected whatever the target's rows say. A trigger that was
/// a draft is still emitted, as the round's last token, but not counted
/// in [`Verified::accepted`] (the drafts kept in the cache): like a
/// replacement token it is fed again by the next step.
///
/// Also returns whether the grammar ended the choice (a trigger after
/// which it allows nothing: `tokens` may then be empty); an error of the
/// grammar is returned as it is.
pub fn verify_lazy(
    sampler: &mut Sampler,
    rows: &mut [f32],
    vocab: usize,
    drafts: &[u32],
    history: &[u32],
    c: &mut Constraint,
) -> Result<(Verified, bool), String> {
    let mut hist = history.to_vec();
    let mut tokens = Vec::with_capacity(drafts.len() + 1);
    for (i, row) in rows.chunks_exact_mut(vocab).enumerate() {
        let Some(t) = c.pick(row, |row| sampler.sample(row, &hist))? else {
            let accepted = tokens.len();
            return Ok((Verified { accepted, tokens }, true));
        };
        tokens.push(t);
        if !c.is_waiting() {
            // The trigger: the grammar's from here.
            let accepted = tokens.len() - 1;
            return Ok((Verified { accepted, tokens }, false));
        }
        match drafts.get(i) {
            Some(&d) if d == t => hist.push(t),
            // The replacement of a rejected draft, or the token after
            // all of them.
            _ => {
                return Ok((
                    Verified {
                        accepted: i,
                        tokens,
                    },
                    false,
                ))
            }
        }
    }
    // `rows` held fewer than drafts + 1 rows: emit what was accepted.
    Ok((
        Verified {
            accepted: tokens.len(),
            tokens,
        },
        false,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SamplingParams;

    #[test]
    fn ngram_finds_the_latest_longest_match() {
        let d = NgramDrafter { n_max: 3, n_min: 1 };
        let mut out = Vec::new();
        // "a b c x y a b c" -> the suffix "a b c" occurred at 0, followed by x y ...
        d.draft(&[1, 2, 3, 7, 8, 1, 2, 3], 4, &mut out);
        assert_eq!(out, vec![7, 8, 1, 2]);
        // No recurring suffix.
        d.draft(&[1, 2, 3, 4], 4, &mut out);
        assert!(out.is_empty());
        // Shorter n-gram when the long one does not recur; the latest match.
        d.draft(&[5, 9, 6, 5, 8, 6, 5], 2, &mut out);
        assert_eq!(out, vec![8, 6]);
    }

    #[test]
    fn draft_lengths_fill_whole_verify_tiles() {
        assert_eq!(tile_k(1), 1);
        assert_eq!(tile_k(7), 7);
        // 9..=15 rows would need a second pass over the weights for
        // fewer than 16 rows: stay at one tile.
        assert_eq!(tile_k(8), 7);
        assert_eq!(tile_k(14), 7);
        assert_eq!(tile_k(15), 15);
        assert_eq!(tile_k(32), 31);
        // Growth: one at a time within the first tile, then tile by tile.
        assert_eq!(adapt_k(3, 3, 3, 32), 4);
        assert_eq!(adapt_k(7, 7, 7, 32), 15);
        assert_eq!(adapt_k(8, 7, 7, 32), 15);
        assert_eq!(adapt_k(15, 15, 15, 32), 23);
        assert_eq!(adapt_k(7, 7, 7, 8), 8);
        assert_eq!(adapt_k(8, 3, 0, 8), 4);
        assert_eq!(adapt_k(1, 1, 0, 8), 1);
        assert_eq!(adapt_k(6, 6, 2, 8), 6);
    }

    #[test]
    fn top_probability_against_p_min() {
        // Two equal logits: each has probability 1/2.
        let row = [0.0f32, 3.0, 3.0, -50.0];
        assert!(top_prob_at_least(&row, 3.0, 0.45));
        assert!(!top_prob_at_least(&row, 3.0, 0.55));
        assert!(top_prob_at_least(&row, 3.0, 0.0));
        // One clear winner over a long row.
        let mut long = vec![-20.0f32; 10_000];
        long[7] = 5.0;
        assert!(top_prob_at_least(&long, 5.0, 0.99));
        assert!(!top_prob_at_least(&[f32::NAN, 1.0], f32::NAN, 0.5));
        assert!(SpecConfig::new(SpecMethod::Draft, 8)
            .and_then(|c| c.with_p_min(1.0))
            .is_err());
        assert!(SpecConfig::new(SpecMethod::Draft, 8)
            .and_then(|c| c.with_p_min(f32::NAN))
            .is_err());
    }

    #[test]
    fn greedy_accepts_exactly_the_argmax_prefix() {
        let mut s = Sampler::new(SamplingParams::default()).expect("sampler");
        let vocab = 4;
        // Row argmaxes: 2, 1, 3.
        let mut rows = vec![0., 0., 5., 0., 0., 5., 0., 0., 0., 0., 0., 5.];
        let v = verify(&mut s, &mut rows.clone(), vocab, &[2, 1], &[0]);
        assert_eq!(
            v,
            Verified {
                accepted: 2,
                tokens: vec![2, 1, 3]
            }
        );
        let v = verify(&mut s, &mut rows, vocab, &[2, 0], &[0]);
        assert_eq!(
            v,
            Verified {
                accepted: 1,
                tokens: vec![2, 1]
            }
        );
    }

    /// Chi-square statistic of observed counts against probabilities.
    fn chi2(counts: &[usize], p: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// The first emitted token of a speculative round follows the target's
    /// processed distribution whatever the draft, at temperature > 0 with
    /// and without truncation: 20,000 rounds per case, chi-square at
    /// significance 0.001 (critical values for 5 and 3 degrees of freedom:
    /// 20.52 and 16.27).
    #[test]
    fn speculative_sampling_keeps_the_target_distribution() {
        let logits = [1.0f32, 0.2, 2.0, -0.5, 0.7, 1.5];
        let vocab = logits.len();
        for (params, df_crit) in [
            (
                SamplingParams {
                    temperature: 0.8,
                    seed: 3,
                    ..Default::default()
                },
                20.52,
            ),
            (
                SamplingParams {
                    temperature: 1.3,
                    top_k: 4,
                    seed: 4,
                    ..Default::default()
                },
                16.27,
            ),
        ] {
            let mut s = Sampler::new(params.clone()).expect("sampler");
            let mut dist = Vec::new();
            s.distribution(&mut logits.to_vec(), &[], &mut dist);
            let mut p = vec![0f64; vocab];
            for &(t, q) in &dist {
                p[t as usize] = q;
            }
            for draft in [0u32, 2, 3] {
                let mut counts = vec![0usize; vocab];
                for _ in 0..20_000 {
                    let mut rows: Vec<f32> = logits.iter().chain(&logits).copied().collect();
                    let v = verify(&mut s, &mut rows, vocab, &[draft], &[]);
                    counts[v.tokens[0] as usize] += 1;
                }
                let x = chi2(&counts, &p);
                assert!(
                    x < df_crit,
                    "draft {draft}, {params:?}: chi2 {x:.2} over {counts:?} vs {p:?}"
                );
            }
        }
    }
}
