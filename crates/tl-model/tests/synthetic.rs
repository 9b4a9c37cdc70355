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
        ("longrope", 4.0, "qwen2.rope.scaling.type \"longrope\""),
        ("yarn", -2.0, "qwen2.rope.scaling.factor -2"),
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

fn rewrite_spec(spec: &SynthSpec, f: impl FnOnce(&mut GgufWriter)) -> Result<Model, ModelError> {
    let bytes = synthesize(spec).expect("synth").to_bytes().expect("bytes");
    let file = GgufFile::from_bytes(bytes).expect("parses");
    let mut w = GgufWriter::from_file(&file);
    f(&mut w);
    Model::from_file(GgufFile::from_bytes(w.to_bytes().expect("bytes")).expect("parses"))
}

/// The `rope.scaling.yarn_*` keys where llama.cpp reads them (mistral3):
/// nonsense values are refused naming the key; where it ignores them
/// (qwen2), so does tl, whatever they hold.
#[test]
fn yarn_keys_are_checked_where_read_and_ignored_elsewhere() {
    let spec = |arch| SynthSpec {
        arch,
        yarn_factor: 8.0,
        ..Default::default()
    };
    let mistral = spec(SynthArch::Mistral3);
    for (key, v, want) in [
        ("rope.scaling.yarn_beta_fast", -1.0, "must be positive"),
        ("rope.scaling.yarn_beta_slow", f32::NAN, "must be positive"),
        (
            "rope.scaling.yarn_log_multiplier",
            -0.5,
            "0 (off) or positive",
        ),
        ("rope.scaling.yarn_beta_slow", 64.0, "is below"),
        (
            "attention.temperature_scale",
            f32::INFINITY,
            "must be finite",
        ),
    ] {
        let e = rewrite_spec(&mistral, |w| {
            w.set(format!("mistral3.{key}"), Value::F32(v))
        })
        .err()
        .unwrap_or_else(|| panic!("mistral3.{key} = {v} accepted"));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("mistral3.{key}")) && msg.contains(want),
            "{msg}"
        );
    }
    let m = rewrite_spec(&mistral, |w| {
        w.set("mistral3.rope.scaling.yarn_beta_fast", Value::F32(16.0));
        w.set("mistral3.rope.scaling.yarn_beta_slow", Value::F32(2.0));
        w.set("mistral3.rope.scaling.yarn_log_multiplier", Value::F32(1.0));
    })
    .expect("valid keys");
    let y = m.config.yarn.expect("yarn");
    assert_eq!((y.beta_fast, y.beta_slow, y.ext_factor), (16.0, 2.0, 1.0));
    // Log multiplier 1: get_mscale(8, 1) / get_mscale(8, 1) = 1, then
    // divided by 1 + 0.1 ln 8.
    assert!((y.attn_factor - 1.0 / (1.0 + 0.1 * 8f32.ln())).abs() < 1e-6);

    let qwen = spec(SynthArch::Qwen2);
    let plain = rewrite_spec(&qwen, |_| {}).expect("qwen2").config.yarn;
    let m = rewrite_spec(&qwen, |w| {
        for key in [
            "yarn_ext_factor",
            "yarn_attn_factor",
            "yarn_beta_fast",
            "yarn_beta_slow",
            "yarn_log_multiplier",
        ] {
            w.set(format!("qwen2.rope.scaling.{key}"), Value::F32(-7.0));
        }
    })
    .expect("keys llama.cpp ignores for qwen2");
    assert_eq!(m.config.yarn, plain);

    // Every key's check, for the architectures that read them all (Grok
    // in llama.cpp).
    let mut md = tl_gguf::Metadata::new();
    let all = [
        "yarn_ext_factor",
        "yarn_attn_factor",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_log_multiplier",
    ];
    md.insert("x.rope.scaling.yarn_ext_factor", Value::F32(-1.0));
    md.insert("x.rope.scaling.yarn_attn_factor", Value::F32(0.5));
    let k = tl_model::config::YarnKeys::read_keys(&md, "x", &all).expect("valid");
    assert_eq!((k.ext_factor, k.attn_factor), (None, Some(0.5)));
    for (key, v) in [("yarn_ext_factor", 1.5), ("yarn_attn_factor", 0.0)] {
        let mut bad = md.clone();
        bad.insert(format!("x.rope.scaling.{key}"), Value::F32(v));
        let e = tl_model::config::YarnKeys::read_keys(&bad, "x", &all).expect_err("bad value");
        assert!(
            e.to_string().contains(&format!("x.rope.scaling.{key}")),
            "{e}"
        );
    }
}

/// The runtime context LongRoPE's factor set is chosen by: llama.cpp's
/// `n_ctx` rounded up to 256 (its `n_ctx_seq`), the training context when
/// none is given (which factors each gives is checked against llama.cpp in
/// synth_vs_llama).
#[test]
fn the_rope_context_is_llama_cpps_rounded_n_ctx() {
    let spec = SynthSpec {
        arch: SynthArch::Phi3,
        long_rope_ctx: 1024,
        context: 500,
        ..Default::default()
    };
    let bytes = synthesize(&spec).expect("synth").to_bytes().expect("bytes");
    let rope_ctx = |ctx| {
        let f = GgufFile::from_bytes(bytes.clone()).expect("parses");
        let m = Model::from_file_ctx(f, tl_core::Device::Cpu, ctx).expect("load");
        m.config.rope_ctx
    };
    assert_eq!(rope_ctx(0), 512);
    assert_eq!(rope_ctx(1000), 1024);
    assert_eq!(rope_ctx(1025), 1280);
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
