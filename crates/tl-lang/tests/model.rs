#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The model builtins on the real Qwen2 model (always present where the
//! tests run: its absence is a failure, not a skip).

use tl_lang::run_source;

fn qwen() -> String {
    let home = std::env::var("HOME").expect("HOME is set");
    let p = format!("{home}/.cache/tensorlogic/models/qwen2.5-coder-0.5b-instruct-q4.gguf");
    assert!(std::path::Path::new(&p).exists(), "missing test model {p}");
    p
}

fn run(body: &str) -> String {
    let src = format!("let m = load_model({:?});\n{body}", qwen());
    match run_source("t.tl", &src) {
        Ok(out) => out,
        Err((out, e)) => panic!("{out}\n{e}"),
    }
}

#[test]
fn config_and_weights_by_gguf_name() {
    let out = run(concat!(
        "print(m.config.n_layers, m.config.d_model, m.config.n_heads, m.config.n_kv_heads, m.config.head_dim);\n",
        "print(m.config.rope_base, m.config.rms_eps, m.config.arch);\n",
        "let w = m.blk[3].attn_q.weight;\n",
        "print(dim(w, 0), dim(w, 1));\n",
        "print(len(m.blk[3].attn_q.bias), len(m.output_norm.weight));\n",
        "print(dim(m.token_embd.weight, 0), dim(m.output.weight, 0));\n",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "24 896 14 2 64");
    assert_eq!(lines[1], "1000000.0 0.000001 qwen2");
    assert_eq!(lines[2], "896 896");
    assert_eq!(lines[3], "896 896");
    assert_eq!(lines[4], "151936 151936");
}

#[test]
fn quantized_linear_matches_dequantized() {
    // The block-format matmul (activations quantized to the weight's dot
    // type) against an f32 product of the dequantized weight.
    let out = run(concat!(
        "let x = embedding(m.token_embd.weight, i32([1, 2, 3]));\n",
        "let w = m.blk[0].ffn_up.weight;\n",
        "let y = linear(x, w);\n",
        "let r = linear(x, f32(embedding(w, i32(arange(dim(w, 0))))));\n",
        "print(dim(y, 0), dim(y, 1), allclose(y, r, 0.05 * max(abs(r))));\n",
    ));
    assert_eq!(out.trim(), "3 4864 true");
}

#[test]
fn tokenize_round_trip_and_template() {
    let out = run(concat!(
        "let ids = tokenize(m, \"def add(a, b): return a + b\");\n",
        "print(detokenize(m, ids));\n",
        "print(is_eog(m, int(tokenize(m, \"<|im_end|>\")[0])));\n",
        "let p = apply_chat_template(m, \"hi\");\n",
        "print(len(p) > 10);\n",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "def add(a, b): return a + b");
    assert_eq!(lines[1], "true");
    assert_eq!(lines[2], "true");
}

#[test]
fn a_missing_tensor_is_an_error_naming_it() {
    let src = format!(
        "let m = load_model({:?});\nlet w = m.blk[0].attn_x.weight;\n",
        qwen()
    );
    let (_, e) = run_source("t.tl", &src).expect_err("must fail");
    assert!(e.contains("undefined model tensor `blk.0.attn_x`"), "{e}");
    let src = format!("let m = load_model({:?});\nlet w = m.blk[24];\n", qwen());
    let (_, e) = run_source("t.tl", &src).expect_err("must fail");
    assert!(e.contains("index 24 out of range"), "{e}");
}
