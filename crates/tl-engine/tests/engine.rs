//! The engine on a tiny synthetic model: batching must not change greedy
//! output, the prefix cache and preemption must be invisible to clients,
//! and every way out of a request must give its blocks back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tl_engine::{
    Engine, EngineConfig, EngineError, Event, FinishReason, GenerationRequest, PromptInput,
    RequestStream, SchedulerConfig,
};
use tl_model::generate::{Runner, TokenOptions};
use tl_model::llm::Llm;
use tl_model::synth::{synthesize, SynthSpec};
use tl_tokenizer::ChatMessage;

fn llm() -> Arc<Llm> {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let path = PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("tl-engine-test-{}.gguf", std::process::id()));
        synthesize(&SynthSpec::default())
            .expect("synth")
            .write_file(&p)
            .expect("write");
        p
    });
    Arc::new(Llm::load(path).expect("load"))
}

fn engine(llm: Arc<Llm>, max_batch: usize, max_batch_tokens: usize, kv_blocks: usize) -> Engine {
    engine_with(llm, max_batch, max_batch_tokens, kv_blocks, None)
}

fn engine_with(
    llm: Arc<Llm>,
    max_batch: usize,
    max_batch_tokens: usize,
    kv_blocks: usize,
    spec: Option<tl_model::spec::SpecConfig>,
) -> Engine {
    let per_block = llm.model.kv_bytes_per_token() * 16;
    Engine::start(
        llm,
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch,
                max_batch_tokens,
                prefix_caching: true,
                spec,
                spec_max_batch: 4,
                ..Default::default()
            },
            kv_bytes: kv_blocks * per_block,
            gpu_memory_utilization: None,
            max_queue: 64,
        },
    )
    .expect("engine")
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (i * 31 + seed * 17) % 300)
        .collect()
}

fn greedy(tokens: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let mut r = GenerationRequest::new(PromptInput::Tokens(tokens));
    r.max_tokens = Some(max_tokens);
    r.temperature = Some(0.0);
    r.ignore_eos = true;
    r
}

#[derive(Debug, Clone, PartialEq)]
struct Choice {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    cached: usize,
}

fn collect(mut s: RequestStream, n: usize) -> Vec<Choice> {
    let mut out = vec![
        Choice {
            tokens: vec![],
            text: String::new(),
            finish: None,
            cached: 0
        };
        n
    ];
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Delta {
                choice,
                text,
                token,
                ..
            } => {
                out[choice].text.push_str(&text);
                out[choice].tokens.extend(token);
            }
            Event::Finished {
                choice,
                reason,
                cached_tokens,
                ..
            } => {
                out[choice].finish = Some(reason);
                out[choice].cached = cached_tokens;
            }
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
    out
}

fn run(e: &Engine, r: GenerationRequest) -> Vec<Choice> {
    let v = e.validate(r).expect("valid");
    let n = v.n();
    collect(e.submit(v).expect("submit"), n)
}

fn wait_idle(e: &Engine) -> tl_engine::Stats {
    let t = Instant::now();
    loop {
        let s = e.last_stats();
        if s.running_seqs == 0 && s.waiting_seqs == 0 {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "engine never idled: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn greedy_matches_the_reference_runner_and_is_batch_invariant() {
    let llm = llm();
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(5 + i * 9, i as u32)).collect();
    // Reference: the plain runner, one prompt at a time, whole-prompt prefill.
    let mut reference = Vec::new();
    for p in &prompts {
        let mut runner = Runner::new(&llm.model, 512).expect("runner");
        let opts = TokenOptions {
            max_tokens: 12,
            ..Default::default()
        };
        let out = runner
            .generate_batch(std::slice::from_ref(p), &opts, |_, _| true)
            .expect("generate");
        reference.push(out[0].0.clone());
    }
    // Alone, with a small token budget so prompts are chunked.
    let e = engine(llm.clone(), 8, 16, 256);
    for (p, want) in prompts.iter().zip(&reference) {
        let got = run(&e, greedy(p.clone(), 12));
        assert_eq!(&got[0].tokens, want, "alone");
        assert_eq!(got[0].finish, Some(FinishReason::Length));
    }
    // All eight at once, from different threads.
    let e = Arc::new(engine(llm.clone(), 8, 64, 256));
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let e = e.clone();
            std::thread::spawn(move || run(&e, greedy(p, 12)))
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&reference) {
        assert_eq!(
            &h.join().expect("thread")[0].tokens,
            want,
            "in a batch of 8"
        );
    }
    let s = wait_idle(&e);
    assert_eq!(s.kv_blocks_used, 0);
}

#[test]
fn repeated_prompt_hits_the_prefix_cache() {
    let llm = llm();
    let e = engine(llm, 4, 64, 64);
    let p = prompt(70, 3);
    let first = run(&e, greedy(p.clone(), 6));
    assert_eq!(first[0].cached, 0);
    let second = run(&e, greedy(p.clone(), 6));
    assert_eq!(
        second[0].cached, 64,
        "4 full blocks reused, the rest computed"
    );
    assert_eq!(first[0].tokens, second[0].tokens);
    // A prompt that extends the first one's prompt and output reuses those too.
    let mut longer = p.clone();
    longer.extend(&first[0].tokens);
    longer.extend(prompt(20, 9));
    let third = run(&e, greedy(longer, 3));
    assert_eq!(third[0].cached, 64);
    let s = wait_idle(&e);
    assert!(s.prefix_hit_tokens >= 128, "{s:?}");
    assert_eq!(s.kv_blocks_used, 0);
    assert!(s.kv_blocks_cached >= 4);
}

/// Each prompt's greedy tokens, all requests submitted at once from their
/// own threads.
fn greedy_together(e: &Arc<Engine>, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let e = e.clone();
            std::thread::spawn(move || run(&e, greedy(p, max_tokens)))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread")[0].tokens.clone())
        .collect()
}

#[test]
fn preemption_by_recompute_is_invisible() {
    let llm = llm();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(30 + i, 10 + i as u32)).collect();
    let roomy = engine(llm.clone(), 4, 64, 256);
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run(&roomy, greedy(p.clone(), 40))[0].tokens.clone())
        .collect();
    // 12 blocks for 4 sequences that each grow to 5 blocks.
    let tight = Arc::new(engine(llm, 4, 64, 12));
    assert_eq!(greedy_together(&tight, &prompts, 40), want);
    let s = wait_idle(&tight);
    assert!(s.preemptions > 0, "the pool was meant to run dry: {s:?}");
    assert_eq!(s.kv_blocks_used, 0);
}

/// A device that runs out of memory mid-serve (here: every step of more
/// than 5 tokens refused as an allocation failure would be): the scheduler
/// halves its step limits and preempts until steps fit, and every request
/// still gets exactly the tokens it gets alone.
#[test]
fn device_out_of_memory_shrinks_steps_and_loses_nothing() {
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| prompt(20 + i, 40 + i as u32)).collect();
    let roomy = engine(llm(), 8, 64, 256);
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run(&roomy, greedy(p.clone(), 12))[0].tokens.clone())
        .collect();
    let small = llm();
    small.model.limit_step_tokens(Some(5));
    let e = Arc::new(engine(small, 8, 64, 256));
    assert_eq!(greedy_together(&e, &prompts, 12), want);
    let s = wait_idle(&e);
    assert!(s.oom_events > 0, "the steps were meant to fail: {s:?}");
    assert_eq!(s.kv_blocks_used, 0);
}

#[test]
fn n_choices_share_the_prompt_blocks() {
    let llm = llm();
    let e = engine(llm, 8, 64, 64);
    let mut r = greedy(prompt(50, 4), 5);
    r.n = Some(3);
    let out = run(&e, r);
    assert_eq!(out.len(), 3);
    assert!(
        out.iter().all(|c| c.tokens == out[0].tokens),
        "greedy choices agree"
    );
    assert_eq!(out[0].cached, 0);
    assert_eq!(out[1].cached, 48);
    assert_eq!(out[2].cached, 48);
    // Sampled choices differ from each other but repeat with the same seed.
    let sampled = |seed| {
        let mut r = GenerationRequest::new(PromptInput::Tokens(prompt(20, 5)));
        r.max_tokens = Some(8);
        r.temperature = Some(1.5);
        r.seed = Some(seed);
        r.n = Some(2);
        r.ignore_eos = true;
        run(&e, r).into_iter().map(|c| c.tokens).collect::<Vec<_>>()
    };
    let a = sampled(42);
    assert_eq!(a, sampled(42));
    assert_ne!(a[0], a[1]);
    assert_ne!(a, sampled(43));
}

#[test]
fn cancellation_frees_blocks() {
    let llm = llm();
    let e = engine(llm, 4, 64, 64);
    let v = e.validate(greedy(prompt(40, 1), 400)).expect("valid");
    let mut s = e.submit(v).expect("submit");
    for _ in 0..3 {
        assert!(matches!(s.blocking_next(), Some(Event::Delta { .. })));
    }
    assert!(e.last_stats().kv_blocks_used > 0);
    drop(s);
    let st = wait_idle(&e);
    assert_eq!(st.kv_blocks_used, 0);
    assert!(st.generated_tokens < 400);
}

#[test]
fn stop_strings_and_eos() {
    let llm = llm();
    let e = engine(llm.clone(), 4, 64, 64);
    let free = run(&e, greedy(prompt(10, 2), 30));
    let text = free[0].text.clone();
    // Stop at a piece of text from the middle of the free-running output.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 6, "{text:?}");
    let stop: String = chars[4..6].iter().collect();
    let mut r = greedy(prompt(10, 2), 30);
    r.stop = vec![stop.clone()];
    let out = run(&e, r);
    assert_eq!(out[0].finish, Some(FinishReason::Stop));
    let at = text.find(&stop).expect("present");
    assert_eq!(out[0].text, text[..at]);
}

#[test]
fn validation_rejects_bad_requests() {
    let llm = llm();
    let e = engine(llm, 4, 64, 64);
    let check = |r: GenerationRequest, param: &str| {
        let err = e.validate(r).expect_err("invalid");
        assert!(err.is_invalid_request(), "{err}");
        assert_eq!(err.param(), Some(param), "{err}");
    };
    let mut r = greedy(prompt(10, 1), 5);
    r.temperature = Some(-1.0);
    check(r, "temperature");
    let mut r = greedy(prompt(10, 1), 5);
    r.top_p = Some(1.5);
    check(r, "top_p");
    let mut r = greedy(prompt(10, 1), 5);
    r.n = Some(0);
    check(r, "n");
    check(greedy(prompt(10, 1), 5000), "max_tokens");
    check(greedy(vec![], 5), "prompt");
    check(greedy(vec![100_000], 5), "prompt");
    check(
        GenerationRequest::new(PromptInput::Chat(vec![])),
        "messages",
    );
    check(
        GenerationRequest::new(PromptInput::Chat(vec![ChatMessage::new("wizard", "hi")])),
        "messages",
    );
    // The default max_tokens fills what is left of the limit.
    let v = e
        .validate(GenerationRequest::new(PromptInput::Text("hello".into())))
        .expect("valid");
    assert_eq!(v.prompt_tokens().len() + v.max_tokens(), 512);
}

#[test]
fn full_queue_is_refused_and_shutdown_fails_in_flight() {
    let llm = llm();
    let per_block = llm.model.kv_bytes_per_token() * 16;
    let e = Engine::start(
        llm.clone(),
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch: 1,
                ..Default::default()
            },
            kv_bytes: 64 * per_block,
            gpu_memory_utilization: None,
            max_queue: 1,
        },
    )
    .expect("engine");
    let mut a = e
        .submit(e.validate(greedy(prompt(8, 1), 400)).expect("valid"))
        .expect("first");
    assert!(matches!(a.blocking_next(), Some(Event::Delta { .. })));
    let _b = e
        .submit(e.validate(greedy(prompt(8, 2), 4)).expect("valid"))
        .expect("second waits in the queue");
    let err = e
        .submit(e.validate(greedy(prompt(8, 3), 4)).expect("valid"))
        .err()
        .expect("third is refused");
    assert_eq!(err, EngineError::QueueFull { max: 1 });
    e.shutdown();
    let mut last = None;
    while let Some(ev) = a.blocking_next() {
        last = Some(ev);
    }
    assert!(matches!(
        last,
        Some(Event::Error(EngineError::ShuttingDown))
    ));
    assert!(e
        .submit(e.validate(greedy(prompt(8, 3), 4)).expect("valid"))
        .is_err());
}

/// Speculative decoding in the server: greedy output equal to the plain
/// engine's, whether requests run alone or several at once (above the
/// speculation batch limit part of the time), with prefix-cache hits, and
/// every block given back; a request that opts out never drafts.
#[test]
fn speculative_decoding_keeps_greedy_output_and_frees_blocks() {
    let llm = llm();
    // Repetitive prompts, so prompt lookup finds drafts.
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| (0..30u32).map(|j| 3 + (j % (5 + i)) * 13).collect())
        .collect();
    let plain = engine(llm.clone(), 8, 64, 256);
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run(&plain, greedy(p.clone(), 24))[0].tokens.clone())
        .collect();
    let cfg = tl_model::spec::SpecConfig::new(tl_model::spec::SpecMethod::Ngram, 6).expect("cfg");
    let e = Arc::new(engine_with(llm.clone(), 8, 64, 256, Some(cfg)));
    for (p, w) in prompts.iter().zip(&want) {
        assert_eq!(&run(&e, greedy(p.clone(), 24))[0].tokens, w, "alone");
    }
    let alone = wait_idle(&e);
    assert!(alone.spec_drafted > 0, "nothing drafted");
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let e = e.clone();
            std::thread::spawn(move || run(&e, greedy(p, 24))[0].tokens.clone())
        })
        .collect();
    for (h, w) in handles.into_iter().zip(&want) {
        assert_eq!(&h.join().expect("thread"), w, "together");
    }
    let s = wait_idle(&e);
    assert_eq!(s.kv_blocks_used, 0);
    // Opting out: no drafts for this request.
    let mut r = greedy(prompts[0].clone(), 24);
    r.speculative = Some(false);
    assert_eq!(run(&e, r)[0].tokens, want[0]);
    assert_eq!(wait_idle(&e).spec_drafted, s.spec_drafted);
}

/// Runs a request to its end; `Err` with the error event when it fails.
fn outcome(s: &mut RequestStream) -> Result<usize, EngineError> {
    let mut tokens = 0;
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Delta { token, .. } => tokens += usize::from(token.is_some()),
            Event::Finished { .. } => {}
            Event::Error(e) => return Err(e),
        }
    }
    Ok(tokens)
}

#[test]
fn a_failed_device_step_fails_its_requests_and_the_engine_goes_on() {
    let m = llm();
    // The fourth step fails as a refused kernel launch would.
    m.model.inject_fault(3, false);
    let e = engine(m, 8, 64, 256);
    let mut streams: Vec<RequestStream> = (0..4)
        .map(|i| {
            e.submit(e.validate(greedy(prompt(10, 60 + i), 10)).expect("valid"))
                .expect("submit")
        })
        .collect();
    let results: Vec<_> = streams.iter_mut().map(outcome).collect();
    let failed: Vec<&EngineError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        !failed.is_empty(),
        "the fault was meant to fail a step: {results:?}"
    );
    for f in &failed {
        assert!(
            matches!(f, EngineError::Model(m) if m.contains("injected fault")),
            "{f}"
        );
    }
    assert_eq!(
        wait_idle(&e).kv_blocks_used,
        0,
        "the failed requests' blocks came back"
    );
    // The device still works: new requests run to their end.
    assert_eq!(e.device_lost(), None);
    for i in 0..2 {
        let out = run(&e, greedy(prompt(12, 70 + i), 6));
        assert_eq!(out[0].tokens.len(), 6);
    }
}

#[test]
fn a_lost_device_fails_every_request_and_refuses_new_ones() {
    let m = llm();
    // The third step finds the device lost (and so would every later one).
    m.model.inject_fault(2, true);
    // Room for two sequences at a time: the others wait in the queue.
    let e = engine(m, 2, 64, 256);
    let mut streams: Vec<RequestStream> = Vec::new();
    for i in 0..5 {
        match e.submit(e.validate(greedy(prompt(10, 80 + i), 40)).expect("valid")) {
            Ok(s) => streams.push(s),
            // On a loaded machine the engine may reach the failing step
            // before every request is in: a later one is then refused at
            // once, as any new request must be.
            Err(EngineError::DeviceLost(why)) if i > 0 => {
                assert!(why.contains("injected fault"), "{why}")
            }
            Err(other) => panic!("submit {i}: {other:?}"),
        }
    }
    for (i, s) in streams.iter_mut().enumerate() {
        match outcome(s) {
            Err(EngineError::DeviceLost(why)) => assert!(why.contains("injected fault"), "{why}"),
            other => panic!("request {i}: {other:?}"),
        }
    }
    // The engine publishes the lost device after the step that failed the
    // requests: wait for it (a generous bound; not a timing assertion).
    let t0 = std::time::Instant::now();
    let why = loop {
        if let Some(why) = e.device_lost() {
            break why;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the engine never reported the lost device"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(why.contains("injected fault"), "{why}");
    let v = e.validate(greedy(prompt(8, 90), 4)).expect("valid");
    assert!(matches!(e.submit(v), Err(EngineError::DeviceLost(_))));
}

fn engine_masks(llm: Arc<Llm>, max_batch: usize, mask_threads: usize) -> Arc<Engine> {
    engine_draws(llm, max_batch, mask_threads, false)
}

fn engine_draws(
    llm: Arc<Llm>,
    max_batch: usize,
    mask_threads: usize,
    device_draws_on_cpu: bool,
) -> Arc<Engine> {
    engine_cfg(
        llm,
        SchedulerConfig {
            max_batch,
            max_batch_tokens: 256,
            prefix_caching: true,
            mask_threads,
            device_draws_on_cpu,
            ..Default::default()
        },
        256,
    )
}

/// An engine of `scheduler` over a cache of `kv_blocks` blocks.
fn engine_cfg(llm: Arc<Llm>, scheduler: SchedulerConfig, kv_blocks: usize) -> Arc<Engine> {
    let per_block = llm.model.kv_bytes_per_token() * 16;
    Arc::new(
        Engine::start(
            llm,
            EngineConfig {
                scheduler,
                kv_bytes: kv_blocks * per_block,
                gpu_memory_utilization: None,
                max_queue: 64,
            },
        )
        .expect("engine"),
    )
}

/// Masks computed on the mask threads while the forward runs give the
/// same outputs as masks computed after it, and as masks handed to the
/// forward's own sampler (the GPU's path), for several concurrent
/// constrained requests of different grammars (greedy and sampled), and
/// each output follows its grammar.
#[test]
fn concurrent_constrained_requests_match_with_and_without_mask_threads() {
    use serde_json::{json, Value};
    use tl_model::constrain::GrammarSpec;
    let llm = llm();
    let specs = [
        GrammarSpec::JsonSchema(json!({"type": "object", "properties": {
            "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["ok", "n"], "additionalProperties": false})),
        GrammarSpec::JsonSchema(json!({"type": "object", "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
            "required": ["color", "tags"], "additionalProperties": false})),
        GrammarSpec::JsonObject,
        GrammarSpec::Gbnf("root ::= (\"yes\" | \"no\") (\", \" (\"yes\" | \"no\")){0,3}\n".into()),
        GrammarSpec::Regex("[0-9]{3}-[a-z]{2,5}".into()),
        GrammarSpec::JsonSchema(
            json!({"type": "array", "items": {"type": "integer"}, "maxItems": 4}),
        ),
    ];
    let request = |i: usize, spec: &GrammarSpec| {
        let mut r = GenerationRequest::new(PromptInput::Tokens(prompt(9 + i, i as u32)));
        r.max_tokens = Some(48);
        r.temperature = Some(if i.is_multiple_of(2) { 0.0 } else { 0.9 });
        r.seed = Some(7 + i as u64);
        r.grammar = Some(("grammar", spec.clone()));
        r
    };
    let together = |e: &Arc<Engine>| -> Vec<Choice> {
        let streams: Vec<RequestStream> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                e.submit(e.validate(request(i, s)).expect("valid"))
                    .expect("submit")
            })
            .collect();
        streams
            .into_iter()
            .map(|s| collect(s, 1).remove(0))
            .collect()
    };
    let overlapped = engine_masks(llm.clone(), 8, 1);
    let got = together(&overlapped);
    let st = wait_idle(&overlapped);
    assert!(st.masks > 0, "no mask was computed: {st:?}");
    let inline = engine_masks(llm.clone(), 8, 0);
    let want = together(&inline);
    assert_eq!(got, want, "mask threads changed the outputs");
    let two = engine_masks(llm.clone(), 8, 2);
    assert_eq!(together(&two), want, "two mask threads changed the outputs");
    // The picks drawn in the forward under the masks (the GPU's path: the
    // masks go to the sampler with the draws), with and without the
    // threads: the same outputs.
    for threads in [1, 0] {
        let device = engine_draws(llm.clone(), 8, threads, true);
        assert_eq!(
            together(&device),
            want,
            "masked device draws ({threads} mask threads) changed the outputs"
        );
        let st = wait_idle(&device);
        assert!(st.masks > 0, "no mask was computed: {st:?}");
    }
    // One at a time (batch of one) as well.
    let alone = engine_masks(llm, 1, 1);
    for (i, s) in specs.iter().enumerate() {
        assert_eq!(run(&alone, request(i, s)).remove(0), want[i], "request {i}");
    }
    for (i, c) in want.iter().enumerate() {
        let t = &c.text;
        if c.finish != Some(FinishReason::Stop) {
            continue;
        }
        match i {
            0 => {
                let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t:?}"));
                assert!(
                    v["ok"].is_boolean() && v["n"].as_u64().is_some_and(|n| n <= 99),
                    "{t}"
                );
            }
            1 => {
                let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t:?}"));
                assert!(
                    ["red", "green", "blue"].contains(&v["color"].as_str().unwrap_or("")),
                    "{t}"
                );
                assert!(v["tags"].as_array().is_some_and(|a| a.len() <= 3), "{t}");
            }
            2 => assert!(
                serde_json::from_str::<Value>(t).is_ok_and(|v| v.is_object()),
                "{t:?}"
            ),
            3 => assert!(t.split(", ").all(|p| p == "yes" || p == "no"), "{t:?}"),
            4 => {
                let (d, l) = t.split_once('-').unwrap_or_else(|| panic!("{t:?}"));
                assert!(
                    d.len() == 3 && d.bytes().all(|b| b.is_ascii_digit()),
                    "{t:?}"
                );
                assert!(
                    (2..=5).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_lowercase()),
                    "{t:?}"
                );
            }
            _ => {
                let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t:?}"));
                assert!(
                    v.as_array()
                        .is_some_and(|a| a.len() <= 4 && a.iter().all(Value::is_i64)),
                    "{t}"
                );
            }
        }
    }
    let stopped = want
        .iter()
        .filter(|c| c.finish == Some(FinishReason::Stop))
        .count();
    assert!(
        stopped >= 3,
        "too few outputs completed their grammar: {want:?}"
    );
}

/// A lazy grammar (free until its trigger token, then constrained) at the
/// engine level: the text before the trigger is the unconstrained text,
/// the rest follows the grammar, and drawing the free tokens on the
/// device path (here the forward's host fallback) gives the same output
/// as drawing them on the host.
#[test]
fn lazy_grammar_is_free_until_its_trigger_on_host_and_device_draws() {
    use tl_model::constrain::{GrammarSpec, Trigger};
    let llm = llm();
    let p = prompt(12, 3);
    let host = engine_draws(llm.clone(), 4, 1, false);
    let free = run(&host, greedy(p.clone(), 24)).remove(0);
    // The trigger: a token the model writes unconstrained, after some text.
    let at = 5;
    let trigger = free.tokens[at];
    let first = free.tokens.iter().position(|&t| t == trigger).unwrap();
    let lazy = |stop_eos: bool| {
        let mut r = greedy(p.clone(), 24);
        r.ignore_eos = !stop_eos;
        r.grammar = Some((
            "grammar",
            GrammarSpec::Lazy {
                trigger: Trigger::Token(trigger),
                grammar: Box::new(GrammarSpec::Lark(format!(
                    "start: <[{trigger}]> \"=\" /[0-9]{{2,3}}/ \";\"\n"
                ))),
            },
        ));
        r
    };
    let got = run(&host, lazy(true)).remove(0);
    assert_eq!(
        got.tokens[..=first],
        free.tokens[..=first],
        "the text before the trigger changed"
    );
    let tail = llm
        .tokenizer
        .decode(&got.tokens[first + 1..], Default::default())
        .unwrap();
    let digits = tail
        .strip_prefix('=')
        .and_then(|t| t.strip_suffix(';'))
        .unwrap_or_else(|| panic!("{tail:?}"));
    assert!(
        (2..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()),
        "{tail:?}"
    );
    assert_eq!(got.finish, Some(FinishReason::Stop));
    let st = wait_idle(&host);
    assert!(st.forced_tokens > 0 || st.masks > 0, "{st:?}");
    // The free part drawn in the forward (the GPU's path) changes nothing.
    let device = engine_draws(llm, 4, 1, true);
    assert_eq!(run(&device, lazy(true)).remove(0), got);
    assert_eq!(run(&device, greedy(p.clone(), 24)).remove(0), free);
    // With a ```json fence trigger too (Hermes' `auto`): the reply's first
    // token, which might open the fence, is drawn on the host; once it
    // cannot, the rest waits for the token on the device as above.
    let fence = {
        let mut r = lazy(true);
        if let Some((
            _,
            GrammarSpec::Lazy {
                trigger: t @ Trigger::Token(_),
                ..
            },
        )) = r.grammar.as_mut()
        {
            *t = Trigger::Fence {
                lang: "json".into(),
                token: Some(trigger),
            };
        }
        assert!(matches!(
            r.grammar,
            Some((
                _,
                GrammarSpec::Lazy {
                    trigger: Trigger::Fence { .. },
                    ..
                }
            ))
        ));
        r
    };
    let host_fence = run(&host, fence.clone()).remove(0);
    assert_eq!(host_fence.tokens, got.tokens);
    assert_eq!(run(&device, fence).remove(0).tokens, got.tokens);
}

/// A synthetic model of `spec`, written once per test process under `tag`.
fn synth_llm(tag: &str, spec: SynthSpec) -> Arc<Llm> {
    let p = std::env::temp_dir().join(format!("tl-engine-test-{tag}-{}.gguf", std::process::id()));
    if !p.exists() {
        synthesize(&spec)
            .expect("synth")
            .write_file(&p)
            .expect("write");
    }
    Arc::new(Llm::load(&p).expect("load"))
}

/// A model of the default synthetic shape (same vocabulary and token
/// text) but other weights: it drafts tokens the target often rejects.
fn other_llm() -> Arc<Llm> {
    synth_llm(
        "draft",
        SynthSpec {
            seed: 77,
            n_layers: 1,
            // Peaked attention: its drafts depend on the whole context, so
            // a draft cache out of step with the text shows.
            qk_scale: 8.0,
            ..SynthSpec::default()
        },
    )
}

/// An engine speculating with `method` (and the draft model, for
/// `Draft`), room for `kv_blocks` blocks in the model's cache and in the
/// draft's.
fn spec_engine(
    llm: Arc<Llm>,
    draft: Option<Arc<Llm>>,
    method: tl_model::spec::SpecMethod,
    max_batch: usize,
    kv_blocks: usize,
) -> Engine {
    let per_block = |l: &Llm| l.model.kv_bytes_per_token() * 16;
    let drafter = match method {
        tl_model::spec::SpecMethod::SelfDraft => Some(llm.clone()),
        _ => draft.clone(),
    };
    let bytes = kv_blocks * (per_block(&llm) + drafter.as_deref().map_or(0, per_block));
    let cfg = tl_model::spec::SpecConfig::new(method, 4).expect("cfg");
    Engine::start_with_draft(
        llm,
        draft,
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch,
                max_batch_tokens: 64,
                prefix_caching: true,
                spec: Some(cfg),
                spec_max_batch: 4,
                ..Default::default()
            },
            kv_bytes: bytes,
            gpu_memory_utilization: None,
            max_queue: 64,
        },
    )
    .expect("engine")
}

/// Six prompts of varied lengths, a few repetitive (prompt lookup finds
/// drafts there), the others not.
fn spec_prompts() -> Vec<Vec<u32>> {
    (0..6u32)
        .map(|i| {
            if i % 2 == 0 {
                (0..20 + i).map(|j| 3 + (j % (4 + i)) * 11).collect()
            } else {
                prompt(15 + 3 * i as usize, 20 + i)
            }
        })
        .collect()
}

/// Greedy output of each prompt from the plain engine.
fn plain_outputs(llm: &Arc<Llm>, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let plain = engine(llm.clone(), 8, 64, 256);
    prompts
        .iter()
        .map(|p| run(&plain, greedy(p.clone(), max_tokens))[0].tokens.clone())
        .collect()
}

/// The server's speculation from a draft model: greedy output equal to the
/// plain engine's alone and six at once (above the speculation batch limit
/// part of the time), every target and draft block given back. With the
/// target itself as the draft every draft is accepted (its cache is in step
/// with the accepted text: a stale entry would make it draft otherwise);
/// with another model some are rejected. A request that opts out drafts
/// nothing.
#[test]
fn draft_model_speculation_keeps_greedy_output_and_frees_blocks() {
    let target = llm();
    let prompts = spec_prompts();
    let want = plain_outputs(&target, &prompts, 20);
    for (name, draft) in [("itself", llm()), ("another model", other_llm())] {
        let e = Arc::new(spec_engine(
            target.clone(),
            Some(draft),
            tl_model::spec::SpecMethod::Draft,
            8,
            256,
        ));
        for (p, w) in prompts.iter().zip(&want) {
            assert_eq!(
                &run(&e, greedy(p.clone(), 20))[0].tokens,
                w,
                "{name}, alone"
            );
        }
        assert_eq!(greedy_together(&e, &prompts, 20), want, "{name}, together");
        let s = wait_idle(&e);
        assert!(s.spec_drafted > 0, "{name}: nothing drafted: {s:?}");
        assert!(s.draft_forwards > 0, "{name}: {s:?}");
        if name == "itself" {
            assert_eq!(s.spec_accepted, s.spec_drafted, "{name}: {s:?}");
        } else {
            assert!(s.spec_accepted < s.spec_drafted, "{name}: {s:?}");
        }
        assert_eq!(s.kv_blocks_used, 0, "{name}");
        assert_eq!(s.draft_kv_blocks_used, 0, "{name}");
        let mut r = greedy(prompts[1].clone(), 20);
        r.speculative = Some(false);
        assert_eq!(run(&e, r)[0].tokens, want[1]);
        assert_eq!(
            wait_idle(&e).spec_drafted,
            s.spec_drafted,
            "{name}: opted out"
        );
    }
}

/// A lazy grammar speculates while its trigger has not fired, with the
/// same greedy output as without speculation: with prompt lookup, and
/// with the target as its own draft model. There every draft is the
/// target's free choice and every round (4 drafts, then the target's
/// token) is accepted whole without a grammar, so a trigger first written
/// at a generated position not a multiple of 5 fires inside a round's
/// drafts: the drafts after it, the free text the grammar refuses, must
/// not come out, and the tokens after it follow the grammar.
#[test]
fn lazy_grammar_speculates_until_its_trigger_with_the_same_output() {
    use tl_model::constrain::{GrammarSpec, Trigger};
    let llm = llm();
    let plain = engine_draws(llm.clone(), 4, 1, false);
    let spec = [
        (
            "ngram",
            spec_engine(llm.clone(), None, tl_model::spec::SpecMethod::Ngram, 8, 256),
        ),
        (
            "itself as draft",
            spec_engine(
                llm.clone(),
                Some(llm.clone()),
                tl_model::spec::SpecMethod::Draft,
                8,
                256,
            ),
        ),
    ];
    let lazy = |p: &[u32], trigger: u32| {
        let mut r = greedy(p.to_vec(), 40);
        r.ignore_eos = false;
        r.grammar = Some((
            "grammar",
            GrammarSpec::Lazy {
                trigger: Trigger::Token(trigger),
                grammar: Box::new(GrammarSpec::Lark(format!(
                    "start: <[{trigger}]> \"=\" /[0-9]{{2,3}}/ \";\"\n"
                ))),
            },
        ));
        r
    };
    let mut inside_drafts = 0;
    // Repetitive prompts, so prompt lookup finds drafts.
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|i| (0..30u32).map(|j| 3 + (j % (5 + i)) * 13).collect())
        .collect();
    for p in &prompts {
        let mut r = greedy(p.clone(), 40);
        r.ignore_eos = false;
        let free = run(&plain, r).remove(0).tokens;
        // Tokens first written at generated positions 1..=30 (the text
        // falls into loops there, which prompt lookup drafts).
        let firsts: Vec<(usize, u32)> = (1..free.len().min(31))
            .filter(|&x| !free[..x].contains(&free[x]))
            .map(|x| (x, free[x]))
            .collect();
        for &(x, trigger) in &firsts {
            let want = run(&plain, lazy(p, trigger)).remove(0);
            assert_eq!(want.tokens[..=x], free[..=x], "before the trigger");
            let tail = llm
                .tokenizer
                .decode(&want.tokens[x + 1..], Default::default())
                .unwrap();
            assert!(
                tail.starts_with('=') && tail.ends_with(';'),
                "not the grammar's: {tail:?}"
            );
            for (name, e) in &spec {
                let got = run(e, lazy(p, trigger)).remove(0);
                assert_eq!(
                    (got.tokens, got.text, got.finish),
                    (want.tokens.clone(), want.text.clone(), want.finish),
                    "{name}: trigger {trigger} at {x}"
                );
            }
            if x % 5 != 0 {
                inside_drafts += 1;
            }
        }
    }
    assert!(inside_drafts > 0, "no trigger fell inside a round's drafts");
    // Sampled: where the trigger comes, what follows is the grammar's.
    let p = &prompts[0];
    let trigger = run(&plain, greedy(p.clone(), 4)).remove(0).tokens[2];
    let mut fired = 0;
    for (name, e) in &spec {
        for seed in 0..6 {
            let mut r = lazy(p, trigger);
            r.temperature = Some(0.7);
            r.seed = Some(seed);
            let got = run(e, r).remove(0).tokens;
            if let Some(at) = got.iter().position(|&t| t == trigger) {
                fired += 1;
                let tail = llm
                    .tokenizer
                    .decode(&got[at + 1..], Default::default())
                    .unwrap();
                let digits = tail.strip_prefix('=').and_then(|t| t.strip_suffix(';'));
                assert!(
                    digits.is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit())),
                    "{name}, seed {seed}: {tail:?}"
                );
            }
        }
    }
    assert!(fired > 0, "the trigger never came in the sampled runs");
    for (name, e) in &spec {
        let s = wait_idle(e);
        assert!(s.spec_drafted > 0, "{name}: nothing drafted: {s:?}");
        assert!(s.spec_accepted > 0, "{name}: nothing accepted: {s:?}");
        assert_eq!(s.kv_blocks_used, 0, "{name}");
        assert_eq!(s.draft_kv_blocks_used, 0, "{name}");
    }
}

/// One request alone drafts and accepts exactly what the reference runner
/// (`Runner::with_draft`, its own draft-cache bookkeeping) does with the
/// same draft model: a draft cache out of step with the text would draft
/// other tokens.
#[test]
fn draft_model_rounds_match_the_reference_runner() {
    let target = llm();
    let draft = other_llm();
    for p in spec_prompts() {
        let opts = TokenOptions {
            max_tokens: 24,
            spec: Some(
                tl_model::spec::SpecConfig::new(tl_model::spec::SpecMethod::Draft, 4).expect("cfg"),
            ),
            ..Default::default()
        };
        let mut r = Runner::new(&target.model, 512)
            .expect("runner")
            .with_draft(&draft.model, 512)
            .expect("draft");
        let want = r
            .generate_batch(std::slice::from_ref(&p), &opts, |_, _| true)
            .expect("generate");
        let e = spec_engine(
            target.clone(),
            Some(draft.clone()),
            tl_model::spec::SpecMethod::Draft,
            8,
            256,
        );
        assert_eq!(run(&e, greedy(p.clone(), 24))[0].tokens, want[0].0);
        let s = wait_idle(&e);
        assert_eq!(
            (s.spec_drafted, s.spec_accepted),
            (r.spec_stats.drafted as u64, r.spec_stats.accepted as u64),
            "prompt {p:?}"
        );
        assert!(s.spec_accepted < s.spec_drafted, "{s:?}");
    }
}

/// The self-speculation draft's cache has room for the layers it runs
/// only: kept layers × one layer's bytes per block × blocks, and the
/// greedy output is the plain engine's.
#[test]
fn self_speculation_caches_only_the_layers_it_runs() {
    let target = synth_llm(
        "self8",
        SynthSpec {
            n_layers: 8,
            ..SynthSpec::default()
        },
    );
    let skip = tl_model::spec::self_draft_layers(8);
    let kept = skip.iter().filter(|&&s| !s).count();
    assert!(kept < 8, "no layer left out: {skip:?}");
    let layer_block = target.model.kv_bytes_per_token_layers(1) * 16;
    assert_eq!(layer_block * 8, target.model.kv_bytes_per_token() * 16);
    let prompts = spec_prompts();
    let want = plain_outputs(&target, &prompts, 16);
    let e = spec_engine(target, None, tl_model::spec::SpecMethod::SelfDraft, 8, 64);
    assert_eq!(e.draft_kv_bytes(), e.kv_blocks() * kept * layer_block);
    for (p, w) in prompts.iter().zip(&want) {
        assert_eq!(&run(&e, greedy(p.clone(), 16))[0].tokens, w);
    }
    let s = wait_idle(&e);
    assert!(s.draft_forwards > 0, "the draft never ran: {s:?}");
    assert_eq!(s.draft_kv_blocks_used, 0);
}

/// Self-speculation in the server (prompt lookup, then the target with a
/// layer left out): greedy output unchanged, blocks given back.
#[test]
fn self_speculation_keeps_greedy_output_and_frees_blocks() {
    let target = synth_llm(
        "self",
        SynthSpec {
            n_layers: 4,
            ..SynthSpec::default()
        },
    );
    let prompts = spec_prompts();
    let want = plain_outputs(&target, &prompts, 20);
    let e = Arc::new(spec_engine(
        target,
        None,
        tl_model::spec::SpecMethod::SelfDraft,
        8,
        256,
    ));
    for (p, w) in prompts.iter().zip(&want) {
        assert_eq!(&run(&e, greedy(p.clone(), 20))[0].tokens, w, "alone");
    }
    assert_eq!(greedy_together(&e, &prompts, 20), want, "together");
    let s = wait_idle(&e);
    assert!(s.spec_drafted > 0, "nothing drafted: {s:?}");
    assert!(
        s.draft_forwards > 0,
        "the layer-skipping draft never ran: {s:?}"
    );
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!(s.draft_kv_blocks_used, 0);
}

/// Preemption and cancellation in the middle of draft-model speculation:
/// the preempted sequences' output is unchanged, and no block of either
/// cache stays taken.
#[test]
fn draft_model_speculation_survives_preemption_and_cancellation() {
    let target = llm();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(30 + i, 10 + i as u32)).collect();
    let want = plain_outputs(&target, &prompts, 40);
    // 12 blocks (in each cache) for 4 sequences that each grow to 5.
    let tight = Arc::new(spec_engine(
        target.clone(),
        Some(other_llm()),
        tl_model::spec::SpecMethod::Draft,
        4,
        12,
    ));
    assert_eq!(greedy_together(&tight, &prompts, 40), want);
    let s = wait_idle(&tight);
    assert!(s.preemptions > 0, "the pool was meant to run dry: {s:?}");
    assert!(s.spec_drafted > 0, "{s:?}");
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!(s.draft_kv_blocks_used, 0);

    let e = spec_engine(
        target,
        Some(llm()),
        tl_model::spec::SpecMethod::Draft,
        4,
        64,
    );
    let v = e.validate(greedy(prompt(40, 1), 400)).expect("valid");
    let mut st = e.submit(v).expect("submit");
    // Past the second speculative round: the stats published after the
    // first are in (a step's stats are published before the next step).
    for _ in 0..12 {
        assert!(matches!(st.blocking_next(), Some(Event::Delta { .. })));
    }
    let mid = e.last_stats();
    assert!(mid.draft_kv_blocks_used > 0, "{mid:?}");
    drop(st);
    let s = wait_idle(&e);
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!(s.draft_kv_blocks_used, 0);
    assert!(s.generated_tokens < 400);
}

/// A draft model of another vocabulary, or none for `draft`, is refused
/// at start with the reason.
#[test]
fn draft_model_setup_errors_are_clear() {
    let target = llm();
    let other_vocab = synth_llm(
        "vocab",
        SynthSpec {
            extra_vocab: 30,
            ..SynthSpec::default()
        },
    );
    let start = |draft: Option<Arc<Llm>>| {
        Engine::start_with_draft(
            target.clone(),
            draft,
            EngineConfig {
                scheduler: SchedulerConfig {
                    spec: Some(
                        tl_model::spec::SpecConfig::new(tl_model::spec::SpecMethod::Draft, 4)
                            .expect("cfg"),
                    ),
                    ..Default::default()
                },
                kv_bytes: 8 << 20,
                ..Default::default()
            },
        )
    };
    match start(Some(other_vocab)) {
        Err(EngineError::Setup(m)) => assert!(m.contains("vocabulary"), "{m}"),
        other => panic!("{:?}", other.err()),
    }
    match start(None) {
        Err(EngineError::Setup(m)) => assert!(m.contains("draft model"), "{m}"),
        other => panic!("{:?}", other.err()),
    }
}

/// The twin of the GPU test `cuda_engine_grammar_masks_on_the_device_match_the_host`
/// on the CPU's device-draw path: concurrent greedy requests under four
/// grammars, masks handed to the forward's sampler, give the outputs of the
/// same requests with logprobs asked for (rows read and masked by the
/// scheduler), and each follows its grammar.
#[test]
fn grammar_masks_in_the_forward_match_host_rows_with_logprobs() {
    use tl_model::constrain::GrammarSpec;
    let llm = llm();
    let specs = [
        GrammarSpec::Regex("[0-9]{3}-[a-z]{2,5}".into()),
        GrammarSpec::Gbnf("root ::= (\"yes\" | \"no\") (\", \" (\"yes\" | \"no\")){0,3}\n".into()),
        GrammarSpec::JsonObject,
        GrammarSpec::Regex("(ab|cd)+e".into()),
    ];
    let req = |i: usize, logprobs: bool| {
        let mut r = greedy(prompt(6 + i * 5, i as u32), 32);
        r.grammar = Some(("grammar", specs[i % specs.len()].clone()));
        r.logprobs = logprobs.then_some(1);
        r
    };
    let e = engine_draws(llm.clone(), 16, 1, true);
    let streams: Vec<RequestStream> = (0..8)
        .map(|i| {
            e.submit(e.validate(req(i, false)).expect("valid"))
                .expect("submit")
        })
        .collect();
    let device: Vec<Choice> = streams
        .into_iter()
        .map(|s| collect(s, 1).remove(0))
        .collect();
    let st = wait_idle(&e);
    assert!(st.masks > 0, "no mask was computed: {st:?}");
    for (i, got) in device.iter().enumerate() {
        let host = run(&e, req(i, true)).remove(0);
        assert_eq!(got.tokens, host.tokens, "request {i}");
        let text = &got.text;
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

fn engine_emit(llm: Arc<Llm>, max_batch: usize, emit_thread: bool) -> Arc<Engine> {
    engine_cfg(
        llm,
        SchedulerConfig {
            max_batch,
            max_batch_tokens: 128,
            prefix_caching: true,
            emit_thread,
            ..Default::default()
        },
        96,
    )
}

/// Events sent from the emitter thread (the GPU's setting): the same
/// choices (tokens, text, finish reason, cached tokens) as events sent
/// from the engine's thread, for concurrent requests with several choices,
/// stop strings, sampling and length limits; each stream ends with its
/// `Finished` events after its deltas (`collect` reads until the end); a
/// client that leaves mid-stream gets its blocks freed.
#[test]
fn emitter_thread_keeps_every_stream_and_frees_blocks() {
    let llm = llm();
    let free = run(
        &engine_emit(llm.clone(), 8, false),
        greedy(prompt(10, 2), 30),
    )[0]
    .text
    .clone();
    let stop: String = free.chars().skip(6).take(2).collect();
    let requests = |i: usize| {
        let mut r = greedy(prompt(10 + 3 * i, i as u32), 12 + 2 * i);
        match i % 3 {
            0 => r.stop = vec![stop.clone()],
            1 => {
                r.temperature = Some(0.8);
                r.seed = Some(5 + i as u64);
                r.n = Some(2);
            }
            _ => r.ignore_eos = true,
        }
        r
    };
    let together = |e: &Arc<Engine>| -> Vec<Vec<Choice>> {
        let streams: Vec<(RequestStream, usize)> = (0..9)
            .map(|i| {
                let v = e.validate(requests(i)).expect("valid");
                let n = v.n();
                (e.submit(v).expect("submit"), n)
            })
            .collect();
        streams.into_iter().map(|(s, n)| collect(s, n)).collect()
    };
    let direct = engine_emit(llm.clone(), 8, false);
    let want = together(&direct);
    let emitted = engine_emit(llm.clone(), 8, true);
    assert_eq!(together(&emitted), want, "the emitter changed the streams");
    assert_eq!(wait_idle(&emitted).kv_blocks_used, 0);
    // A client that leaves mid-stream.
    let v = emitted.validate(greedy(prompt(40, 1), 400)).expect("valid");
    let mut s = emitted.submit(v).expect("submit");
    for _ in 0..3 {
        assert!(matches!(s.blocking_next(), Some(Event::Delta { .. })));
    }
    drop(s);
    let st = wait_idle(&emitted);
    assert_eq!(st.kv_blocks_used, 0);
    assert!(st.generated_tokens < 400 + 200);
}
