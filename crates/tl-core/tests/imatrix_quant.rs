//! `quant::quantize_weighted` against ggml's `ggml_quantize_chunk`, with and
//! without an importance matrix: for every case of
//! `tests/fixtures/imatrix_quant.json` (written by
//! `scripts/make_imatrix_quant_fixtures.py`), the rows and the importance
//! matrix are regenerated here with the script's generator and the SHA-256
//! of the quantized bytes must equal ggml's. No tolerance.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use tl_core::quant;
use tl_core::GgmlType;

/// The script's splitmix64 generator, operation for operation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 40) as f64 / 16_777_216.0
    }

    fn normal(&mut self) -> f64 {
        let a = self.uniform();
        let b = self.uniform();
        let c = self.uniform();
        let d = self.uniform();
        (a + b + c + d - 2.0) * 1.7
    }
}

fn row_values(rng: &mut Rng, dist: &str, r: usize, n: usize, out: &mut Vec<f32>) {
    let dist = if dist == "mixed" {
        ["normal", "outliers", "zero", "positive"][r % 4]
    } else {
        dist
    };
    for _ in 0..n {
        let v = match dist {
            "normal" => rng.normal(),
            "uniform" => rng.uniform() * 2.0 - 1.0,
            "outliers" => {
                let v = rng.normal() * 0.02;
                if rng.next().is_multiple_of(53) {
                    v * 400.0
                } else {
                    v
                }
            }
            "positive" => rng.uniform() * 3.0 + 0.5,
            "tiny" => rng.normal() * 1e-18,
            "zero" => 0.0,
            other => panic!("unknown distribution {other}"),
        };
        out.push(v as f32);
    }
}

fn imatrix_values(rng: &mut Rng, kind: &str, n: usize) -> Option<Vec<f32>> {
    if kind == "none" {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let u = rng.uniform();
        let mut w = u * u * 50.0 + 0.01;
        if rng.next().is_multiple_of(17) {
            w *= 1000.0;
        }
        if kind == "sparse" && rng.next().is_multiple_of(4) {
            w = 0.0;
        }
        out.push(w as f32);
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn weighted_quantizers_match_ggml_quantize_chunk() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/imatrix_quant.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 400, "{} cases", cases.len());
    let mut failures = Vec::new();
    let mut types = std::collections::BTreeSet::new();
    for c in cases {
        let ty_name = c["type"].as_str().unwrap();
        let ty = GgmlType::from_name(ty_name).expect("type name");
        types.insert(ty_name.to_owned());
        let dist = c["dist"].as_str().unwrap();
        let kind = c["imatrix"].as_str().unwrap();
        let n = c["n_per_row"].as_u64().unwrap() as usize;
        let rows = c["rows"].as_u64().unwrap() as usize;
        let mut rng = Rng(c["seed"].as_u64().unwrap());
        let mut x = Vec::with_capacity(rows * n);
        for r in 0..rows {
            row_values(&mut rng, dist, r, n, &mut x);
        }
        let im = imatrix_values(&mut rng, kind, n);
        let label = format!("{ty_name} {dist} imatrix={kind} n_per_row={n}");

        let mut inputs = le_bytes(&x);
        if let Some(w) = &im {
            inputs.extend(le_bytes(w));
        }
        let input_sha = hex(&Sha256::digest(&inputs));
        if !input_sha.starts_with(c["input_sha256"].as_str().unwrap()) {
            failures.push(format!(
                "{label}: generated inputs differ from the script's"
            ));
            continue;
        }

        let size = ty.bytes_for((rows * n) as u64).unwrap() as usize;
        let mut out = vec![0u8; size];
        quant::quantize_weighted(ty, &x, n, im.as_deref(), &mut out).unwrap();
        let sha = hex(&Sha256::digest(&out));
        if !sha.starts_with(c["sha256"].as_str().unwrap()) {
            failures.push(format!("{label}: bytes differ from ggml's"));
        }
        if im.is_none() && quant::is_quantize_supported(ty) {
            // Without weights it is the reference quantizer.
            let mut plain = vec![0u8; size];
            quant::quantize(ty, &x, &mut plain).unwrap();
            assert_eq!(plain, out, "{label}");
        }
    }
    assert_eq!(types.len(), 21, "{types:?}");
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    let x = vec![0.5f32; 512];
    let mut out = vec![0u8; GgmlType::Q4_K.bytes_for(512).unwrap() as usize];
    // Importance matrix of the wrong length.
    let w = vec![1.0f32; 300];
    let e = quant::quantize_weighted(GgmlType::Q4_K, &x, 256, Some(&w), &mut out)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("300") && e.contains("256"), "{e}");
    // Rows that are not whole super-blocks.
    let w = vec![1.0f32; 128];
    assert!(quant::quantize_weighted(GgmlType::Q4_K, &x, 128, Some(&w), &mut out).is_err());
    // Values that are not whole rows.
    let mut q4 = vec![0u8; GgmlType::Q4_0.bytes_for(480).unwrap() as usize];
    assert!(quant::quantize_weighted(GgmlType::Q4_0, &x[..480], 100, None, &mut q4).is_err());
    assert!(quant::quantize_weighted(GgmlType::Q4_0, &x[..480], 96, None, &mut q4).is_ok());
    // Types ggml_quantize_chunk does not make.
    let mut q8k = vec![0u8; GgmlType::Q8_K.bytes_for(512).unwrap() as usize];
    assert!(quant::quantize_weighted(GgmlType::Q8_K, &x, 256, None, &mut q8k).is_err());
    // IQ2_XXS, IQ2_XS and IQ1_S need an importance matrix, as in ggml.
    for ty in [GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ1_S] {
        let mut q = vec![0u8; ty.bytes_for(512).unwrap() as usize];
        let e = quant::quantize_weighted(ty, &x, 256, None, &mut q)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("importance matrix") && e.contains(ty.name()),
            "{e}"
        );
        let w = vec![1.0f32; 256];
        assert!(quant::quantize_weighted(ty, &x, 256, Some(&w), &mut q).is_ok());
        // A wrong-length matrix is named.
        assert!(quant::quantize_weighted(ty, &x, 256, Some(&w[..100]), &mut q).is_err());
    }
    // Nothing to do.
    assert!(quant::quantize_weighted(GgmlType::Q6_K, &[], 256, None, &mut []).is_ok());
    // Weights that the type ignores may have any length, as in ggml.
    let mut f16 = vec![0u8; 1024];
    assert!(quant::quantize_weighted(GgmlType::F16, &x, 256, Some(&w), &mut f16).is_ok());
}
