#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Every class of bad input gives a diagnostic with the right message at
//! the right line and column — never a panic.

use tl_lang::{check_source, run_source};

/// The first line of the rendered diagnostic of a program that must fail
/// (at check time if `at_check`, else when run).
fn diag(src: &str, at_check: bool) -> String {
    if at_check {
        let e = check_source("t.tl", src).expect_err("must not check");
        e.lines().next().unwrap().to_string()
    } else {
        check_source("t.tl", src).expect("checks");
        let (_, e) = run_source("t.tl", src).expect_err("must fail when run");
        e.lines().next().unwrap().to_string()
    }
}

fn assert_diag(src: &str, at_check: bool, want: &str) {
    let got = diag(src, at_check);
    assert_eq!(got, want, "program:\n{src}");
}

#[test]
fn syntax_errors() {
    assert_diag(
        "let x = 1 +;\n",
        true,
        "t.tl:1:12: error: expected an expression, found `;`",
    );
    assert_diag(
        "let x = 1\nlet y = 2;\n",
        true,
        "t.tl:2:1: error: expected `;`, found `let`",
    );
    assert_diag(
        "fn f( { }\n",
        true,
        "t.tl:1:7: error: expected a parameter name, found `{`",
    );
    assert_diag(
        "let s = \"abc;\n",
        true,
        "t.tl:1:9: error: unterminated string",
    );
    assert_diag(
        "let x = 3 @ 4;\n",
        true,
        "t.tl:1:11: error: unexpected character `@`",
    );
    assert_diag(
        "fn f(x: tensor) {}\n",
        true,
        "t.tl:1:9: error: unknown type `tensor`",
    );
    assert_diag(
        "Parent(a, b) :- .\n",
        true,
        "t.tl:1:17: error: expected a relation name, found `.`",
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let src = format!("let x = {}1{};\n", "(".repeat(5000), ")".repeat(5000));
    let e = diag(&src, true);
    assert!(e.contains("nesting is too deep"), "{e}");
}

#[test]
fn undefined_names() {
    assert_diag(
        "let x = 1;\nprint(y);\n",
        true,
        "t.tl:2:7: error: undefined variable `y`",
    );
    assert_diag(
        "let x = frob(1);\n",
        true,
        "t.tl:1:9: error: undefined function `frob`",
    );
    assert_diag(
        "?- Nope(X).\n",
        true,
        "t.tl:1:4: error: undefined relation `Nope`",
    );
    assert_diag(
        "fn f() -> int { return q; }\n",
        true,
        "t.tl:1:24: error: undefined variable `q`",
    );
}

#[test]
fn wrong_arity() {
    assert_diag(
        "fn f(a: int) -> int { return a; }\nlet z = f(1, 2);\n",
        true,
        "t.tl:2:9: error: `f` takes 1 argument, got 2",
    );
    assert_diag(
        "let z = softmax();\n",
        true,
        "t.tl:1:9: error: `softmax` takes 1 argument, got 0",
    );
    assert_diag(
        "relation P(a: T, b: T)\nP(x).\n",
        true,
        "t.tl:2:1: error: `P` takes 2 arguments, got 1",
    );
}

#[test]
fn shape_mismatches() {
    assert_diag(
        "fn f(a: f32[n, d], b: f32[d]) -> f32[n] {\n  Y[i] = a[i, j] b[j];\n  return Y;\n}\nlet y = f([[1.0, 2.0]], [1.0, 2.0, 3.0]);\n",
        true,
        "t.tl:5:25: error: shape mismatch: dimension `d` of `f` is 2 from an earlier argument but 3 in argument 2 (f32[3])",
    );
    assert_diag(
        "let x = [1.0, 2.0] + [1.0, 2.0, 3.0];\n",
        true,
        "t.tl:1:9: error: shape mismatch: `+` of f32[2] and f32[3] (shapes must be equal or broadcast)",
    );
    assert_diag(
        "let a = [[1.0, 2.0], [3.0, 4.0]];\nlet b = [1.0, 2.0, 3.0];\nY[i] = a[i, j] b[j];\n",
        true,
        "t.tl:3:18: error: shape mismatch: index `j` has size 2 elsewhere but 3 in dimension 0 of `b`",
    );
    assert_diag(
        "let a = zeros(2, 3);\nlet b = zeros(4, 5);\nlet c = matmul(a, b);\n",
        true,
        "t.tl:3:9: error: shape mismatch: matmul of f32[2, 3] and f32[4, 5]: inner dimensions 3 and 4 differ",
    );
    assert_diag(
        "fn g(x: f32[3]) -> f32[3] { return x; }\nlet y = g([1.0, 2.0]);\n",
        true,
        "t.tl:2:11: error: shape mismatch: argument 1 of `g`: expected f32[3], found f32[2]",
    );
    // `?` dims are checked when the program runs.
    assert_diag(
        "fn g(x: f32[?], y: f32[?]) -> f32[?] { return x + y; }\nlet n = 3;\nlet y = g(zeros(2), zeros(n));\n",
        false,
        "t.tl:1:47: error: shape mismatch: `+` of [2] and [3] (shapes must be equal or broadcast)",
    );
}

#[test]
fn type_mismatches() {
    assert_diag(
        "let x = 1;\nlet s = \"a\" + x;\n",
        true,
        "t.tl:2:9: error: type mismatch: expected operands that `+` accepts, found string and int",
    );
    assert_diag(
        "if 1 { }\n",
        true,
        "t.tl:1:4: error: type mismatch: expected bool, found int",
    );
    assert_diag(
        "fn f(x: int) -> int { return x; }\nlet y = f(\"no\");\n",
        true,
        "t.tl:2:11: error: type mismatch: expected int, found string",
    );
    assert_diag(
        "fn f() -> int { return 1.5; }\n",
        true,
        "t.tl:1:24: error: type mismatch: expected int, found float",
    );
    assert_diag(
        "let x = 1;\nx = \"s\";\n",
        true,
        "t.tl:2:5: error: type mismatch: expected int, found string",
    );
}

#[test]
fn out_of_range_indices() {
    assert_diag(
        "let t = [1.0, 2.0];\nlet v = t[5];\n",
        true,
        "t.tl:2:11: error: index 5 out of range for dimension of size 2",
    );
    assert_diag(
        "let t = [1.0, 2.0];\nlet i = 7;\nlet v = t[i];\n",
        false,
        "t.tl:3:11: error: index 7 out of range for dimension of size 2",
    );
    assert_diag(
        "let t = zeros(2, 2);\nlet i = -1;\nt[0, i] = 1.0;\n",
        false,
        "t.tl:3:6: error: index -1 out of range for dimension of size 2",
    );
    assert_diag(
        "let t = [1.0, 2.0, 3.0];\nlet n = 4;\nlet s = t[1..n];\n",
        false,
        "t.tl:3:14: error: index 4 out of range for dimension of size 3",
    );
}

#[test]
fn division_by_zero() {
    assert_diag(
        "let a = 4 / 0;\n",
        true,
        "t.tl:1:13: error: division by zero",
    );
    assert_diag(
        "let a = 4;\nlet b = 0;\nprint(a / b);\n",
        false,
        "t.tl:3:11: error: division by zero",
    );
    assert_diag(
        "let a = 4;\nlet b = 0;\nprint(a % b);\n",
        false,
        "t.tl:3:11: error: division by zero",
    );
    assert_diag(
        "let a = 1.5;\nlet b = 0.0;\nprint(a / b);\n",
        false,
        "t.tl:3:11: error: division by zero",
    );
}

#[test]
fn fixpoint_limit_exceeded() {
    let src = "relation E(a: N, b: N)\nrelation R(a: N, b: N)\nR(x, y) :- E(x, y).\nR(x, z) :- R(x, y), E(y, z).\nfixpoint_limit(5);\nfor i in 0..50 { fact E(i, i + 1); }\n?- R(0, X).\n";
    assert_diag(
        src,
        false,
        "t.tl:4:1: error: rules for `R` did not reach a fixpoint within 5 iterations",
    );
    // Within the default limit the same program answers.
    let ok = run_source("t.tl", &src.replace("fixpoint_limit(5);\n", "")).expect("runs");
    assert!(ok.contains("(50 answers)"), "{ok}");
}

#[test]
fn model_builtin_errors() {
    // Checked before anything runs: a model argument must be a model.
    assert_diag(
        "let t = tokenize(1, \"hi\");\n",
        true,
        "t.tl:1:18: error: type mismatch: expected a model (from load_model), found int",
    );
    assert_diag(
        "let x = 3;\nlet w = x.weight;\n",
        true,
        "t.tl:2:9: error: type mismatch: expected a model (to read `.weight`), found int",
    );
    assert_diag(
        "let a = attention(1, 2, 3, 4);\n",
        true,
        "t.tl:1:9: error: `attention` takes 6 arguments, got 4",
    );
    assert_diag(
        "fn w(m: model) -> int {\n    return 1;\n}\nlet x = w(3);\n",
        true,
        "t.tl:4:11: error: type mismatch: expected model, found int",
    );
    // A missing file is an error at the call, naming the file.
    let got = diag("let m = load_model(\"/nonexistent/x.gguf\");\n", false);
    assert!(
        got.starts_with("t.tl:1:9: error: cannot read /nonexistent/x.gguf:"),
        "{got}"
    );
}

#[test]
fn logic_errors() {
    assert_diag(
        "relation P(a: T)\nrelation Q(a: T)\nQ(y) :- P(x).\n",
        true,
        "t.tl:3:3: error: variable `y` in the head of a rule must appear in its body",
    );
    assert_diag(
        "relation P(a: T)\nrelation Q(a: U)\nrelation R(a: T)\nR(x) :- P(x), Q(x).\n",
        true,
        "t.tl:4:17: error: type mismatch: expected `x` of domain T, found a use at a U position",
    );
}

#[test]
fn equation_errors() {
    assert_diag(
        "let a = zeros(2, 2);\nY[i, k] = a[i, j];\n",
        true,
        "t.tl:2:6: error: index `k` on the left does not appear on the right",
    );
    assert_diag(
        "let a = zeros(2, 2);\nY[i] = a[i];\n",
        true,
        "t.tl:2:8: error: shape mismatch: `a` has rank 2 ([2, 2]) but is indexed with 1 indices",
    );
    assert_diag(
        "let a = zeros(2);\nlet y = a[0] a[1];\n",
        true,
        "t.tl:2:14: error: factors written side by side are a product only on the right side of a tensor equation `Y[i] = …`; use `*` here",
    );
    assert_diag(
        "let a = zeros(2);\nY[i] = softmax(a[i]);\n",
        true,
        "t.tl:2:8: error: `softmax` cannot be used inside a tensor equation (only elementwise functions such as relu, exp, sigmoid can)",
    );
}

#[test]
fn caret_is_under_the_span() {
    let e = check_source("t.tl", "let x = 1;\nprint(yy);\n").expect_err("fails");
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines[2], "2 | print(yy);");
    assert_eq!(lines[3], "  |       ^^");
}

#[test]
fn unbounded_recursion_is_a_diagnostic() {
    let src = "fn f(n: int) -> int { return f(n + 1); }\nlet x = f(0);\n";
    let (_, e) = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || run_source("t.tl", src).expect_err("fails"))
        .unwrap()
        .join()
        .unwrap();
    assert!(e.contains("calls nested deeper than"), "{e}");
}

/// Runs `src` under `limits`; the first line of the diagnostic.
fn limited(src: &str, limits: tl_lang::Limits) -> String {
    let mut it = tl_lang::Interp::new(Box::new(std::io::sink()));
    it.set_limits(limits);
    let r = it
        .load_source_in("t.tl", src, std::path::Path::new("."))
        .and_then(|mut p| it.check(&mut p).map(|()| p))
        .and_then(|p| it.run(&p));
    let e = r.expect_err("must hit a limit");
    e.render(&it.sources).lines().next().unwrap().to_string()
}

#[test]
fn resource_limits_are_diagnostics() {
    let small = tl_lang::Limits {
        max_steps: Some(1000),
        max_elements: 1 << 12,
        max_equation_iterations: 1 << 14,
        max_tuples: 500,
    };
    assert_eq!(
        limited("let i = 0;\nwhile true { i = i + 1; }\n", small),
        "t.tl:2:1: error: resource limit: the program ran more than 1000 steps"
    );
    assert_eq!(
        limited("let a = zeros(100, 100);\n", small),
        "t.tl:1:9: error: shape [100, 100] is too large"
    );
    assert_eq!(
        limited(
            "let a = zeros(65);\nlet b = zeros(65, 1);\nlet c = a + b;\n",
            small
        ),
        "t.tl:3:9: error: resource limit: `+` of [65] and [65, 1] would exceed 4096 elements"
    );
    assert_eq!(
        limited("let a = zeros(64, 64);\nY[i, k] = a[i, j] a[j, k];\n", small),
        "t.tl:2:11: error: resource limit: tensor equation needs 262144 loop iterations, over the limit of 16384"
    );
    assert_eq!(
        limited(
            "relation E(a: N, b: N)\nrelation P(a: N, b: N)\nP(x, y) :- E(x, y).\nP(x, z) :- P(x, y), E(y, z).\nfor i in 0..40 { fact E(i, i + 1); }\n?- P(0, X).\n",
            small
        ),
        "t.tl:3:1: error: resource limit: relations hold more than 500 tuples"
    );
    assert_eq!(
        limited("let s = \"ab\";\nfor i in 0..20 { s = s + s; }\n", small),
        "t.tl:2:22: error: resource limit: a string of more than 4096 bytes"
    );
}

#[test]
fn huge_literal_dims_and_wide_relations() {
    assert_diag(
        "let a = zeros(4);\nlet b = reshape(a, 4294967296, 4294967296, 4294967296, 4294967296, 4294967296);\n",
        true,
        "t.tl:2:9: error: shape mismatch: cannot reshape f32[4] (4 elements) to [4294967296, 4294967296, 4294967296, 4294967296, 4294967296] (too many elements)",
    );
    let args: Vec<String> = (0..65).map(|i| format!("a{i}: T")).collect();
    let src = format!("relation W({})\n", args.join(", "));
    assert_diag(
        &src,
        true,
        "t.tl:1:1: error: `W` has 65 arguments; relations have at most 64",
    );
}

#[test]
fn learning_errors() {
    let data = "let X = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];\nlet Y = [1.0, 0.0, 1.0];\n";
    let cases: Vec<(String, bool, &str)> = vec![
        // The loss is not a scalar.
        (
            format!("{data}learnable w: f32[2] = zeros;\nlearn {{\n    data xb, yb in X, Y;\n    loss = xb * w;\n}}\n"),
            true,
            "t.tl:6:12: error: shape mismatch: the loss must be a scalar (a float or f32[]), found f32[?, 2]; reduce it, e.g. with mean(…)",
        ),
        // Data tensors disagree on the number of examples.
        (
            format!("{data}learnable w: f32[2] = zeros;\nlet Z = [1.0, 2.0];\nlearn {{\n    data xb, yb in X, Z;\n    loss = mean(yb);\n}}\n"),
            true,
            "t.tl:6:23: error: shape mismatch: data tensors must have the same first dimension (the examples): 3 and 2",
        ),
        // A parameter of the wrong shape for the batches: at check time
        // when the shapes are known, when the program runs otherwise.
        (
            format!("{data}learnable w: f32[3] = zeros;\nlearn {{\n    data xb, yb in X, Y;\n    loss = mean(xb * w);\n}}\n"),
            true,
            "t.tl:6:17: error: shape mismatch: `*` of f32[?, 2] and f32[3] (shapes must be equal or broadcast)",
        ),
        (
            format!("{data}let n = 3;\nlearnable w: f32[n] = zeros;\nlearn {{\n    data xb, yb in X, Y;\n    loss = mean(xb * w);\n}}\n"),
            false,
            "t.tl:7:17: error: shape mismatch: `*` of [3, 2] and [3] (shapes must be equal or broadcast)",
        ),
        (
            "learnable w: f32[2, 2] = [1.0, 2.0];\n".into(),
            true,
            "t.tl:1:26: error: shape mismatch: expected f32[2, 2], found f32[2]",
        ),
        // A NaN loss, and one that diverges.
        (
            format!("{data}learnable w: f32[2] = [-1.0, -1.0];\nlearn {{\n    data xb in X;\n    loss = sum(log(xb * w));\n    epochs = 3;\n}}\n"),
            false,
            "t.tl:6:12: error: the loss is NaN at epoch 1, step 1 (learning rate too high, or log/division of 0?)",
        ),
        (
            format!("{data}learnable w: f32[2] = [1.0, 1.0];\nlearn {{\n    loss = sum(exp(w * w));\n    optimizer = sgd(lr = 100.0);\n    epochs = 50;\n}}\n"),
            false,
            "t.tl:5:12: error: the loss is inf at epoch 2, step 1 (learning rate too high, or log/division of 0?)",
        ),
        // Operations without a gradient on the way to the loss.
        (
            "learnable w: f32[2] = [1.0, -1.0];\nlet h = step(w);\nlet loss = sum(h * h);\nprint(grad(loss, w));\n".into(),
            false,
            "t.tl:2:9: error: `step` has no gradient, but the objective depends on its result here; for a differentiable threshold use `sigmoid(x, T)`, a step with temperature T",
        ),
        (
            "learnable w: f32[2] = [1.0, -1.0];\nlearn {\n    loss = sum((w % 2.0) * w);\n}\n".into(),
            false,
            "t.tl:3:16: error: `%` has no gradient, but the objective depends on its result here",
        ),
        (
            "learnable A: f32[2, 2] = ones;\nP[x, z] = step(A[x, y] A[y, z]);\nlet l = sum(P);\nprint(grad(l, A));\n".into(),
            false,
            "t.tl:2:11: error: `step` has no gradient, but the objective depends on this tensor equation; for a differentiable threshold use `sigmoid(x, T)`, a step with temperature T",
        ),
        (
            "let v = [1.0, 2.0];\nlet l = sum(v * v);\nprint(grad(l, v));\n".into(),
            false,
            "t.tl:3:15: error: `grad`: this tensor is neither learnable nor computed from a learnable tensor; declare it with `learnable`",
        ),
        // Settings.
        (
            "learnable w: f32[2] = [1.0, -1.0];\nlearn {\n    loss = sum(w * w);\n    optimizer = adam(lr = 0.1, momentum = 0.9);\n}\n".into(),
            true,
            "t.tl:4:32: error: `adam` has no argument `momentum` (it takes lr, betas, eps, weight_decay)",
        ),
        (
            "learnable w: f32[2] = [1.0, -1.0];\nlearn {\n    loss = sum(w * w);\n    optimiser = adam(lr = 0.1);\n}\n".into(),
            true,
            "t.tl:4:5: error: unknown setting `optimiser` of `learn` (data, loss, optimizer, schedule, epochs, batch_size, clip_norm, seed, shuffle, log_every)",
        ),
        (
            "learnable w: f32[2] = [1.0, -1.0];\nlearn {\n    epochs = 2;\n}\n".into(),
            true,
            "t.tl:2:1: error: `learn` needs the objective to minimize: `loss = …;` (a scalar)",
        ),
        (
            "learnable w: f32[2] = [1.0, -1.0];\nlearn {\n    loss = sum(w);\n    optimizer = adam(betas = 0.9);\n}\n".into(),
            true,
            "t.tl:4:30: error: type mismatch: expected f32[2] (`[0.9, 0.999]`), found float",
        ),
        (
            "let v = [1.0];\nlearn {\n    loss = sum(v);\n}\n".into(),
            false,
            "t.tl:2:1: error: `learn`: no learnable tensors in scope (declare them with `learnable`)",
        ),
        (
            "learnable w: f32[2] = [1.0, -1.0];\nlet c = [1.0];\nlearn {\n    loss = sum(c);\n}\n".into(),
            false,
            "t.tl:4:12: error: the loss does not depend on any learnable tensor",
        ),
        (
            "learnable w: f32[2] = load(\"/nonexistent/w.safetensors\");\n".into(),
            false,
            "t.tl:1:23: error: cannot read /nonexistent/w.safetensors: No such file or directory (os error 2)",
        ),
    ];
    for (src, at_check, want) in cases {
        assert_diag(&src, at_check, want);
    }
}

#[test]
fn grouped_linears_report_errors_in_statement_order() {
    // Two `let`s of `linear` over one input run as a group; the first has
    // a bad weight, the second a bad index. As one by one, the first
    // statement's error is the one reported.
    assert_diag(
        concat!(
            "fn f(h: f32[?, ?], w1: f32[?, ?], w2: f32[?, ?, ?]) -> f32[?, ?] {\n",
            "    let q = linear(h, w1);\n",
            "    let k = linear(h, w2[5]);\n",
            "    return q + k;\n",
            "}\n",
            "print(f(ones(2, 3), ones(4, 5), ones(2, 4, 3)));\n",
        ),
        false,
        "t.tl:2:13: error: shape mismatch: linear: input [2, 3] against weight [4, 5] (expected [n, 3])",
    );
}
