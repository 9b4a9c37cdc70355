//! Writes the logits of every position of a token sequence, evaluated as one
//! batch, as little-endian f32 (`n_tokens × vocab`); used by
//! `scripts/compare_forward.py` to compare with llama.cpp position by position.
//! With `TL_DUMP_ONE_BY_ONE=1` the tokens go through the forward one per
//! call instead (the decode path), for comparing the two.
//!
//! usage: dump_logits MODEL.gguf OUT.bin ID,ID,ID...
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::io::Write;

use tl_model::generate::Runner;
use tl_model::model::Model;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert!(
        a.len() == 4,
        "usage: dump_logits MODEL.gguf OUT.bin ID,ID,ID..."
    );
    let model = Model::load(&a[1]).expect("loads the model");
    let ids: Vec<u32> = a[3]
        .split(',')
        .map(|s| s.trim().parse().expect("token ids are integers"))
        .collect();
    let logits = if std::env::var("TL_DUMP_ONE_BY_ONE").is_ok_and(|v| v == "1") {
        one_by_one(&model, &ids)
    } else {
        let mut runner = Runner::new(&model, ids.len().max(1)).expect("cache");
        runner.all_logits(&ids).expect("forward")
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(&a[2]).expect("creates OUT"));
    for v in logits {
        f.write_all(&v.to_le_bytes()).expect("writes");
    }
}

/// Every position's logits with one token per forward call.
fn one_by_one(model: &Model, ids: &[u32]) -> Vec<f32> {
    use tl_model::kv::{BlockManager, SeqKv};
    use tl_model::model::{ForwardState, Logits, SeqBatch};
    let mut cache = model.new_cache(ids.len().max(1)).expect("cache");
    let mut blocks = BlockManager::new(cache.n_blocks);
    let mut kv = SeqKv::new();
    kv.reserve(&mut blocks, ids.len()).expect("blocks");
    let mut st = ForwardState::default();
    let mut all = Vec::new();
    for (pos, t) in ids.iter().enumerate() {
        let b = [SeqBatch {
            tokens: std::slice::from_ref(t),
            pos,
            kv: &kv,
            logits: Logits::Last,
        }];
        all.extend_from_slice(model.forward(&mut cache, &b, &mut st).expect("forward"));
    }
    all
}
