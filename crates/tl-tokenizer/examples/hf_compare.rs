//! Builds the HF `tokenizers` BPE for a byte-level GGUF vocabulary
//! programmatically (vocab + merges + Split(regex) + ByteLevel, special
//! tokens as added tokens) and compares it with this crate: ids on the
//! llama.cpp fixture corpus and encode throughput on a text file.
//!
//! `cargo run --release -p tl-tokenizer --features hf-compare --example hf_compare -- MODEL FIXTURE TEXT_FILE`

use std::time::Instant;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use tl_gguf::GgufFile;
use tl_tokenizer::{EncodeOptions, TokenAttr, Tokenizer};

/// The Qwen 2 pattern as tokenizer.json has it.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: hf_compare MODEL FIXTURE TEXT_FILE".into());
    }
    let gguf = GgufFile::open(&args[1])?;
    let md = &gguf.metadata;
    let ours = Tokenizer::from_gguf(&gguf)?;

    let t0 = Instant::now();
    let tokens = md
        .get_array("tokenizer.ggml.tokens")?
        .as_strings()
        .ok_or("tokens")?;
    let merges = md
        .get_array("tokenizer.ggml.merges")?
        .as_strings()
        .ok_or("merges")?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build()?;
    let mut hf = HfTokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(QWEN2_PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )?;
    hf.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]))));
    let mut special = Vec::new();
    for id in 0..ours.n_vocab() as u32 {
        let a = ours.vocab().attr(id).unwrap_or_default();
        if a.has(TokenAttr(TokenAttr::CONTROL.0 | TokenAttr::USER_DEFINED.0)) {
            let text = ours.token_text(id).unwrap_or_default().to_string();
            special.push(AddedToken::from(text, a.has(TokenAttr::CONTROL)));
        }
    }
    hf.add_special_tokens(&special);
    println!(
        "HF build from GGUF data: {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;
    let (mut same, mut total) = (0, 0);
    for e in fx["entries"].as_array().ok_or("entries")? {
        let text = e["text"].as_str().unwrap_or_default();
        let want: Vec<u32> = e["ids_parse_special"]
            .as_array()
            .ok_or("ids")?
            .iter()
            .filter_map(|x| x.as_u64().map(|v| v as u32))
            .collect();
        let got = hf.encode(text, false)?.get_ids().to_vec();
        total += 1;
        if got == want {
            same += 1;
        } else {
            println!(
                "HF differs from llama.cpp on {:?}:\n  llama.cpp {want:?}\n  HF        {got:?}",
                e["name"]
            );
        }
    }
    println!("HF tokenizers: {same}/{total} fixture entries equal to llama.cpp (parse_special)");

    // llama.cpp's parse_special=false still splits out user-defined tokens;
    // HF can only turn splitting off for all added tokens at once.
    hf.set_encode_special_tokens(true);
    let (mut same, mut total) = (0, 0);
    for e in fx["entries"].as_array().ok_or("entries")? {
        let text = e["text"].as_str().unwrap_or_default();
        let want: Vec<u32> = e["ids_no_add_special"]
            .as_array()
            .ok_or("ids")?
            .iter()
            .filter_map(|x| x.as_u64().map(|v| v as u32))
            .collect();
        let got = hf.encode(text, false)?.get_ids().to_vec();
        total += 1;
        if got == want {
            same += 1;
        } else {
            println!("HF (special text as text) differs on {:?}:\n  llama.cpp {want:?}\n  HF        {got:?}", e["name"]);
        }
    }
    println!("HF tokenizers: {same}/{total} fixture entries equal to llama.cpp (no parse_special)");
    hf.set_encode_special_tokens(false);

    let text = std::fs::read_to_string(&args[3])?;
    let opts = EncodeOptions {
        add_special: false,
        parse_special: false,
    };
    let (mut hf_best, mut our_best) = (f64::INFINITY, f64::INFINITY);
    let (mut hf_ids, mut our_ids) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        hf_ids = hf.encode_fast(text.as_str(), false)?.get_ids().to_vec();
        hf_best = hf_best.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        our_ids = ours.encode(&text, opts)?;
        our_best = our_best.min(t.elapsed().as_secs_f64());
    }
    let mb = text.len() as f64 / 1e6;
    println!(
        "{} bytes: HF tokenizers {:.2} MB/s, tl-tokenizer {:.2} MB/s, ids equal: {}",
        text.len(),
        mb / hf_best,
        mb / our_best,
        hf_ids == our_ids
    );
    Ok(())
}
