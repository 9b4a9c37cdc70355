#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `tl inspect` driven as a user would, on both real models.

use std::path::PathBuf;
use std::process::Command;

fn model(name: &str) -> PathBuf {
    tl_gguf::cached_model(name).unwrap_or_else(|e| panic!("{e}"))
}

fn inspect_json(path: &PathBuf, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tl"))
        .arg("inspect")
        .arg(path)
        .arg("--json")
        .args(extra)
        .output()
        .expect("runs tl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

#[test]
fn qwen_summary() {
    let j = inspect_json(&model("qwen2.5-coder-0.5b-instruct-q4.gguf"), &[]);
    assert_eq!(j["architecture"], "qwen2");
    let h = &j["hyper_parameters"];
    assert_eq!(h["block_count"], 24);
    assert_eq!(h["embedding_length"], 896);
    assert_eq!(h["feed_forward_length"], 4864);
    assert_eq!(h["attention.head_count"], 14);
    assert_eq!(h["attention.head_count_kv"], 2);
    assert_eq!(h["rope.freq_base"], 1_000_000.0);
    assert_eq!(j["tokenizer"]["model"], "gpt2");
    assert_eq!(j["tokenizer"]["pre"], "qwen2");
    assert_eq!(j["tokenizer"]["vocab_size"], 151_936);
    assert_eq!(j["chat_template"], true);
    let t = &j["tensor_types"];
    for (ty, n) in [
        ("F32", 121),
        ("Q5_0", 133),
        ("Q8_0", 13),
        ("Q6_K", 12),
        ("Q4_K", 12),
    ] {
        assert_eq!(t[ty]["count"], n, "{ty}");
    }
    assert_eq!(j["tensor_count"], 291);
}

#[test]
fn gemma_summary_and_tensor_list() {
    let j = inspect_json(&model("gemma-3-270m-q4_k_m.gguf"), &["--tensors"]);
    assert_eq!(j["architecture"], "gemma3");
    let h = &j["hyper_parameters"];
    assert_eq!(h["block_count"], 18);
    assert_eq!(h["embedding_length"], 640);
    assert_eq!(h["attention.key_length"], 256);
    assert_eq!(h["attention.sliding_window"], 512);
    assert_eq!(j["tokenizer"]["model"], "llama");
    assert_eq!(j["tokenizer"]["vocab_size"], 262_144);
    assert_eq!(j["chat_template"], false);
    let t = &j["tensor_types"];
    for (ty, n) in [
        ("F32", 109),
        ("Q5_0", 81),
        ("Q4_K", 27),
        ("Q8_0", 10),
        ("Q6_K", 9),
    ] {
        assert_eq!(t[ty]["count"], n, "{ty}");
    }
    let tensors = j["tensors"].as_array().expect("tensor list");
    assert_eq!(tensors.len(), 236);
    let embd = tensors
        .iter()
        .find(|t| t["name"] == "token_embd.weight")
        .expect("embedding listed");
    assert_eq!(embd["type"], "Q8_0");
    assert_eq!(embd["dims"], serde_json::json!([640, 262144]));
    assert!(
        tensors.iter().all(|t| t["name"] != "output.weight"),
        "tied output"
    );
}

#[test]
fn bad_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("tl-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let p = dir.join("bad.gguf");
    std::fs::write(&p, b"GGUF\x07\x00\x00\x00rest").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_tl"))
        .args(["inspect"])
        .arg(&p)
        .output()
        .expect("runs tl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsupported GGUF version 7"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn runnable_verdict_names_the_missing_piece() {
    assert_eq!(
        inspect_json(&model("qwen2.5-coder-0.5b-instruct-q4.gguf"), &[])["runnable"],
        true
    );
    // A synthetic file of a supported architecture runs; the same file
    // with an architecture tl lacks, or a tokenizer it lacks, does not,
    // and the verdict says which piece is missing.
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok.gguf");
    let st = Command::new(env!("CARGO_BIN_EXE_tl"))
        .args(["synth", "--arch", "phi3", "-o"])
        .arg(&ok)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert_eq!(inspect_json(&ok, &[])["runnable"], true);
    let bytes = std::fs::read(&ok).unwrap();
    let mut g = tl_gguf::GgufFile::from_bytes(bytes).unwrap();
    g.metadata.insert(
        "general.architecture",
        tl_gguf::Value::String("mamba".into()),
    );
    let w = tl_gguf::GgufWriter::from_file(&g);
    let bad = dir.path().join("bad.gguf");
    w.write_file(&bad).unwrap();
    let j = inspect_json(&bad, &[]);
    assert_eq!(j["runnable"], false);
    let why = j["not_runnable_because"].to_string();
    assert!(why.contains("mamba"), "{why}");
}

/// A split model (the Qwen test model in two parts): `tl inspect` on the
/// first part lists every tensor with the part it is in and its offset in
/// that part's file, where its bytes are; on the second part it fails,
/// naming the first.
#[test]
fn split_model() {
    use tl_gguf::reader::split_path;
    let path = model("qwen2.5-coder-0.5b-instruct-q4.gguf");
    let whole = tl_gguf::GgufFile::open(&path).unwrap();
    let dir = std::env::temp_dir().join(format!("tl-inspect-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = dir.join("qwen-00001-of-00002.gguf");
    let parts = tl_gguf::GgufWriter::from_file(&whole)
        .into_split(2)
        .unwrap();
    for (i, w) in parts.iter().enumerate() {
        w.write_file(split_path(&first, i as u64, 2).unwrap())
            .unwrap();
    }
    let j = inspect_json(&first, &["--tensors"]);
    assert_eq!(j["architecture"], "qwen2");
    assert_eq!(j["tensor_count"], 291);
    assert_eq!(j["split_parts"].as_array().unwrap().len(), 2);
    let files = [
        std::fs::read(&first).unwrap(),
        std::fs::read(split_path(&first, 1, 2).unwrap()).unwrap(),
    ];
    let mut per_part = [0usize; 2];
    for t in j["tensors"].as_array().unwrap() {
        let part = t["part"].as_u64().unwrap() as usize - 1;
        per_part[part] += 1;
        let at = t["offset"].as_u64().unwrap() as usize;
        let n = t["bytes"].as_u64().unwrap() as usize;
        let name = t["name"].as_str().unwrap();
        let (_, want) = whole.tensor_bytes(name).unwrap();
        assert!(files[part][at..at + n] == *want, "{name}");
    }
    assert_eq!(per_part, [145, 146]);

    let second = split_path(&first, 1, 2).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tl"))
        .arg("inspect")
        .arg(&second)
        .output()
        .expect("runs tl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this is part 2 of 2; open the first part")
            && err.contains("qwen-00001-of-00002.gguf"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
