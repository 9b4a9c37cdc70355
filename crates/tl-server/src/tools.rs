//! Tool calling: the model's tool-call format read back into OpenAI's
//! `tool_calls`, `tool_choice` checked, the grammar that forces a call for
//! `required` or a named function, and the lazy one for `auto` (free text
//! until the format's trigger, a valid call from there; for Hermes also a
//! reply that opens a ```` ```json ```` fence).
//!
//! Formats (chosen by the vocabulary, as the chat templates that render
//! `tools` write them):
//! - Hermes (Qwen2.5 and others with a `<tool_call>` token):
//!   `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one block
//!   per call;
//! - Mistral (`[TOOL_CALLS]` token): `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]`;
//! - JSON (Llama 3.x): the whole reply is `{"name": …, "parameters": {…}}`
//!   (or a list of them);
//! - harmony (gpt-oss): a message to `functions.NAME` on the commentary
//!   channel, `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{…}`
//!   (read with the reply's reasoning and content by [`crate::harmony`]).

use serde_json::{json, Value};
use tl_model::constrain::{compact, GrammarSpec, Trigger};
use tl_tokenizer::Tokenizer;

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Mistral,
    Json,
    Harmony,
}

impl ToolFormat {
    pub fn detect(tok: &Tokenizer) -> ToolFormat {
        if crate::harmony::is_harmony(tok) {
            ToolFormat::Harmony
        } else if tok.token_id("<tool_call>").is_some() {
            ToolFormat::Hermes
        } else if tok.token_id("[TOOL_CALLS]").is_some() {
            ToolFormat::Mistral
        } else {
            ToolFormat::Json
        }
    }

    fn marker(self) -> Option<&'static str> {
        match self {
            ToolFormat::Hermes => Some("<tool_call>"),
            ToolFormat::Mistral => Some("[TOOL_CALLS]"),
            ToolFormat::Json | ToolFormat::Harmony => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// One parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON string (OpenAI's shape).
    pub arguments: String,
}

impl ToolCall {
    pub fn json(&self, id: &str) -> Value {
        json!({"id": id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// The names and parameter schemas of `tools`, checked.
fn functions(tools: &Value) -> Result<Vec<(String, Value)>, ApiError> {
    let arr = tools
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "'tools' must be an array"))?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, t) in arr.iter().enumerate() {
        let f = t
            .get("function")
            .filter(|_| t.get("type").and_then(Value::as_str) == Some("function"))
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("tools[{i}]"),
                    "each tool must be {\"type\": \"function\", \"function\": {…}}",
                )
            })?;
        let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid(
                format!("tools[{i}].function.name"),
                "a function needs a 'name'",
            )
        })?;
        let params = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}));
        out.push((name.to_string(), params));
    }
    Ok(out)
}

/// `tool_choice` against `tools`.
pub fn parse_choice(choice: Option<&Value>, tools: Option<&Value>) -> Result<ToolChoice, ApiError> {
    let names = match tools {
        Some(t) if !t.is_null() => functions(t)?.into_iter().map(|f| f.0).collect(),
        _ => Vec::new(),
    };
    let c = match choice.filter(|c| !c.is_null()) {
        None if names.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            s => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("unknown 'tool_choice' '{s}' (none, auto, required or a function)"),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tool_choice",
                        "'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )
                })?;
            ToolChoice::Named(name.to_string())
        }
    };
    match &c {
        ToolChoice::Required | ToolChoice::Named(_) if names.is_empty() => Err(ApiError::invalid(
            "tool_choice",
            "'tool_choice' asks for a tool call but the request has no 'tools'",
        )),
        ToolChoice::Named(n) if !names.contains(n) => Err(ApiError::invalid(
            "tool_choice",
            format!("'tool_choice' names '{n}', which is not among the tools"),
        )),
        _ => Ok(c),
    }
}

/// The grammar that makes the reply one call (or, with `parallel`, one or
/// more) of the chosen tools in `fmt`.
pub fn grammar(
    fmt: ToolFormat,
    tok: &Tokenizer,
    tools: &Value,
    choice: &ToolChoice,
    parallel: bool,
) -> Result<GrammarSpec, ApiError> {
    if fmt == ToolFormat::Harmony {
        return harmony_grammar(tok, tools, choice);
    }
    let call = call_schema(fmt, tools, choice)?;
    Ok(match fmt {
        ToolFormat::Hermes => {
            // (A JSON-schema spec gets the compact layout when compiled; a
            // schema inside Lark needs it here.)
            let s = serde_json::to_string(&compact(call)).unwrap_or_default();
            let rep = if parallel { " (\"\\n\" call)*" } else { "" };
            GrammarSpec::Lark(format!(
                "start: call{rep}\ncall: \"<tool_call>\\n\" %json {s} \"\\n</tool_call>\"\n"
            ))
        }
        ToolFormat::Mistral | ToolFormat::Json | ToolFormat::Harmony => {
            GrammarSpec::JsonSchema(if parallel && fmt == ToolFormat::Mistral {
                json!({"type": "array", "items": call, "minItems": 1})
            } else {
                call
            })
        }
    })
}

/// Harmony's forced call: the reply opens with a message to one of the
/// chosen functions on the commentary channel, its arguments valid against
/// the function's parameters (one call: `<|call|>` ends the generation).
fn harmony_grammar(
    tok: &Tokenizer,
    tools: &Value,
    choice: &ToolChoice,
) -> Result<GrammarSpec, ApiError> {
    let id = |t: &str| {
        tok.token_id(t).ok_or_else(|| {
            ApiError::invalid(
                "tool_choice",
                format!("the model's vocabulary has no {t} token for a harmony tool call"),
            )
        })
    };
    let markers = [id("<|channel|>")?, id("<|constrain|>")?, id("<|message|>")?];
    harmony_call_grammar(markers, tools, choice)
}

/// [`harmony_grammar`] with the ids of `<|channel|>`, `<|constrain|>`
/// and `<|message|>` given: `<|channel|>commentary to=functions.NAME
/// <|constrain|>json<|message|>` and the arguments, valid against the
/// function's parameters.
pub fn harmony_call_grammar(
    [ch, cons, msg]: [u32; 3],
    tools: &Value,
    choice: &ToolChoice,
) -> Result<GrammarSpec, ApiError> {
    let mut rules = Vec::new();
    for (name, params) in functions(tools)? {
        if matches!(choice, ToolChoice::Named(want) if *want != name) {
            continue;
        }
        let head =
            serde_json::to_string(&format!("commentary to=functions.{name} ")).unwrap_or_default();
        let schema = serde_json::to_string(&compact(params)).unwrap_or_default();
        rules.push(format!(
            "call{}: <[{ch}]> {head} <[{cons}]> \"json\" <[{msg}]> %json {schema}",
            rules.len()
        ));
    }
    let alts: Vec<String> = (0..rules.len()).map(|i| format!("call{i}")).collect();
    Ok(GrammarSpec::Lark(format!(
        "start: {}\n{}\n",
        alts.join(" | "),
        rules.join("\n")
    )))
}

/// The grammar of `tool_choice: "auto"`: the reply is free until the
/// format's trigger — the `<tool_call>` token (Hermes), `[TOOL_CALLS]`
/// (Mistral), a reply opening with `{` (Llama 3 JSON) — and from there one
/// call (or, with `parallel`, one or more) of any of the tools, valid
/// against its parameter schema. A Hermes reply that opens a ```` ```json ````
/// fence (Qwen2.5-Coder's way of calling, see [`bare_call`]) is a trigger
/// too: from the reply's start it is the fence around one call (with
/// `parallel`, a call or an array of calls) and the closing fence, and
/// nothing after it. Only a fence that opens the reply: one after some
/// prose is an example in an explanation far more often than a call, and
/// is read back as content ([`parse_calls`]) anyway. `None` when the
/// trigger token is not in the vocabulary.
pub fn lazy_grammar(
    fmt: ToolFormat,
    tok: &Tokenizer,
    tools: &Value,
    parallel: bool,
) -> Result<Option<GrammarSpec>, ApiError> {
    let call = call_schema(fmt, tools, &ToolChoice::Auto)?;
    let json = |v: Value| serde_json::to_string(&compact(v)).unwrap_or_default();
    Ok(Some(match fmt {
        ToolFormat::Hermes => {
            let Some(id) = tok.token_id("<tool_call>") else {
                return Ok(None);
            };
            GrammarSpec::Lazy {
                trigger: Trigger::Fence {
                    lang: "json".into(),
                    token: Some(id),
                },
                grammar: Box::new(GrammarSpec::Lark(hermes_lazy_lark(id, call, parallel))),
            }
        }
        ToolFormat::Mistral => {
            let Some(id) = tok.token_id("[TOOL_CALLS]") else {
                return Ok(None);
            };
            let body = if parallel {
                json!({"type": "array", "items": call, "minItems": 1})
            } else {
                call
            };
            GrammarSpec::Lazy {
                trigger: Trigger::Token(id),
                grammar: Box::new(GrammarSpec::Lark(format!(
                    "start: <[{id}]> \" \"? %json {}\n",
                    json(body)
                ))),
            }
        }
        // Every harmony message opens alike: the reply stays free and is
        // read back afterwards.
        ToolFormat::Harmony => return Ok(None),
        ToolFormat::Json => GrammarSpec::Lazy {
            trigger: Trigger::JsonReply,
            grammar: Box::new(GrammarSpec::Lark(format!(
                "start: BLANK? %json {}\nBLANK: /[ \\t\\r\\n]+/\n",
                json(call)
            ))),
        },
    }))
}

/// The Lark grammar of Hermes' lazy call (trigger token `id`): either
/// `<tool_call>` blocks (the trigger token starts it) or, from the reply's
/// start, blanks, a ```` ```json ```` fence around the call (or, with
/// `parallel`, a call or an array of calls) and the closing fence.
fn hermes_lazy_lark(id: u32, call: Value, parallel: bool) -> String {
    let json = |v: Value| serde_json::to_string(&compact(v)).unwrap_or_default();
    let rep = if parallel { " (\"\\n\" call)*" } else { "" };
    let body = if parallel {
        json!({"anyOf": [call.clone(), {"type": "array", "items": call.clone(), "minItems": 1}]})
    } else {
        call.clone()
    };
    format!(
        "start: tagged | fenced\n\
         tagged: call{rep}\n\
         call: <[{id}]> \"\\n\" %json {} \"\\n</tool_call>\"\n\
         fenced: BLANK? \"```json\" FENCE_GAP? %json {} \"\\n```\"\n\
         BLANK: /[ \\t\\r\\n]+/\n\
         FENCE_GAP: /[ \\t]*\\r?\\n|[ \\t]+/\n",
        json(call),
        json(body)
    )
}

/// The schema of one call of the chosen tools (any of them, or the named
/// one).
fn call_schema(fmt: ToolFormat, tools: &Value, choice: &ToolChoice) -> Result<Value, ApiError> {
    let args_key = if fmt == ToolFormat::Json {
        "parameters"
    } else {
        "arguments"
    };
    let one = |name: &str, params: &Value| {
        json!({"type": "object", "properties": {"name": {"const": name}, args_key: params},
               "required": ["name", args_key], "additionalProperties": false})
    };
    let mut calls: Vec<Value> = functions(tools)?
        .iter()
        .filter(|(n, _)| match choice {
            ToolChoice::Named(want) => n == want,
            _ => true,
        })
        .map(|(n, p)| one(n, p))
        .collect();
    Ok(if calls.len() == 1 {
        calls.remove(0)
    } else {
        json!({"anyOf": calls})
    })
}

/// One call object: `{"name", "arguments"|"parameters"}`.
fn call_of(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let arguments = match args {
        Value::String(s) => s,
        a => a.to_string(),
    };
    Some(ToolCall { name, arguments })
}

fn calls_of(v: &Value) -> Option<Vec<ToolCall>> {
    match v {
        Value::Array(a) => a.iter().map(call_of).collect(),
        v => call_of(v).map(|c| vec![c]),
    }
}

/// The names of the request's functions (empty when `tools` is malformed:
/// the request was refused before it ran).
pub fn names(tools: &Value) -> Vec<String> {
    functions(tools).map_or_else(|_| Vec::new(), |f| f.into_iter().map(|(n, _)| n).collect())
}

/// The calls in a finished reply and the text before them; `None` when
/// the reply holds no well-formed call (it is then plain content).
/// `names`: the request's functions — a Hermes model's call without its
/// `<tool_call>` marker counts only when it calls one of them.
pub fn parse_calls(
    fmt: ToolFormat,
    text: &str,
    names: &[String],
) -> Option<(String, Vec<ToolCall>)> {
    match fmt {
        ToolFormat::Hermes => {
            let Some(start) = text.find("<tool_call>") else {
                let calls = bare_call(text)?;
                return calls
                    .iter()
                    .all(|c| names.contains(&c.name))
                    .then(|| (String::new(), calls));
            };
            let mut calls = Vec::new();
            let mut rest = &text[start..];
            while let Some(p) = rest.find("<tool_call>") {
                let body = &rest[p + "<tool_call>".len()..];
                let (inner, next) = match body.find("</tool_call>") {
                    Some(e) => (&body[..e], &body[e + "</tool_call>".len()..]),
                    None => (body, ""),
                };
                let v: Value = serde_json::from_str(inner.trim()).ok()?;
                calls.extend(calls_of(&v)?);
                rest = next;
            }
            (!calls.is_empty()).then(|| (text[..start].trim().to_string(), calls))
        }
        ToolFormat::Mistral => {
            let (before, body) = match text.find("[TOOL_CALLS]") {
                Some(p) => (&text[..p], &text[p + "[TOOL_CALLS]".len()..]),
                None if text.trim_start().starts_with('[') => ("", text),
                None => return None,
            };
            let v: Value = serde_json::from_str(body.trim()).ok()?;
            let calls = calls_of(&v)?;
            (!calls.is_empty()).then(|| (before.trim().to_string(), calls))
        }
        ToolFormat::Json => {
            let v: Value = serde_json::from_str(text.trim()).ok()?;
            let calls = calls_of(&v)?;
            (!calls.is_empty()).then(|| (String::new(), calls))
        }
        ToolFormat::Harmony => {
            let p = crate::harmony::parse(text, true);
            (!p.calls.is_empty()).then_some((p.content, p.calls))
        }
    }
}

/// A Hermes-format model that answers with the call alone, as a JSON
/// object in a Markdown code fence or bare (Qwen2.5-Coder does this
/// rather than writing `<tool_call>`; llama.cpp's Hermes parser takes the
/// same forms): the whole reply must be the call (or an array of calls),
/// each exactly `{"name": …, "arguments": {…}}`, so that ordinary JSON
/// answers stay content (and the caller keeps only calls of the request's
/// functions). Under `auto` a fenced call is constrained from the fence's
/// opening on ([`lazy_grammar`]); a bare one is not.
fn bare_call(text: &str) -> Option<Vec<ToolCall>> {
    let t = text.trim();
    let body = match t.strip_prefix("```") {
        Some(f) => {
            let f = f.strip_prefix("json").unwrap_or(f);
            f.strip_suffix("```")?
        }
        None => t,
    };
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let one = |c: &Value| {
        let o = c.as_object()?;
        (o.len() == 2 && o.get("name")?.is_string() && o.get("arguments")?.is_object())
            .then_some(())
    };
    match &v {
        Value::Array(a) if !a.is_empty() => a.iter().try_for_each(one)?,
        Value::Object(_) => one(&v)?,
        _ => return None,
    }
    calls_of(&v)
}

/// Where, in streamed text not yet sent, a tool call may begin: text from
/// there on is held back until the choice ends (a marker's first
/// characters at the end are held too, until they turn out otherwise).
/// `at_start`: `text` is the reply from its beginning, where a Hermes
/// model's bare or fenced JSON call ([`bare_call`]) may open.
pub fn hold_from(fmt: ToolFormat, text: &str, at_start: bool) -> Option<usize> {
    if fmt == ToolFormat::Harmony {
        // Streamed by channel (`crate::harmony`), never through here.
        return None;
    }
    if fmt == ToolFormat::Hermes && at_start {
        let t = text.trim_start();
        if t.is_empty() || t.starts_with('{') || t.starts_with("```") || "```".starts_with(t) {
            return Some(0);
        }
    }
    match fmt.marker() {
        Some(m) => {
            if let Some(p) = text.find(m) {
                return Some(p);
            }
            (1..m.len())
                .rev()
                .find(|&k| text.ends_with(&m[..k]))
                .map(|k| text.len() - k)
        }
        // A JSON reply is a call only as a whole.
        None => {
            let t = text.trim_start();
            (t.is_empty() || t.starts_with('{') || t.starts_with('[')).then_some(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_format() {
        let h = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>";
        let (before, calls) = parse_calls(ToolFormat::Hermes, h, &[]).unwrap();
        assert_eq!(before, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, "{\"city\":\"Paris\"}");
        let m = "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"x\": 1}}]";
        assert_eq!(
            parse_calls(ToolFormat::Mistral, m, &[]).unwrap().1[0].name,
            "f"
        );
        let j = "{\"name\": \"f\", \"parameters\": {\"x\": 1}}";
        assert_eq!(
            parse_calls(ToolFormat::Json, j, &[]).unwrap().1[0].arguments,
            "{\"x\":1}"
        );
        assert!(parse_calls(ToolFormat::Hermes, "no call here", &[]).is_none());
        assert!(parse_calls(ToolFormat::Json, "{\"answer\": 4}", &[]).is_none());
        assert!(parse_calls(ToolFormat::Hermes, "<tool_call>\n{broken", &[]).is_none());
        // A Hermes model's call alone, fenced or bare.
        let f = "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```";
        let names: Vec<String> = ["get_weather", "a", "b", "f"].map(String::from).to_vec();
        let (before, calls) = parse_calls(ToolFormat::Hermes, f, &names).unwrap();
        assert_eq!(
            (before.as_str(), calls[0].name.as_str()),
            ("", "get_weather")
        );
        assert_eq!(calls[0].arguments, "{\"city\":\"Paris\"}");
        let b = " [{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"x\": 1}}] ";
        assert_eq!(
            parse_calls(ToolFormat::Hermes, b, &names).unwrap().1.len(),
            2
        );
        // Ordinary JSON answers and code stay content.
        for t in [
            "{\"name\": \"Paris\", \"population\": 2}",
            "{\"name\": \"f\", \"arguments\": {}, \"extra\": 1}",
            "{\"name\": \"f\", \"arguments\": \"x\"}",
            "```python\nprint(1)\n```",
            "Here: ```json\n{\"name\": \"f\", \"arguments\": {}}\n```",
            "[]",
        ] {
            assert!(parse_calls(ToolFormat::Hermes, t, &names).is_none(), "{t}");
        }
        // A call of a function the request does not have is content.
        assert!(parse_calls(ToolFormat::Hermes, f, &names[1..]).is_none());
    }

    #[test]
    fn holds_back_a_possible_marker() {
        assert_eq!(hold_from(ToolFormat::Hermes, "Hello <tool", true), Some(6));
        assert_eq!(hold_from(ToolFormat::Hermes, "Hello <b>", true), None);
        assert_eq!(
            hold_from(ToolFormat::Hermes, "a<tool_call>{", true),
            Some(1)
        );
        assert_eq!(hold_from(ToolFormat::Json, "  {\"name\"", true), Some(0));
        assert_eq!(hold_from(ToolFormat::Json, "Sure", true), None);
        // A reply that may be a fenced or bare call is held from its start.
        assert_eq!(hold_from(ToolFormat::Hermes, "\n``", true), Some(0));
        assert_eq!(hold_from(ToolFormat::Hermes, "```json\n{", true), Some(0));
        assert_eq!(hold_from(ToolFormat::Hermes, "{\"na", true), Some(0));
        assert_eq!(hold_from(ToolFormat::Hermes, "{\"na", false), None);
        assert_eq!(hold_from(ToolFormat::Hermes, "`x", true), None);
    }

    #[test]
    fn hermes_lazy_grammar_takes_the_tag_or_a_json_fence() {
        let tools = json!([{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]);
        let call = call_schema(ToolFormat::Hermes, &tools, &ToolChoice::Auto).unwrap();
        let one = serde_json::to_string(&compact(call.clone())).unwrap();
        let g = hermes_lazy_lark(7, call.clone(), true);
        let lines: Vec<&str> = g.lines().collect();
        assert_eq!(lines[0], "start: tagged | fenced");
        assert_eq!(lines[1], "tagged: call (\"\\n\" call)*");
        assert_eq!(
            lines[2],
            format!("call: <[7]> \"\\n\" %json {one} \"\\n</tool_call>\"")
        );
        // The fence: from the reply's start, blanks, the opening, a call or
        // an array of calls, the closing fence and nothing more.
        let body = serde_json::to_string(&compact(json!({"anyOf": [call.clone(),
            {"type": "array", "items": call.clone(), "minItems": 1}]})))
        .unwrap();
        assert_eq!(
            lines[3],
            format!("fenced: BLANK? \"```json\" FENCE_GAP? %json {body} \"\\n```\"")
        );
        assert_eq!(lines[4], "BLANK: /[ \\t\\r\\n]+/");
        assert_eq!(lines[5], "FENCE_GAP: /[ \\t]*\\r?\\n|[ \\t]+/");
        assert!(one.contains("\"name\":{\"const\":\"f\"}"), "{one}");
        // One call only: no repetition, no array.
        let g = hermes_lazy_lark(7, call, false);
        let lines: Vec<&str> = g.lines().collect();
        assert_eq!(lines[1], "tagged: call");
        assert_eq!(
            lines[3],
            format!("fenced: BLANK? \"```json\" FENCE_GAP? %json {one} \"\\n```\"")
        );
    }

    #[test]
    fn tool_choice_is_checked() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        assert_eq!(parse_choice(None, Some(&tools)).unwrap(), ToolChoice::Auto);
        assert_eq!(parse_choice(None, None).unwrap(), ToolChoice::None);
        assert_eq!(
            parse_choice(
                Some(&json!({"type": "function", "function": {"name": "f"}})),
                Some(&tools)
            )
            .unwrap(),
            ToolChoice::Named("f".into())
        );
        assert!(parse_choice(
            Some(&json!({"type": "function", "function": {"name": "g"}})),
            Some(&tools)
        )
        .is_err());
        assert!(parse_choice(Some(&json!("required")), None).is_err());
        assert!(parse_choice(Some(&json!("sometimes")), Some(&tools)).is_err());
        assert!(parse_choice(None, Some(&json!([{"type": "function"}]))).is_err());
    }
}
