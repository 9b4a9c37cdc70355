//! `tl tokenize` driven as a user would, on the real Qwen model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn model(file: &str) -> PathBuf {
    tl_gguf::cached_model(file).unwrap_or_else(|e| panic!("{e}"))
}

fn tl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tl"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn tokenize_json_and_switches() {
    let m = model("qwen2.5-coder-0.5b-instruct-q4.gguf");
    let m = m.to_str().unwrap();

    let out = tl(&["tokenize", "-m", m, "--json", "<|im_start|>user\nHello"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Same ids as llama.cpp (tests/fixtures of tl-tokenizer: special text parsed).
    assert_eq!(v["ids"], serde_json::json!([151644, 872, 198, 9707]));
    assert_eq!(v["tokens"][0]["piece"], "<|im_start|>");

    let out = tl(&[
        "tokenize",
        "-m",
        m,
        "--json",
        "--no-special",
        "<|im_start|>",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["n_tokens"].as_u64().unwrap() > 1,
        "special text must stay text: {v}"
    );

    let out = tl(&["tokenize", "-m", m, "a\tb"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("'\\t"), "{table}");
    assert!(table.trim_end().ends_with("tokens"), "{table}");
}

#[test]
fn tokenize_bad_model_is_a_clear_error() {
    let out = tl(&["tokenize", "-m", "/nonexistent/model.gguf", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}
