//! The engine on a GPU: batching, the prefix cache and preemption must not
//! change a sequence's output. Each of 64 requests runs alone first; then
//! all 64 together, a repeat that hits the prefix cache, and all 64 in a
//! KV pool too small for them (preemption by recompute) must give the same
//! tokens — greedy, and sampled with a seed (the picks are taken on the
//! device).
//!
//! Why this holds on the GPU: in batch-invariant mode
//! (`Model::set_batch_invariant`, `tl serve --batch-invariant`) and with at
//! most 64 tokens a step (`max_batch_tokens` 64) every product takes the
//! same quantized matrix-vector kernels, whose arithmetic per row does not
//! depend on the other rows; the decode attention splits each sequence's keys in chunks
//! of a fixed size whatever the batch; the sampling kernel works row by
//! row. (Steps of more than 64 tokens run their products on cuBLAS over
//! f16 activations, whose rounding differs from the 8-bit path: a prompt
//! prefilled in one such step and one prefilled in small chunks may then
//! differ in the last bits.)
//!
//! Without a GPU (CI) the test prints why it is skipped and passes;
//! `scripts/gpu_check.sh` runs it on the GPU machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tl_engine::{
    Engine, EngineConfig, Event, GenerationRequest, PromptInput, RequestStream, SchedulerConfig,
};
use tl_model::llm::Llm;
use tl_model::synth::{synthesize, SynthSpec};

fn gpu_llm() -> Option<Arc<Llm>> {
    gpu_synth(SynthSpec {
        n_layers: 3,
        extra_vocab: 2000,
        context: 4096,
        seed: 11,
        ..Default::default()
    })
}

/// A synthetic model loaded on the GPU, or None (and why) without one.
fn gpu_synth(spec: SynthSpec) -> Option<Arc<Llm>> {
    if let Err(e) = tl_cuda::probe() {
        eprintln!("SKIPPED cuda engine tests: {e}");
        return None;
    }
    let p = std::env::temp_dir().join(format!(
        "tl-cuda-engine-{}-{}.gguf",
        std::process::id(),
        spec.seed
    ));
    synthesize(&spec)
        .expect("synth")
        .write_file(&p)
        .expect("write");
    let llm = Llm::load_on(&p, tl_core::Device::Cuda(0)).expect("load on the GPU");
    let _ = std::fs::remove_file(&p);
    Some(Arc::new(llm))
}

fn engine(llm: Arc<Llm>, max_batch: usize, kv_blocks: usize) -> Arc<Engine> {
    let per_block = llm.model.kv_bytes_per_token() * 16;
    Arc::new(
        Engine::start(
            llm,
            EngineConfig {
                scheduler: SchedulerConfig {
                    max_batch,
                    max_batch_tokens: 64,
                    prefix_caching: true,
                    ..Default::default()
                },
                kv_bytes: kv_blocks * per_block,
                gpu_memory_utilization: None,
                max_queue: 256,
            },
        )
        .expect("engine"),
    )
}

fn request(i: usize, sampled: bool) -> GenerationRequest {
    let len = 5 + (i * 37) % 90;
    let tokens: Vec<u32> = (0..len as u32)
        .map(|j| 3 + (j * 31 + i as u32 * 17) % 2000)
        .collect();
    let mut r = GenerationRequest::new(PromptInput::Tokens(tokens));
    r.max_tokens = Some(24);
    r.ignore_eos = true;
    if sampled {
        r.temperature = Some(0.9);
        r.top_p = Some(0.95);
        r.seed = Some(1000 + i as u64);
    } else {
        r.temperature = Some(0.0);
    }
    r
}

fn collect(mut s: RequestStream) -> (Vec<u32>, usize) {
    let (mut toks, mut cached) = (Vec::new(), 0);
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Delta { token, .. } => toks.extend(token),
            Event::Finished { cached_tokens, .. } => cached = cached_tokens,
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
    (toks, cached)
}

fn run(e: &Engine, r: GenerationRequest) -> (Vec<u32>, usize) {
    let v = e.validate(r).expect("valid");
    collect(e.submit(v).expect("submit"))
}

/// All `n` requests at once, each from its own thread.
fn together(e: &Arc<Engine>, n: usize, sampled: bool) -> Vec<Vec<u32>> {
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let e = e.clone();
            std::thread::spawn(move || run(&e, request(i, sampled)).0)
        })
        .collect();
    hs.into_iter().map(|h| h.join().expect("thread")).collect()
}

fn wait_idle(e: &Engine) -> tl_engine::Stats {
    let t = Instant::now();
    loop {
        let s = e.last_stats();
        if s.running_seqs == 0 && s.waiting_seqs == 0 {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "engine never idled: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cuda_engine_output_is_batch_prefix_and_preemption_invariant() {
    let Some(llm) = gpu_llm() else {
        return;
    };
    llm.model.set_batch_invariant(true);
    let n = 64;
    for sampled in [false, true] {
        let what = if sampled {
            "sampled (seeded)"
        } else {
            "greedy"
        };
        // Alone: one request at a time, no prefix cache hits (distinct
        // prompts).
        let solo = engine(llm.clone(), 1, 1024);
        let alone: Vec<Vec<u32>> = (0..n).map(|i| run(&solo, request(i, sampled)).0).collect();
        drop(solo);
        // Together: 64 sequences decoding in one batch.
        let e = engine(llm.clone(), 64, 1024);
        let batched = together(&e, n, sampled);
        let mut differ = Vec::new();
        for i in 0..n {
            if batched[i] != alone[i] {
                differ.push(i);
            }
        }
        assert!(
            differ.is_empty(),
            "{what}: batched output differs for requests {differ:?}"
        );
        // The same prompts again: their blocks come from the prefix cache.
        let (again, cached) = run(&e, request(7, sampled));
        assert!(cached > 0, "{what}: no prefix cache hit");
        assert_eq!(
            again, alone[7],
            "{what}: with {cached} cached prompt tokens"
        );
        let s = wait_idle(&e);
        assert_eq!(s.kv_blocks_used, 0);
        drop(e);
        // A pool of 24 blocks for 64 sequences of up to 8 blocks each:
        // sequences are preempted and recomputed.
        let tight = engine(llm.clone(), 64, 24);
        let squeezed = together(&tight, n, sampled);
        let s = wait_idle(&tight);
        assert!(
            s.preemptions > 0,
            "{what}: the pool was meant to run dry: {s:?}"
        );
        for i in 0..n {
            assert_eq!(
                squeezed[i], alone[i],
                "{what}: request {i} after preemption"
            );
        }
        eprintln!(
            "{what}: 64 requests equal alone, batched, from the prefix cache and after {} \
             preemptions",
            s.preemptions
        );
    }
}

/// The default kernels (tensor-core products for 9-64 rows, so a batch of
/// 64 sums each row in another order than a batch of one): logits move in
/// the last bits, which can flip a pick only at a near-exact tie, so nearly
/// every request must still equal its run alone; a wrong tensor-core
/// product would change them all. Reported, and held to 56 of 64.
#[test]
fn cuda_engine_default_kernels_keep_batched_output() {
    let Some(llm) = gpu_llm() else {
        return;
    };
    let n = 64;
    let solo = engine(llm.clone(), 1, 1024);
    let alone: Vec<Vec<u32>> = (0..n).map(|i| run(&solo, request(i, false)).0).collect();
    drop(solo);
    let e = engine(llm.clone(), 64, 1024);
    let batched = together(&e, n, false);
    let same = (0..n).filter(|&i| batched[i] == alone[i]).count();
    eprintln!("default kernels: {same} of {n} greedy requests equal alone and batched");
    assert!(
        same >= 56,
        "only {same} of {n} batched requests equal alone"
    );
}

/// The device refusing steps over 5 tokens (as an allocation failure
/// would): the scheduler halves its limits and preempts until steps fit;
/// no request fails or changes.
#[test]
fn cuda_engine_out_of_memory_shrinks_steps() {
    let Some(llm) = gpu_llm() else {
        return;
    };
    llm.model.set_batch_invariant(true);
    let n = 8;
    let solo = engine(llm.clone(), 1, 1024);
    let alone: Vec<Vec<u32>> = (0..n).map(|i| run(&solo, request(i, false)).0).collect();
    drop(solo);
    llm.model.limit_step_tokens(Some(5));
    let e = engine(llm.clone(), 64, 1024);
    let got = together(&e, n, false);
    let s = wait_idle(&e);
    llm.model.limit_step_tokens(None);
    assert!(s.oom_events > 0, "the steps were meant to fail: {s:?}");
    assert_eq!(s.kv_blocks_used, 0);
    for i in 0..n {
        assert_eq!(
            got[i], alone[i],
            "request {i} after the device ran out of memory"
        );
    }
    eprintln!(
        "out of memory: {} events, {} preemptions, {n} requests equal alone",
        s.oom_events, s.preemptions
    );
}

/// Speculative decoding on the GPU (prompt lookup, a draft model on the
/// GPU — the target's own weights loaded again, and another model): with
/// the target batch-invariant, every request's greedy output equals the
/// plain engine's, alone and eight at once; every target and draft block is
/// given back. Self-speculation (layer skipping) is refused on the GPU with
/// the reason.
#[test]
fn cuda_engine_speculation_keeps_greedy_output() {
    use tl_model::spec::{SpecConfig, SpecMethod};
    let Some(llm) = gpu_llm() else {
        return;
    };
    llm.model.set_batch_invariant(true);
    let n = 8;
    // Repetitive prompts give prompt lookup something to find.
    let req = |i: usize| {
        let mut r = request(i, false);
        if i.is_multiple_of(2) {
            r.prompt = PromptInput::Tokens((0..40).map(|j| 3 + (j % (5 + i as u32)) * 7).collect());
        }
        r
    };
    let solo = engine(llm.clone(), 1, 1024);
    let alone: Vec<Vec<u32>> = (0..n).map(|i| run(&solo, req(i)).0).collect();
    drop(solo);
    let same = gpu_llm().expect("the GPU is there");
    let other = gpu_synth(SynthSpec {
        n_layers: 1,
        extra_vocab: 2000,
        context: 4096,
        seed: 77,
        ..Default::default()
    })
    .expect("the GPU is there");
    let cases: [(&str, SpecMethod, Option<Arc<Llm>>); 4] = [
        ("prompt lookup", SpecMethod::Ngram, None),
        ("draft: the same weights", SpecMethod::Draft, Some(same)),
        ("draft: another model", SpecMethod::Draft, Some(other)),
        ("self-speculation", SpecMethod::SelfDraft, None),
    ];
    for (what, method, draft) in cases {
        let per_block = |l: &Llm| l.model.kv_bytes_per_token() * 16;
        let drafter = match method {
            SpecMethod::SelfDraft => Some(llm.clone()),
            _ => draft.clone(),
        };
        let kv_bytes = 1024 * (per_block(&llm) + drafter.as_deref().map_or(0, per_block));
        let started = Engine::start_with_draft(
            llm.clone(),
            draft,
            EngineConfig {
                scheduler: SchedulerConfig {
                    max_batch: 16,
                    max_batch_tokens: 64,
                    prefix_caching: true,
                    spec: Some(SpecConfig::new(method.clone(), 4).expect("k")),
                    spec_max_batch: 16,
                    ..Default::default()
                },
                kv_bytes,
                gpu_memory_utilization: None,
                max_queue: 64,
            },
        )
        .map_err(|e| e.to_string());
        let e = match (started, &method) {
            (Ok(_), SpecMethod::SelfDraft) => panic!("{what}: not refused"),
            (Err(e), SpecMethod::SelfDraft) => {
                assert!(
                    e.contains("--spec self (layer skipping) runs on the CPU only"),
                    "{e}"
                );
                continue;
            }
            (Ok(e), _) => Arc::new(e),
            (Err(e), _) => panic!("{what}: {e}"),
        };
        for (i, want) in alone.iter().enumerate().take(3) {
            assert_eq!(&run(&e, req(i)).0, want, "{what}: request {i} alone");
        }
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let e = e.clone();
                std::thread::spawn(move || run(&e, req(i)).0)
            })
            .collect();
        let got: Vec<Vec<u32>> = hs.into_iter().map(|h| h.join().expect("thread")).collect();
        for i in 0..n {
            assert_eq!(got[i], alone[i], "{what}: request {i} among {n}");
        }
        let s = wait_idle(&e);
        assert!(s.spec_drafted > 0, "{what}: nothing drafted: {s:?}");
        assert_eq!(s.kv_blocks_used, 0, "{what}");
        assert_eq!(s.draft_kv_blocks_used, 0, "{what}");
        eprintln!(
            "speculation on the GPU, {what}: {n} requests equal the plain engine's; \
             {} of {} drafted tokens accepted",
            s.spec_accepted, s.spec_drafted
        );
    }
}

/// Grammar-constrained requests on the GPU: the masks go to the device's
/// sampler with the draws, so only ids come back. Eight concurrent requests
/// of four grammars, greedy: each output follows its grammar and equals the
/// output of the same request with logprobs asked for (whose rows are read
/// and masked on the host), on the same card.
#[test]
fn cuda_engine_grammar_masks_on_the_device_match_the_host() {
    use tl_model::constrain::GrammarSpec;
    let Some(llm) = gpu_llm() else {
        return;
    };
    let specs = Arc::new([
        GrammarSpec::Regex("[0-9]{3}-[a-z]{2,5}".into()),
        GrammarSpec::Gbnf("root ::= (\"yes\" | \"no\") (\", \" (\"yes\" | \"no\")){0,3}\n".into()),
        GrammarSpec::JsonObject,
        GrammarSpec::Regex("(ab|cd)+e".into()),
    ]);
    let sp = specs.clone();
    let req = |i: usize, logprobs: bool| {
        let mut r = request(i, false);
        r.ignore_eos = false;
        r.max_tokens = Some(32);
        r.grammar = Some(("grammar", sp[i % sp.len()].clone()));
        r.logprobs = logprobs.then_some(1);
        r
    };
    let e = engine(llm.clone(), 16, 512);
    let hs: Vec<_> = (0..8)
        .map(|i| {
            let e = e.clone();
            let r = req(i, false);
            std::thread::spawn(move || run(&e, r).0)
        })
        .collect();
    let device: Vec<Vec<u32>> = hs.into_iter().map(|h| h.join().expect("thread")).collect();
    let st = wait_idle(&e);
    assert!(st.masks > 0, "no mask was computed: {st:?}");
    for (i, got) in device.iter().enumerate() {
        let host = run(&e, req(i, true)).0;
        assert_eq!(
            got, &host,
            "request {i}: device-masked output differs from the host's"
        );
        let text = llm
            .tokenizer
            .decode(got, Default::default())
            .expect("decode");
        match i % specs.len() {
            0 => assert!(
                text.len() >= 6 && text.as_bytes()[..3].iter().all(u8::is_ascii_digit),
                "{text:?}"
            ),
            1 => assert!(
                text.split(", ").all(|p| p == "yes"
                    || p == "no"
                    || "yes".starts_with(p)
                    || "no".starts_with(p)),
                "{text:?}"
            ),
            3 => assert!(text.chars().all(|c| "abcde".contains(c)), "{text:?}"),
            _ => {}
        }
    }
}
