//! `tool_choice: "auto"` on the real Qwen2.5 vocabulary: the reply is
//! free text until the tool-call trigger, and a valid call from there.
//!
//! The "model" here is a script (the text it would like to write): each
//! pick prefers the script's next token when the grammar allows it, and
//! otherwise takes what the grammar allows (ending if it may, else the
//! longest allowed token), so the tests see exactly where the grammar
//! overrules the text and where it leaves it alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use serde_json::{json, Value};
use tl_model::constrain::{Constraint, GrammarSpec};
use tl_model::llm::Llm;
use tl_server::tools::{harmony_call_grammar, lazy_grammar, parse_calls, ToolChoice, ToolFormat};
use tl_tokenizer::EncodeOptions;

fn model_path(name: &str) -> PathBuf {
    tl_gguf::cached_model(name).unwrap_or_else(|e| panic!("{e}"))
}

fn qwen() -> &'static Llm {
    static LLM: std::sync::OnceLock<Llm> = std::sync::OnceLock::new();
    LLM.get_or_init(|| Llm::load(model_path("qwen2.5-coder-0.5b-instruct-q4.gguf")).expect("loads"))
}

fn weather() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": false}}}])
}

/// [`weather`] and a second function whose name also starts with `get`.
fn two() -> Value {
    let mut t = weather();
    t.as_array_mut()
        .unwrap()
        .push(json!({"type": "function", "function": {
        "name": "get_news", "parameters": {"type": "object",
        "properties": {"topic": {"type": "string"}}, "required": ["topic"],
        "additionalProperties": false}}}));
    t
}

/// What one scripted generation did.
struct Run {
    text: String,
    /// Per pick: whether the row the draw saw was masked.
    masked: Vec<bool>,
    /// Per pick: whether the script's token was refused.
    overruled: Vec<bool>,
}

fn drive(llm: &Llm, c: &mut Constraint, script: &str, max: usize) -> Run {
    drive_split(llm, c, script, max, false)
}

/// [`drive`], the script's tokens one character each when `chars` (the
/// same text in other tokens).
fn drive_split(llm: &Llm, c: &mut Constraint, script: &str, max: usize, chars: bool) -> Run {
    let tok = &llm.tokenizer;
    let vocab = llm.model.config.vocab;
    let eos = tok.eot().or(tok.eog_ids().first().copied()).unwrap();
    let opts = EncodeOptions {
        add_special: false,
        parse_special: true,
    };
    let piece =
        |t: u32| String::from_utf8_lossy(tok.token_to_piece(t, false).unwrap()).into_owned();
    let mut run = Run {
        text: String::new(),
        masked: Vec::new(),
        overruled: Vec::new(),
    };
    let norm = |s: &str| -> String { s.chars().filter(|c| !c.is_ascii_whitespace()).collect() };
    let script_norm = norm(script);
    for _ in 0..max {
        let want = match script.strip_prefix(run.text.as_str()) {
            Some("") => Some(eos),
            Some(rest) if chars => {
                let ch = rest.chars().next().unwrap().to_string();
                tok.encode(&ch, opts).unwrap().first().copied()
            }
            Some(rest) => tok.encode(rest, opts).unwrap().first().copied(),
            None => None,
        };
        // Off the script: back onto it where only blanks differ, or after
        // the longest end of the text (4 characters at least) that the
        // script has (past a refused name, at its `"arguments"`).
        let text_norm = norm(&run.text);
        let rest = match script_norm.strip_prefix(text_norm.as_str()) {
            Some(r) => r.to_string(),
            None => (4..=text_norm.len().min(40))
                .rev()
                .filter(|&k| text_norm.is_char_boundary(text_norm.len() - k))
                .find_map(|k| {
                    let end = &text_norm[text_norm.len() - k..];
                    script_norm
                        .find(end)
                        .map(|p| script_norm[p + k..].to_string())
                })
                .unwrap_or_default(),
        };
        let mut row = vec![0.0f32; vocab];
        if let Some(w) = want {
            row[w as usize] = 10.0;
        }
        let mut masked = false;
        let mut overruled = false;
        let picked = c
            .pick(&mut row, |row| {
                masked = row.contains(&f32::NEG_INFINITY);
                overruled = false;
                if let Some(w) = want.filter(|&w| row[w as usize].is_finite()) {
                    return w;
                }
                overruled = want.is_some();
                let allowed = (0..vocab as u32).filter(|&t| row[t as usize].is_finite());
                let resync = allowed
                    .clone()
                    .map(|t| (t, norm(&piece(t))))
                    .filter(|(_, p)| !p.is_empty() && rest.starts_with(p.as_str()))
                    // (Blanks the script has are forced by the grammar:
                    // of equal tokens, the one without them.)
                    .max_by_key(|(t, p)| (piece(*t).len() == p.len(), p.len(), u32::MAX - t));
                if let Some((t, _)) = resync {
                    return t;
                }
                if row[eos as usize].is_finite() {
                    return eos;
                }
                allowed
                    .filter(|&t| !norm(&piece(t)).is_empty())
                    .max_by_key(|&t| (piece(t).len(), u32::MAX - t))
                    .unwrap()
            })
            .expect("pick");
        run.masked.push(masked);
        run.overruled.push(overruled);
        let Some(t) = picked else {
            break;
        };
        if tok.eog_ids().contains(&t) {
            break;
        }
        run.text.push_str(&piece(t));
        for f in c.take_forced() {
            run.text.push_str(&piece(f));
        }
    }
    run
}

fn lazy(fmt: ToolFormat, parallel: bool) -> Constraint {
    lazy_with(fmt, &weather(), parallel)
}

fn lazy_with(fmt: ToolFormat, tools: &Value, parallel: bool) -> Constraint {
    let spec = lazy_grammar(fmt, &qwen().tokenizer, tools, parallel)
        .expect("grammar")
        .expect("a trigger in this vocabulary");
    assert!(matches!(spec, GrammarSpec::Lazy { .. }));
    qwen().constraint(&spec).expect("compiles")
}

/// The calls in `text`, each checked against the tool's parameter schema.
fn check_calls(text: &str, fmt: ToolFormat, n: usize) -> (String, Vec<Value>) {
    let (before, calls) = parse_calls(fmt, text, &["get_weather".to_string()])
        .unwrap_or_else(|| panic!("no tool call in {text:?}"));
    assert_eq!(calls.len(), n, "{text:?}");
    let mut all = Vec::new();
    for c in calls {
        assert_eq!(c.name, "get_weather");
        let args: Value = serde_json::from_str(&c.arguments).expect("arguments are JSON");
        let o = args.as_object().expect("an object");
        assert_eq!(o.len(), 2, "{args}");
        assert!(o["city"].is_string(), "{args}");
        assert!(
            o["unit"] == "celsius" || o["unit"] == "fahrenheit",
            "{args}"
        );
        all.push(args);
    }
    (before, all)
}

fn check_call(text: &str, fmt: ToolFormat) -> (String, Value) {
    let (before, mut all) = check_calls(text, fmt, 1);
    (before, all.remove(0))
}

#[test]
fn text_then_hermes_call_is_constrained_from_the_trigger() {
    let llm = qwen();
    let mut c = lazy(ToolFormat::Hermes, true);
    let text = "Let me look that up for you.\n";
    let script = format!(
        "{text}<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Paris\", \"unit\": \"kelvin\"}}}}\n</tool_call>"
    );
    let run = drive(llm, &mut c, &script, 200);
    // The text before the trigger is the script's, picked from rows the
    // grammar did not touch.
    assert!(run.text.starts_with(text), "{:?}", run.text);
    let before = llm
        .tokenizer
        .encode(
            text,
            EncodeOptions {
                add_special: false,
                parse_special: true,
            },
        )
        .unwrap()
        .len();
    assert!(
        run.masked[..=before].iter().all(|m| !m),
        "masked before the trigger: {:?}",
        run.masked
    );
    // From the trigger on the grammar holds: the made-up unit is refused.
    assert!(
        run.masked[before + 1..].iter().any(|m| *m),
        "{:?}",
        run.masked
    );
    assert!(
        run.overruled.iter().any(|o| *o),
        "the script's 'kelvin' went through"
    );
    let (content, args) = check_call(&run.text, ToolFormat::Hermes);
    assert_eq!(content, text.trim());
    assert_eq!(args["city"], "Paris");

    // Parallel calls: a second block after the first.
    let mut c = lazy(ToolFormat::Hermes, true);
    let call = |city: &str, unit: &str| {
        format!("<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\", \"unit\": \"{unit}\"}}}}\n</tool_call>")
    };
    let script = format!(
        "Two calls.\n{}\n{}",
        call("Paris", "celsius"),
        call("Rome", "kelvin")
    );
    let run = drive(llm, &mut c, &script, 200);
    let (content, args) = check_calls(&run.text, ToolFormat::Hermes, 2);
    assert_eq!(content, "Two calls.");
    assert_eq!(args[0]["unit"], "celsius");
    assert_eq!(args[1]["city"], "Rome");
    assert_eq!(args[1]["unit"], "fahrenheit", "{:?}", run.text);
}

#[test]
fn without_the_trigger_the_text_is_untouched() {
    let llm = qwen();
    for fmt in [ToolFormat::Hermes, ToolFormat::Json] {
        let mut c = lazy(fmt, true);
        let script = "The weather in Paris is usually mild in May: around 20 °C, {sometimes} rain.";
        let run = drive(llm, &mut c, script, 200);
        assert_eq!(run.text, script, "{fmt:?}");
        assert!(run.masked.iter().all(|m| !m), "{fmt:?}: {:?}", run.masked);
        assert!(!c.needs_mask(), "{fmt:?}");
        assert!(parse_calls(fmt, &run.text, &["get_weather".to_string()]).is_none());
    }
}

#[test]
fn a_reply_opening_with_a_brace_is_a_constrained_json_call() {
    let llm = qwen();
    // Leading blanks, then the call with a unit the schema refuses.
    let mut c = lazy(ToolFormat::Json, false);
    let script = "\n {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\", \"unit\": \"kelvin\"}}";
    let run = drive(llm, &mut c, script, 200);
    assert!(run.overruled.iter().any(|o| *o), "{:?}", run.text);
    let (_, args) = check_call(&run.text, ToolFormat::Json);
    assert_eq!(args["city"], "Oslo");
    assert!(
        run.text.starts_with("\n {\"name\": \"get_weather\""),
        "{:?}",
        run.text
    );

    // A first token the grammar refuses (`{` then a newline: the call is
    // written compactly) is drawn again under the grammar.
    let mut c = lazy(ToolFormat::Json, false);
    let script = "{\n\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\", \"unit\": \"celsius\"}}";
    let run = drive(llm, &mut c, script, 200);
    assert!(run.overruled[0], "{:?}", run.text);
    assert!(
        run.masked[0],
        "the first pick was not redrawn under the mask"
    );
    check_call(&run.text, ToolFormat::Json);
}

/// On a GPU a lazy constraint waiting for its trigger token lets the token
/// be drawn on the device; the scheduler shows it to the constraint, and
/// the trigger turns the grammar on (with the tokens it forces next).
/// Hermes' reply start, which may open a ```json fence, is drawn on the
/// host until it cannot.
#[test]
fn tokens_drawn_elsewhere_turn_a_lazy_constraint_on() {
    let llm = qwen();
    let tok = &llm.tokenizer;
    let opts = EncodeOptions {
        add_special: false,
        parse_special: true,
    };
    let mut c = lazy(ToolFormat::Hermes, false);
    let text = tok.encode("Sure, one moment.\n", opts).unwrap();
    assert!(c.needs_logits() && !c.needs_mask());
    let mut row = vec![0.0f32; llm.model.config.vocab];
    row[text[0] as usize] = 1.0;
    let first = c
        .pick(&mut row, |r| tl_model::sampler::argmax(r))
        .expect("pick");
    assert_eq!(first, Some(text[0]));
    for &t in &text[1..] {
        assert!(!c.needs_logits());
        c.observe(t).expect("free text");
        assert!(c.take_forced().is_empty());
    }
    c.observe(tok.token_id("<tool_call>").unwrap())
        .expect("the trigger");
    assert!(c.needs_logits() && c.needs_mask());
    let forced: String = c
        .take_forced()
        .iter()
        .map(|&t| String::from_utf8_lossy(tok.token_to_piece(t, false).unwrap()).into_owned())
        .collect();
    assert!(
        forced.starts_with("\n{\"name\": \"get_weather\", \"arguments\": {"),
        "{forced:?}"
    );
    // Once on, every token needs the mask.
    assert!(c.observe(tok.encode("x", opts).unwrap()[0]).is_err());
    // A reply that may open with `{` is decided on the host from the start.
    assert!(lazy(ToolFormat::Json, false).needs_logits());
}

/// Harmony's forced call (`tool_choice: "required"`), compiled on the
/// Qwen vocabulary with its two rendered special tokens standing in for
/// harmony's markers (`<tool_call>` for `<|channel|>` and `<|constrain|>`,
/// `</tool_call>` for `<|message|>`; no harmony vocabulary is at hand):
/// prose is refused from the first token; the call passes as written; a
/// unit outside the schema's enum is overruled; read back (markers
/// renamed) as harmony, each is one valid call.
#[test]
fn harmony_forced_call_grammar_compiles_and_forces_the_call() {
    let llm = qwen();
    let tok = &llm.tokenizer;
    let (open, close) = (
        tok.token_id("<tool_call>").unwrap(),
        tok.token_id("</tool_call>").unwrap(),
    );
    let spec = harmony_call_grammar([open, open, close], &weather(), &ToolChoice::Required)
        .expect("grammar");
    let compile = || llm.constraint(&spec).expect("compiles");
    let prose = drive(llm, &mut compile(), "Sure, it is sunny in Paris.", 1);
    let head = "<tool_call>commentary to=functions.get_weather <tool_call>json</tool_call>";
    // (After the first token the header is the only way on: the grammar
    // forces it, with the opening of the arguments.)
    assert_eq!(prose.overruled, [true]);
    assert!(
        prose.text.starts_with(&format!("{head}{{")),
        "{:?}",
        prose.text
    );
    for (args, overruled) in [
        (r#"{"city": "Paris", "unit": "celsius"}"#, false),
        (r#"{"city": "Paris", "unit": "kelvin"}"#, true),
    ] {
        let script = format!("{head}{args}");
        let run = drive(llm, &mut compile(), &script, 60);
        assert_eq!(
            run.overruled.iter().any(|&o| o),
            overruled,
            "{:?}",
            run.text
        );
        let text = run
            .text
            .replacen("<tool_call>", "<|channel|>", 1)
            .replacen("<tool_call>", "<|constrain|>", 1)
            .replacen("</tool_call>", "<|message|>", 1);
        let p = tl_server::harmony::parse(&text, true);
        assert!(p.content.is_empty() && p.reasoning.is_empty(), "{p:?}");
        assert_eq!(p.calls.len(), 1, "{text:?}");
        assert_eq!(p.calls[0].name, "get_weather");
        let v: Value = serde_json::from_str(&p.calls[0].arguments).expect("arguments are JSON");
        assert_eq!(v["city"], "Paris", "{v}");
        assert!(v["unit"] == "celsius" || v["unit"] == "fahrenheit", "{v}");
    }
}

/// Qwen2.5-Coder's own way of calling under `auto`: a reply that opens a
/// ```json fence is constrained from the reply's start to the fence around
/// a call of the request's functions, whatever tokens spell the opening
/// (the script's own tokenization, one character a token, a blank before
/// the fence or after its language); the made-up unit and function name
/// are overruled, and the reply reads back as one valid call.
#[test]
fn a_reply_opening_a_json_fence_is_a_constrained_call() {
    let llm = qwen();
    let body = |name: &str, unit: &str| {
        format!("{{\"name\": \"{name}\", \"arguments\": {{\"city\": \"Paris\", \"unit\": \"{unit}\"}}}}")
    };
    for (open, chars) in [
        ("```json\n", false),
        ("```json\n", true),
        ("\n```json \n", false),
        ("```json ", true),
    ] {
        // (With one function its name is forced; with two the model picks,
        // and `_time` is refused after `get`.)
        for (name, unit, tools) in [
            ("get_weather", "kelvin", weather()),
            ("get_time", "celsius", two()),
        ] {
            let script = format!("{open}{}\n```", body(name, unit));
            let mut c = lazy_with(ToolFormat::Hermes, &tools, true);
            let run = drive_split(llm, &mut c, &script, 200, chars);
            let what = format!("{script:?} (chars: {chars}) gave {:?}", run.text);
            assert!(run.overruled.iter().any(|o| *o), "{what}");
            // Free until the opening is out, masked from there.
            assert!(!run.masked[0], "{what}");
            assert!(run.masked.iter().any(|m| *m), "{what}");
            assert!(run.text.starts_with(open), "{what}");
            assert!(run.text.ends_with("\n```"), "{what}");
            let (content, args) = check_call(&run.text, ToolFormat::Hermes);
            assert_eq!(content, "", "{what}");
            assert_eq!(args["city"], "Paris", "{what}");
        }
    }
    // Parallel calls: an array in the fence.
    let mut c = lazy(ToolFormat::Hermes, true);
    let script = format!(
        "```json\n[{}, {}]\n```",
        body("get_weather", "celsius"),
        body("get_weather", "kelvin")
    );
    let run = drive(llm, &mut c, &script, 200);
    let (_, args) = check_calls(&run.text, ToolFormat::Hermes, 2);
    assert_eq!(args[1]["unit"], "fahrenheit", "{:?}", run.text);
    // Without parallel calls, only one call object (the grammar forces
    // its opening right after the fence's).
    let mut c = lazy(ToolFormat::Hermes, false);
    let run = drive(llm, &mut c, &script, 200);
    assert!(
        run.text.starts_with("```json\n{\"name\": \"get_weather\""),
        "{:?}",
        run.text
    );
    check_call(&run.text, ToolFormat::Hermes);
}

/// Fences that are not a call's stay free: another language, a fence
/// after some prose (an example in an explanation), JSON without the
/// fence; the `<tool_call>` token still turns the grammar on after a
/// fence that missed.
#[test]
fn other_fences_and_prose_stay_free() {
    let llm = qwen();
    for script in [
        "```python\ndef get_weather(city):\n    return {\"name\": \"x\"}\n```",
        "```jsonc\n{\"name\": \"get_time\", \"arguments\": {}}\n```",
        "Here is an example:\n```json\n{\"name\": \"get_time\", \"arguments\": {\"unit\": \"kelvin\"}}\n```\nDone.",
        "Sure, the weather in Paris is mild.",
    ] {
        for chars in [false, true] {
            let mut c = lazy(ToolFormat::Hermes, true);
            let run = drive_split(llm, &mut c, script, 200, chars);
            assert_eq!(run.text, script, "chars: {chars}");
            assert!(run.masked.iter().all(|m| !m), "{script:?}: {:?}", run.masked);
            assert!(!c.needs_mask() && c.is_waiting(), "{script:?}");
        }
    }
    let mut c = lazy_with(ToolFormat::Hermes, &two(), false);
    let script = "```python\nprint(1)\n```\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"city\": \"Oslo\", \"unit\": \"celsius\"}}\n</tool_call>";
    let run = drive(llm, &mut c, script, 200);
    assert!(run.overruled.iter().any(|o| *o), "{:?}", run.text);
    let (content, args) = check_call(&run.text, ToolFormat::Hermes);
    assert_eq!(content, "```python\nprint(1)\n```");
    assert_eq!(args["city"], "Oslo");
}
