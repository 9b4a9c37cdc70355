//! Unigram (`tokenizer.ggml.model = t5`) against llama.cpp: the fixture
//! (scripts/make_ugm_fixtures.py) holds a SentencePiece Unigram vocabulary
//! trained on this repository's docs — T5's layout, two user-defined
//! symbols, the nmt_nfkc rules as a precompiled charsmap — and llama.cpp's
//! ids for a corpus under three metadata variants (charsmap with merged
//! spaces; no charsmap, spaces kept; no space prefix), with special tokens
//! added and special text left as text, and without them but parsed. The
//! same metadata must give the same ids here. Exact equality: tokenization
//! is discrete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;

use tl_gguf::{Array, GgufFile, GgufWriter, Value};
use tl_tokenizer::{DecodeOptions, EncodeOptions, TokenId, Tokenizer};

fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 {c}"),
    };
    let s: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for ch in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in ch.iter().enumerate() {
            n |= u32::from(val(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..ch.len()]);
    }
    out
}

fn tokenizer(fx: &serde_json::Value, v: &serde_json::Value) -> Tokenizer {
    let strs = |k: &str| -> Vec<String> {
        fx[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("t5".into()));
    w.set("tokenizer.ggml.model", Value::String("t5".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(strs("tokens"))),
    );
    let scores = fx["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32);
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32(scores.collect())),
    );
    let types = fx["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32);
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(types.collect())),
    );
    for k in ["add_space_prefix", "remove_extra_whitespaces"] {
        w.set(
            format!("tokenizer.ggml.{k}"),
            Value::Bool(v[k].as_bool().unwrap()),
        );
    }
    if v["charsmap"].as_bool().unwrap() {
        let blob = b64(fx["charsmap"].as_str().unwrap());
        w.set(
            "tokenizer.ggml.precompiled_charsmap",
            Value::Array(Array::U8(blob)),
        );
    }
    w.set("tokenizer.ggml.eos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(2));
    w.set("tokenizer.ggml.padding_token_id", Value::U32(0));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    w.set("tokenizer.ggml.add_eos_token", Value::Bool(true));
    let file = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    Tokenizer::from_gguf(&file).unwrap()
}

#[test]
fn unigram_ids_match_llama_cpp() {
    let fx = common::fixture("ugm_tokenizer.json");
    let texts: Vec<&str> = common::strs(&fx["texts"]);
    let mut failures = Vec::new();
    let mut checked = 0;
    for v in fx["variants"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let tok = tokenizer(&fx, v);
        for (key, add_special, parse_special) in [("special", true, false), ("parsed", false, true)]
        {
            let opts = EncodeOptions {
                add_special,
                parse_special,
            };
            for (text, ids) in texts.iter().zip(v[key].as_array().unwrap()) {
                let want: Vec<TokenId> = ids
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as TokenId)
                    .collect();
                let got = tok.encode(text, opts).unwrap();
                checked += 1;
                if got != want {
                    failures.push(format!(
                        "{name} {key} {text:?}: tl {got:?}, llama.cpp {want:?}"
                    ));
                }
            }
        }
    }
    assert!(checked >= 300, "only {checked} cases checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Ids decode back to the normalized text (the leading "▁" dropped).
#[test]
fn unigram_decodes_to_text() {
    let fx = common::fixture("ugm_tokenizer.json");
    let tok = tokenizer(&fx, &fx["variants"][0]);
    let opts = EncodeOptions {
        add_special: true,
        parse_special: false,
    };
    let ids = tok.encode("The model runs on the GPU.", opts).unwrap();
    assert_eq!(ids.last(), Some(&1), "</s> appended");
    let back = tok
        .decode(
            &ids,
            DecodeOptions {
                remove_special: true,
                unparse_special: false,
            },
        )
        .unwrap();
    assert_eq!(back, "The model runs on the GPU.");
}

/// A charsmap whose header claims more bytes than it has is a clear error.
#[test]
fn a_truncated_charsmap_is_refused() {
    let fx = common::fixture("ugm_tokenizer.json");
    let mut blob = b64(fx["charsmap"].as_str().unwrap());
    blob.truncate(100);
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("t5".into()));
    w.set("tokenizer.ggml.model", Value::String("t5".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(vec![
            "<pad>".into(),
            "</s>".into(),
            "<unk>".into(),
        ])),
    );
    w.set(
        "tokenizer.ggml.precompiled_charsmap",
        Value::Array(Array::U8(blob)),
    );
    let file = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let e = Tokenizer::from_gguf(&file).unwrap_err().to_string();
    assert!(e.contains("precompiled_charsmap"), "{e}");
}
