#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fidelity against llama.cpp (fixtures from scripts/make_forward_fixtures.py):
//! greedy continuations, top-1 agreement under teacher forcing, largest logit
//! difference, perplexity, and batch invariance.
//!
//! Tolerances. The reference is llama.cpp with each prompt or teacher-forced
//! sequence evaluated as one batch of up to 512 tokens. The fixtures also
//! hold llama.cpp against itself with one token per batch
//! (`llama_cpp_n_batch_1`): same weights, same code, only the float order of
//! ggml's kernels differs (which matmul and attention kernels run depends on
//! the batch's token count). That moves llama.cpp's own logits by up to 0.43
//! (Qwen) and 1.47 (Gemma), keeps its greedy continuations fully equal on
//! only 7/10 (Qwen) and 3/10 (Gemma) prompts, and its teacher-forced top-1
//! on 390/399 and 422/434 positions. The cause is chaotic amplification, not
//! a bug: Q·K logits reach the thousands (Qwen) so an ulp of difference in
//! Q or K flips the f16 rounding of a softmax probability, and each
//! quantization of activations to Q8 turns small differences into whole
//! quantization steps; Qwen's massive activations (one residual channel
//! grows to ~80 within layers 3-5 at some tokens) amplify further. Without
//! cross-token attention (position 0) our hidden states agree with
//! llama.cpp's to ~1e-7 relative through every layer of both models.
//! A position whose reference top-2 margin is below `NEAR_TIE` = 0.5 is
//! therefore a coin toss. The checks:
//! - greedy: every continuation equals llama.cpp's up to the first position
//!   whose reference margin is below `NEAR_TIE` (or below llama.cpp's own
//!   largest logit movement between its batch shapes on that model), or up to a token that
//!   llama.cpp's own one-token-batch run chose as we did (a divergence at a
//!   clear margin that llama.cpp itself did not make fails), and at least as
//!   many are fully equal as llama.cpp's own one-token-batch run, less
//!   `GREEDY_SLACK`; the count equal to either llama.cpp run is printed;
//! - teacher forcing: top-1 agrees on ≥ 99% of positions with a clear
//!   margin, and over all positions on at least llama.cpp's own
//!   one-token-batch rate less `TF_SLACK`;
//! - perplexity within 1% of llama.cpp's.
//!
//! The largest logit difference on the reference top-5 is printed next to
//! llama.cpp's own.
//!
//! This is the default (`fast`) numerics. Against llama.cpp's portable
//! build, tl's reference numerics agree with no tolerance at all: see
//! `fidelity_reference.rs` and docs/FIDELITY.md (which also shows
//! llama.cpp's AVX-512 and portable builds agreeing with each other only at
//! the level checked here: greedy 7/10 and 5/10, top-1 97.4% and 97.2%).

mod common;

use tl_model::generate::{Runner, TokenOptions};
use tl_model::model::Model;

/// Reference top-2 margins below this are within llama.cpp's own noise.
const NEAR_TIE: f64 = 0.5;
/// Fully equal greedy continuations may fall short of llama.cpp's own
/// one-token-batch count by this many (a count out of 10 of coin tosses).
const GREEDY_SLACK: usize = 2;
/// Teacher-forced top-1 agreement over all positions may fall short of
/// llama.cpp's own one-token-batch rate by this much.
const TF_SLACK: f64 = 0.01;

fn margin(row: &serde_json::Value) -> f64 {
    let l = row["logits"].as_array().expect("logits");
    l[0].as_f64().expect("f") - l[1].as_f64().expect("f")
}

fn argmax(v: &[f32]) -> u32 {
    tl_model::sampler::argmax(v)
}

fn check_model(fixture: &str) {
    let fx = common::fixture(fixture);
    let model =
        Model::load(common::model_path(fx["model"].as_str().expect("model"))).expect("loads");
    let vocab = model.config.vocab;
    let mut runner = Runner::new(&model, 1024).expect("cache");
    let cases = fx["cases"].as_array().expect("cases");
    let (mut greedy_ok, mut tf_agree, mut tf_total, mut max_diff) = (0, 0usize, 0usize, 0f32);
    let mut greedy_either = 0usize;
    let (mut clear_agree, mut clear_total) = (0usize, 0usize);
    // llama.cpp against itself, evaluated one token per batch.
    let (mut self_greedy, mut self_tf, mut self_max) = (0usize, 0usize, 0f64);
    let mut divergences = Vec::new();
    for case in cases {
        let own = &case["llama_cpp_n_batch_1"];
        if own["greedy"] == case["greedy"] {
            self_greedy += 1;
        }
        let own_top1 = common::ids(&own["teacher_forced_top1"]);
        for ((row, &t), at) in case["teacher_forced_top"]
            .as_array()
            .expect("rows")
            .iter()
            .zip(&own_top1)
            .zip(own["logits_at_reference_top"].as_array().expect("logits"))
        {
            if t == common::ids(&row["ids"])[0] {
                self_tf += 1;
            }
            for (a, b) in at
                .as_array()
                .expect("logits")
                .iter()
                .zip(row["logits"].as_array().expect("logits"))
            {
                self_max = self_max.max((a.as_f64().expect("f") - b.as_f64().expect("f")).abs());
            }
        }
        let prompt = common::ids(&case["prompt_ids"]);
        let want = common::ids(&case["greedy"]);
        let opts = TokenOptions {
            max_tokens: want.len(),
            ..Default::default()
        };
        let got = runner
            .generate_batch(std::slice::from_ref(&prompt), &opts, |_, _| true)
            .expect("generates");
        let got = &got[0].0;
        let tf = case["teacher_forced_top"].as_array().expect("rows");
        let own_greedy = common::ids(&own["greedy"]);
        if *got == want || *got == own_greedy {
            greedy_either += 1;
        }
        if *got == want {
            greedy_ok += 1;
        } else {
            let j = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            let m = tf.get(prompt.len() - 1 + j).map(margin).unwrap_or(0.0);
            // llama.cpp itself made our choice at this point when only its
            // batch shape changed: the divergence is within its own noise.
            let as_own = j < got.len() && j < own_greedy.len() && got[..=j] == own_greedy[..=j];
            eprintln!(
                "greedy differs for {:?} at generated token {j} (reference margin {m:.3}{}):\n  ours {got:?}\n  ref  {want:?}",
                case["prompt"],
                if as_own { "; llama.cpp with one token per batch chose as we did" } else { "" }
            );
            divergences.push((m, as_own, case["prompt"].to_string()));
        }
        let all: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let logits = runner.all_logits(&all).expect("logits");
        for (i, row) in case["teacher_forced_top"]
            .as_array()
            .expect("rows")
            .iter()
            .enumerate()
        {
            let ours = &logits[i * vocab..(i + 1) * vocab];
            let ref_ids = common::ids(&row["ids"]);
            tf_total += 1;
            let agree = argmax(ours) == ref_ids[0];
            if agree {
                tf_agree += 1;
            }
            if margin(row) >= NEAR_TIE {
                clear_total += 1;
                if agree {
                    clear_agree += 1;
                }
            }
            for (id, l) in ref_ids
                .iter()
                .zip(row["logits"].as_array().expect("logits"))
            {
                let d = (ours[*id as usize] - l.as_f64().expect("f") as f32).abs();
                max_diff = max_diff.max(d);
            }
        }
    }
    // A greedy divergence must be at a near tie: below NEAR_TIE, or below
    // the largest logit movement llama.cpp itself shows between its two
    // batch shapes on this model (1.47 on Gemma). The wider bound matters
    // where this machine's SIMD kernels are not the ones the fixtures'
    // llama.cpp build ran (an AVX2-only CPU against an AVX-512 build): the
    // float order then differs from llama.cpp's as much as llama.cpp's
    // builds differ from each other.
    let tie = NEAR_TIE.max(self_max);
    for (m, as_own, prompt) in &divergences {
        assert!(
            *m < tie || *as_own,
            "{fixture}: greedy diverges at a clear reference margin {m:.3} (llama.cpp's own noise {self_max:.3}) for {prompt}"
        );
    }
    let rate = tf_agree as f64 / tf_total as f64;
    let clear = clear_agree as f64 / clear_total as f64;
    eprintln!(
        "{fixture}: greedy {greedy_ok}/{} fully equal ({greedy_either} equal to one of llama.cpp's two runs); teacher-forced top-1 {tf_agree}/{tf_total} ({:.2}%) overall, {clear_agree}/{clear_total} ({:.2}%) where the reference margin >= {NEAR_TIE}; max |logit diff| on reference top-5 {max_diff:.4}",
        cases.len(),
        100.0 * rate,
        100.0 * clear
    );
    let self_rate = self_tf as f64 / tf_total as f64;
    eprintln!(
        "{fixture}: llama.cpp against itself (one token per batch): greedy {self_greedy}/{} fully equal; teacher-forced top-1 {self_tf}/{tf_total} ({:.2}%); max |logit diff| on reference top-5 {self_max:.4}",
        cases.len(),
        100.0 * self_rate
    );
    assert!(
        clear >= 0.99,
        "teacher-forced top-1 agreement at clear margins {clear}"
    );
    assert!(
        greedy_ok + GREEDY_SLACK >= self_greedy,
        "{fixture}: {greedy_ok} greedy continuations fully equal, llama.cpp's own one-token-batch run has {self_greedy}"
    );
    assert!(
        rate >= self_rate - TF_SLACK,
        "{fixture}: teacher-forced top-1 agreement {rate:.4} below llama.cpp's own one-token-batch {self_rate:.4}"
    );

    // Perplexity the way llama.cpp's tool computes it.
    let p = &fx["perplexity"];
    let toks = common::ids(&p["token_ids"]);
    let ctx = p["ctx"].as_u64().expect("ctx") as usize;
    let add_bos = fx["add_bos"].as_bool().expect("add_bos");
    let bos = if add_bos { Some(toks[0]) } else { None };
    let ppl = runner
        .perplexity(&toks, ctx, bos, |_, _, _| {})
        .expect("ppl")
        .ppl;
    let want = p["ppl"].as_f64().expect("ppl");
    eprintln!("{fixture}: perplexity {ppl:.4} vs llama.cpp {want:.4}");
    assert!(
        (ppl / want - 1.0).abs() < 0.01,
        "perplexity {ppl} vs {want}"
    );
}

#[test]
fn qwen_matches_llama_cpp() {
    check_model("forward_qwen.json");
}

#[test]
fn gemma_matches_llama_cpp() {
    check_model("forward_gemma.json");
}

#[test]
fn batch_invariance() {
    let fx = common::fixture("forward_qwen.json");
    let model =
        Model::load(common::model_path(fx["model"].as_str().expect("model"))).expect("loads");
    let prompts: Vec<Vec<u32>> = fx["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .take(4)
        .map(|c| common::ids(&c["prompt_ids"]))
        .collect();
    let opts = TokenOptions {
        max_tokens: 12,
        ..Default::default()
    };
    let mut runner = Runner::new(&model, 2048).expect("cache");
    let together = runner
        .generate_batch(&prompts, &opts, |_, _| true)
        .expect("batch");
    for (p, t) in prompts.iter().zip(&together) {
        let alone = runner
            .generate_batch(std::slice::from_ref(p), &opts, |_, _| true)
            .expect("alone");
        assert_eq!(alone[0].0, t.0, "batched and alone differ");
    }
    assert_eq!(
        runner.blocks.n_free(),
        runner.blocks.n_total(),
        "all blocks freed"
    );
}
