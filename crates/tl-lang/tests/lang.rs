#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Language features end to end: parse, check, run, compare.

use tl_lang::{run_source, Interp, SharedBuf, Value};

fn run(src: &str) -> String {
    match run_source("t.tl", src) {
        Ok(out) => out,
        Err((out, e)) => panic!("{out}\n{e}"),
    }
}

#[test]
fn scalars_control_flow_and_functions() {
    let out = run(r#"
        fn fib(n: int) -> int {
            if n < 2 { return n; }
            return fib(n - 1) + fib(n - 2);
        }
        fn collatz(n: int) -> int {
            let steps = 0;
            while n != 1 {
                if n % 2 == 0 { n = n / 2; } else { n = 3 * n + 1; }
                steps = steps + 1;
            }
            return steps;
        }
        let total = 0;
        for i in 0..10 { total = total + i; }
        let f: float = 2;
        print(fib(15), collatz(27), total, f * 1.5, "a" + "b", !true || 1 <= 2);
        /* block comment */
        print(int(3.9), float(2), str(4) + "!", len("héllo"));
    "#);
    assert_eq!(out, "610 111 45 3.0 ab true\n3 2.0 4! 5\n");
}

#[test]
fn tensors_literals_indexing_slicing() {
    let out = run(r#"
        let m = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]];
        print(m[1, 2], m[0], m[.., 1], m[0, 1..3], m[1..]);
        let z = zeros(2, 2);
        z[0, 1] = 7;
        z[1] = [8.0, 9.0];
        print(z, dim(m, 1), len(m));
        let ids = [3, 1, 2];
        print(ids, ids * 2, m * 2.0 + 1.0, m > 3.0);
        let h = f16(m);
        let b = bf16(m);
        print(f32(h) == m, b[1, 0], i32(m));
        print(reshape(m, 3, 2), transpose(m), arange(4), ones(2));
    "#);
    let want = "6.0 [1.0, 2.0, 3.0] [2.0, 5.0] [2.0, 3.0] [[4.0, 5.0, 6.0]]\n\
                [[0.0, 7.0], [8.0, 9.0]] 3 2\n\
                [3, 1, 2] [6, 2, 4] [[3.0, 5.0, 7.0], [9.0, 11.0, 13.0]] [[false, false, false], [true, true, true]]\n\
                [[true, true, true], [true, true, true]] 4.0 [[1, 2, 3], [4, 5, 6]]\n\
                [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]] [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]] [0.0, 1.0, 2.0, 3.0] [1.0, 1.0]\n";
    assert_eq!(out, want);
}

/// A plain reference contraction to hold the equation engine to.
fn matmul_ref(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                out[i * n + j] += a[i * k + p] * b[p * n + j];
            }
        }
    }
    out
}

fn tensor_of(it: &Interp, src_out: &str) -> Vec<f32> {
    let _ = it;
    src_out
        .trim()
        .replace(['[', ']'], "")
        .split(", ")
        .map(|x| x.parse().unwrap())
        .collect()
}

#[test]
fn einsum_forms_agree_with_reference() {
    // 3x4 · 4x5 through the kernel path, a transposed operand, a batch
    // index (general loop nest), a diagonal and a trace.
    let a: Vec<f32> = (0..12).map(|x| x as f32 * 0.5 - 2.0).collect();
    let b: Vec<f32> = (0..20).map(|x| (x as f32 * 0.37).sin()).collect();
    let lit = |v: &[f32], rows: usize| {
        let cols = v.len() / rows;
        let r: Vec<String> = (0..rows)
            .map(|i| {
                let c: Vec<String> = v[i * cols..(i + 1) * cols]
                    .iter()
                    .map(|x| format!("{x:?}"))
                    .collect();
                format!("[{}]", c.join(", "))
            })
            .collect();
        format!("[{}]", r.join(", "))
    };
    let src = format!(
        "let a = {};\nlet b = {};\n\
         C[i, k] = a[i, j] b[j, k];\nprint(C);\n\
         D[k, i] = b[j, k] a[i, j];\nprint(D);\n\
         bt[k, j] = b[j, k];\nE[i, k] = a[i, j] * bt[k, j];\nprint(E);\n\
         let sq = [[1.0, 2.0], [3.0, 4.0]];\n\
         dg[i] = sq[i, i];\ntr[] = sq[i, i];\nprint(dg, tr);\n\
         B3[q, i, k] = sq[q, i] sq[q, k];\nprint(B3);\n\
         G[i, k] = a[i, j] b[j, k] * 2 - a[i, j] b[j, k];\nprint(G);\n",
        lit(&a, 3),
        lit(&b, 4)
    );
    let out = run(&src);
    let lines: Vec<&str> = out.lines().collect();
    let it = Interp::new(Box::new(std::io::sink()));
    let want = matmul_ref(&a, &b, 3, 4, 5);
    let close = |got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
    };
    close(&tensor_of(&it, lines[0]), &want);
    let mut want_t = vec![0.0; 15];
    for i in 0..3 {
        for k in 0..5 {
            want_t[k * 3 + i] = want[i * 5 + k];
        }
    }
    close(&tensor_of(&it, lines[1]), &want_t);
    close(&tensor_of(&it, lines[2]), &want);
    assert_eq!(lines[3], "[1.0, 4.0] 5.0");
    assert_eq!(
        lines[4],
        "[[[1.0, 2.0], [2.0, 4.0]], [[9.0, 12.0], [12.0, 16.0]]]"
    );
    close(&tensor_of(&it, lines[5]), &want);
}

#[test]
fn builtins_on_core_kernels() {
    let out = run(r#"
        let x = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]];
        let s = softmax(x);
        print(allclose(s[1], [1.0, 1.0, 1.0] / 3.0, 0.000001), sum(s) > 1.9999 && sum(s) < 2.0001);
        let w = [1.0, 1.0, 1.0];
        let r = rms_norm(x, w, 0.0);
        print(allclose(r[0], x[0] / sqrt(14.0 / 3.0), 0.0001));
        let ln = layer_norm([[1.0, 2.0, 3.0]], w, [0.0, 0.0, 0.0], 0.0);
        print(allclose(ln, [[-1.2247449, 0.0, 1.2247449]], 0.0001));
        let wt = [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]];
        print(linear(x, wt), linear(x, wt, [1.0, -1.0]), matmul(x, transpose(wt)));
        print(argmax([0.5, 3.0, 3.0, 1.0]), argmax(x), topk([0.5, 3.0, 2.0, 1.0], 2));
        let table = [[0.0, 0.5], [1.0, 1.5], [2.0, 2.5]];
        print(embedding(table, [2, 0]), embedding(f16(table), [1]));
        print(silu(0.0), gelu(0.0), relu(-2.0), step(0.5), sigmoid(0.0));
        print(allclose(silu([1.0]), [0.7310586], 0.00001), allclose(gelu([1.0]), [0.8411920], 0.0001));
        let q = reshape(arange(8), 2, 1, 4);
        let pos = [0, 1];
        let rq = rope(q, pos, 10000.0);
        print(allclose(rq[0], q[0], 0.000001), allclose(rope(q, pos, 10000.0, "normal")[0], q[0], 0.000001));
        print(mean([1.0, 2.0, 3.0, 6.0]), max([1.0, 5.0]), min([1.0, 5.0]));
    "#);
    let want = "true true\ntrue\ntrue\n\
                [[1.0, 6.0], [0.0, 0.0]] [[2.0, 5.0], [1.0, -1.0]] [[1.0, 6.0], [0.0, 0.0]]\n\
                1 [2, 0] [1, 2]\n\
                [[2.0, 2.5], [0.0, 0.5]] [[1.0, 1.5]]\n\
                0.0 0.0 0.0 1.0 0.5\ntrue true\ntrue true\n3.0 5.0 1.0\n";
    assert_eq!(out, want);
}

#[test]
fn sampling_is_deterministic_per_seed() {
    let out = run(r#"
        let logits = [1.0, 2.0, 3.0, 0.5, 2.5];
        print(sample(logits, 0.0, 0, 1.0, 1));
        let a = sample(logits, 1.0, 0, 1.0, 42);
        let b = sample(logits, 1.0, 0, 1.0, 42);
        print(a == b);
        let k1 = 0;
        for s in 0..50 { if sample(logits, 1.0, 1, 1.0, s) == 2 { k1 = k1 + 1; } }
        print(k1);
        let pset = 0;
        for s in 0..50 { let t = sample(logits, 1.0, 0, 0.5, s); if t == 2 || t == 4 { pset = pset + 1; } }
        print(pset);
        print_top_k(logits, 2);
    "#);
    assert_eq!(out, "2\ntrue\n50\n50\n2: 3\n4: 2.5\n");
}

#[test]
fn test_blocks_run_with_failures_reported() {
    let buf = SharedBuf::default();
    let mut it = Interp::new(Box::new(buf.clone()));
    let mut p = it
        .load_source_in(
            "t.tl",
            "fn sq(x: int) -> int { return x * x; }\n\
             test \"passes\" { assert sq(3) == 9; }\n\
             test \"fails\" {\n  assert sq(2) == 5, \"two squared\";\n}\n\
             test \"errors\" { let t = [1.0]; let i = 3; print(t[i]); }\n",
            std::path::Path::new("."),
        )
        .unwrap();
    it.check(&mut p).unwrap();
    let r = it.run_tests();
    assert_eq!(r.len(), 3);
    assert!(r[0].1.is_ok());
    let e1 = r[1].1.as_ref().unwrap_err().render(&it.sources);
    assert!(
        e1.starts_with("t.tl:4:10: error: assertion failed: two squared"),
        "{e1}"
    );
    let e2 = r[2].1.as_ref().unwrap_err().render(&it.sources);
    assert!(
        e2.starts_with("t.tl:6:51: error: index 3 out of range"),
        "{e2}"
    );
}

#[test]
fn imports_and_repl_style_sessions() {
    let dir = std::env::temp_dir().join(format!("tl-lang-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("lib.tl"),
        "import \"main.tl\";\nfn double(x: f32[n]) -> f32[n] { return x * 2.0; }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("main.tl"),
        "import \"lib.tl\";\nprint(double([1.0, 2.5]));\n",
    )
    .unwrap();
    let buf = SharedBuf::default();
    let mut it = Interp::new(Box::new(buf.clone()));
    let p = it.load_file(&dir.join("main.tl")).unwrap();
    let mut p = p;
    it.check(&mut p).unwrap();
    it.run(&p).unwrap();
    assert_eq!(buf.text(), "[2.0, 5.0]\n");
    // A missing import points at the import line.
    std::fs::write(dir.join("bad.tl"), "let a = 1;\nimport \"nope.tl\";\n").unwrap();
    let mut it2 = Interp::new(Box::new(std::io::sink()));
    let e = it2
        .load_file(&dir.join("bad.tl"))
        .unwrap_err()
        .render(&it2.sources);
    assert!(e.contains("bad.tl:2:1: error: cannot read"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();

    // Successive inputs share functions, globals, relations and facts.
    let buf = SharedBuf::default();
    let mut it = Interp::new(Box::new(buf.clone()));
    let dot = std::path::Path::new(".");
    let step = |it: &mut Interp, src: &str| -> Option<Value> {
        let mut p = it.load_source_in("<repl>", src, dot).unwrap();
        it.check(&mut p).unwrap();
        it.run(&p).unwrap()
    };
    step(&mut it, "fn inc(x: int) -> int { return x + 1; }");
    step(&mut it, "let a = inc(41);");
    let v = step(&mut it, "a * 2;").unwrap();
    assert_eq!(v.to_string(), "84");
    step(&mut it, "relation E(a: N, b: N)\nE(1, 2).\nE(2, 3).");
    step(
        &mut it,
        "relation P(a: N, b: N)\nP(x, y) :- E(x, y).\nP(x, z) :- E(x, y), P(y, z).",
    );
    step(&mut it, "fact E(3, a);");
    step(&mut it, "?- P(1, X).");
    assert_eq!(
        buf.text(),
        "?- P(1, X).\nX = 2\nX = 3\nX = 42\n(3 answers)\n"
    );
}

#[test]
fn explain_shows_rules_and_equations() {
    let mut it = Interp::new(Box::new(std::io::sink()));
    let mut p = it
        .load_source_in(
            "t.tl",
            "relation E(a: N, b: N)\nrelation T(a: N, b: N)\nT(x, y) :- E(x, y).\nT(x, z) :- T(x, y), E(y, z).\n\
             fn layer(w: f32[o, i], x: f32[i], b: f32[o]) -> f32[o] { H[k] = relu(w[k, j] x[j] + b[k]); return H; }\n",
            std::path::Path::new("."),
        )
        .unwrap();
    it.check(&mut p).unwrap();
    let s = it.explain(&p).unwrap();
    assert!(
        s.contains("T[x, y] = step(T[x, y] + E[x, y] + T[x, y'] E[y', y])"),
        "{s}"
    );
    assert!(
        s.contains("H[k] = relu((sum_{j}(w[k, j] x[j]) + b[k]))"),
        "{s}"
    );
}

#[test]
fn language_reference_lists_every_builtin() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/LANGUAGE.md"
    ))
    .unwrap();
    for b in tl_lang::builtins::BUILTINS {
        assert!(
            doc.contains(&format!("`{}`", b.name)),
            "docs/LANGUAGE.md does not list `{}`",
            b.name
        );
        if let tl_lang::builtins::Status::Later(_) = b.status {
            let at = doc.find("**Not yet implemented**").unwrap();
            assert!(
                doc[at..].contains(&format!("| `{}` |", b.name)),
                "`{}` not marked not-yet-implemented",
                b.name
            );
        }
    }
}

/// The semantics of rules is their tensor equation iterated densely to a
/// fixpoint; the runtime evaluates them sparsely. Both, on the same random
/// graph, must give the same relation.
#[test]
fn rules_match_their_dense_tensor_equations() {
    let src = r#"
        relation E(a: N, b: N)
        relation T(a: N, b: N)
        T(x, y) :- E(x, y).
        T(x, z) :- T(x, y), E(y, z).

        fn closure(e: f32[n, n]) -> f32[n, n] {
            R[x, y] = e[x, y];
            let changed = true;
            while changed {
                S[x, y] = step(R[x, y] + e[x, y] + R[x, w] e[w, y]);
                changed = !allclose(S, R, 0.0);
                R = S;
            }
            return R;
        }

        let n = 40;
        let e = zeros(n, n);
        let s = 11;
        for k in 0..50 {
            s = (s * 1103515245 + 12345) % 2147483648;
            let a = (s / 65536) % n;
            s = (s * 1103515245 + 12345) % 2147483648;
            let b = (s / 65536) % n;
            e[a, b] = 1.0;
            fact E(a, b);
        }
        let r = closure(e);
        for x in 0..n {
            for y in 0..n {
                if r[x, y] > 0.5 { print("dense", x, y); }
            }
        }
        ?- T(X, Y).
    "#;
    let out = run(src);
    let mut dense: Vec<(i64, i64)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("dense "))
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    let mut sparse: Vec<(i64, i64)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("X = "))
        .map(|l| {
            let (a, b) = l.split_once(", Y = ").unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    dense.sort();
    sparse.sort();
    assert!(dense.len() > 50, "a trivial closure: {}", dense.len());
    assert_eq!(dense, sparse);
}
