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
fn grouped_linears_give_the_bits_of_one_by_one() {
    // `let`s of `linear` over one input run as one product; separated by
    // another statement they run one by one. Q/K/V (with biases) and
    // gate/up, for one row (decode) and 17 (prefill, the panel kernel):
    // the results must be equal to the bit.
    let out = run(concat!(
        "let b = m.blk[5];\n",
        "for i in 0..2 {\n",
        "    let n = 1 + 16 * i;\n",
        "    let h = rms_norm(embedding(m.token_embd.weight, i32(arange(n) * 37 + 11)), b.attn_norm.weight, 0.000001);\n",
        "    let q = linear(h, b.attn_q.weight, b.attn_q.bias);\n",
        "    let k = linear(h, b.attn_k.weight, b.attn_k.bias);\n",
        "    let v = linear(h, b.attn_v.weight, b.attn_v.bias);\n",
        "    let g = linear(h, b.ffn_gate.weight);\n",
        "    let s = 0;\n",
        "    let q1 = linear(h, b.attn_q.weight, b.attn_q.bias);\n",
        "    s = 1;\n",
        "    let k1 = linear(h, b.attn_k.weight, b.attn_k.bias);\n",
        "    s = 2;\n",
        "    let v1 = linear(h, b.attn_v.weight, b.attn_v.bias);\n",
        "    s = 3;\n",
        "    let g1 = linear(h, b.ffn_gate.weight);\n",
        "    let u = linear(h, b.ffn_up.weight);\n",
        "    s = 4;\n",
        "    let u1 = linear(h, b.ffn_up.weight);\n",
        "    print(dim(q, 0), dim(q, 1), dim(k, 1), dim(g, 1), max(abs(q - q1)), max(abs(k - k1)), max(abs(v - v1)), max(abs(g - g1)), max(abs(u - u1)), max(abs(q)) > 0.0);\n",
        "    let y = silu(g) * u;\n",
        "    let sg = silu(g);\n",
        "    print(max(abs(y - sg * u)));\n",
        "}\n",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1 896 128 4864 0.0 0.0 0.0 0.0 0.0 true", "{out}");
    assert_eq!(lines[1], "0.0", "{out}");
    assert_eq!(
        lines[2], "17 896 128 4864 0.0 0.0 0.0 0.0 0.0 true",
        "{out}"
    );
    assert_eq!(lines[3], "0.0", "{out}");
}

#[test]
fn attention_gradient_is_refused_past_position_zero() {
    // A second call attends over keys the first one cached: the gradient
    // would miss them, so asking for it is an error that says so.
    let src = format!(
        concat!(
            "let m = load_model({:?});\n",
            "let cache = kv_cache(m, 8);\n",
            "learnable q: f32[2, 14, 64] = zeros;\n",
            "let k = zeros(2, 2, 64) + 0.5;\n",
            "let a = attention(q, k, k, cache, 0, 0);\n",
            "let b = attention(q, k, k, cache, 0, 2);\n",
            "let g = grad(sum(a), q);\n",
            "print(\"ok\", dim(g, 0));\n",
            "let h = grad(sum(b), q);\n",
        ),
        qwen()
    );
    let (out, err) = run_source("t.tl", &src).expect_err("the second gradient is refused");
    assert!(out.contains("ok 2"), "{out}");
    assert!(err.contains("attention at position 2"), "{err}");
    assert!(err.contains("no gradient"), "{err}");
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
