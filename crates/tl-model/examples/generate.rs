//! Embedding the engine: load a model, stream a greedy and a sampled
//! generation, and run a batch of prompts together.
//!
//!     cargo run --release -p tl-model --example generate -- MODEL.gguf "Your prompt"

use std::io::Write;

use tl_model::llm::{GenerateOptions, Llm};
use tl_model::sampler::SamplingParams;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: generate MODEL.gguf [PROMPT]")?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is".into());
    let llm = Llm::load(&path)?;

    // Greedy, streamed through a callback.
    let opts = GenerateOptions {
        max_tokens: 24,
        ..Default::default()
    };
    print!("{prompt}");
    let g = llm.generate(&prompt, &opts, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
        true
    })?;
    println!(
        "\n[{} tokens, {:.1} tok/s]",
        g.tokens.len(),
        g.decode_tok_per_s()
    );

    // Sampled with a seed: the same seed gives the same text.
    let sampled = GenerateOptions {
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: 42,
            ..Default::default()
        },
        ..opts.clone()
    };
    let s = llm.generate(&prompt, &sampled, |_| true)?;
    println!("sampled (seed 42): {}", s.text);

    // Several prompts in one ragged batch.
    let batch = llm.generate_batch(&["One, two,", "Roses are red,"], &opts)?;
    for g in batch {
        println!("batch: {:?}", g.text);
    }
    Ok(())
}
