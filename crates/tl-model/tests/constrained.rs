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
