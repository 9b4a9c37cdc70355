#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bit-for-bit agreement with llama.cpp's portable CPU code, under tl's
//! reference numerics (`tl_core::numerics::Numerics::Reference`).
//!
//! The fixtures (`forward_<model>_portable.json`, made by
//! `scripts/make_forward_fixtures.py --portable`) come from llama.cpp built
//! for the x86-64 baseline, every SIMD option off: its arithmetic is then
//! the order its C source writes, the same on every machine and for every
//! batch shape. tl in reference numerics performs the same operations in
//! the same order, so there is no tolerance: on both models and all ten
//! prompts the greedy continuations are equal, every teacher-forced
//! position has the same top-1 token, the reference's top-5 logits are
//! equal bit for bit, and the perplexity (computed from those logits, tl
//! in f64 like the script) agrees to 1e-9 relative, the slack of a
//! different order of f64 summation. The ten prompts generated together in
//! one ragged batch give the same continuations.
//!
//! The speed of this mode is that of scalar matmuls, which is why only
//! this test and the CLI's `--numerics reference` use it.

mod common;

use tl_core::numerics::{set_numerics, Numerics};
use tl_model::generate::{Runner, TokenOptions};
use tl_model::model::Model;

fn check_model(fixture: &str) {
    set_numerics(Numerics::Reference).expect("this test binary runs the reference numerics only");
    let fx = common::fixture(fixture);
    assert!(
        fx["reference"]
            .as_str()
            .expect("reference")
            .contains("portable"),
        "{fixture} is not from the portable llama.cpp build"
    );
    let model =
        Model::load(common::model_path(fx["model"].as_str().expect("model"))).expect("loads");
    let vocab = model.config.vocab;
    let mut runner = Runner::new(&model, 1024).expect("cache");
    let cases = fx["cases"].as_array().expect("cases");
    let (mut greedy_ok, mut tf_agree, mut tf_total, mut logits_equal, mut logits_total) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut max_diff = 0f32;
    for case in cases {
        let prompt = common::ids(&case["prompt_ids"]);
        let want = common::ids(&case["greedy"]);
        let opts = TokenOptions {
            max_tokens: want.len(),
            ..Default::default()
        };
        let got = runner
            .generate_batch(std::slice::from_ref(&prompt), &opts, |_, _| true)
            .expect("generates");
        if got[0].0 == want {
            greedy_ok += 1;
        } else {
            eprintln!(
                "greedy differs for {:?}:\n  ours {:?}\n  ref  {want:?}",
                case["prompt"], got[0].0
            );
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
            if tl_model::sampler::argmax(ours) == ref_ids[0] {
                tf_agree += 1;
            }
            for (id, l) in ref_ids
                .iter()
                .zip(row["logits"].as_array().expect("logits"))
            {
                // The fixture holds each f32 logit as the f64 of its value.
                let want = l.as_f64().expect("f") as f32;
                let have = ours[*id as usize];
                logits_total += 1;
                if have.to_bits() == want.to_bits() {
                    logits_equal += 1;
                }
                max_diff = max_diff.max((have - want).abs());
            }
        }
    }
    // All ten prompts as one ragged batch: the same continuations (the
    // reference numerics do not depend on the batch's shape).
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| common::ids(&c["prompt_ids"]))
        .collect();
    let n_gen = fx["n_gen"].as_u64().expect("n_gen") as usize;
    let together = runner
        .generate_batch(
            &prompts,
            &TokenOptions {
                max_tokens: n_gen,
                ..Default::default()
            },
            |_, _| true,
        )
        .expect("batch");
    let mut batch_equal = 0;
    for (t, c) in together.iter().zip(cases) {
        // A reference continuation ends early at the end-of-sequence token;
        // the batch runs every sequence to `n_gen` tokens.
        let want = common::ids(&c["greedy"]);
        if t.0.get(..want.len()) == Some(&want[..]) {
            batch_equal += 1;
        } else {
            eprintln!(
                "in the batch, greedy differs for {:?}:\n  ours {:?}\n  ref  {want:?}",
                c["prompt"], t.0
            );
        }
    }
    let p = &fx["perplexity"];
    let toks = common::ids(&p["token_ids"]);
    let ctx = p["ctx"].as_u64().expect("ctx") as usize;
    let bos = if fx["add_bos"].as_bool().expect("add_bos") {
        Some(toks[0])
    } else {
        None
    };
    let ppl = runner
        .perplexity(&toks, ctx, bos, |_, _, _| {})
        .expect("ppl")
        .ppl;
    let want_ppl = p["ppl"].as_f64().expect("ppl");
    eprintln!(
        "{fixture}: greedy {greedy_ok}/{} equal ({batch_equal} in one ragged batch); teacher-forced top-1 {tf_agree}/{tf_total}; reference top-5 logits bit-equal {logits_equal}/{logits_total} (max |diff| {max_diff:e}); perplexity {ppl:.6} vs llama.cpp {want_ppl:.6}",
        cases.len()
    );
    assert_eq!(greedy_ok, cases.len(), "{fixture}: greedy continuations");
    assert_eq!(
        batch_equal,
        cases.len(),
        "{fixture}: greedy continuations in one batch"
    );
    assert_eq!(tf_agree, tf_total, "{fixture}: teacher-forced top-1");
    assert_eq!(logits_equal, logits_total, "{fixture}: top-5 logits");
    assert!(
        (ppl / want_ppl - 1.0).abs() < 1e-9,
        "{fixture}: perplexity {ppl} vs {want_ppl}"
    );
}

#[test]
fn qwen_is_llama_cpp_portable_bit_for_bit() {
    check_model("forward_qwen_portable.json");
}

#[test]
fn gemma_is_llama_cpp_portable_bit_for_bit() {
    check_model("forward_gemma_portable.json");
}
