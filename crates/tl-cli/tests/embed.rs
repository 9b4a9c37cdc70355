//! `tl embed` driven as a user would, on `tl synth` embedding models: the
//! printed vectors are llama.cpp's (the fixture of
//! crates/tl-model/tests/embed_vs_llama.rs, made by
//! scripts/make_embed_fixtures.py), within that test's tolerance; bad
//! input is a clear error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn tl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tl"))
        .args(args)
        .output()
        .unwrap()
}

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tl-model/tests/fixtures/embed_synth.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Writes the fixture's case `i` with `tl synth`.
fn synth(case: &serde_json::Value, out: &Path) {
    let mut args = vec!["synth".to_string(), "-o".into(), out.display().to_string()];
    for k in [
        "arch",
        "layers",
        "d_model",
        "heads",
        "kv_heads",
        "head_dim",
        "ffn",
        "extra_vocab",
        "context",
        "weight_type",
        "pooling",
        "seed",
        "qk_scale",
    ] {
        args.push(format!("--{}", k.replace('_', "-")));
        args.push(match &case[k] {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        });
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tl(&refs);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tl-embed-{}-{name}", std::process::id()))
}

#[test]
fn embed_prints_llama_cpp_vectors() {
    let fx = fixture();
    let inputs: Vec<&str> = fx["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for (ci, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let path = tmp(&format!("{ci}.gguf"));
        synth(case, &path);
        let m = path.display().to_string();
        let mut args = vec!["embed", "-m", &m];
        for t in &inputs {
            args.extend(["-p", t]);
        }
        let o = tl(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // Without pooling: an array of token vectors per input, compared
        // flattened.
        let got: Vec<Vec<f32>> = if case["pooling"] == "none" {
            let nested: Vec<Vec<Vec<f32>>> = serde_json::from_slice(&o.stdout).unwrap();
            nested.into_iter().map(|v| v.concat()).collect()
        } else {
            serde_json::from_slice(&o.stdout).unwrap()
        };
        let want = case["normalized"].as_array().unwrap();
        // embed_vs_llama.rs's bound (2× llama.cpp's own float-order move)
        // on unit vectors; the raw vectors' lengths are above 1 here.
        let bound = 2.0 * case["self_max_abs"].as_f64().unwrap() as f32;
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let w: Vec<f32> = w
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(g.len(), w.len());
            let max = g
                .iter()
                .zip(&w)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(max <= bound, "case {ci}: max diff {max} > {bound}");
        }
        // One line per input; from a file too.
        let f = tmp(&format!("{ci}.txt"));
        std::fs::write(&f, format!("{}\n\n{}\n", inputs[0], inputs[1])).unwrap();
        let fs = f.display().to_string();
        let o = tl(&["embed", "-m", &m, "-f", &fs, "--format", "lines"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let lines: Vec<Vec<f32>> = String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
            .collect();
        let got_lines: Vec<f32> = lines.concat();
        assert_eq!(got_lines, [got[0].clone(), got[1].clone()].concat());
        if case["pooling"] != "none" {
            assert_eq!(lines.len(), 2);
        }
        std::fs::remove_file(&f).ok();
        std::fs::remove_file(&path).ok();
    }
}

#[test]
fn embed_bad_input_is_a_clear_error() {
    let fx = fixture();
    let case = &fx["cases"][0];
    let path = tmp("bad.gguf");
    synth(case, &path);
    let m = path.display().to_string();
    let err = |args: &[&str]| {
        let o = tl(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(err(&["embed", "-m", &m]).contains("nothing to embed"));
    let long = "word ".repeat(200);
    let e = err(&["embed", "-m", &m, "-p", "ok", "-p", &long]);
    assert!(e.contains("input 1") && e.contains("context of 128"), "{e}");
    let e = err(&["embed", "-m", &m, "-p", "x", "--format", "csv"]);
    assert!(e.contains("--format csv"), "{e}");
    let e = err(&["embed", "-m", "/nonexistent.gguf", "-p", "x"]);
    assert!(e.contains("/nonexistent.gguf"), "{e}");
    // A text generator is not an embedding model.
    let gen = tmp("gen.gguf");
    let gs = gen.display().to_string();
    let o = tl(&["synth", "--arch", "llama", "-o", &gs]);
    assert!(o.status.success());
    let e = err(&["embed", "-m", &gs, "-p", "x"]);
    assert!(e.contains("not an embedding model"), "{e}");
    // An embedding model is not a text generator.
    let e = err(&["generate", "-m", &m, "-p", "x", "-n", "1"]);
    assert!(e.contains("tl embed"), "{e}");
    std::fs::remove_file(&path).ok();
    std::fs::remove_file(&gen).ok();
}
