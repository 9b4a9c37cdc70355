//! Encoder (embedding) models against llama.cpp on `tl synth` models: the
//! fixture (scripts/make_embed_fixtures.py) holds, for bert and nomic-bert
//! models of two weight types and four poolings (mean, CLS, last, none),
//! the token ids llama.cpp feeds for several inputs and the embeddings it
//! returns (raw and L2-normalised; without pooling, every token's vector). The same spec synthesized here must tokenize to the same
//! ids and embed to the same vectors.
//!
//! Tolerance. llama.cpp's own vectors move with float order alone: the
//! fixture records, per case, the largest move between its attention
//! kernels (flash attention on/off) and batchings (all inputs in one batch
//! vs one at a time): 6.8e-3 and 8.1e-3 on the Q8_0 cases (activations are
//! quantized to 8 bits before each product, so one rounding flip moves a
//! whole block) and 1.0e-3 on F16, for entries reaching 2–4 (2.1e-2 over
//! the per-token vectors of the Q8_0 case without pooling, entries up to
//! 4.4); its cosine against itself stays ≥ 0.999992. tl may differ from llama.cpp's vectors
//! by 2× that move (raw max |Δ|), with cosine ≥ 0.9999; the normalised
//! vectors by the same bound over the smallest |v|, and they must have unit
//! length. Measured worst: pooled, raw 3.6e-7 (Q8_0, bert) and 3.6e-4
//! (F16, bert CLS) against bounds 1.4e-2 and 2.0e-3; per token (Q8_0,
//! no pooling, where llama.cpp ran one input at a time and tl the batch:
//! an 8-bit rounding flip shows in single tokens) 8.5e-3 against 4.2e-2;
//! cosine 1 − 1e-7 or closer.
//!
//! A wrong detail lands far outside: pooling by [CLS] instead of the mean
//! (or the mean instead of [CLS]) gives max |Δ| 2.9–4.7 and cosine
//! 0.22–0.55; nomic-bert without RoPE gives 0.38–1.62 and cosine 0.95–0.98.
//! `wrong_details_fall_outside_the_tolerance` checks both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;

use tl_gguf::{GgmlType, GgufFile};
use tl_model::encoder::{Encoder, Pooling, PositionKind};
use tl_model::synth::{synthesize_encoder, SynthArch, SynthSpec};
use tl_tokenizer::{EncodeOptions, Tokenizer};

struct Case {
    label: String,
    enc: Encoder,
    tokens: Vec<Vec<u32>>,
    raw: Vec<Vec<f32>>,
    normalized: Vec<Vec<f32>>,
    bound: f32,
}

fn pooling(s: &str) -> Pooling {
    match s {
        "mean" => Pooling::Mean,
        "cls" => Pooling::Cls,
        "last" => Pooling::Last,
        "none" => Pooling::None,
        other => panic!("pooling {other}"),
    }
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let fx = common::fixture("embed_synth.json");
    let inputs: Vec<&str> = fx["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut out = Vec::new();
    for c in fx["cases"].as_array().unwrap() {
        let u = |k: &str| c[k].as_u64().unwrap() as usize;
        let ty = GgmlType::from_name(c["weight_type"].as_str().unwrap()).unwrap();
        let spec = SynthSpec {
            arch: SynthArch::parse(c["arch"].as_str().unwrap()).unwrap(),
            n_layers: u("layers"),
            d_model: u("d_model"),
            n_heads: u("heads"),
            n_kv_heads: u("kv_heads"),
            head_dim: u("head_dim"),
            ffn: u("ffn"),
            extra_vocab: u("extra_vocab"),
            context: u("context"),
            weight_type: ty,
            output_type: ty,
            seed: c["seed"].as_u64().unwrap(),
            qk_scale: c["qk_scale"].as_f64().unwrap() as f32,
            ..SynthSpec::default()
        };
        let label = format!("{} {} {}", c["arch"], c["weight_type"], c["pooling"]);
        let bytes = synthesize_encoder(&spec, pooling(c["pooling"].as_str().unwrap()))
            .unwrap()
            .to_bytes()
            .unwrap();
        let file = GgufFile::from_bytes(bytes).unwrap();
        let tok = Tokenizer::from_gguf(&file).unwrap();
        let want_tokens: Vec<Vec<u32>> = c["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(common::ids)
            .collect();
        for (text, want) in inputs.iter().zip(&want_tokens) {
            let got = tok.encode(text, EncodeOptions::default()).unwrap();
            assert_eq!(&got, want, "{label}: tokens of {text:?}");
        }
        let raw = rows(&c["raw"]);
        let self_max = c["self_max_abs"].as_f64().unwrap() as f32;
        out.push(Case {
            label,
            enc: Encoder::from_file(file).unwrap(),
            tokens: want_tokens,
            raw,
            normalized: rows(&c["normalized"]),
            bound: 2.0 * self_max,
        });
    }
    out
}

/// (max |a - b|, min cosine) over rows.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f64) {
    let mut max = 0f32;
    let mut min_cos = 1f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            max = max.max((p - q).abs());
        }
        let dot: f64 = x
            .iter()
            .zip(y)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum();
        let nx: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
        min_cos = min_cos.min(dot / (nx * ny));
    }
    (max, min_cos)
}

const MIN_COS: f64 = 0.9999;

#[test]
fn encoders_match_llama_cpp() {
    let mut report = Vec::new();
    let mut failed = Vec::new();
    for c in cases() {
        let seqs: Vec<&[u32]> = c.tokens.iter().map(Vec::as_slice).collect();
        let raw = c.enc.embed(&seqs, false).unwrap();
        let (max, cos) = compare(&raw, &c.raw);
        let norm = c.enc.embed(&seqs, true).unwrap();
        // Each vector (each token's, without pooling) has unit length.
        let d = c.enc.n_embd();
        for v in norm.iter().flat_map(|v| v.chunks(d)) {
            let len: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((len - 1.0).abs() < 1e-5, "{}: |v| = {len}", c.label);
        }
        let min_len = c
            .raw
            .iter()
            .flat_map(|v| v.chunks(d))
            .map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt())
            .fold(f32::INFINITY, f32::min);
        let (nmax, ncos) = compare(&norm, &c.normalized);
        // One input at a time gives the same vectors as the batch.
        for (i, s) in seqs.iter().enumerate() {
            let one = c.enc.embed(&[s], false).unwrap();
            let (d, _) = compare(&one, &raw[i..i + 1]);
            assert!(d <= 1e-5, "{}: input {i} alone differs by {d}", c.label);
        }
        report.push(format!(
            "{}: raw max diff {max:.2e} (bound {:.2e}) cos {cos:.7}; normalised max diff {nmax:.2e} cos {ncos:.7}",
            c.label, c.bound
        ));
        if max > c.bound || cos < MIN_COS || nmax > c.bound / min_len || ncos < MIN_COS {
            failed.push(c.label.clone());
        }
    }
    println!("{}", report.join("\n"));
    assert!(
        failed.is_empty(),
        "outside tolerance: {failed:?}\n{}",
        report.join("\n")
    );
}

/// The bounds can fail: a wrong pooling or a missing RoPE lands far
/// outside them.
#[test]
fn wrong_details_fall_outside_the_tolerance() {
    for mut c in cases() {
        let seqs: Vec<&[u32]> = c.tokens.iter().map(Vec::as_slice).collect();
        let real = c.enc.config.pooling;
        // Without pooling a pooled vector has another length: no twist.
        if real != Pooling::None {
            c.enc.config.pooling = if real == Pooling::Cls {
                Pooling::Mean
            } else {
                Pooling::Cls
            };
            let (max, cos) = compare(&c.enc.embed(&seqs, false).unwrap(), &c.raw);
            println!(
                "{}: wrong pooling: max diff {max:.3}, cos {cos:.4}",
                c.label
            );
            assert!(
                max > c.bound && cos < MIN_COS,
                "{}: wrong pooling stays inside the tolerance (max {max}, cos {cos})",
                c.label
            );
            c.enc.config.pooling = real;
        }
        if let PositionKind::Rope { dims, .. } = c.enc.config.positions {
            // A base so large every angle is ~0: no rotation.
            c.enc.config.positions = PositionKind::Rope { dims, base: 1e30 };
            let (max, cos) = compare(&c.enc.embed(&seqs, false).unwrap(), &c.raw);
            println!("{}: no RoPE: max diff {max:.3}, cos {cos:.5}", c.label);
            assert!(
                max > c.bound && cos < MIN_COS,
                "{}: no RoPE stays inside the tolerance (max {max}, cos {cos})",
                c.label
            );
        }
    }
}

#[test]
fn encoder_refuses_bad_input() {
    let c = cases().into_iter().next().unwrap();
    let e = c.enc.embed(&[&[]], false).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let long = vec![5u32; c.enc.config.context + 1];
    let e = c.enc.embed(&[&long], false).unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
    let e = c.enc.embed(&[&[u32::MAX]], false).unwrap_err().to_string();
    assert!(e.contains("vocabulary"), "{e}");
}

/// README's list of embedding architectures is the code's.
#[test]
fn readme_lists_the_encoder_architectures() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let tag = "<!-- encoder architectures: ";
    let at = readme
        .find(tag)
        .expect("encoder architectures marker in README.md")
        + tag.len();
    let end = at + readme[at..].find(" -->").expect("marker end");
    assert_eq!(&readme[at..end], tl_model::encoder::ENCODER_ARCHS);
}

/// CUDA refuses encoders with the missing feature named, before touching
/// a GPU (so this holds on machines without one).
#[test]
fn cuda_refuses_encoders_before_touching_the_gpu() {
    for arch in [SynthArch::Bert, SynthArch::NomicBert] {
        let spec = SynthSpec {
            arch,
            d_model: 64,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 32,
            ffn: 64,
            context: 16,
            extra_vocab: 0,
            ..SynthSpec::default()
        };
        let p = std::env::temp_dir().join(format!(
            "tl-embed-cuda-{}-{}.gguf",
            arch.name(),
            std::process::id()
        ));
        synthesize_encoder(&spec, Pooling::Mean)
            .unwrap()
            .write_file(&p)
            .unwrap();
        let e = Encoder::load_on(&p, tl_core::Device::Cuda(0))
            .err()
            .expect("refused")
            .to_string();
        std::fs::remove_file(&p).ok();
        assert!(
            e.contains(arch.name()) && e.contains("not supported on CUDA yet: encoder models"),
            "{e}"
        );
    }
}
