#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Speculative decoding is exact: greedy output is token-identical with
//! and without it (synthetic models of every architecture, batched; the real
//! Qwen model on code-editing and free-generation prompts), and at
//! temperature > 0 the first token of a verification round follows the real
//! model's processed next-token distribution (chi-square over 10,000 draws).

#[allow(dead_code)]
mod common;

use tl_gguf::{GgmlType, GgufFile};
use tl_model::generate::{Runner, TokenOptions};
use tl_model::llm::{GenerateOptions, Llm};
use tl_model::model::Model;
use tl_model::sampler::{Sampler, SamplingParams};
use tl_model::spec::{verify, SpecConfig, SpecMethod};
use tl_model::synth::{synthesize, SynthArch, SynthSpec};

fn ngram(k: usize) -> Option<SpecConfig> {
    Some(SpecConfig::new(SpecMethod::Ngram, k).expect("config"))
}

#[test]
fn greedy_is_identical_with_prompt_lookup_on_every_architecture() {
    for arch in [SynthArch::Qwen2, SynthArch::Llama, SynthArch::Gemma3] {
        let s = SynthSpec {
            arch,
            weight_type: GgmlType::Q8_0,
            output_type: GgmlType::Q8_0,
            seed: 2,
            ..Default::default()
        };
        let bytes = synthesize(&s).expect("synth").to_bytes().expect("bytes");
        let m = Model::from_file(GgufFile::from_bytes(bytes).expect("parses")).expect("loads");
        // Repetitive prompts so that lookups find matches.
        let prompts: Vec<Vec<u32>> = vec![
            [5u32, 6, 7, 8, 9].repeat(6),
            (0..40).map(|i| 3 + (i % 11) as u32).collect(),
            vec![1, 40, 41, 42, 40, 41],
        ];
        let mut r = Runner::new(&m, 2048).expect("cache");
        let plain = TokenOptions {
            max_tokens: 40,
            ..Default::default()
        };
        let want = r
            .generate_batch(&prompts, &plain, |_, _| true)
            .expect("plain");
        for k in [1, 4, 8] {
            let spec = TokenOptions {
                spec: ngram(k),
                ..plain.clone()
            };
            let got = r
                .generate_batch(&prompts, &spec, |_, _| true)
                .expect("spec");
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(a.0, b.0, "{arch:?} k={k}: speculative output differs");
            }
        }
        assert!(r.spec_stats.drafted > 0, "{arch:?}: nothing was drafted");
        assert_eq!(
            r.blocks.n_free(),
            r.blocks.n_total(),
            "{arch:?}: leaked blocks"
        );
    }
}

#[test]
fn greedy_is_identical_with_prompt_lookup_on_qwen() {
    let llm = Llm::load(common::model_path("qwen2.5-coder-0.5b-instruct-q4.gguf")).expect("loads");
    let code = "def summarize(values, weights=None):\n    total = 0.0\n    count = 0\n    for i, v in enumerate(values):\n        w = 1.0 if weights is None else weights[i]\n        total += v * w\n        count += 1\n    if count == 0:\n        return 0.0\n    return total / count\n";
    let prompts = [
        format!("<|im_start|>user\nRename `total` to `acc` in this function; output only the code.\n```python\n{code}```<|im_end|>\n<|im_start|>assistant\n"),
        format!("<|im_start|>user\nAdd a docstring to this function; output only the code.\n```python\n{code}```<|im_end|>\n<|im_start|>assistant\n"),
        "Write a Python function that checks whether a number is prime.".to_string(),
    ];
    let mut stats = tl_model::spec::SpecStats::default();
    for p in &prompts {
        let plain = GenerateOptions {
            max_tokens: 64,
            ..Default::default()
        };
        let a = llm.generate(p, &plain, |_| true).expect("plain");
        let spec = GenerateOptions {
            spec: ngram(8),
            ..plain
        };
        let b = llm.generate(p, &spec, |_| true).expect("spec");
        assert_eq!(a.tokens, b.tokens, "prompt {p:?}");
        stats.add(&b.spec);
    }
    eprintln!(
        "qwen prompt lookup: {} drafted, {} accepted ({:.1}%)",
        stats.drafted,
        stats.accepted,
        100.0 * stats.acceptance()
    );
    assert!(stats.accepted > 0);
}

/// Critical chi-square at significance 0.001 for `df` degrees of freedom
/// (Wilson–Hilferty approximation; within 1% of the table for df >= 3).
fn chi2_critical(df: f64) -> f64 {
    let z = 3.090_232; // the 0.999 normal quantile
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + z * a.sqrt()).powi(3)
}

#[test]
fn sampling_stays_exact_on_a_real_next_token_distribution() {
    let model =
        Model::load(common::model_path("qwen2.5-coder-0.5b-instruct-q4.gguf")).expect("loads");
    let vocab = model.config.vocab;
    let mut r = Runner::new(&model, 64).expect("cache");
    let prompt: Vec<u32> = vec![785, 6722, 315, 9625, 374]; // "The capital of France is"
    let logits = r.all_logits(&prompt).expect("logits");
    let row = logits[(prompt.len() - 1) * vocab..].to_vec();
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 12,
        seed: 9,
        ..Default::default()
    };
    let mut s = Sampler::new(params).expect("sampler");
    let mut dist = Vec::new();
    s.distribution(&mut row.clone(), &[], &mut dist);
    assert!(dist.len() >= 2);
    // Draft the second most likely token: rejected often, accepted often.
    let mut sorted = dist.clone();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    let draft = sorted[1].0;
    let n = 10_000;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..n {
        let mut rows: Vec<f32> = row.iter().chain(&row).copied().collect();
        let v = verify(&mut s, &mut rows, vocab, &[draft], &[]);
        *counts.entry(v.tokens[0]).or_insert(0usize) += 1;
    }
    // Tokens expected fewer than 5 times are pooled into one bin (the
    // chi-square approximation needs expected counts of at least 5).
    let (mut x, mut bins) = (0.0, 0usize);
    let (mut pool_e, mut pool_c) = (0.0, 0.0);
    for &(t, p) in &dist {
        let e = p * n as f64;
        let c = counts.get(&t).copied().unwrap_or(0) as f64;
        if e < 5.0 {
            pool_e += e;
            pool_c += c;
            continue;
        }
        x += (c - e) * (c - e) / e;
        bins += 1;
    }
    if pool_e > 0.0 {
        x += (pool_c - pool_e) * (pool_c - pool_e) / pool_e;
        bins += 1;
    }
    assert!(
        counts.keys().all(|t| dist.iter().any(|d| d.0 == *t)),
        "a token outside the target's support was emitted"
    );
    let crit = chi2_critical((bins.max(2) - 1) as f64);
    eprintln!(
        "real-model chi2 {x:.2} (critical {crit:.2}, {} tokens)",
        dist.len()
    );
    assert!(x < crit, "chi2 {x:.2} >= {crit:.2}");
}

/// A small random Qwen2 model of Q8_0 weights (`seed`, `layers`).
fn qwen_q8(seed: u64, layers: usize) -> Model {
    let s = SynthSpec {
        arch: SynthArch::Qwen2,
        weight_type: GgmlType::Q8_0,
        output_type: GgmlType::Q8_0,
        n_layers: layers,
        seed,
        ..Default::default()
    };
    let bytes = synthesize(&s).expect("synth").to_bytes().expect("bytes");
    Model::from_file(GgufFile::from_bytes(bytes).expect("parses")).expect("loads")
}

#[test]
fn greedy_is_identical_with_a_draft_model() {
    let mk = qwen_q8;
    let target = mk(2, 3);
    // The target's own weights with the output projection requantized to
    // Q4_0 for drafting (`--draft-output-type`, the CLI's default).
    let mut cheap = mk(2, 3);
    assert_eq!(cheap.output_type(), GgmlType::Q8_0);
    assert!(
        cheap.requantize_output(GgmlType::Q4_0).expect("requantize"),
        "a Q8_0 head is requantized to Q4_0"
    );
    assert!(
        !cheap.requantize_output(GgmlType::Q8_0).expect("no-op"),
        "never to a wider type"
    );
    // Its logits are the target's within Q4_0's rounding, and not equal
    // (the requantized copy is the one the product reads).
    let logits = |m: &Model| -> Vec<f32> {
        use tl_model::kv::{BlockManager, SeqKv};
        use tl_model::model::{Logits, SeqBatch};
        let tokens: Vec<u32> = (0..9).map(|i| 3 + i * 11).collect();
        let mut cache = m.new_cache(64).expect("cache");
        let mut blocks = BlockManager::new(cache.n_blocks);
        let mut kv = SeqKv::new();
        kv.reserve(&mut blocks, tokens.len()).expect("blocks");
        let mut st = tl_model::model::ForwardState::default();
        let batch = [SeqBatch {
            tokens: &tokens,
            pos: 0,
            kv: &kv,
            logits: Logits::All,
        }];
        m.forward(&mut cache, &batch, &mut st)
            .expect("forward")
            .to_vec()
    };
    let (a, b) = (logits(&target), logits(&cheap));
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff > 0.0, "the requantized head is not the one in use");
    assert!(
        diff < 0.1 * scale,
        "max diff {diff} against max |logit| {scale}"
    );
    // The target drafting for itself (every draft accepted), itself with
    // the cheaper head (most accepted) and a different, smaller model of
    // the same vocabulary (few accepted): same output.
    for (draft, all_accepted) in [(mk(2, 3), true), (cheap, false), (mk(7, 1), false)] {
        let prompts: Vec<Vec<u32>> = vec![
            vec![1, 40, 41, 42],
            (0..23).map(|i| 3 + (i * 7 % 50) as u32).collect(),
        ];
        let plain = TokenOptions {
            max_tokens: 30,
            ..Default::default()
        };
        let want = Runner::new(&target, 512)
            .expect("cache")
            .generate_batch(&prompts, &plain, |_, _| true)
            .expect("plain");
        let spec = TokenOptions {
            spec: Some(SpecConfig::new(SpecMethod::Draft, 5).expect("config")),
            ..plain
        };
        let mut r = Runner::new(&target, 512)
            .expect("cache")
            .with_draft(&draft, 512)
            .expect("draft");
        let got = r
            .generate_batch(&prompts, &spec, |_, _| true)
            .expect("spec");
        for (a, b) in want.iter().zip(&got) {
            assert_eq!(a.0, b.0, "draft-model speculation changed the output");
        }
        assert!(r.spec_stats.drafted > 0);
        if all_accepted {
            assert_eq!(
                r.spec_stats.accepted, r.spec_stats.drafted,
                "self-drafts must all be accepted"
            );
        }
        assert_eq!(r.blocks.n_free(), r.blocks.n_total());
    }
}

/// `p_min` (llama.cpp's `--draft-p-min`) cuts draft rounds short where
/// the draft model is unsure: fewer tokens drafted, the same greedy
/// output, with the target drafting for itself (every draft accepted) and
/// with a different model.
#[test]
fn draft_p_min_changes_the_drafts_not_the_output() {
    let mk = qwen_q8;
    let target = mk(2, 3);
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 40, 41, 42],
        (0..23).map(|i| 3 + (i * 7 % 50) as u32).collect(),
    ];
    let plain = TokenOptions {
        max_tokens: 40,
        ..Default::default()
    };
    let want = Runner::new(&target, 512)
        .expect("cache")
        .generate_batch(&prompts, &plain, |_, _| true)
        .expect("plain");
    for (name, draft) in [("self", mk(2, 3)), ("other", mk(7, 1))] {
        let mut drafted = Vec::new();
        for p_min in [0.0f32, 0.004, 0.008, 0.015, 0.03, 0.9] {
            let cfg = SpecConfig::new(SpecMethod::Draft, 16)
                .and_then(|c| c.with_p_min(p_min))
                .expect("config");
            let spec = TokenOptions {
                spec: Some(cfg),
                ..plain.clone()
            };
            let mut r = Runner::new(&target, 512)
                .expect("cache")
                .with_draft(&draft, 512)
                .expect("draft");
            let got = r
                .generate_batch(&prompts, &spec, |_, _| true)
                .expect("spec");
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(a.0, b.0, "{name} draft, p_min {p_min}: output changed");
            }
            assert_eq!(r.blocks.n_free(), r.blocks.n_total());
            drafted.push(r.spec_stats.drafted);
        }
        eprintln!("{name} draft: drafted {drafted:?} for p_min 0, 0.004, 0.008, 0.015, 0.03, 0.9");
        assert!(drafted[0] > 0, "{name}: nothing drafted without p_min");
        assert!(
            drafted[1..].iter().any(|&d| d != drafted[0]),
            "{name}: p_min never changed the drafts: {drafted:?}"
        );
        if name == "self" {
            // Every draft accepted: shorter rounds draft fewer in total.
            assert!(
                drafted.iter().all(|&d| d <= drafted[0]),
                "{name}: {drafted:?}"
            );
        }
    }
}

/// Self-speculation (prompt lookup, else the target with a subset of its
/// layers drafting): greedy output token-identical to plain decoding on
/// every architecture, batched, and on the real Qwen model.
#[test]
fn greedy_is_identical_with_self_speculation() {
    for arch in [SynthArch::Qwen2, SynthArch::Llama, SynthArch::Gemma3] {
        let s = SynthSpec {
            arch,
            weight_type: GgmlType::Q8_0,
            output_type: GgmlType::Q8_0,
            n_layers: 6,
            seed: 5,
            ..Default::default()
        };
        let bytes = synthesize(&s).expect("synth").to_bytes().expect("bytes");
        let m = Model::from_file(GgufFile::from_bytes(bytes).expect("parses")).expect("loads");
        let prompts: Vec<Vec<u32>> = vec![
            vec![1, 40, 41, 42],
            (0..23).map(|i| 3 + (i * 7 % 50) as u32).collect(),
            [5u32, 6, 7, 8, 9].repeat(4),
        ];
        let plain = TokenOptions {
            max_tokens: 30,
            ..Default::default()
        };
        let want = Runner::new(&m, 1024)
            .expect("cache")
            .generate_batch(&prompts, &plain, |_, _| true)
            .expect("plain");
        for k in [1, 4, 16] {
            let spec = TokenOptions {
                spec: Some(SpecConfig::new(SpecMethod::SelfDraft, k).expect("config")),
                ..plain.clone()
            };
            let mut r = Runner::new(&m, 1024)
                .expect("cache")
                .with_self_draft(1024)
                .expect("self draft");
            let got = r
                .generate_batch(&prompts, &spec, |_, _| true)
                .expect("spec");
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(
                    a.0, b.0,
                    "{arch:?} k={k}: self-speculation changed the output"
                );
            }
            assert!(r.spec_stats.drafted > 0);
            assert_eq!(r.blocks.n_free(), r.blocks.n_total());
        }
    }
    // Without the draft attached: a clear error, not a panic.
    let s = SynthSpec::default();
    let bytes = synthesize(&s).expect("synth").to_bytes().expect("bytes");
    let m = Model::from_file(GgufFile::from_bytes(bytes).expect("parses")).expect("loads");
    let spec = TokenOptions {
        max_tokens: 8,
        spec: Some(SpecConfig::new(SpecMethod::SelfDraft, 4).expect("config")),
        ..Default::default()
    };
    let err = Runner::new(&m, 256)
        .expect("cache")
        .generate_batch(&[vec![1, 2, 3]], &spec, |_, _| true)
        .expect_err("no draft attached");
    assert!(err.to_string().contains("draft"), "{err}");
    assert!("selfish".parse::<SpecMethod>().is_err());
    assert_eq!("self".parse::<SpecMethod>(), Ok(SpecMethod::SelfDraft));
}

#[test]
fn greedy_is_identical_with_self_speculation_on_qwen() {
    let llm = Llm::load(common::model_path("qwen2.5-coder-0.5b-instruct-q4.gguf")).expect("loads");
    let prompts = [
        "<|im_start|>user\nRename `x` to `value` in this function; output only the code.\n```python\ndef f(x):\n    y = x * 2\n    return x + y\n```<|im_end|>\n<|im_start|>assistant\n",
        "Write a Python function that checks whether a number is prime.",
    ];
    for p in prompts {
        let plain = GenerateOptions {
            max_tokens: 32,
            ..Default::default()
        };
        let a = llm.generate(p, &plain, |_| true).expect("plain");
        let spec = GenerateOptions {
            spec: Some(SpecConfig::new(SpecMethod::SelfDraft, 8).expect("config")),
            ..plain
        };
        let b = llm.generate(p, &spec, |_| true).expect("spec");
        assert_eq!(a.tokens, b.tokens, "prompt {p:?}");
        assert!(b.spec.drafted > 0);
    }
}
