//! Encode throughput on a text file, for scripts/bench_tokenizer.py.
//!
//! `cargo run --release -p tl-tokenizer --example encode_bench -- MODEL TEXT_FILE [REPEATS] [IDS_OUT]`
//! prints one JSON line: bytes, tokens, best seconds over the repeats, MB/s.
//! With IDS_OUT it also writes the ids, one per line, for comparison.

use std::time::Instant;

use tl_tokenizer::{EncodeOptions, Tokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: encode_bench MODEL TEXT_FILE [REPEATS] [IDS_OUT]".into());
    }
    let t0 = Instant::now();
    let tok = Tokenizer::from_file(&args[1])?;
    let load_s = t0.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&args[2])?;
    let repeats: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let opts = EncodeOptions {
        add_special: false,
        parse_special: false,
    };
    let mut best = f64::INFINITY;
    let mut ids = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        ids = tok.encode(&text, opts)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    if let Some(path) = args.get(4) {
        let lines: Vec<String> = ids.iter().map(u32::to_string).collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    println!(
        "{{\"bytes\": {}, \"tokens\": {}, \"seconds\": {:.6}, \"mb_per_s\": {:.3}, \"load_seconds\": {:.3}}}",
        text.len(),
        ids.len(),
        best,
        text.len() as f64 / 1e6 / best,
        load_s
    );
    Ok(())
}
