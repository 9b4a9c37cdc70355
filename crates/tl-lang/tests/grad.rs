#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Gradients of every differentiable operation against central finite
//! differences of the same program.
//!
//! Each case is a program over learnable tensors `a` (and `b`) that
//! computes `o`; the objective is `L = 0.5 Σ o² + 0.3 Σ o`, so the
//! gradient arriving at `o` differs from element to element. `grad(L, a)`
//! is compared with `(L(a + h e_k) - L(a - h e_k)) / 2h` for every element
//! `k`, each evaluation a fresh run of the program with that input.
//!
//! Tolerance: everything runs in f32. With h = 1e-2 the truncation error
//! of the central difference is h²/6 · |L'''| ≈ 2e-5 · |L'''|, and the
//! rounding error of the two f32 evaluations is about 2 · 6e-8 · |L| / 2h
//! ≈ 6e-6 · |L|; with |L| and its third derivatives of order 1–10 on these
//! inputs both stay below 1e-3, so `|g - fd| ≤ 2e-3 · (1 + |fd|)` leaves a
//! margin. Inputs stay away from kinks (relu and abs at 0, ties of max).

use tl_lang::run_source;

/// Numbers printed on the line starting with `tag`.
fn numbers(out: &str, tag: &str) -> Vec<f64> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(tag))
        .unwrap_or_else(|| panic!("no {tag:?} in:\n{out}"));
    line.split(|c: char| !(c.is_ascii_digit() || "-.eE+".contains(c)))
        .filter(|s| !s.is_empty() && *s != "-")
        .map(|s| s.parse().unwrap())
        .collect()
}

/// A deterministic input in [-1, 1] (or [0.5, 1.5] when `positive`).
fn inputs(n: usize, salt: u64, positive: bool) -> Vec<f64> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ salt.wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            let v = if positive { 0.5 + u } else { 2.0 * u - 1.0 };
            // Keep clear of 0 (kinks) by at least 0.05.
            if !positive && v.abs() < 0.05 {
                v + 0.1
            } else {
                v
            }
        })
        .collect()
}

fn literal(shape: &[usize], v: &[f64]) -> String {
    if shape.is_empty() {
        return format!("{:?}", v[0]);
    }
    if shape.len() == 1 {
        let parts: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
        return format!("[{}]", parts.join(", "));
    }
    let inner: usize = shape[1..].iter().product();
    let rows: Vec<String> = (0..shape[0])
        .map(|r| literal(&shape[1..], &v[r * inner..(r + 1) * inner]))
        .collect();
    format!("[{}]", rows.join(", "))
}

struct Param {
    name: &'static str,
    shape: Vec<usize>,
    positive: bool,
}

fn p(name: &'static str, shape: &[usize]) -> Param {
    Param {
        name,
        shape: shape.to_vec(),
        positive: false,
    }
}

fn pos(name: &'static str, shape: &[usize]) -> Param {
    Param {
        name,
        shape: shape.to_vec(),
        positive: true,
    }
}

fn program(params: &[Param], values: &[Vec<f64>], body: &str, with_grad: bool) -> String {
    let mut s = String::new();
    for (prm, v) in params.iter().zip(values) {
        let ty: Vec<String> = prm.shape.iter().map(|d| d.to_string()).collect();
        if prm.shape.is_empty() {
            s += &format!("learnable {}: f32[] = {:?};\n", prm.name, v[0]);
        } else {
            s += &format!(
                "learnable {}: f32[{}] = {};\n",
                prm.name,
                ty.join(", "),
                literal(&prm.shape, v)
            );
        }
    }
    s += body;
    s += "\nlet L = 0.5 * sum(o * o) + 0.3 * sum(o);\nprint(\"L\", L);\n";
    if with_grad {
        for prm in params {
            s += &format!("print(\"g_{0}\", grad(L, {0}));\n", prm.name);
        }
    }
    s
}

fn run(src: &str) -> String {
    run_source("grad_case.tl", src)
        .unwrap_or_else(|(out, e)| panic!("{out}{e}\n--- program:\n{src}"))
}

/// Checks `grad` against finite differences for every parameter element,
/// at eight independent pseudo-random draws of the inputs (a property over
/// inputs, not one hand-picked point).
fn check(params: &[Param], body: &str) {
    for draw in 0..8u64 {
        check_at(params, body, draw);
    }
}

fn check_at(params: &[Param], body: &str, draw: u64) {
    let values: Vec<Vec<f64>> = params
        .iter()
        .enumerate()
        .map(|(k, prm)| {
            inputs(
                prm.shape.iter().product(),
                k as u64 + 1 + 1000 * draw,
                prm.positive,
            )
        })
        .collect();
    let out = run(&program(params, &values, body, true));
    let h = 1e-2;
    for (k, prm) in params.iter().enumerate() {
        let g = numbers(&out, &format!("g_{} ", prm.name));
        assert_eq!(g.len(), values[k].len(), "{body}: gradient of {}", prm.name);
        for i in 0..values[k].len() {
            let at = |d: f64| {
                let mut vs = values.clone();
                vs[k][i] += d;
                numbers(&run(&program(params, &vs, body, false)), "L ")[0]
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (g[i] - fd).abs() <= 2e-3 * (1.0 + fd.abs()),
                "{body}\nd/d{}[{i}]: grad {} vs finite difference {fd}",
                prm.name,
                g[i]
            );
        }
    }
}

#[test]
fn elementwise_arithmetic_with_broadcasting() {
    check(&[p("a", &[2, 3]), p("b", &[3])], "let o = a + b;");
    check(&[p("a", &[2, 3]), p("b", &[2, 1])], "let o = a - b * 2.0;");
    check(&[p("a", &[2, 3]), p("b", &[3])], "let o = a * b;");
    check(
        &[p("a", &[2, 3]), pos("b", &[3])],
        "let o = a / b + 1.0 / b;",
    );
    check(&[p("a", &[3])], "let o = -a * 3 - 1;");
}

#[test]
fn elementwise_functions() {
    for f in ["relu", "sigmoid", "exp", "tanh", "abs", "silu", "gelu"] {
        check(&[p("a", &[2, 3])], &format!("let o = {f}(a);"));
    }
    check(&[pos("a", &[2, 3])], "let o = log(a) + sqrt(a);");
    check(&[p("a", &[4])], "let o = sigmoid(a, 0.5);");
    check(&[p("a", &[4]), pos("t", &[])], "let o = sigmoid(a, t);");
}

#[test]
fn softmax_and_log_softmax() {
    check(&[p("a", &[2, 4])], "let o = softmax(a * 2.0);");
    check(&[p("a", &[3, 4])], "let o = log_softmax(a * 3.0);");
}

#[test]
fn matmul_and_linear() {
    check(&[p("a", &[2, 3]), p("b", &[3, 4])], "let o = matmul(a, b);");
    check(
        &[p("a", &[2, 2, 3]), p("b", &[3, 2])],
        "let o = matmul(a, b);",
    );
    check(
        &[p("a", &[2, 2, 3]), p("b", &[2, 3, 2])],
        "let o = matmul(a, b);",
    );
    check(
        &[p("a", &[3, 4]), p("b", &[2, 4]), p("c", &[2])],
        "let o = linear(a, b, c);",
    );
}

#[test]
fn norms() {
    check(
        &[p("a", &[2, 4]), p("b", &[4])],
        "let o = rms_norm(a, b, 1e-5);",
    );
    check(
        &[p("a", &[2, 4]), p("b", &[4]), p("c", &[4])],
        "let o = layer_norm(a, b, c, 1e-5);",
    );
}

#[test]
fn reductions_indexing_and_shapes() {
    check(
        &[p("a", &[2, 3])],
        "let o = a[0, ..] * (sum(a * a) + mean(a));",
    );
    check(&[p("a", &[2, 3])], "let o = a[1, ..] * (max(a) - min(a));");
    check(&[p("a", &[3, 4])], "let o = a[1, 1..3] + a[2, 0];");
    check(&[p("a", &[3, 4])], "let o = a[0..2, ..] * a[1..3, ..];");
    check(&[p("a", &[2, 3])], "let o = transpose(a) * [1.0, 2.0];");
    check(
        &[p("a", &[2, 3])],
        "let o = reshape(a, 3, 2) * [1.0, -1.0];",
    );
    check(&[p("a", &[4, 2])], "let o = embedding(a, [2, 0, 2]);");
    check(&[p("a", &[2, 3])], "let o = f32(a) * 2.0;");
}

#[test]
fn tensor_equations() {
    check(
        &[p("a", &[2, 3]), p("b", &[3, 2])],
        "o[i, k] = a[i, j] b[j, k];",
    );
    check(
        &[p("a", &[3, 2]), p("b", &[3]), p("c", &[4, 2])],
        "o[s, i] = tanh(a[i, j] c[s, j] + b[i]);",
    );
    check(&[p("a", &[3, 3])], "o[i] = a[i, i];");
    check(&[p("a", &[3]), p("b", &[2])], "o[i, j] = a[i] b[j];");
    check(&[p("a", &[2, 3])], "o[] = a[i, j] a[i, j];");
    check(
        &[p("a", &[2, 3]), pos("b", &[3])],
        "o[i, j] = a[i, j] / b[j] - a[i, j];",
    );
    check(
        &[p("a", &[3, 3]), p("b", &[3])],
        "o[i] = a[i, j] b[j] b[j];",
    );
    check(
        &[p("a", &[2, 3]), p("b", &[3])],
        "o[i] = relu(a[i, j]) * b[j];",
    );
    check(
        &[p("a", &[3, 3]), pos("t", &[])],
        "o[x, z] = sigmoid(a[x, y] a[y, z] + a[x, z], t);",
    );
    check(
        &[p("a", &[2, 2, 3]), p("b", &[2, 3])],
        "o[n, i] = a[n, i, j] b[n, j];",
    );
}

/// Causal self-attention as tests/examples' transformer writes it: scores
/// with batch indices (run on the batched matmul kernel), a causal mask
/// of -1e9 (masked entries get softmax weight 0 and no gradient), softmax
/// over the keys, values, output projection.
#[test]
fn causal_attention_equations() {
    let body = "let M = [[0.0, -1.0e9, -1.0e9], [0.0, 0.0, -1.0e9], [0.0, 0.0, 0.0]];\n\
                Q[i, k, j] = b[k, j, c] a[i, c];\n\
                K[i, k, j] = d[k, j, c] a[i, c];\n\
                S[k, i, s] = Q[i, k, j] K[s, k, j] * 0.7 + M[i, s];\n\
                let A = softmax(S);\n\
                O[i, k, j] = A[k, i, s] a[s, j];\n\
                o[i, c] = e[c, k, j] O[i, k, j];";
    check(
        &[
            p("a", &[3, 2]),
            p("b", &[2, 2, 2]),
            p("d", &[2, 2, 2]),
            p("e", &[2, 2, 2]),
        ],
        body,
    );
}

#[test]
fn rope() {
    // Positions up to 9 with base 100: the pairs turn by up to 9 radians,
    // so the rotation is far from the identity in every pair.
    check(&[p("a", &[3, 2, 4])], "let o = rope(a, [0, 1, 9], 100.0);");
    check(
        &[p("a", &[2, 1, 6])],
        "let o = rope(a * 2.0, [3, 7], 10.0, \"normal\");",
    );
}

#[test]
fn through_functions_and_control_flow() {
    let body = "fn layer(x: f32[n, d], w: f32[d, d]) -> f32[n, d] {\n\
                    Y[s, i] = tanh(x[s, j] w[i, j]);\n\
                    return Y;\n\
                }\n\
                let h = a;\n\
                for k in 0..3 {\n\
                    if k % 2 == 0 { h = layer(h, b); } else { h = h * 0.5 + a; }\n\
                }\n\
                let o = h;";
    check(&[p("a", &[2, 3]), p("b", &[3, 3])], body);
}
