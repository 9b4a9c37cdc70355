//! gpt-oss's chat template (the harmony format: channels, a developer turn,
//! tools as a TypeScript namespace, `<|call|>`/`<|return|>`) renders through
//! tl's minijinja setup exactly as Jinja2 renders it the way HF transformers
//! sets it up (fixture: scripts/make_gpt_oss_chat_fixtures.py). The template
//! prints today's date (`strftime_now`); the fixture was rendered with a
//! fixed one, put in place of today's here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;

use tl_tokenizer::{ChatMessage, ChatTemplate, RenderOptions};

/// `text` with the date after "Current date: " replaced by `date`.
fn with_date(text: &str, date: &str) -> String {
    const TAG: &str = "Current date: ";
    match text.find(TAG) {
        Some(at) => {
            let start = at + TAG.len();
            let end = (start + date.len()).min(text.len());
            format!("{}{date}{}", &text[..start], &text[end..])
        }
        None => text.to_string(),
    }
}

#[test]
fn gpt_oss_template_renders_like_jinja2() {
    let fx = common::fixture("gpt_oss_chat.json");
    let date = fx["date"].as_str().unwrap();
    let tmpl = ChatTemplate::new(
        fx["template"].as_str().unwrap(),
        "gpt-oss",
        "<|startoftext|>",
        "<|return|>",
    )
    .unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let opts = RenderOptions {
            add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
            tools: (!c["tools"].is_null()).then(|| c["tools"].clone()),
            extra: c["extra"].as_object().unwrap().clone(),
        };
        let got = tmpl
            .render(&msgs, &opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            with_date(&got, date),
            c["expected"].as_str().unwrap(),
            "{name}"
        );
    }
}
