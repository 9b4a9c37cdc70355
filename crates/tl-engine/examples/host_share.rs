//! The host's share of a decode step: runs `N` greedy requests together
//! through the engine on the CPU with the picks taken in the forward (the
//! path a GPU takes: no logits on the host) and reports, per step, the
//! engine's time outside the model's forward — scheduling, block tables,
//! sampling parameters, emitting and detokenizing — which on a GPU is time
//! the device waits for unless it overlaps the forward.
//!
//!     cargo run --release -p tl-engine --example host_share -- MODEL.gguf [N] [TOKENS] [emit]
//!
//! `emit` sends the streams' events from the scheduler's emitter thread
//! (`SchedulerConfig::emit_thread`, the GPU's setting).
//!
//! A tiny model (`tl synth --layers 1 --d-model 64 --tokenizer-from
//! REAL.gguf`) keeps the forward short so that the host's part shows.

use std::sync::Arc;
use std::time::Instant;

use tl_engine::{Engine, EngineConfig, Event, GenerationRequest, PromptInput, SchedulerConfig};
use tl_model::llm::Llm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: host_share MODEL.gguf [N] [TOKENS]")?;
    let n: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let tokens: usize = args.get(3).map_or(Ok(64), |s| s.parse())?;
    let emit_thread = args.get(4).is_some_and(|s| s == "emit");
    let llm = Arc::new(Llm::load(path)?);
    let per_block = llm.model.kv_bytes_per_token() * 16;
    let blocks = n * (tokens + 64).div_ceil(16) + 16;
    let e = Arc::new(Engine::start(
        llm.clone(),
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch: n,
                max_batch_tokens: 2048,
                prefix_caching: true,
                device_draws_on_cpu: true,
                emit_thread,
                ..Default::default()
            },
            kv_bytes: blocks * per_block,
            gpu_memory_utilization: None,
            max_queue: n + 8,
        },
    )?);
    let vocab = llm.model.config.vocab as u32;
    let t0 = Instant::now();
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let prompt: Vec<u32> = (0..32u32)
                .map(|j| 300 + (j * 131 + i as u32 * 977) % (vocab - 400))
                .collect();
            let mut r = GenerationRequest::new(PromptInput::Tokens(prompt));
            r.max_tokens = Some(tokens);
            r.ignore_eos = true;
            r.temperature = Some(0.0);
            let e = e.clone();
            std::thread::spawn(move || -> usize {
                let Ok(v) = e.validate(r) else { return 0 };
                let Ok(mut s) = e.submit(v) else { return 0 };
                let mut got = 0;
                while let Some(ev) = s.blocking_next() {
                    if let Event::Delta { token, .. } = ev {
                        got += usize::from(token.is_some());
                    }
                }
                got
            })
        })
        .collect();
    let got: usize = hs.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let wall = t0.elapsed();
    let st = e.last_stats();
    let steps = st.steps.max(1) as f64;
    let host = st.step_us.saturating_sub(st.forward_us) as f64;
    println!(
        "{n} requests, {got} tokens in {:.2} s; {} steps: step {:.0} µs, forward {:.0} µs, \
         host {:.0} µs a step ({:.1} µs a sequence-step); wall per step {:.0} µs",
        wall.as_secs_f64(),
        st.steps,
        st.step_us as f64 / steps,
        st.forward_us as f64 / steps,
        host / steps,
        host / steps / n as f64,
        wall.as_micros() as f64 / steps,
    );
    Ok(())
}
