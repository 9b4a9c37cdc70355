#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A split model runs exactly as the file it was split from: the Qwen test
//! model written as three parts (llama.cpp's `gguf-split` layout, by
//! `GgufWriter::into_split`) and loaded from its first part gives the same
//! logits, bit for bit, at every position of a prompt, and the same greedy
//! tokens. Nothing about the numbers may differ: the same tensor bytes go
//! through the same code, so the tolerance is zero. (That llama.cpp reads
//! this layout, giving the whole file's logits exactly, is checked by
//! scripts/check_split_llama.py.)

mod common;

use tl_gguf::reader::split_path;
use tl_gguf::{GgufFile, GgufWriter};
use tl_model::generate::{Runner, TokenOptions};
use tl_model::model::Model;

#[test]
fn split_qwen_runs_as_the_whole_file() {
    let fx = common::fixture("forward_qwen.json");
    let path = common::model_path(fx["model"].as_str().expect("model"));
    let dir = std::env::temp_dir().join(format!("tl-split-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = dir.join("qwen-00001-of-00003.gguf");
    {
        let whole = GgufFile::open(&path).unwrap();
        let parts = GgufWriter::from_file(&whole).into_split(3).unwrap();
        for (i, w) in parts.iter().enumerate() {
            w.write_file(split_path(&first, i as u64, 3).unwrap())
                .unwrap();
        }
    }
    let split = Model::load(&first).expect("split model loads");
    let whole = Model::load(&path).expect("loads");

    let case = &fx["cases"][0];
    let prompt = common::ids(&case["prompt_ids"]);
    let mut a = Runner::new(&whole, 512).unwrap();
    let mut b = Runner::new(&split, 512).unwrap();
    let la = a.all_logits(&prompt).unwrap();
    let lb = b.all_logits(&prompt).unwrap();
    assert_eq!(la.len(), lb.len());
    assert!(la.len() >= prompt.len() * 151_936);
    let same = la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "logits differ between the split and the whole model");

    let opts = TokenOptions {
        max_tokens: 16,
        ..Default::default()
    };
    let ta = a
        .generate_batch(std::slice::from_ref(&prompt), &opts, |_, _| true)
        .unwrap();
    let tb = b
        .generate_batch(std::slice::from_ref(&prompt), &opts, |_, _| true)
        .unwrap();
    assert_eq!(ta[0].0, tb[0].0);
    assert!(!ta[0].0.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
