//! Constrained decoding on the real test models: the output follows the
//! JSON schema / GBNF grammar / regex whatever the model would rather say,
//! sampled or greedy; invalid grammars are clear errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#[allow(dead_code)]
mod common;

use serde_json::{json, Value};
use tl_model::constrain::GrammarSpec;
use tl_model::llm::{GenerateOptions, Llm};
use tl_model::sampler::SamplingParams;
use tl_tokenizer::ChatMessage;

fn qwen() -> Llm {
    Llm::load(common::model_path("qwen2.5-coder-0.5b-instruct-q4.gguf")).expect("loads")
}

fn chat_prompt(llm: &Llm, user: &str) -> String {
    llm.chat_prompt(&[ChatMessage::new("user", user)])
        .expect("template")
}

fn run(llm: &Llm, prompt: &str, spec: &GrammarSpec, temp: f32, seed: u64) -> (String, Value) {
    let c = llm.constraint(spec).expect("compiles");
    let opts = GenerateOptions {
        max_tokens: 200,
        sampling: SamplingParams {
            temperature: temp,
            seed,
            ..Default::default()
        },
        constraint: Some(c),
        ..Default::default()
    };
    let out = llm.generate(prompt, &opts, |_| true).expect("generates");
    let v = serde_json::from_str(&out.text).unwrap_or(Value::Null);
    (out.text, v)
}

#[test]
fn json_schema_output_validates_greedy_and_sampled() {
    let llm = qwen();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    });
    // A prompt that asks for prose, so the grammar has to overrule it.
    let prompt = chat_prompt(&llm, "Write a short poem about the sea.");
    for (temp, seed) in [(0.0, 0), (0.8, 1), (0.8, 2), (1.2, 3)] {
        let (text, v) = run(
            &llm,
            &prompt,
            &GrammarSpec::JsonSchema(schema.clone()),
            temp,
            seed,
        );
        let o = v
            .as_object()
            .unwrap_or_else(|| panic!("not a JSON object: {text:?}"));
        assert_eq!(o.len(), 3, "{text}");
        assert!(
            o["name"].as_str().is_some_and(|s| s.chars().count() <= 20),
            "{text}"
        );
        assert!(
            o["age"].as_i64().is_some_and(|a| (0..=150).contains(&a)),
            "{text}"
        );
        let tags = o["tags"].as_array().expect("tags");
        assert!(tags.len() <= 3, "{text}");
        assert!(
            tags.iter()
                .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap_or(""))),
            "{text}"
        );
    }
}

#[test]
fn json_object_and_gbnf_and_regex() {
    let llm = qwen();
    let prompt = chat_prompt(&llm, "Tell me about yourself.");
    let (text, v) = run(&llm, &prompt, &GrammarSpec::JsonObject, 0.7, 5);
    assert!(v.is_object(), "{text:?}");

    // llama.cpp's GBNF: a list of one to three yes/no answers.
    let gbnf = "root ::= answer (\", \" answer){0,2} \".\"\nanswer ::= (\"yes\" | \"no\")\n";
    for seed in 0..3 {
        let (text, _) = run(&llm, &prompt, &GrammarSpec::Gbnf(gbnf.into()), 1.0, seed);
        let body = text.strip_suffix('.').unwrap_or_else(|| panic!("{text:?}"));
        let parts: Vec<&str> = body.split(", ").collect();
        assert!((1..=3).contains(&parts.len()), "{text:?}");
        assert!(parts.iter().all(|p| *p == "yes" || *p == "no"), "{text:?}");
    }

    let (text, _) = run(
        &llm,
        &prompt,
        &GrammarSpec::Regex("[0-9]{3}-[0-9]{4}".into()),
        1.0,
        9,
    );
    assert_eq!(text.len(), 8, "{text:?}");
    assert!(
        text.chars()
            .enumerate()
            .all(|(i, c)| if i == 3 { c == '-' } else { c.is_ascii_digit() }),
        "{text:?}"
    );
}

#[test]
fn invalid_grammars_are_clear_errors() {
    let llm = qwen();
    for (spec, want) in [
        (
            GrammarSpec::Gbnf("root ::= missing".into()),
            "rule `missing` is not defined",
        ),
        (
            GrammarSpec::Gbnf("root ::= \"a".into()),
            "line 1: unterminated string",
        ),
        (
            GrammarSpec::JsonSchema(json!({"type": "no-such-type"})),
            "invalid JSON schema",
        ),
        (GrammarSpec::Lark("start: (".into()), "invalid Lark grammar"),
    ] {
        let e = llm.constraint(&spec).expect_err("an error").to_string();
        assert!(e.contains(want), "{spec:?}: {e}");
    }
}

#[test]
fn gemma_json_schema() {
    // A SentencePiece vocabulary (byte tokens, ▁ spaces) as well.
    let llm = Llm::load(common::model_path("gemma-3-270m-q4_k_m.gguf")).expect("loads");
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer", "minimum": 0, "maximum": 9999}}, "required": ["city", "n"]});
    let prompt = chat_prompt(&llm, "Name a city and a number as JSON.");
    let (text, v) = run(&llm, &prompt, &GrammarSpec::JsonSchema(schema), 0.0, 0);
    assert!(
        v["city"].is_string() && v["n"].as_u64().is_some_and(|n| n <= 9999),
        "{text:?}"
    );
}

/// Speculative verification under a lazy grammar (`verify_lazy`), with
/// hand-made target rows on the Qwen vocabulary: before the trigger a
/// draft is accepted iff it is the target's pick; the round ends with the
/// trigger, whether it was a draft or the target's own token, and the
/// drafts after it are not emitted even where the target's rows agree with
/// them (they are free text, which the grammar refuses); the trigger
/// counts as outside the cache. A text trigger (a ```json fence) works on
/// the text of the drafts, however the tokens split it.
#[test]
fn lazy_verification_ends_the_round_at_the_trigger() {
    use tl_model::constrain::Trigger;
    use tl_model::sampler::Sampler;
    use tl_model::spec::{verify_lazy, Verified};
    use tl_tokenizer::EncodeOptions;
    let llm = qwen();
    let tok = &llm.tokenizer;
    let vocab = llm.model.config.vocab;
    let ids = |s: &str| {
        tok.encode(
            s,
            EncodeOptions {
                add_special: false,
                parse_special: true,
            },
        )
        .unwrap()
    };
    // Rows whose argmax is each of `picks`.
    let rows = |picks: &[u32]| {
        let mut r = vec![0.0f32; vocab * picks.len()];
        for (i, &p) in picks.iter().enumerate() {
            r[i * vocab + p as usize] = 10.0;
        }
        r
    };
    let tc = tok.token_id("<tool_call>").unwrap();
    let token_lazy = GrammarSpec::Lazy {
        trigger: Trigger::Token(tc),
        grammar: Box::new(GrammarSpec::Lark(format!(
            "start: <[{tc}]> \"=\" /[0-9]{{2,3}}/ \";\"\n"
        ))),
    };
    let greedy = || Sampler::new(SamplingParams::default()).unwrap();
    let text = ids("Let me check");
    let (a, b, x) = (text[0], text[1], ids("Sure")[0]);
    // The trigger as the third draft; the target agrees with every draft.
    let mut c = llm.constraint(&token_lazy).unwrap();
    let drafts = [a, b, tc, x, x];
    let mut r = rows(&[a, b, tc, x, x, x]);
    let (v, done) = verify_lazy(&mut greedy(), &mut r, vocab, &drafts, &[1], &mut c).unwrap();
    assert_eq!(
        v,
        Verified {
            accepted: 2,
            tokens: vec![a, b, tc]
        }
    );
    assert!(!done && !c.is_waiting() && c.needs_mask());
    // What follows is the grammar's, not the drafts'.
    let forced = c.take_forced();
    assert_eq!(tok.decode(&forced, Default::default()).unwrap(), "=");
    // The trigger as the target's token after a rejected draft.
    let mut c = llm.constraint(&token_lazy).unwrap();
    let mut r = rows(&[a, tc, x]);
    let (v, _) = verify_lazy(&mut greedy(), &mut r, vocab, &[a, x], &[1], &mut c).unwrap();
    assert_eq!(v.tokens, vec![a, tc]);
    assert_eq!(v.accepted, 1);
    assert!(!c.is_waiting());
    // No trigger: as the plain rule, and the constraint still waits.
    let mut c = llm.constraint(&token_lazy).unwrap();
    let mut r = rows(&[a, b, x]);
    let (v, _) = verify_lazy(&mut greedy(), &mut r, vocab, &[a, b], &[1], &mut c).unwrap();
    assert_eq!(
        v,
        Verified {
            accepted: 2,
            tokens: vec![a, b, x]
        }
    );
    assert!(c.is_waiting());

    // A fence trigger, the opening split over several drafts however the
    // tokens fall; the round ends with the token that completes it.
    let fence_lazy = GrammarSpec::Lazy {
        trigger: Trigger::Fence {
            lang: "json".into(),
            token: None,
        },
        grammar: Box::new(GrammarSpec::Lark(
            "start: \"```json\" /[ \\t]*\\n/ %json {\"type\": \"object\"} \"\\n```\"\n".into(),
        )),
    };
    let byte = |s: &str| -> Vec<u32> { s.chars().map(|ch| ids(&ch.to_string())[0]).collect() };
    for split in [ids("```json\n{\"a\": 1}"), byte("```json\n{\"a\": 1}")] {
        let n_open = (1..=split.len())
            .find(|&n| {
                tok.decode(&split[..n], Default::default())
                    .unwrap()
                    .starts_with("```json\n")
            })
            .unwrap();
        let mut c = llm.constraint(&fence_lazy).unwrap();
        let mut r = rows(&[split.as_slice(), &[x]].concat());
        let (v, _) = verify_lazy(&mut greedy(), &mut r, vocab, &split, &[1], &mut c).unwrap();
        assert_eq!(v.tokens, split[..n_open], "{split:?}");
        assert_eq!(v.accepted, n_open - 1);
        assert!(!c.is_waiting() && c.needs_mask());
    }
    // A ```python fence stays free: every draft accepted.
    let mut c = llm.constraint(&fence_lazy).unwrap();
    let py = ids("```python\nx = 1");
    let mut r = rows(&[py.as_slice(), &[x]].concat());
    let (v, _) = verify_lazy(&mut greedy(), &mut r, vocab, &py, &[1], &mut c).unwrap();
    assert_eq!(v.accepted, py.len());
    assert!(c.is_waiting() && !c.needs_mask());
}
