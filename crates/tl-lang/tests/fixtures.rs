#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Gradients and optimizer steps against PyTorch: the fixtures in
//! tests/fixtures/grad_fixtures.json come from scripts/make_grad_fixtures.py,
//! which runs the same computations in PyTorch (autograd, `torch.optim`,
//! `clip_grad_norm_`, `LambdaLR`) on the same f32 inputs, in float64.
//!
//! Tolerances. TensorLogic computes in f32, so each operation rounds with
//! a relative error of about 6e-8, and the cases chain 5–15 operations
//! (sums of up to a few dozen terms): the expected error is of order 1e-7
//! to 1e-6 relative (the largest seen is 6e-7 for gradients, 1.3e-6 for
//! parameters after 6 Adam steps; `--nocapture` prints each margin).
//! Gradients and losses must agree within `1e-5 · (1 + |reference|)` and
//! parameters after optimizer steps, which compound rounding and where
//! Adam's division by √v amplifies it, within `2e-5 · (1 + |reference|)`:
//! ten times the largest error seen, and four orders of magnitude below
//! the effect of a wrong formula (a missing term or factor moves a value by
//! 1e-1 on these inputs). Logged losses are printed with 6 decimals
//! (rounding ≤ 5e-7).

use serde_json::Value as J;
use tl_lang::run_source;

fn fixtures() -> J {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/grad_fixtures.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &J) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A TensorLogic literal of a fixture tensor `{shape, data}`.
fn literal(t: &J) -> String {
    let shape: Vec<usize> = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data = floats(&t["data"]);
    fn nest(shape: &[usize], v: &[f64]) -> String {
        if shape.len() <= 1 {
            let parts: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
            return format!("[{}]", parts.join(", "));
        }
        let inner: usize = shape[1..].iter().product();
        let rows: Vec<String> = (0..shape[0])
            .map(|r| nest(&shape[1..], &v[r * inner..(r + 1) * inner]))
            .collect();
        format!("[{}]", rows.join(", "))
    }
    nest(&shape, &data)
}

fn type_of(t: &J) -> String {
    let dims: Vec<String> = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.to_string())
        .collect();
    format!("f32[{}]", dims.join(", "))
}

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

/// Checks `|got - want| ≤ tol · (1 + |want|)` elementwise; prints the
/// largest scaled error (`--nocapture` shows the margin).
fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0f64;
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs() / (1.0 + w.abs());
        worst = worst.max(e);
        assert!(e <= tol, "{what}[{k}]: TensorLogic {g} vs PyTorch {w}");
    }
    println!("{what}: largest error {worst:.1e} (tolerance {tol:.0e})");
}

#[test]
fn gradients_match_pytorch_autograd() {
    let fx = fixtures();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let mut src = String::new();
        for (k, t) in c["consts"].as_object().unwrap() {
            src += &format!("let {k} = {};\n", literal(t));
        }
        let params = c["params"].as_object().unwrap();
        for (k, t) in params {
            src += &format!("learnable {k}: {} = {};\n", type_of(t), literal(t));
        }
        src += c["body"].as_str().unwrap();
        src += "\nlet L = 0.5 * sum(o * o) + 0.3 * sum(o);\nprint(\"L\", L);\n";
        for k in params.keys() {
            src += &format!("print(\"g_{k}\", grad(L, {k}));\n");
        }
        let out = run_source(&format!("{name}.tl"), &src)
            .unwrap_or_else(|(o, e)| panic!("{name}: {o}{e}\n{src}"));
        // f32 against float64: 1e-5 unless the case states (and the
        // generator justifies) another bound.
        let tol = c.get("tol").and_then(J::as_f64).unwrap_or(1e-5);
        close(
            &numbers(&out, "L "),
            &[c["loss"].as_f64().unwrap()],
            tol,
            &format!("{name}: loss"),
        );
        for k in params.keys() {
            close(
                &numbers(&out, &format!("g_{k} ")),
                &floats(&c["grads"][k]),
                tol,
                &format!("{name}: d/d{k}"),
            );
        }
    }
}

#[test]
fn optimizer_steps_match_torch_optim() {
    let fx = fixtures();
    let o = &fx["optimizer"];
    let runs = o["runs"].as_array().unwrap();
    assert!(runs.len() >= 5);
    for r in runs {
        let name = r["name"].as_str().unwrap();
        let src = format!(
            "{}\nlet X = {};\nlet Y = {};\nlearnable w: {} = {};\nlearnable b: {} = {};\n\
             learn {{\n    loss = obj(X, Y, w, b);\n    {}\n    epochs = {};\n    log_every = 1;\n}}\n\
             print(\"w\", w);\nprint(\"b\", b);\n",
            o["objective"].as_str().unwrap(),
            literal(&o["x"]),
            literal(&o["y"]),
            type_of(&o["w0"]),
            literal(&o["w0"]),
            type_of(&o["b0"]),
            literal(&o["b0"]),
            r["settings"].as_str().unwrap(),
            r["epochs"],
        );
        let out = run_source(&format!("{name}.tl"), &src)
            .unwrap_or_else(|(o, e)| panic!("{name}: {o}{e}\n{src}"));
        // One step per epoch: each logged loss is that step's loss.
        let losses: Vec<f64> = out
            .lines()
            .filter_map(|l| l.split(": loss ").nth(1))
            .map(|x| x.parse().unwrap())
            .collect();
        close(
            &losses,
            &floats(&r["losses"]),
            1e-5,
            &format!("{name}: losses"),
        );
        close(
            &numbers(&out, "w "),
            &floats(&r["w"]),
            2e-5,
            &format!("{name}: w"),
        );
        close(
            &numbers(&out, "b "),
            &floats(&r["b"]),
            2e-5,
            &format!("{name}: b"),
        );
    }
}
