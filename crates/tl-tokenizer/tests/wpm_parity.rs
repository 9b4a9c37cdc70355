//! WordPiece (`tokenizer.ggml.model = bert`) against llama.cpp: the fixture
//! (scripts/make_embed_fixtures.py) holds a WordPiece vocabulary in
//! llama.cpp's GGUF form, written as three vocab-only files (llama.cpp's
//! default normalizer: lowercase and strip accents; cased; lowercase keeping
//! accents), and llama.cpp's ids for a corpus under each: with special
//! tokens added ([CLS] … [SEP]) and special text left as text, and without
//! them but with special text parsed. The same metadata must give the same
//! ids here. Exact equality: tokenization is discrete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;

use tl_gguf::{Array, GgufFile, GgufWriter, Value};
use tl_tokenizer::{EncodeOptions, TokenId, Tokenizer};

fn tokenizer(fx: &serde_json::Value, lowercase: Option<bool>, strip: Option<bool>) -> Tokenizer {
    let tokens: Vec<String> = fx["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let types: Vec<i32> = fx["token_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap() as i32)
        .collect();
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("bert".into()));
    w.set("tokenizer.ggml.model", Value::String("bert".into()));
    w.set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    w.set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    for (k, id) in [
        ("padding", 0),
        ("unknown", 1),
        ("bos", 2),
        ("seperator", 3),
        ("mask", 4),
    ] {
        w.set(format!("tokenizer.ggml.{k}_token_id"), Value::U32(id));
    }
    if let Some(b) = lowercase {
        w.set("tokenizer.ggml.normalizer.lowercase", Value::Bool(b));
    }
    if let Some(b) = strip {
        w.set("tokenizer.ggml.normalizer.strip_accents", Value::Bool(b));
    }
    let file = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    Tokenizer::from_gguf(&file).unwrap()
}

#[test]
fn wordpiece_ids_match_llama_cpp() {
    let fx = common::fixture("wpm_tokenizer.json");
    let corpus: Vec<&str> = common::strs(&fx["corpus"]);
    let mut failures = Vec::new();
    let mut checked = 0;
    for v in fx["variants"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let tok = tokenizer(&fx, v["lowercase"].as_bool(), v["strip_accents"].as_bool());
        for (text, ids) in corpus.iter().zip(v["ids"].as_array().unwrap()) {
            for (key, opts) in [
                (
                    "special",
                    EncodeOptions {
                        add_special: true,
                        parse_special: false,
                    },
                ),
                (
                    "parse",
                    EncodeOptions {
                        add_special: false,
                        parse_special: true,
                    },
                ),
            ] {
                let want: Vec<TokenId> = ids[key]
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
    assert!(checked >= 100, "only {checked} cases checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Decoding WordPiece ids gives back the (normalised) words, spaced.
#[test]
fn wordpiece_decodes_to_words() {
    let fx = common::fixture("wpm_tokenizer.json");
    let tok = tokenizer(&fx, None, None);
    let ids = tok
        .encode(
            "Unbelievable, Tokenizers!",
            EncodeOptions {
                add_special: true,
                parse_special: false,
            },
        )
        .unwrap();
    let text = tok
        .decode(
            &ids,
            tl_tokenizer::DecodeOptions {
                remove_special: true,
                unparse_special: false,
            },
        )
        .unwrap();
    assert_eq!(text.trim(), "unbelievable, tokenizers!");
}
