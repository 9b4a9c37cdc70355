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

/// `tl synth --tokenizer-from`: random weights with the real model's
/// tokenizer and chat template tokenize every text as the real file does.
#[test]
fn synth_takes_a_real_tokenizer() {
    let m = model("qwen2.5-coder-0.5b-instruct-q4.gguf");
    let m = m.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("tok.gguf");
    let s = s.to_str().unwrap();
    let out = tl(&["synth", "--layers", "1", "-o", s, "--tokenizer-from", m]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for text in [
        "<|im_start|>user\nHello, wörld! 1234 \t fn main() {}",
        "def f(x):\n    return x ** 2  # ✓",
    ] {
        let a = tl(&["tokenize", "-m", m, "--json", text]);
        let b = tl(&["tokenize", "-m", s, "--json", text]);
        assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
        let a: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
        assert_eq!(a["ids"], b["ids"], "{text:?}");
        assert_eq!(a["tokens"], b["tokens"], "{text:?}");
    }
    // The vocabulary size follows the tokenizer: the synthetic model reads
    // and writes every id of the real one.
    let inspect = tl(&["inspect", s]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("vocab 151936"), "{text}");
    let bad = tl(&["synth", "-o", s, "--tokenizer-from", "/nonexistent/x.gguf"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--tokenizer-from /nonexistent/x.gguf"));
}
