#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `tl run`, `tl check`, `tl test` and `tl repl` driven as a user would.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn tl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tl"))
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn run_examples() {
    let out = ok(&tl()
        .arg("run")
        .arg(examples().join("mlp.tl"))
        .output()
        .unwrap());
    assert!(out.starts_with("y = [[7.1, 2.55], [0.1, -0.2]]\n"), "{out}");
    let out = ok(&tl()
        .arg("run")
        .arg(examples().join("ancestors.tl"))
        .output()
        .unwrap());
    assert!(out.contains("?- Ancestor(alice, Z).\nZ = bob\n"), "{out}");
    let out = ok(&tl()
        .arg("run")
        .arg(examples().join("reachability.tl"))
        .args(["2000", "10000", "5"])
        .output()
        .unwrap());
    assert!(out.contains(" answers)\n"), "{out}");
}

#[test]
fn check_reports_file_line_col_and_caret() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.tl");
    std::fs::write(&p, "let x = 1;\nprint(y + x);\n").unwrap();
    let out = tl().arg("check").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[0],
        format!("{}:2:7: error: undefined variable `y`", p.display())
    );
    assert_eq!(lines[2], "2 | print(y + x);");
    assert_eq!(lines[3], "  |       ^");
    // Nothing ran: checking comes first.
    std::fs::write(&p, "print(\"ran\");\nlet z = 1 / 0;\n").unwrap();
    let out = tl().arg("run").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert!(text(&out.stderr).contains(":2:13: error: division by zero"));

    let good = ok(&tl()
        .arg("check")
        .arg(examples().join("mlp.tl"))
        .output()
        .unwrap());
    assert!(good.ends_with("mlp.tl: ok\n"), "{good}");
}

#[test]
fn check_explain_prints_tensor_forms() {
    let out = ok(&tl()
        .args(["check", "--explain"])
        .arg(examples().join("ancestors.tl"))
        .output()
        .unwrap());
    assert!(
        out.contains(
            "Ancestor[x, y] = step(Ancestor[x, y] + Parent[x, y] + Parent[x, y'] Ancestor[y', y])"
        ),
        "{out}"
    );
    let out = ok(&tl()
        .args(["check", "--explain"])
        .arg(examples().join("mlp.tl"))
        .output()
        .unwrap());
    assert!(
        out.contains("H[s, i] = relu((sum_{j}(w1[i, j] x[s, j]) + b1[i]))"),
        "{out}"
    );
}

#[test]
fn test_runs_test_blocks() {
    let out = ok(&tl().arg("test").arg(examples()).output().unwrap());
    assert!(
        out.contains("mlp matches hand-computed values ... ok"),
        "{out}"
    );
    assert!(out.ends_with("test result: 2 passed; 0 failed\n"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.tl"),
        "test \"good\" { assert 1 + 1 == 2; }\ntest \"bad\" { assert 1 > 2, \"one is not more than two\"; }\n",
    )
    .unwrap();
    let out = tl().arg("test").arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let so = text(&out.stdout);
    assert!(
        so.contains(":: good ... ok") && so.contains(":: bad ... FAILED"),
        "{so}"
    );
    assert!(so.contains("test result: 1 passed; 1 failed"), "{so}");
    assert!(
        text(&out.stderr).contains("t.tl:2:21: error: assertion failed: one is not more than two")
    );
}

#[test]
fn repl_session() {
    let mut child = tl()
        .arg("repl")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"fn f(x: int) -> int {\n  return x * 2;\n}\nf(21);\nprint(nope);\nlet v = [1.0, 2.0];\nY[i] = v[i] v[i];\nY;\nrelation E(a: N, b: N)\nE(1, 2).\n?- E(X, Y).\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let so = text(&out.stdout);
    assert!(so.contains("tl> ... ... tl> 42\n"), "{so}");
    assert!(so.contains("[1.0, 4.0]\n"), "{so}");
    assert!(so.contains("X = 1, Y = 2\n(1 answer)\n"), "{so}");
    assert!(
        text(&out.stderr).contains("<repl:5>:1:7: error: undefined variable `nope`"),
        "{}",
        text(&out.stderr)
    );
}
