#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `tl quantize --imatrix` against llama.cpp's quantizer with an importance
//! matrix: for the models, matrices, file types and flags in
//! tests/fixtures/quantize_imatrix.json (written by
//! scripts/make_imatrix_quantize_fixtures.py with llama-cpp-python's
//! `llama_model_quantize`), every output tensor must have llama.cpp's type
//! and bytes, and the whole file (metadata with the `quantize.imatrix.*`
//! keys included) must be the same. No tolerance.
//!
//! The importance matrices are regenerated here with the script's generator
//! and written as GGUF (llama-imatrix's format) or legacy `.dat` files.
//!
//! Plus bad importance matrices: each refusal names the file and, where
//! there is one, the tensor or entry; none panics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tl_gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};

fn tl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tl"))
}

fn fixtures() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quantize_imatrix.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json")
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn strs(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

/// The script's splitmix64 generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 40) as f64 / 16_777_216.0
    }
}

/// The script's `raw_entries`: name -> (sums, counts).
fn raw_entries(model: &Path, partial: bool) -> BTreeMap<String, (Vec<f32>, Vec<u64>)> {
    let f = GgufFile::open(model).unwrap();
    let mut tensors: Vec<(String, Vec<u64>)> = f
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone()))
        .collect();
    tensors.sort();
    let mut rng = Rng(0x1A7E1C);
    let mut out = BTreeMap::new();
    for (name, dims) in tensors {
        if !name.ends_with(".weight") || dims.len() < 2 || dims[1] <= 1 {
            continue;
        }
        if partial && name.contains("attn_k.") {
            continue;
        }
        let (mut n_cols, mut n_exp) = (dims[0], dims.get(2).copied().unwrap_or(1));
        if name == "token_embd.weight" {
            (n_cols, n_exp) = (7, 1);
        }
        let mut counts = Vec::new();
        for j in 0..n_exp {
            let mut c = 1 + rng.next() % 500;
            if n_exp > 1 && j == 2 {
                c = 0;
            }
            counts.push(c);
        }
        let mut sums = Vec::new();
        for &c in &counts {
            for _ in 0..n_cols {
                let u = rng.uniform();
                sums.push(((u * u * 20.0 + 0.001) * c.max(1) as f64) as f32);
            }
        }
        out.insert(name, (sums, counts));
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_gguf_imatrix(
    path: &Path,
    raw: &BTreeMap<String, (Vec<f32>, Vec<u64>)>,
    meta: &serde_json::Value,
) {
    let mut w = GgufWriter::new();
    w.set("general.type", Value::String("imatrix".into()));
    w.set(
        "imatrix.datasets",
        Value::Array(Array::String(vec![meta["dataset"]
            .as_str()
            .unwrap()
            .to_owned()])),
    );
    w.set(
        "imatrix.chunk_count",
        Value::U32(meta["chunk_count"].as_u64().unwrap() as u32),
    );
    w.set(
        "imatrix.chunk_size",
        Value::U32(meta["chunk_size"].as_u64().unwrap() as u32),
    );
    for (name, (sums, counts)) in raw {
        let n_exp = counts.len() as u64;
        let n_cols = sums.len() as u64 / n_exp;
        w.add_tensor(
            format!("{name}.in_sum2"),
            vec![n_cols, n_exp],
            GgmlType::F32,
            f32_bytes(sums),
        )
        .unwrap();
        let c: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        w.add_tensor(
            format!("{name}.counts"),
            vec![1, n_exp],
            GgmlType::F32,
            f32_bytes(&c),
        )
        .unwrap();
    }
    w.write_file(path).unwrap();
}

fn write_dat_imatrix(
    path: &Path,
    raw: &BTreeMap<String, (Vec<f32>, Vec<u64>)>,
    meta: &serde_json::Value,
) {
    let mut b = Vec::new();
    b.extend((raw.len() as i32).to_le_bytes());
    for (name, (sums, counts)) in raw {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend((counts[0] as i32).to_le_bytes());
        b.extend((sums.len() as i32).to_le_bytes());
        b.extend(f32_bytes(sums));
    }
    let ds = meta["dataset"].as_str().unwrap();
    b.extend((meta["chunk_count"].as_u64().unwrap() as i32).to_le_bytes());
    b.extend((ds.len() as i32).to_le_bytes());
    b.extend(ds.as_bytes());
    std::fs::write(path, b).unwrap();
}

fn synth(args: &[String], out: &Path) {
    let s = tl()
        .arg("synth")
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
}

#[test]
fn imatrix_quantization_matches_llama_cpp() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let mut diffs = Vec::new();
    let mut n = 0;
    for (model, entry) in fx["models"].as_object().unwrap() {
        let input = tmp.path().join(format!("{model}.gguf"));
        synth(&strs(&entry["synth_args"]), &input);
        assert_eq!(
            sha256(&std::fs::read(&input).unwrap()),
            entry["input_sha256"].as_str().unwrap(),
            "`tl synth` no longer writes the input of {model}: rerun scripts/make_imatrix_quantize_fixtures.py"
        );
        for case in entry["cases"].as_array().unwrap() {
            n += 1;
            let ftype = case["ftype"].as_str().unwrap();
            let kind = case["imatrix"].as_str().unwrap();
            let flags = strs(&case["flags"]);
            let label = format!("{model} {kind} {ftype} {flags:?}");
            let (fmt, part) = kind.split_once('-').unwrap();
            // Each matrix in a folder of its own, named as the script names
            // it, since the name is written into the output.
            let dir = tmp.path().join(format!("{model}-{kind}"));
            let file = format!("imatrix.{fmt}");
            if !dir.exists() {
                std::fs::create_dir_all(&dir).unwrap();
                let raw = raw_entries(&input, part == "partial");
                if fmt == "dat" {
                    write_dat_imatrix(&dir.join(&file), &raw, &fx["dat"]);
                } else {
                    write_gguf_imatrix(&dir.join(&file), &raw, &fx["gguf"]);
                }
            }
            let out = tmp.path().join("out.gguf");
            let run = tl()
                .current_dir(&dir)
                .arg("quantize")
                .arg(&input)
                .arg(&out)
                .arg(ftype)
                .args(["-t", "2", "--imatrix", &file])
                .args(&flags)
                .output()
                .unwrap();
            if !run.status.success() {
                diffs.push(format!(
                    "{label}: tl quantize failed: {}",
                    String::from_utf8_lossy(&run.stderr)
                ));
                continue;
            }
            let got = GgufFile::open(&out).unwrap();
            let want = case["tensors"].as_object().unwrap();
            let before = diffs.len();
            if got.tensors.len() != want.len() {
                diffs.push(format!(
                    "{label}: {} tensors, llama.cpp wrote {}",
                    got.tensors.len(),
                    want.len()
                ));
            }
            for t in &got.tensors {
                let Some(w) = want.get(&t.name) else {
                    diffs.push(format!("{label}: extra tensor {}", t.name));
                    continue;
                };
                let (wty, wsha) = (w[0].as_str().unwrap(), w[1].as_str().unwrap());
                if t.ty.name() != wty {
                    diffs.push(format!(
                        "{label}: {} is {}, llama.cpp made it {wty}",
                        t.name,
                        t.ty.name()
                    ));
                } else if !sha256(got.tensor_data(t)).starts_with(wsha) {
                    diffs.push(format!(
                        "{label}: {} ({wty}) bytes differ from llama.cpp's",
                        t.name
                    ));
                }
            }
            if diffs.len() == before
                && sha256(&std::fs::read(&out).unwrap()) != case["file_sha256"].as_str().unwrap()
            {
                diffs.push(format!(
                    "{label}: tensors equal but the file differs (metadata or layout)"
                ));
            }
        }
    }
    assert!(n >= 28, "only {n} cases in the fixture");
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

fn run_quantize(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = tl()
        .current_dir(dir)
        .arg("quantize")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails_with(dir: &Path, args: &[&str], needles: &[&str]) {
    let (ok, err) = run_quantize(dir, args);
    assert!(!ok, "succeeded: {args:?}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: wanted '{n}' in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dir.join("out.gguf").exists(), "{args:?} left an output");
}

#[test]
fn bad_importance_matrices_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = d.join("m.gguf");
    synth(
        &[
            "--weight-type",
            "F32",
            "--output-type",
            "F32",
            "--layers",
            "2",
        ]
        .map(String::from),
        &model,
    );
    let m = model.to_str().unwrap();
    let meta = serde_json::json!({"dataset": "d.txt", "chunk_count": 3, "chunk_size": 64});
    let good = raw_entries(&model, false);

    // Not an imatrix at all; empty; truncated legacy data.
    std::fs::write(d.join("junk.dat"), b"\x05\x00").unwrap();
    fails_with(
        d,
        &[m, "out.gguf", "Q4_K_M", "--imatrix", "junk.dat"],
        &["junk.dat", "imatrix"],
    );
    let mut dat = Vec::new();
    dat.extend(1i32.to_le_bytes());
    dat.extend(19i32.to_le_bytes());
    dat.extend(b"blk.0.attn_q.weight");
    dat.extend(1i32.to_le_bytes());
    dat.extend(1000i32.to_le_bytes());
    dat.extend([0u8; 40]);
    std::fs::write(d.join("short.dat"), &dat).unwrap();
    fails_with(
        d,
        &[m, "out.gguf", "Q4_K_M", "--imatrix", "short.dat"],
        &["short.dat", "blk.0.attn_q.weight", "cut short"],
    );
    fails_with(
        d,
        &[m, "out.gguf", "Q4_K_M", "--imatrix", "missing.dat"],
        &["missing.dat"],
    );

    // A GGUF file that is not an importance matrix (the model itself).
    fails_with(
        d,
        &[m, "out.gguf", "Q4_K_M", "--imatrix", m],
        &["missing imatrix metadata"],
    );

    // Sums without counts.
    let mut w = GgufWriter::new();
    w.set("imatrix.datasets", Value::Array(Array::String(vec![])));
    w.set("imatrix.chunk_count", Value::U32(1));
    w.set("imatrix.chunk_size", Value::U32(1));
    w.add_tensor(
        "blk.0.attn_q.weight.in_sum2",
        vec![4, 1],
        GgmlType::F32,
        vec![0; 16],
    )
    .unwrap();
    w.write_file(d.join("nocounts.gguf")).unwrap();
    fails_with(
        d,
        &[m, "out.gguf", "Q4_K_M", "--imatrix", "nocounts.gguf"],
        &["nocounts.gguf", "blk.0.attn_q.weight", "counts"],
    );

    // An entry of the wrong size for a tensor other than token_embd.
    let mut wrong = good.clone();
    let e = wrong.get_mut("blk.1.ffn_down.weight").unwrap();
    e.0.truncate(e.0.len() - 32);
    write_gguf_imatrix(&d.join("wrong.gguf"), &wrong, &meta);
    fails_with(
        d,
        &[m, "out.gguf", "Q4_K_M", "--imatrix", "wrong.gguf"],
        &["wrong.gguf", "blk.1.ffn_down.weight", "values"],
    );

    // A non-finite weight.
    let mut nan = good.clone();
    nan.get_mut("blk.0.attn_q.weight").unwrap().0[3] = f32::INFINITY;
    write_gguf_imatrix(&d.join("inf.gguf"), &nan, &meta);
    fails_with(
        d,
        &[m, "out.gguf", "Q4_K_M", "--imatrix", "inf.gguf"],
        &["inf.gguf", "blk.0.attn_q.weight", "non-finite"],
    );

    // Q2_K_S needs an entry for every Q2_K tensor.
    let mut partial = good.clone();
    partial.remove("blk.0.ffn_up.weight");
    write_gguf_imatrix(&d.join("partial.gguf"), &partial, &meta);
    fails_with(
        d,
        &[m, "out.gguf", "Q2_K_S", "--imatrix", "partial.gguf"],
        &["blk.0.ffn_up.weight", "partial.gguf", "no entry"],
    );
    fails_with(d, &[m, "out.gguf", "Q2_K_S"], &["--imatrix"]);
    // ... and with one it works.
    write_gguf_imatrix(&d.join("good.gguf"), &good, &meta);
    let (ok, err) = run_quantize(d, &[m, "out.gguf", "Q2_K_S", "--imatrix", "good.gguf"]);
    assert!(ok, "{err}");
    let f = GgufFile::open(d.join("out.gguf")).unwrap();
    assert_eq!(
        f.metadata.get("quantize.imatrix.file"),
        Some(&Value::String("good.gguf".into()))
    );
    std::fs::remove_file(d.join("out.gguf")).unwrap();

    // So do the IQ3_XXS, IQ2 and IQ1 tensors, as in llama.cpp ...
    for ftype in ["IQ2_XXS", "IQ3_XXS", "IQ1_M"] {
        fails_with(
            d,
            &[m, "out.gguf", ftype, "--imatrix", "partial.gguf"],
            &["blk.0.ffn_up.weight", "partial.gguf", "no entry"],
        );
        fails_with(d, &[m, "out.gguf", ftype], &["--imatrix"]);
    }
    // ... and with every entry they work.
    let (ok, err) = run_quantize(d, &[m, "out.gguf", "IQ2_XXS", "--imatrix", "good.gguf"]);
    assert!(ok, "{err}");
    let f = GgufFile::open(d.join("out.gguf")).unwrap();
    assert!(f.tensors.iter().any(|t| t.ty == GgmlType::IQ2_XXS));
    std::fs::remove_file(d.join("out.gguf")).unwrap();
    // --include-weights and --exclude-weights together, or without --imatrix.
    let (ok, _) = run_quantize(
        d,
        &[
            m,
            "out.gguf",
            "Q4_K_M",
            "--imatrix",
            "good.gguf",
            "--include-weights",
            "a",
            "--exclude-weights",
            "b",
        ],
    );
    assert!(!ok);
    let (ok, _) = run_quantize(d, &[m, "out.gguf", "Q4_K_M", "--include-weights", "a"]);
    assert!(!ok);
    let _ = PathBuf::new();
}
