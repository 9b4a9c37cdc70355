#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Every architecture on tiny synthetic models: loads, generates, is batch
//! invariant and frees its KV blocks; malformed models give errors naming
//! the problem.

use tl_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use tl_model::generate::{Runner, TokenOptions};
use tl_model::model::Model;
use tl_model::synth::{synthesize, SynthArch, SynthSpec};
use tl_model::ModelError;

fn model(arch: SynthArch, weight_type: GgmlType) -> Model {
    let spec = SynthSpec {
        arch,
        weight_type,
        output_type: weight_type,
        seed: 11,
        ..Default::default()
    };
    let bytes = synthesize(&spec).expect("synth").to_bytes().expect("bytes");
    Model::from_file(GgufFile::from_bytes(bytes).expect("parses")).expect("loads")
}

#[test]
fn every_architecture_generates_batch_invariantly() {
    for (arch, ty) in [
        (SynthArch::Llama, GgmlType::Q4_0),
        (SynthArch::Qwen2, GgmlType::Q8_0),
        (SynthArch::Gemma3, GgmlType::Q4_K),
        (SynthArch::Llama, GgmlType::F16),
        (SynthArch::Olmo2, GgmlType::Q8_0),
        (SynthArch::CommandR, GgmlType::Q4_0),
    ] {
        let m = model(arch, ty);
        let prompts: Vec<Vec<u32>> = vec![
            vec![1, 40, 41, 42],
            vec![1, 300, 7],
            vec![1, 5, 6, 7, 8, 9, 10],
        ];
        let opts = TokenOptions {
            max_tokens: 6,
            ..Default::default()
        };
        let mut r = Runner::new(&m, 256).expect("cache");
        let together = r
            .generate_batch(&prompts, &opts, |_, _| true)
            .expect("batch");
        for (p, t) in prompts.iter().zip(&together) {
            assert_eq!(t.0.len(), 6, "{arch:?}");
            let alone = r
                .generate_batch(std::slice::from_ref(p), &opts, |_, _| true)
                .expect("alone");
            assert_eq!(alone[0].0, t.0, "{arch:?} {ty}: batched and alone differ");
        }
        // Chunked prefill gives the same tokens as one-shot prefill.
        let chunked = TokenOptions {
            prefill_chunk: 2,
            ..opts.clone()
        };
        let c = r
            .generate_batch(&prompts[2..], &chunked, |_, _| true)
            .expect("chunked");
        assert_eq!(c[0].0, together[2].0, "{arch:?}: chunked prefill differs");
        assert_eq!(
            r.blocks.n_free(),
            r.blocks.n_total(),
            "{arch:?}: leaked blocks"
        );
    }
}

#[test]
fn kv_cache_exhaustion_is_an_error_not_a_panic() {
    let m = model(SynthArch::Qwen2, GgmlType::Q8_0);
    let mut r = Runner::new(&m, 16).expect("cache"); // one block
    let long: Vec<u32> = (0..40).map(|i| 260 + i % 50).collect();
    let err = r
        .generate_batch(&[long], &TokenOptions::default(), |_, _| true)
        .expect_err("does not fit");
    assert!(matches!(err, ModelError::KvFull { .. }), "{err}");
    assert_eq!(r.blocks.n_free(), r.blocks.n_total());
}

fn rewrite(f: impl FnOnce(&mut GgufWriter)) -> Result<Model, ModelError> {
    let bytes = synthesize(&SynthSpec::default())
        .expect("synth")
        .to_bytes()
        .expect("bytes");
    let file = GgufFile::from_bytes(bytes).expect("parses");
    let mut w = GgufWriter::from_file(&file);
    f(&mut w);
    Model::from_file(GgufFile::from_bytes(w.to_bytes().expect("bytes")).expect("parses"))
}

#[test]
fn malformed_models_name_the_problem() {
    let e = rewrite(|w| w.set("general.architecture", Value::String("mamba".into())))
        .err()
        .expect("unknown arch");
    let msg = e.to_string();
    assert!(
        msg.contains("mamba") && msg.contains(tl_model::config::SUPPORTED_ARCHS),
        "{msg}"
    );

    // RoPE scaling tl does not apply is refused, naming it.
    for (kind, factor, want) in [
        ("longrope", 4.0, "rope scaling type \"longrope\""),
        ("yarn", -2.0, "rope scaling factor -2"),
    ] {
        let e = rewrite(|w| {
            w.set("qwen2.rope.scaling.type", Value::String(kind.into()));
            w.set("qwen2.rope.scaling.factor", Value::F32(factor));
        })
        .err()
        .expect("refused scaling");
        assert!(e.to_string().contains(want), "{e}");
    }
    let e = rewrite(|w| w.set("qwen2.rope.scaling.attn_factor", Value::F32(0.0)))
        .err()
        .expect("bad magnitude factor");
    assert!(e.to_string().contains("rope.scaling.attn_factor"), "{e}");

    let e = rewrite(|w| {
        w.set("general.architecture", Value::String("qwen2".into()));
        w.set("qwen2.feed_forward_length", Value::U32(1024));
    })
    .err()
    .expect("wrong shape");
    let msg = e.to_string();
    assert!(msg.contains("blk.0.ffn_gate.weight"), "{msg}");

    let e = rewrite(|w| w.set("qwen2.block_count", Value::U32(3)))
        .err()
        .expect("missing tensor");
    assert!(e.to_string().contains("blk.2."), "{e}");

    let e = rewrite(|w| w.set("qwen2.attention.head_count_kv", Value::U32(3)))
        .err()
        .expect("bad heads");
    assert!(e.to_string().contains("KV heads"), "{e}");
}

#[test]
fn out_of_vocab_tokens_and_context_overflow_are_errors() {
    let m = model(SynthArch::Qwen2, GgmlType::Q8_0);
    let mut r = Runner::new(&m, 64).expect("cache");
    let e = r
        .generate_batch(&[vec![1, 99_999]], &TokenOptions::default(), |_, _| true)
        .expect_err("bad token");
    assert!(e.to_string().contains("99999"), "{e}");
    assert_eq!(r.blocks.n_free(), r.blocks.n_total());
    let too_long: Vec<u32> = vec![5; 600]; // synthetic context is 512
    let e = r
        .generate_batch(&[too_long], &TokenOptions::default(), |_, _| true)
        .expect_err("too long");
    assert!(matches!(e, ModelError::ContextOverflow { .. }), "{e}");
}
