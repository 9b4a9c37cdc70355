#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The CLI driven as a user would: generate, chat (piped stdin), perplexity
//! and bad input, on a tiny synthetic model written by `tl synth`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn tl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tl"))
}

fn synth_model(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join(format!("{tag}.gguf"));
    let out = tl()
        .args(["synth", "--arch", "qwen2", "-o"])
        .arg(&p)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir, p)
}

#[test]
fn generate_streams_and_reports_speed() {
    let (_d, m) = synth_model("gen");
    let out = tl()
        .args([
            "generate",
            "-p",
            "hello world",
            "-n",
            "5",
            "--ignore-eos",
            "-t",
            "1",
            "-m",
        ])
        .arg(&m)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("decode: 5 tokens"), "{err}");
    assert!(err.contains("tok/s"), "{err}");
    // Same seed, same sampled text.
    let sample = |seed: &str| {
        tl().args([
            "generate",
            "-p",
            "abc",
            "-n",
            "6",
            "--ignore-eos",
            "--temp",
            "1.0",
            "--seed",
            seed,
            "-m",
        ])
        .arg(&m)
        .output()
        .expect("runs")
        .stdout
    };
    assert_eq!(sample("7"), sample("7"));
}

#[test]
fn chat_with_piped_stdin_keeps_going_after_reset() {
    let (_d, m) = synth_model("chat");
    let mut child = tl()
        .args(["chat", "-n", "3", "--ignore-eos", "-m"])
        .arg(&m)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hi there\n/system be brief\nsecond question\n/reset\nthird\n")
        .expect("writes");
    let out = child.wait_with_output().expect("exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("history cleared"), "{err}");
    // Three answers, one line each.
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[test]
fn perplexity_runs_with_progress() {
    let (d, m) = synth_model("ppl");
    let text = d.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog ".repeat(20),
    )
    .expect("write");
    let out = tl()
        .args(["perplexity", "--chunk", "64", "-f"])
        .arg(&text)
        .arg("-m")
        .arg(&m)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.starts_with("perplexity: "), "{s}");
}

/// `tl perplexity --chunk N` takes N as the runtime context when
/// `--ctx-size` is not given, as llama-perplexity's `-c` is both: a Phi-3
/// LongRoPE file (original context 256, training context 512) scored in
/// chunks of 256 uses the short factors, the same as `--ctx-size 256` and
/// not as the training context (`--ctx-size 512`, the long ones).
#[test]
fn perplexity_chunk_is_the_runtime_context() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = dir.path().join("phi3.gguf");
    let out = tl()
        .args(["synth", "--arch", "phi3", "--long-rope", "256", "-o"])
        .arg(&m)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(30),
    )
    .expect("write");
    let ppl = |extra: &[&str]| {
        let out = tl()
            .args(["perplexity", "-t", "1", "--chunk", "256", "-f"])
            .arg(&text)
            .arg("-m")
            .arg(&m)
            .args(extra)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let by_chunk = ppl(&[]);
    assert_eq!(by_chunk, ppl(&["--ctx-size", "256"]));
    assert_ne!(by_chunk, ppl(&["--ctx-size", "512"]));
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (d, m) = synth_model("bad");
    // Prompt longer than the context without truncation.
    let out = tl()
        .args(["generate", "-c", "8", "-n", "4", "-p"])
        .arg("word ".repeat(50))
        .arg("-m")
        .arg(&m)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not fit the context"), "{err}");
    // …and with truncation it runs.
    let out = tl()
        .args([
            "generate",
            "-c",
            "16",
            "-n",
            "4",
            "--truncate",
            "--ignore-eos",
            "-p",
        ])
        .arg("word ".repeat(50))
        .arg("-m")
        .arg(&m)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Out-of-range sampling values.
    let out = tl()
        .args(["generate", "-p", "x", "--top-p", "0", "-m"])
        .arg(&m)
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
    // A file that is not a model.
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model").expect("write");
    let out = tl()
        .args(["generate", "-p", "x", "-m"])
        .arg(&junk)
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"));
}

#[test]
fn check_tensors_names_the_bad_tensor() {
    let (d, m) = synth_model("nan");
    // Overwrite the first f32 value of output_norm.weight with NaN.
    let f = tl_gguf::GgufFile::open(&m).expect("opens");
    let t = f.tensor("output_norm.weight").expect("present");
    let at = (f.data_offset + t.offset) as usize;
    drop(f);
    let mut bytes = std::fs::read(&m).expect("read");
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let bad = d.path().join("nan.gguf");
    std::fs::write(&bad, bytes).expect("write");
    let out = tl()
        .args(["generate", "--check-tensors", "-p", "x", "-m"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("output_norm.weight"), "{err}");
}

/// `--numerics reference` runs (the synthetic model's Q8_0 weights through
/// the generic kernels) and a bad mode is a clear error naming the choices.
#[test]
fn numerics_flag() {
    let (_d, m) = synth_model("num");
    let run = |mode: &str| {
        tl().args([
            "--numerics",
            mode,
            "generate",
            "-p",
            "hello",
            "-n",
            "4",
            "--ignore-eos",
            "-m",
        ])
        .arg(&m)
        .output()
        .expect("runs")
    };
    let out = run("reference");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("decode: 4 tokens"));
    let bad = run("exact");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("fast") && err.contains("reference"), "{err}");
}

/// `tl bench --spec`: plain and speculative decoding side by side on a
/// prompt file (the output checked identical), for every method without a
/// second model; bad speculation flags are clear errors.
#[test]
fn bench_compares_speculation_on_a_prompt_file() {
    let (d, m) = synth_model("spec");
    let prompt = d.path().join("prompt.txt");
    std::fs::write(&prompt, "a b c d a b c d a b c d a b").expect("write");
    for method in ["ngram", "self"] {
        let out = tl()
            .args([
                "bench", "--spec", method, "--spec-k", "4", "-n", "12", "-r", "1",
            ])
            .args(["-t", "1", "--prompt-file"])
            .arg(&prompt)
            .arg("-m")
            .arg(&m)
            .output()
            .expect("runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{method}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("plain t/s"), "{stdout}");
        assert!(stdout.contains(&format!("{method} k≤4")), "{stdout}");
    }
    for (args, want) in [
        (&["--spec", "ngram"][..], "--prompt-file"),
        (
            &["--spec", "ngram", "--spec-k", "33", "--prompt-file", "p"][..],
            "out of range",
        ),
        (
            &["--spec", "draft", "--prompt-file", "p"][..],
            "--draft-model",
        ),
        (&["--spec", "bogus"][..], "unknown speculation method"),
        (&["--prompt-file", "p"][..], "used with --spec"),
    ] {
        let out = tl()
            .arg("bench")
            .args(args)
            .arg("-m")
            .arg(&m)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn kv_type_flag() {
    let (d, m) = synth_model("kvt");
    let text = d.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog ".repeat(20),
    )
    .expect("write");
    let out = tl()
        .args(["--kv-type", "q8_0", "perplexity", "--chunk", "64", "-f"])
        .arg(&text)
        .arg("-m")
        .arg(&m)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("kv cache: q8_0"), "{err}");
    let out = tl()
        .args(["--kv-type", "q9", "perplexity", "-f"])
        .arg(&text)
        .arg("-m")
        .arg(&m)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown KV cache type 'q9'"), "{err}");
    let out = tl()
        .args(["--kv-type", "q8_0", "tokenize", "-m"])
        .arg(&m)
        .arg("x")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--kv-type applies to"),
        "refused where no model cache is made"
    );
}

/// One HTTP/1.1 request to `127.0.0.1:port`; the response's status line
/// and body (`None` when nothing answers).
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(String, String)> {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .ok()?;
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    let (head, rest) = out.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), rest.to_string()))
}

/// A counter's value in Prometheus text (summed over its label sets).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `tl serve --spec draft --draft-model FILE` answers completions and
/// reports what it drafted and what was accepted; the draft flags are
/// checked against each other.
#[test]
fn serve_speculates_with_a_draft_model() {
    let (_d, m) = synth_model("serve-draft");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = Kill(
        // The file's own output projection (`keep`), so that the model
        // drafting for itself agrees with itself on every token.
        tl().args(["serve", "--spec", "draft", "--spec-k", "4", "-t", "1"])
            .args(["--draft-output-type", "keep"])
            .args(["--kv-memory", "16M", "--port", &port.to_string()])
            .arg("--draft-model")
            .arg(&m)
            .arg("-m")
            .arg(&m)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs"),
    );
    let t = std::time::Instant::now();
    loop {
        if let Some((status, _)) = http(port, "GET", "/health", "") {
            if status.contains(" 200") {
                break;
            }
        }
        if let Ok(Some(st)) = server.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = server.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("tl serve exited ({st}): {err}");
        }
        assert!(t.elapsed().as_secs() < 60, "tl serve never got ready");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let body = r#"{"prompt": "a b c d a b c d a b", "max_tokens": 24, "temperature": 0, "ignore_eos": true}"#;
    let (status, text) = http(port, "POST", "/v1/completions", body).expect("answers");
    assert!(status.contains(" 200"), "{status}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 24, "{text}");
    let (_, metrics) = http(port, "GET", "/metrics", "").expect("metrics");
    let drafted = metric(&metrics, "tl_spec_drafted_tokens_total");
    let accepted = metric(&metrics, "tl_spec_accepted_tokens_total");
    assert!(drafted > 0.0, "{metrics}");
    // The model drafts for itself: everything is accepted.
    assert_eq!(accepted, drafted, "{metrics}");
    assert!(
        metric(&metrics, "tl_spec_draft_forwards_total") > 0.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "tl_draft_kv_blocks_used"),
        0.0,
        "{metrics}"
    );
    drop(server);

    for (args, want) in [
        (&["--spec", "draft"][..], "--draft-model"),
        (
            &["--spec", "ngram", "--draft-model", "x.gguf"][..],
            "used with --spec draft",
        ),
        (
            &["--spec", "draft", "--draft-model", "missing.gguf"][..],
            "not found",
        ),
        (
            &[
                "--spec",
                "draft",
                "--draft-model",
                "x.gguf",
                "--draft-output-type",
                "q9_9",
            ][..],
            "unknown block type",
        ),
    ] {
        let out = tl()
            .arg("serve")
            .args(args)
            .arg("-m")
            .arg(&m)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
