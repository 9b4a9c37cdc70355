//! Importance-matrix sums against llama.cpp's: the fixture
//! (scripts/make_imatrix_fixtures.py) holds, for `tl synth` models (a dense
//! llama and a qwen3moe with 8 experts, 2 used) over three chunks of 64
//! fixed token ids, what llama-imatrix's `collect_imatrix` gathers from
//! llama.cpp's own forward: per weight the row counts, per matrix the total
//! of its column sums, and every `stride`-th column sum. The same model
//! synthesized here, run through a runner with an
//! [`ImatrixCollector`] over the same chunks (BOS first, all logits), must
//! give the same entries, the same counts (exactly: the same rows reach the
//! same weights and experts), and sums within a relative tolerance.
//!
//! Tolerance: the sums are of squared activations, so they carry twice the
//! relative difference of the activations themselves, which differ from
//! llama.cpp's by float order (another summation order in the SIMD
//! kernels), growing through the layers. Observed (AVX2): at most 1.2e-3
//! per sampled column and 1.4e-5 per matrix total on the llama model,
//! 5.7e-3 and 2.7e-4 on the MoE model (whose routing amplifies small
//! differences). The bounds are 2% per column (relative to the larger of
//! the column and the matrix's mean column) and 0.2% per matrix total, far
//! below what a wrong input would give (the input of
//! another product, a missing norm or a token left out moves sums by tens
//! of percent or more; a BOS not substituted changes the counts' sums by
//! whole rows).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;

use tl_gguf::{GgmlType, GgufFile};
use tl_model::generate::Runner;
use tl_model::imatrix::ImatrixCollector;
use tl_model::model::Model;
use tl_model::synth::{synthesize, SynthArch, SynthSpec};

/// Compares the collected sums with one fixture case; returns the largest
/// relative difference of a sampled column and of a matrix total.
pub fn compare(
    label: &str,
    got: &ImatrixCollector,
    want: &serde_json::Map<String, serde_json::Value>,
    col_tol: f64,
    total_tol: f64,
) -> (f64, f64) {
    let names: Vec<&String> = got.stats.keys().collect();
    let want_names: Vec<&String> = want.keys().collect();
    assert_eq!(names, want_names, "{label}: entries");
    let (mut worst_col, mut worst_total) = (0f64, 0f64);
    for (name, w) in want {
        let e = &got.stats[name];
        let counts: Vec<i64> = w["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(e.counts, counts, "{label}: {name} counts");
        let cols = w["cols"].as_u64().unwrap() as usize;
        let stride = w["stride"].as_u64().unwrap() as usize;
        assert_eq!(e.values.len(), cols * counts.len(), "{label}: {name} size");
        for (m, (tot, sample)) in w["total"]
            .as_array()
            .unwrap()
            .iter()
            .zip(w["sample"].as_array().unwrap())
            .enumerate()
        {
            let row = &e.values[m * cols..(m + 1) * cols];
            let t: f64 = row.iter().map(|&v| f64::from(v)).sum();
            let tw = tot.as_f64().unwrap();
            let rel = (t - tw).abs() / tw.abs().max(1e-30);
            worst_total = worst_total.max(rel);
            assert!(
                rel <= total_tol,
                "{label}: {name} matrix {m} total {t} vs {tw}"
            );
            // Columns are compared relative to the matrix's mean column
            // sum, so that near-zero columns don't demand bit-equality.
            let mean = tw / cols as f64;
            for (i, v) in sample.as_array().unwrap().iter().enumerate() {
                let (g, r) = (f64::from(row[i * stride]), v.as_f64().unwrap());
                let rel = (g - r).abs() / r.abs().max(mean).max(1e-30);
                worst_col = worst_col.max(rel);
                assert!(
                    rel <= col_tol,
                    "{label}: {name} matrix {m} column {} sum {g} vs {r}",
                    i * stride
                );
            }
        }
    }
    (worst_col, worst_total)
}

#[test]
fn synthetic_models_imatrix_matches_llama_cpp() {
    let fx = common::fixture("imatrix_ref.json");
    for c in fx["cases"].as_array().unwrap() {
        if c["kind"] != "synth" {
            continue;
        }
        let u = |k: &str| c[k].as_u64().unwrap() as usize;
        let ty = |k: &str| GgmlType::from_name(c[k].as_str().unwrap()).unwrap();
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
            weight_type: ty("weight_type"),
            output_type: ty("output_type"),
            seed: c["seed"].as_u64().unwrap(),
            rope_freqs: false,
            qk_scale: 1.0,
            n_expert: c.get("experts").and_then(|v| v.as_u64()).unwrap_or(8) as usize,
            n_expert_used: c.get("experts_used").and_then(|v| v.as_u64()).unwrap_or(2) as usize,
            yarn_factor: c.get("yarn").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32,
            long_rope_ctx: c.get("long_rope").and_then(|v| v.as_u64()).unwrap_or(0) as usize,
            rope_attn_factor: c
                .get("rope_attn_factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(1.0) as f32,
            swa_pattern: c.get("swa_pattern").and_then(|v| v.as_u64()).unwrap_or(0) as usize,
            linear_factor: c.get("rope_linear").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32,
            ..Default::default()
        };
        let label = format!("synth {}", c["arch"]);
        let bytes = synthesize(&spec).unwrap().to_bytes().unwrap();
        let m = Model::from_file(GgufFile::from_bytes(bytes).unwrap()).unwrap();
        let tokens = common::ids(&c["tokens"]);
        let (ctx, chunks) = (u("ctx"), u("chunks"));
        let bos = c["bos"].as_u64().map(|b| b as u32);
        let mut r = Runner::new(&m, ctx).unwrap();
        r.set_imatrix(Some(ImatrixCollector::new(true))).unwrap();
        let vocab = m.config.vocab;
        let (mut nll, mut count) = (0f64, 0usize);
        for ch in 0..chunks {
            let mut chunk = tokens[ch * ctx..(ch + 1) * ctx].to_vec();
            if let Some(b) = bos {
                chunk[0] = b;
            }
            let logits = r.all_logits(&chunk).unwrap();
            for j in ctx / 2..ctx - 1 {
                let row = &logits[j * vocab..(j + 1) * vocab];
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let s: f64 = row.iter().map(|&v| f64::from((v - max).exp())).sum();
                nll -= f64::from(row[tokens[ch * ctx + j + 1] as usize] - max) - s.ln();
                count += 1;
            }
        }
        let got = r.take_imatrix().unwrap();
        let (col, total) = compare(&label, &got, c["tensors"].as_object().unwrap(), 2e-2, 2e-3);
        let ppl = (nll / count as f64).exp();
        let want_ppl = c["ppl"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_f64()
            .unwrap();
        eprintln!(
            "{label}: max relative difference: column {col:.2e}, matrix total {total:.2e}; ppl {ppl:.4} vs {want_ppl:.4}"
        );
        assert!(
            (ppl / want_ppl - 1.0).abs() < 1e-2,
            "{label}: ppl {ppl} vs {want_ppl}"
        );
        assert_eq!(got.chunk_count(ctx), chunks as i64);
    }
}
