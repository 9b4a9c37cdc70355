#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `tl quantize` against llama.cpp's quantizer: for the inputs, file types
//! and flags in tests/fixtures/quantize.json (written by
//! scripts/make_quantize_fixtures.py with llama-cpp-python's
//! `llama_model_quantize`), every output tensor must have llama.cpp's type
//! and the same bytes (the first 64 bits of their SHA-256), and the whole
//! file must be the same (its full SHA-256). No
//! tolerance: the quantizers are deterministic integer/float code that
//! follows ggml's reference routines operation by operation.
//!
//! Plus bad input: each refusal names what is wrong and leaves no output.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tl_gguf::{GgmlType, GgufFile, GgufWriter, Value};

fn tl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tl"))
}

fn fixtures() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quantize.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json")
}

fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("TL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tensorlogic/models")
        });
    let p = dir.join(file);
    assert!(
        p.exists(),
        "model file {} is missing: run `python3 scripts/fetch_models.py` (or set TL_MODEL_DIR)",
        p.display()
    );
    p
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

/// Runs `tl quantize` for one fixture case and returns the differences.
fn check_case(input: &Path, case: &serde_json::Value, label: &str, tmp: &Path) -> Vec<String> {
    let ftype = case["ftype"].as_str().unwrap();
    let flags = strs(&case["flags"]);
    let out = tmp.join("out.gguf");
    let run = tl()
        .arg("quantize")
        .arg(input)
        .arg(&out)
        .arg(ftype)
        .args(["-t", "2"])
        .args(&flags)
        .output()
        .expect("runs");
    if !run.status.success() {
        return vec![format!(
            "{label} {ftype} {flags:?}: tl quantize failed: {}",
            String::from_utf8_lossy(&run.stderr)
        )];
    }
    let mut diffs = Vec::new();
    let file = GgufFile::open(&out).expect("output reads back");
    let want = case["tensors"].as_object().unwrap();
    if file.tensors.len() != want.len() {
        diffs.push(format!(
            "{label} {ftype} {flags:?}: {} tensors, llama.cpp wrote {}",
            file.tensors.len(),
            want.len()
        ));
    }
    for t in &file.tensors {
        let Some(w) = want.get(&t.name) else {
            diffs.push(format!("{label} {ftype}: extra tensor {}", t.name));
            continue;
        };
        let (wty, wsha) = (w[0].as_str().unwrap(), w[1].as_str().unwrap());
        if t.ty.name() != wty {
            diffs.push(format!(
                "{label} {ftype} {flags:?}: {} is {}, llama.cpp made it {wty}",
                t.name,
                t.ty.name()
            ));
        } else if !sha256(file.tensor_data(t)).starts_with(wsha) {
            diffs.push(format!(
                "{label} {ftype} {flags:?}: {} ({wty}) bytes differ from llama.cpp's",
                t.name
            ));
        }
    }
    if diffs.is_empty() {
        let whole = sha256(&std::fs::read(&out).unwrap());
        if whole != case["file_sha256"].as_str().unwrap() {
            diffs.push(format!(
                "{label} {ftype} {flags:?}: tensors equal but the file differs (metadata or layout)"
            ));
        }
    }
    diffs
}

#[test]
fn synthetic_models_quantize_like_llama_cpp() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let mut diffs = Vec::new();
    let mut n = 0;
    for entry in fx["synth"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let input = tmp.path().join(format!("{name}.gguf"));
        let s = tl()
            .arg("synth")
            .args(strs(&entry["synth_args"]))
            .arg("-o")
            .arg(&input)
            .output()
            .unwrap();
        assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
        assert_eq!(
            sha256(&std::fs::read(&input).unwrap()),
            entry["input_sha256"].as_str().unwrap(),
            "`tl synth` no longer writes the input of {name}: rerun scripts/make_quantize_fixtures.py"
        );
        for case in entry["cases"].as_array().unwrap() {
            diffs.extend(check_case(&input, case, name, tmp.path()));
            n += 1;
        }
    }
    assert!(n >= 80, "only {n} cases in the fixture");
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
fn test_models_requantize_like_llama_cpp() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let mut diffs = Vec::new();
    for entry in fx["models"].as_array().unwrap() {
        let model = entry["model"].as_str().unwrap();
        let input = model_path(model);
        for case in entry["cases"].as_array().unwrap() {
            diffs.extend(check_case(&input, case, model, tmp.path()));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

fn fails_with(args: &[&std::ffi::OsStr], needle: &str) {
    let out = tl().arg("quantize").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {args:?}");
    assert!(
        err.contains(needle),
        "{args:?}: wanted '{needle}' in: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_refused_by_name_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("out.gguf");
    let q = model_path("qwen2.5-coder-0.5b-instruct-q4.gguf");
    // Already quantized without --allow-requantize.
    fails_with(
        &[q.as_os_str(), out.as_os_str(), "Q4_0".as_ref()],
        "--allow-requantize",
    );
    // Unknown file type lists the known ones.
    fails_with(&[q.as_os_str(), out.as_os_str(), "Q9_K".as_ref()], "Q4_K_M");
    // File types without a quantizer yet are named as such.
    fails_with(
        &[q.as_os_str(), out.as_os_str(), "MXFP4".as_ref()],
        "not supported by tl quantize yet",
    );
    // A mix that needs an importance matrix.
    let synth = d.join("s.gguf");
    assert!(tl()
        .args([
            "synth",
            "--weight-type",
            "F16",
            "--output-type",
            "F16",
            "-o"
        ])
        .arg(&synth)
        .status()
        .unwrap()
        .success());
    for ftype in [
        "Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ2_XS", "IQ2_M", "IQ1_S", "IQ1_M",
    ] {
        fails_with(
            &[synth.as_os_str(), out.as_os_str(), ftype.as_ref()],
            "importance matrix",
        );
    }
    // So does a grid type named by --tensor-type.
    fails_with(
        &[
            synth.as_os_str(),
            out.as_os_str(),
            "Q4_K_M".as_ref(),
            "--tensor-type".as_ref(),
            "ffn_up=IQ2_XXS".as_ref(),
        ],
        "importance matrix",
    );
    // Malformed --tensor-type arguments.
    for (arg, needle) in [
        ("attn_v", "expected PATTERN=TYPE"),
        ("attn_v=", "missing quantization type"),
        ("=Q8_0", "missing tensor name pattern"),
        ("attn_v=Q9_K", "unknown tensor type 'Q9_K'"),
        ("attn_v=Q8_K", "can't write tensors of type Q8_K"),
        ("attn_(v=Q8_0", "bad regular expression"),
    ] {
        fails_with(
            &[
                synth.as_os_str(),
                out.as_os_str(),
                "Q4_K_M".as_ref(),
                "--tensor-type".as_ref(),
                arg.as_ref(),
            ],
            needle,
        );
    }
    // Not a GGUF file.
    let junk = d.join("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    fails_with(
        &[junk.as_os_str(), out.as_os_str(), "Q8_0".as_ref()],
        "GGUF",
    );
    // Output over the input.
    fails_with(
        &[synth.as_os_str(), synth.as_os_str(), "Q8_0".as_ref()],
        "is the input file",
    );
    // A NaN in a weight: named by tensor and row; no output, no partial file.
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(1));
    let mut vals = vec![0.5f32; 64];
    vals[40] = f32::NAN;
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.add_tensor("blk.0.attn_q.weight", vec![32, 2], GgmlType::F32, bytes)
        .unwrap();
    let nan = d.join("nan.gguf");
    w.write_file(&nan).unwrap();
    fails_with(
        &[nan.as_os_str(), out.as_os_str(), "Q8_0".as_ref()],
        "'blk.0.attn_q.weight': row 1",
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `tl quantize --dry-run` of an 8-layer F32 synthetic model with `args`
/// (the type first): the plan's line for a tensor, by name prefix. Nothing
/// may be written.
fn dry_run_plan(args: &[&str]) -> impl Fn(&str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let synth = tmp.path().join("s.gguf");
    assert!(tl()
        .args([
            "synth",
            "--weight-type",
            "F32",
            "--output-type",
            "F32",
            "--layers",
            "8",
            "-o"
        ])
        .arg(&synth)
        .status()
        .unwrap()
        .success());
    let out = tmp.path().join("o.gguf");
    let run = tl()
        .arg("quantize")
        .arg(&synth)
        .arg(&out)
        .args(args)
        .arg("--dry-run")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!out.exists());
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    move |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    }
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let line = dry_run_plan(&["Q4_K_M"]);
    // Layer 0 is in the first eighth (Q6_K attn_v and ffn_down); layer 2 is
    // not among the extra-bit layers (0, 3, 6 and 7 of 8).
    assert!(line("blk.0.attn_v.weight").contains("-> Q6_K"));
    assert!(line("blk.0.ffn_down.weight").contains("-> Q6_K"));
    assert!(line("blk.2.ffn_down.weight").contains("-> Q4_K"));
    assert!(line("blk.0.attn_norm.weight").contains("F32 -> F32"));
}

/// A split input (the qwen2_f32 model in three parts, gguf-split's
/// layout), given by its first part, is quantized into the file llama.cpp
/// writes for it, which the fixture script checked is the file it writes
/// for the whole input; a part given alone, or an output that is one of
/// the parts, is refused.
#[test]
fn split_input_quantizes_as_the_whole() {
    use tl_gguf::reader::split_path;
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let entry = &fx["synth"][0];
    assert_eq!(entry["name"], "qwen2_f32");
    let input = tmp.path().join("in.gguf");
    let s = tl()
        .arg("synth")
        .args(strs(&entry["synth_args"]))
        .arg("-o")
        .arg(&input)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let first = tmp.path().join("in-00001-of-00003.gguf");
    {
        let whole = GgufFile::open(&input).unwrap();
        let parts = GgufWriter::from_file(&whole).into_split(3).unwrap();
        for (i, w) in parts.iter().enumerate() {
            w.write_file(split_path(&first, i as u64, 3).unwrap())
                .unwrap();
        }
    }
    let ftypes = strs(&entry["split_input_ftypes"]);
    assert!(ftypes.len() >= 3);
    let mut diffs = Vec::new();
    for ftype in &ftypes {
        let case = entry["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["ftype"] == ftype.as_str() && strs(&c["flags"]).is_empty())
            .unwrap();
        diffs.extend(check_case(&first, case, "qwen2_f32 (split)", tmp.path()));
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));

    let second = split_path(&first, 1, 3).unwrap();
    fails_with(
        &[first.as_os_str(), second.as_os_str(), "Q8_0".as_ref()],
        "is the input file",
    );
    let out = tmp.path().join("refused.gguf");
    fails_with(
        &[second.as_os_str(), out.as_os_str(), "Q8_0".as_ref()],
        "this is part 2 of 3; open the first part",
    );
    assert!(!out.exists());
}

/// `--tensor-type-file` is `--tensor-type` from a file: the fixture's
/// cases with `--tensor-type` flags, run with the same patterns in a file
/// (one per line, two on one line, a comment), give llama.cpp's file byte
/// for byte; a bad entry is refused naming the file, line and entry.
#[test]
fn tensor_type_file_is_tensor_type_from_a_file() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let entry = &fx["synth"][0];
    assert_eq!(entry["name"], "qwen2_f32");
    let input = tmp.path().join("in.gguf");
    let s = tl()
        .arg("synth")
        .args(strs(&entry["synth_args"]))
        .arg("-o")
        .arg(&input)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let mut n = 0;
    let mut diffs = Vec::new();
    for case in entry["cases"].as_array().unwrap() {
        let flags = strs(&case["flags"]);
        if !flags.iter().any(|f| f == "--tensor-type") {
            continue;
        }
        let pats: Vec<&String> = flags.iter().skip(1).step_by(2).collect();
        assert!(pats.len() >= 2);
        let mut text = String::from("# overrides\n");
        text.push_str(&format!("{} {}\n", pats[0], pats[1]));
        for p in &pats[2..] {
            text.push_str(&format!("  {p}\n"));
        }
        let file = tmp.path().join(format!("types{n}.txt"));
        std::fs::write(&file, text).unwrap();
        let mut c = case.clone();
        c["flags"] = serde_json::json!(["--tensor-type-file", file.to_str().unwrap()]);
        diffs.extend(check_case(&input, &c, "qwen2_f32 (file)", tmp.path()));
        n += 1;
    }
    assert_eq!(n, 2);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));

    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, "ffn_up=Q5_0\n\nattn_v=Q9_K\n").unwrap();
    let out = tmp.path().join("refused.gguf");
    fails_with(
        &[
            input.as_os_str(),
            out.as_os_str(),
            "Q4_K_M".as_ref(),
            "--tensor-type-file".as_ref(),
            bad.as_os_str(),
        ],
        &format!(
            "tensor type file {}, line 3: 'attn_v=Q9_K': unknown tensor type 'Q9_K'",
            bad.display()
        ),
    );
    assert!(!out.exists());
}

#[test]
fn tensor_type_overrides_replace_the_mix_choice() {
    let line = dry_run_plan(&[
        "IQ4_XS",
        "--tensor-type",
        "BLK\\.[01]\\.ffn_down=q8_0",
        "--tensor-type",
        "ffn_down=Q4_K",
        "--tensor-type",
        "attn_q=IQ4_NL",
        "--tensor-type",
        "attn_norm=Q8_0",
    ]);
    // The pattern is lower-cased; the first match wins.
    assert!(line("blk.0.ffn_down.weight").contains("-> Q8_0"));
    assert!(line("blk.1.ffn_down.weight").contains("-> Q8_0"));
    assert!(line("blk.5.ffn_down.weight").contains("-> Q4_K"));
    assert!(line("blk.3.attn_q.weight").contains("-> IQ4_NL"));
    // Without a pattern: the IQ4_XS mix.
    assert!(line("blk.3.ffn_up.weight").contains("-> IQ4_XS"));
    // Tensors that are never quantized stay as they are.
    assert!(line("blk.0.attn_norm.weight").contains("F32 -> F32"));
}

#[test]
fn iq3_m_mix_gives_attn_v_and_the_first_ffn_down_q4_k() {
    let line = dry_run_plan(&["IQ3_M"]);
    assert!(line("blk.5.attn_v.weight").contains("-> Q4_K"));
    assert!(line("blk.0.ffn_down.weight").contains("-> Q4_K"));
    assert!(line("blk.2.ffn_down.weight").contains("-> IQ3_S"));
    assert!(line("blk.2.attn_output.weight").contains("-> Q4_K"));
    assert!(line("blk.2.ffn_up.weight").contains("-> IQ3_S"));
}

/// A model quantized to IQ4_NL, IQ4_XS, IQ3_S or IQ3_M runs on the CPU
/// (perplexity), and its perplexity stays close to the F32 original's.
#[test]
fn iq_models_run_and_stay_close_to_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let synth = d.join("s.gguf");
    assert!(tl()
        .args([
            "synth",
            "--weight-type",
            "F32",
            "--output-type",
            "F32",
            "--d-model",
            "256",
            "-o"
        ])
        .arg(&synth)
        .status()
        .unwrap()
        .success());
    let text = d.join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog ".repeat(20),
    )
    .unwrap();
    let ppl = |m: &Path| -> f64 {
        let out = tl()
            .args(["perplexity", "--chunk", "64", "-f"])
            .arg(&text)
            .arg("-m")
            .arg(m)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.strip_prefix("perplexity: ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no perplexity in {s}"))
    };
    let base = ppl(&synth);
    assert!(base.is_finite() && base > 1.0, "{base}");
    for (ftype, tol, ty) in [
        ("IQ4_NL", 0.02, "IQ4_NL"),
        ("IQ4_XS", 0.02, "IQ4_XS"),
        ("IQ3_S", 0.1, "IQ3_S"),
        ("IQ3_M", 0.1, "IQ3_S"),
    ] {
        let out = d.join(format!("{ftype}.gguf"));
        let run = tl()
            .arg("quantize")
            .arg(&synth)
            .arg(&out)
            .args([ftype, "-t", "2"])
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let file = GgufFile::open(&out).unwrap();
        let want = GgmlType::from_name(ty).unwrap();
        assert!(
            file.tensors.iter().any(|t| t.ty == want),
            "{ftype}: no tensor of type {ty}"
        );
        let p = ppl(&out);
        assert!(
            p.is_finite() && (p.ln() - base.ln()).abs() < tol,
            "{ftype}: perplexity {p} against {base} for F32"
        );
    }
}

fn split_fixtures() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quantize_split.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json")
}

/// The split fixture's input: the synthetic qwen2 model and its parts
/// (gguf-split's layout), whose hashes the fixture recorded.
fn split_input(fx: &serde_json::Value, dir: &Path) -> (PathBuf, PathBuf, u64) {
    use tl_gguf::reader::split_path;
    let whole = dir.join("in.gguf");
    let s = tl()
        .arg("synth")
        .args(strs(&fx["synth_args"]))
        .arg("-o")
        .arg(&whole)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert_eq!(
        sha256(&std::fs::read(&whole).unwrap()),
        fx["input_sha256"].as_str().unwrap(),
        "tl synth wrote another input than the fixture's"
    );
    let n = fx["parts"].as_u64().unwrap();
    let first = dir.join(format!("in-00001-of-{n:05}.gguf"));
    let file = GgufFile::open(&whole).unwrap();
    let parts = GgufWriter::from_file(&file).into_split(n as u16).unwrap();
    for (i, w) in parts.iter().enumerate() {
        let p = split_path(&first, i as u64, n).unwrap();
        w.write_file(&p).unwrap();
        assert_eq!(
            sha256(&std::fs::read(&p).unwrap()),
            fx["input_parts_sha256"][i].as_str().unwrap()
        );
    }
    (whole, first, n)
}

fn quantize_ok(args: &[&std::ffi::OsStr]) -> String {
    let out = tl()
        .arg("quantize")
        .args(args)
        .args(["-t", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {err}");
    err
}

/// Every tensor of a (joined) file: name -> (type, bytes).
fn tensor_map(path: &Path) -> std::collections::BTreeMap<String, (GgmlType, Vec<u8>)> {
    let f = GgufFile::open(path).unwrap();
    f.tensors
        .iter()
        .map(|t| (t.name.clone(), (t.ty, f.tensor_data(t).to_vec())))
        .collect()
}

/// `--keep-split` on a model in three parts writes three parts that are
/// byte for byte llama.cpp's (`llama_model_quantize` with keep_split, as
/// llama-quantize --keep-split), with the split keys, and whose tensors,
/// joined, are the unsplit quantization's; an unsplit input gives one
/// file, PREFIX-00001-of-00001.gguf, as llama-quantize writes it.
#[test]
fn keep_split_writes_llama_cpps_parts() {
    let fx = split_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (whole, first, n) = split_input(&fx, d);
    let mut diffs = Vec::new();
    for (ftype, want) in fx["keep_split"].as_object().unwrap() {
        let unsplit = d.join("unsplit.gguf");
        quantize_ok(&[first.as_os_str(), unsplit.as_os_str(), ftype.as_ref()]);
        // The prefix may be given with .gguf, as llama-quantize takes it.
        let prefix = d.join("out.gguf");
        quantize_ok(&[
            first.as_os_str(),
            prefix.as_os_str(),
            ftype.as_ref(),
            "--keep-split".as_ref(),
        ]);
        for i in 0..n {
            let p = d.join(format!("out-{:05}-of-{n:05}.gguf", i + 1));
            let got = sha256(&std::fs::read(&p).unwrap());
            if got != want[i as usize].as_str().unwrap() {
                diffs.push(format!("{ftype}: part {} differs from llama.cpp's", i + 1));
            }
            let md = GgufFile::open_one(&p).unwrap().metadata;
            assert_eq!(md.opt_u64("split.no").unwrap(), Some(i));
            assert_eq!(md.opt_u64("split.count").unwrap(), Some(n));
            assert_eq!(md.opt_u64("split.tensors.count").unwrap(), Some(99));
        }
        let joined = d.join(format!("out-00001-of-{n:05}.gguf"));
        if tensor_map(&joined) != tensor_map(&unsplit) {
            diffs.push(format!(
                "{ftype}: the joined parts hold other tensors than the unsplit output"
            ));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));

    // An unsplit input: one file, no split keys (llama-quantize's output).
    let one = d.join("one");
    let err = quantize_ok(&[
        whole.as_os_str(),
        one.as_os_str(),
        "Q4_K_M".as_ref(),
        "--keep-split".as_ref(),
    ]);
    assert!(err.contains("input of one file"), "{err}");
    let p = d.join("one-00001-of-00001.gguf");
    assert_eq!(
        sha256(&std::fs::read(&p).unwrap()),
        fx["keep_split_unsplit_input"]["sha256"].as_str().unwrap()
    );
    assert!(!d.join("one").exists());
}

/// `--split-max-tensors N` and `--split-max-size SIZE` cut the output as
/// llama-gguf-split cuts a file: the tensors in the unsplit output's order,
/// N to a part, or as many as fit in SIZE (10^6 bytes for M) of data padded
/// to 32 bytes; every part has the split keys, the first the metadata.
/// (scripts/make_quantize_split_fixtures.py loads such parts in llama.cpp:
/// the logits are the unsplit file's.)
#[test]
fn split_max_tensors_and_size_cut_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let fx = split_fixtures();
    let (whole, _, _) = split_input(&fx, d);
    let unsplit = d.join("unsplit.gguf");
    quantize_ok(&[whole.as_os_str(), unsplit.as_os_str(), "Q8_0".as_ref()]);
    let want = GgufFile::open(&unsplit).unwrap();
    let order: Vec<String> = want.tensors.iter().map(|t| t.name.clone()).collect();
    let want_map = tensor_map(&unsplit);
    for (flag, value, parts) in [
        ("--split-max-tensors", "40", 3u64),
        ("--split-max-tensors", "99", 1),
        ("--split-max-size", "1M", 6),
    ] {
        let prefix = d.join(format!("s{parts}"));
        quantize_ok(&[
            whole.as_os_str(),
            prefix.as_os_str(),
            "Q8_0".as_ref(),
            flag.as_ref(),
            value.as_ref(),
        ]);
        let mut names = Vec::new();
        for i in 0..parts {
            let p = d.join(format!("s{parts}-{:05}-of-{parts:05}.gguf", i + 1));
            let f = GgufFile::open_one(&p).unwrap();
            let md = &f.metadata;
            assert_eq!(md.opt_u64("split.no").unwrap(), Some(i), "{flag} {value}");
            assert_eq!(md.opt_u64("split.count").unwrap(), Some(parts));
            assert_eq!(md.opt_u64("split.tensors.count").unwrap(), Some(99));
            assert_eq!(md.get("general.architecture").is_some(), i == 0);
            if flag == "--split-max-tensors" {
                assert!(f.tensors.len() <= 40 || parts == 1);
            } else {
                let data: u64 = f
                    .tensors
                    .iter()
                    .map(|t| (f.tensor_data(t).len() as u64).div_ceil(32) * 32)
                    .sum();
                assert!(data <= 1_000_000, "part {i}: {data} bytes of data");
            }
            names.extend(f.tensors.iter().map(|t| t.name.clone()));
        }
        assert_eq!(names, order, "{flag} {value}: tensor order");
        let first = d.join(format!("s{parts}-00001-of-{parts:05}.gguf"));
        assert_eq!(tensor_map(&first), want_map, "{flag} {value}");
    }
}

/// Bad split options are refused by name, writing nothing.
#[test]
fn bad_split_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let input = d.join("in.gguf");
    let s = tl()
        .args(["synth", "--arch", "llama", "--layers", "2", "-o"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let out = d.join("out");
    let q = |flags: &[&str], needle: &str| {
        let mut args: Vec<&std::ffi::OsStr> =
            vec![input.as_os_str(), out.as_os_str(), "Q8_0".as_ref()];
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        fails_with(&args, needle);
    };
    q(&["--split-max-size", "12X"], "--split-max-size '12X'");
    q(
        &["--split-max-size", "12X"],
        "M for megabytes or G for gigabytes",
    );
    q(&["--split-max-size", "1.5G"], "not a whole number");
    q(&["--split-max-size", "0M"], "must be positive");
    q(&["--split-max-size", ""], "--split-max-size ''");
    q(
        &["--split-max-tensors", "0"],
        "--split-max-tensors must be at least 1",
    );
    q(
        &["--keep-split", "--split-max-tensors", "3"],
        "cannot be used with",
    );
    q(
        &["--split-max-tensors", "3", "--split-max-size", "1M"],
        "cannot be used with",
    );
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "in.gguf")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
