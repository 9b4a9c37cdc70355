//! Cost of one forward over `n` new tokens of one sequence (logits for
//! every row, as a speculative verify step asks) against a one-token decode
//! step, after a prompt of `ctx` tokens:
//! `cargo run --release -p tl-model --example verify_cost -- MODEL.gguf [ctx] [reps]`.

use std::time::Instant;

use tl_model::kv::SeqKv;
use tl_model::model::{ForwardState, Logits, Model, SeqBatch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: verify_cost MODEL.gguf [ctx] [reps]")?;
    let ctx: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let reps: usize = args.get(3).map_or(Ok(20), |s| s.parse())?;
    let m = Model::load(path)?;
    let vocab = m.config.vocab as u32;
    let mut cache = m.new_cache(ctx + 64)?;
    let mut blocks = tl_model::kv::BlockManager::new(cache.n_blocks);
    let mut st = ForwardState::default();
    let mut kv = SeqKv::new();
    kv.reserve(&mut blocks, ctx + 40)?;
    let prompt: Vec<u32> = (0..ctx as u32)
        .map(|i| 1000 + (i * 7919) % (vocab - 1000))
        .collect();
    m.forward(
        &mut cache,
        &[SeqBatch {
            tokens: &prompt,
            pos: 0,
            kv: &kv,
            logits: Logits::Last,
        }],
        &mut st,
    )?;
    kv.len = ctx;
    println!("| rows | logits | ms/step (min) | × one row |");
    println!("| ---: | --- | ---: | ---: |");
    let mut one = 0.0;
    for n in [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17] {
        for logits in [Logits::All, Logits::Last] {
            if n == 1 && logits == Logits::Last {
                continue;
            }
            let toks: Vec<u32> = (0..n as u32).map(|i| 2000 + i * 13).collect();
            let b = [SeqBatch {
                tokens: &toks,
                pos: ctx,
                kv: &kv,
                logits,
            }];
            m.forward(&mut cache, &b, &mut st)?;
            // The fastest of `reps` steps: the least disturbed by other load.
            let mut ms = f64::INFINITY;
            for _ in 0..reps {
                let t0 = Instant::now();
                m.forward(&mut cache, &b, &mut st)?;
                ms = ms.min(t0.elapsed().as_secs_f64() * 1000.0);
            }
            if n == 1 {
                one = ms;
            }
            println!("| {n} | {logits:?} | {ms:.2} | {:.2} |", ms / one);
        }
    }
    Ok(())
}
