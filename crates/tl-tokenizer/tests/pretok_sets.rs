//! Every pre-tokenizer regex set against llama.cpp: the fixture
//! (scripts/make_pretok_fixtures.py) holds, for one `tokenizer.ggml.pre`
//! name per distinct behaviour, the ids llama.cpp gives a corpus with the
//! Qwen2.5-Coder vocabulary and merges under that name. The same name put
//! into the same metadata must give the same ids here; names llama.cpp
//! refuses must be refused too. Exact equality: tokenization is discrete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};

use tl_gguf::{Array, GgufFile, Metadata, Value};
use tl_tokenizer::{DecodeOptions, EncodeOptions, TokenId, Tokenizer};

/// The fixture's ids of one text.
fn fixture_ids(v: &serde_json::Value) -> Vec<TokenId> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as TokenId)
        .collect()
}

/// Encodes `text` (special tokens added, not parsed); a difference from
/// llama.cpp's `want` goes to `failures`.
fn check_encode(
    tok: &Tokenizer,
    name: &str,
    i: usize,
    text: &str,
    want: &[TokenId],
    failures: &mut Vec<String>,
) {
    let got = tok
        .encode(
            text,
            EncodeOptions {
                add_special: true,
                parse_special: false,
            },
        )
        .unwrap();
    if got != want {
        failures.push(format!(
            "{name} text {i} {:?}: tl {:?} llama.cpp {:?}",
            text.chars().take(40).collect::<String>(),
            &got[..got.len().min(12)],
            &want[..want.len().min(12)]
        ));
    }
}

#[test]
fn every_pre_tokenizer_set_matches_llama_cpp() {
    let fx = common::fixture("pretok.json");
    let gguf = GgufFile::open(common::model_path(fx["vocab_from"].as_str().unwrap())).unwrap();
    let texts: Vec<&str> = common::strs(&fx["texts"]);
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, entry) in fx["names"].as_object().unwrap() {
        let mut md = gguf.metadata.clone();
        md.insert("tokenizer.ggml.pre", Value::String(name.clone()));
        let tok = Tokenizer::from_metadata(&md);
        if entry.get("error").is_some() {
            assert!(tok.is_err(), "{name}: llama.cpp refuses it, tl loads it");
            continue;
        }
        let tok = tok.unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, (text, want)) in texts
            .iter()
            .zip(entry["ids"].as_array().unwrap())
            .enumerate()
        {
            check_encode(&tok, name, i, text, &fixture_ids(want), &mut failures);
            checked += 1;
        }
    }
    assert!(checked > 1000, "only {checked} encodings checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} encodings differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn unknown_and_unsupported_names_are_clear_errors() {
    let path = common::model_path("qwen2.5-coder-0.5b-instruct-q4.gguf");
    let gguf = GgufFile::open(path).unwrap();
    let mut md = gguf.metadata.clone();
    md.insert("tokenizer.ggml.pre", Value::String("no-such-pre".into()));
    let e = Tokenizer::from_metadata(&md).err().unwrap().to_string();
    assert!(
        e.contains("no-such-pre") && e.contains("smollm") && e.contains("qwen2"),
        "{e}"
    );
    assert!(
        tl_tokenizer::PreTokenizer::unsupported_names().is_empty(),
        "every name llama.cpp knows runs"
    );
}

/// GPT-2's character → byte table (the inverse of its byte encoding).
fn gpt2_decoder() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..0xAD)
        .chain(0xAE..0x100)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.iter()
        .zip(&cs)
        .map(|(&b, &c)| (char::from_u32(c).unwrap(), b as u8))
        .collect()
}

/// scripts/make_pretok_fixtures.py `raw_vocab`, rule for rule: Qwen's
/// byte-level vocabulary rewritten as an SPM-style one.
fn raw_vocab(md: &mut Metadata, model: &str, pre: &str, escape: bool) {
    let dec = gpt2_decoder();
    let raw = |t: &str| -> Option<String> {
        let bytes: Option<Vec<u8>> = t.chars().map(|c| dec.get(&c).copied()).collect();
        let s = String::from_utf8(bytes?).ok()?;
        Some(if escape {
            s.replace(' ', "\u{2581}")
        } else {
            s
        })
    };
    let tokens = match md.get("tokenizer.ggml.tokens") {
        Some(Value::Array(Array::String(t))) => t.clone(),
        _ => panic!("tokens"),
    };
    let types = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(Array::I32(t))) => t.clone(),
        _ => panic!("token types"),
    };
    let merges = match md.get("tokenizer.ggml.merges") {
        Some(Value::Array(Array::String(t))) => t.clone(),
        _ => panic!("merges"),
    };
    let mut used: HashSet<String> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty != 1)
        .map(|(t, _)| t.clone())
        .collect();
    let (mut out_t, mut out_ty) = (Vec::new(), Vec::new());
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        let (mut t, mut ty) = (t.clone(), ty);
        if ty == 1 {
            t = match raw(&t) {
                Some(r) if !used.contains(&r) => r,
                _ => {
                    ty = 5;
                    format!("<unused{i}>")
                }
            };
            used.insert(t.clone());
        }
        out_t.push(t);
        out_ty.push(ty);
    }
    for b in 0..256 {
        let t = format!("<0x{b:02X}>");
        assert!(!used.contains(&t), "{t}");
        out_t.push(t);
        out_ty.push(6);
    }
    let mut out_m = Vec::new();
    for m in &merges {
        let p = 1 + m.as_bytes()[1..].iter().position(|&b| b == b' ').unwrap();
        if let (Some(a), Some(b)) = (raw(&m[..p]), raw(&m[p + 1..])) {
            out_m.push(format!("{a} {b}"));
        }
    }
    md.insert("tokenizer.ggml.model", Value::String(model.into()));
    md.insert("tokenizer.ggml.pre", Value::String(pre.into()));
    md.insert("tokenizer.ggml.tokens", Value::Array(Array::String(out_t)));
    md.insert(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(out_ty)),
    );
    md.insert("tokenizer.ggml.merges", Value::Array(Array::String(out_m)));
}

/// The SPM-style BPE names (raw UTF-8, spaces as U+2581, `<0xXX>` byte
/// fallback) on a vocabulary made from Qwen's by the fixture script's
/// rules: ids and decoded text equal llama.cpp's.
#[test]
fn raw_utf8_bpe_names_match_llama_cpp() {
    let fx = common::fixture("pretok_raw.json");
    let gguf = GgufFile::open(common::model_path(fx["vocab_from"].as_str().unwrap())).unwrap();
    let texts: Vec<&str> = common::strs(&fx["texts"]);
    let mut failures = Vec::new();
    let mut checked = 0;
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let (model, pre) = (
            case["model"].as_str().unwrap(),
            case["pre"].as_str().unwrap(),
        );
        let mut md = gguf.metadata.clone();
        raw_vocab(&mut md, model, pre, case["escape"].as_bool().unwrap());
        let tok = Tokenizer::from_metadata(&md).unwrap_or_else(|e| panic!("{pre}: {e}"));
        let all_ids = case["ids"].as_array().unwrap();
        let all_text = case["decoded_hex"].as_array().unwrap();
        for (i, text) in texts.iter().enumerate() {
            let want = fixture_ids(&all_ids[i]);
            check_encode(&tok, pre, i, text, &want, &mut failures);
            let back = tok
                .decode_bytes(
                    &want,
                    DecodeOptions {
                        remove_special: false,
                        unparse_special: false,
                    },
                )
                .unwrap();
            checked += 1;
            let back: String = back.iter().map(|b| format!("{b:02x}")).collect();
            if back != all_text[i].as_str().unwrap() {
                failures.push(format!("{pre} text {i}: decoded {back}"));
            }
        }
    }
    assert!(checked > 200, "only {checked} encodings checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn readme_lists_exactly_the_supported_pre_tokenizers() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let begin = readme
        .find("<!-- pre-tokenizers: begin -->")
        .expect("begin marker");
    let end = readme
        .find("<!-- pre-tokenizers: end -->")
        .expect("end marker");
    let listed: Vec<&str> = readme[begin..end].split('`').skip(1).step_by(2).collect();
    let mut known = tl_tokenizer::PreTokenizer::known_names();
    let mut l = listed.clone();
    known.sort_unstable();
    l.sort_unstable();
    assert_eq!(
        l, known,
        "README's pre-tokenizer list differs from the code's"
    );
}
