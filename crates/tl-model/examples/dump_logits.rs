//! Writes the logits of every position of a token sequence, evaluated as one
//! batch, as little-endian f32 (`n_tokens × vocab`); used by
//! `scripts/compare_forward.py` to compare with llama.cpp position by position.
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
    let mut runner = Runner::new(&model, ids.len().max(1)).expect("cache");
    let logits = runner.all_logits(&ids).expect("forward");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&a[2]).expect("creates OUT"));
    for v in logits {
        f.write_all(&v.to_le_bytes()).expect("writes");
    }
}
