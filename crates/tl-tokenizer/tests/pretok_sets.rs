//! Every pre-tokenizer regex set against llama.cpp: the fixture
//! (scripts/make_pretok_fixtures.py) holds, for one `tokenizer.ggml.pre`
//! name per distinct behaviour, the ids llama.cpp gives a corpus with the
//! Qwen2.5-Coder vocabulary and merges under that name. The same name put
//! into the same metadata must give the same ids here; names llama.cpp
//! refuses must be refused too. Exact equality: tokenization is discrete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use tl_gguf::{GgufFile, Value};
use tl_tokenizer::{EncodeOptions, TokenId, Tokenizer};

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
            let want: Vec<TokenId> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as TokenId)
                .collect();
            let got = tok
                .encode(
                    text,
                    EncodeOptions {
                        add_special: true,
                        parse_special: false,
                    },
                )
                .unwrap();
            checked += 1;
            if got != want {
                failures.push(format!(
                    "{name} text {i} {:?}: tl {:?} llama.cpp {:?}",
                    text.chars().take(40).collect::<String>(),
                    &got[..got.len().min(12)],
                    &want[..want.len().min(12)]
                ));
            }
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
    md.insert("tokenizer.ggml.pre", Value::String("gemma4".into()));
    let e = Tokenizer::from_metadata(&md).err().unwrap().to_string();
    assert!(e.contains("gemma4") && e.contains("not supported"), "{e}");
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
