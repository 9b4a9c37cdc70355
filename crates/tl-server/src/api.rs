//! OpenAI request bodies, parsed into engine requests, and the JSON of the
//! answers. Parsing is lenient where OpenAI's clients differ (unknown fields
//! are ignored, `null` means "default") and strict about values: every
//! out-of-range or ill-typed field is a 400 naming the field.

use serde::Deserialize;
use serde_json::{json, Value};
use tl_engine::{GenerationRequest, PromptInput, TokenLogprob};
use tl_model::constrain::GrammarSpec;
use tl_tokenizer::ChatMessage;

use crate::error::ApiError;
use crate::tools::{self, ToolChoice};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
        }
    }
}

/// A request as the handlers use it: one engine request per prompt.
#[derive(Debug)]
pub struct Parsed {
    pub model: Option<String>,
    pub requests: Vec<GenerationRequest>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions' `echo`: the prompt text, per prompt, to put first.
    pub echo: Option<Vec<String>>,
    pub logprobs: Option<usize>,
    /// Chat with tools the model may (or must) call; `None` when the
    /// request has no tools or `tool_choice` is `none`.
    pub tools: Option<ToolRequest>,
}

/// The tool side of a chat request.
#[derive(Clone, Debug)]
pub struct ToolRequest {
    pub tools: Value,
    pub choice: ToolChoice,
    pub parallel: bool,
    /// The model's tool-call format (set once the model is known).
    pub format: Option<tools::ToolFormat>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Fields both endpoints share.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    n: Option<i64>,
    stop: Option<StopField>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    ignore_eos: Option<bool>,
    /// Opt this request in or out of speculative decoding (the server's
    /// `--spec` sets the default).
    speculative: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct Message {
    role: Option<String>,
    #[serde(default)]
    content: Option<Content>,
    #[serde(flatten)]
    extra: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Option<Vec<Message>>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<i64>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Option<Value>,
    #[serde(default)]
    logprobs: Option<i64>,
    #[serde(default)]
    echo: Option<bool>,
}

fn shape_error(e: serde_json::Error) -> ApiError {
    ApiError::invalid("body", format!("invalid request body: {e}"))
}

fn non_negative(param: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x < 0 => Err(ApiError::invalid(
            param,
            format!("'{param}' must be ≥ 0, got {x}"),
        )),
        Some(x) => Ok(Some(x as usize)),
    }
}

fn message_text(index: usize, c: Option<Content>) -> Result<String, ApiError> {
    match c {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("messages[{index}].content[{j}]"),
                            format!(
                                "unsupported content part type {}; only 'text' parts are supported",
                                kind.map_or("(missing)".to_string(), |k| format!("'{k}'"))
                            ),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Completions' `prompt`: a string, strings, token ids, or lists of ids.
fn prompts(v: Value) -> Result<Vec<PromptInput>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
        )
    };
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|x| x.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    match v {
        Value::String(s) => Ok(vec![PromptInput::Text(s)]),
        Value::Array(a) if a.is_empty() => Err(ApiError::invalid("prompt", "'prompt' is empty")),
        Value::Array(a) => {
            if a.iter().all(Value::is_string) {
                Ok(a.into_iter()
                    .filter_map(|x| match x {
                        Value::String(s) => Some(PromptInput::Text(s)),
                        _ => None,
                    })
                    .collect())
            } else if a.iter().all(Value::is_number) {
                Ok(vec![PromptInput::Tokens(ids(&a).ok_or_else(bad)?)])
            } else if a.iter().all(Value::is_array) {
                a.iter()
                    .map(|x| {
                        let t =
                            ids(x.as_array().map(Vec::as_slice).unwrap_or(&[])).ok_or_else(bad)?;
                        Ok(PromptInput::Tokens(t))
                    })
                    .collect()
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
}

/// Fields whose meaning this server does not implement are refused rather
/// than silently ignored (their default values pass).
fn unsupported(v: &Value) -> Result<(), ApiError> {
    let refuse = |param: &str, why: &str| {
        Err(ApiError::invalid(
            param,
            format!("'{param}' is not supported by this server{why}"),
        ))
    };
    if v.get("logit_bias")
        .is_some_and(|b| b.as_object().is_some_and(|o| !o.is_empty()))
    {
        return refuse("logit_bias", "");
    }
    if v.get("best_of")
        .and_then(Value::as_u64)
        .is_some_and(|b| b > 1)
    {
        return refuse("best_of", " (use n)");
    }
    if v.get("suffix")
        .is_some_and(|s| s.as_str().is_some_and(|s| !s.is_empty()))
    {
        return refuse("suffix", "");
    }
    Ok(())
}

/// The grammar a request asks for: OpenAI's `response_format`
/// (`json_object`, `json_schema`), or llama.cpp's `json_schema` (a schema)
/// and `grammar` (GBNF). At most one of them.
fn grammar(v: &Value) -> Result<Option<(&'static str, GrammarSpec)>, ApiError> {
    let mut found: Vec<(&'static str, GrammarSpec)> = Vec::new();
    if let Some(rf) = v.get("response_format").filter(|r| !r.is_null()) {
        let ty = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid("response_format", "'response_format' needs a string 'type'")
        })?;
        match ty {
            "text" => {}
            "json_object" => found.push((
                "response_format",
                // llama.cpp also takes a schema here.
                match rf.get("schema").filter(|s| !s.is_null()) {
                    Some(s) => GrammarSpec::JsonSchema(s.clone()),
                    None => GrammarSpec::JsonObject,
                },
            )),
            "json_schema" => {
                let js = rf.get("json_schema").ok_or_else(|| {
                    ApiError::invalid(
                        "response_format",
                        "'response_format' of type 'json_schema' needs a 'json_schema' object",
                    )
                })?;
                let schema = js
                    .get("schema")
                    .filter(|s| s.is_object() || s.is_boolean())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "response_format.json_schema.schema",
                            "'response_format.json_schema' needs a 'schema' (a JSON schema object)",
                        )
                    })?;
                found.push(("response_format", GrammarSpec::JsonSchema(schema.clone())));
            }
            t => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!(
                        "unknown 'response_format' type '{t}' (text, json_object or json_schema)"
                    ),
                ))
            }
        }
    }
    if let Some(s) = v.get("json_schema").filter(|s| !s.is_null()) {
        if !s.is_object() && !s.is_boolean() {
            return Err(ApiError::invalid(
                "json_schema",
                "'json_schema' must be a JSON schema object",
            ));
        }
        found.push(("json_schema", GrammarSpec::JsonSchema(s.clone())));
    }
    if let Some(g) = v.get("grammar").filter(|g| !g.is_null()) {
        let g = g.as_str().ok_or_else(|| {
            ApiError::invalid("grammar", "'grammar' must be a string (a GBNF grammar)")
        })?;
        if !g.trim().is_empty() {
            found.push(("grammar", GrammarSpec::Gbnf(g.to_string())));
        }
    }
    if found.len() > 1 {
        return Err(ApiError::invalid(
            found[1].0,
            format!(
                "'{}' and '{}' both constrain the output; give one",
                found[0].0, found[1].0
            ),
        ));
    }
    Ok(found.pop())
}

/// Most prompts in one completions request.
pub const MAX_PROMPTS: usize = 16;

pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Parsed, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    let c = Common::deserialize(&v).map_err(shape_error)?;
    unsupported(&v)?;
    let grammar = grammar(&v)?;
    let mut tool_req = None;
    let (inputs, tools, logprobs, echo) = match endpoint {
        Endpoint::Chat => {
            let b = ChatBody::deserialize(&v).map_err(shape_error)?;
            let msgs = b
                .messages
                .ok_or_else(|| ApiError::invalid("messages", "'messages' is required"))?;
            let mut out = Vec::with_capacity(msgs.len());
            for (i, m) in msgs.into_iter().enumerate() {
                let role = m.role.ok_or_else(|| {
                    ApiError::invalid(
                        format!("messages[{i}].role"),
                        "every message needs a 'role'",
                    )
                })?;
                let mut cm = ChatMessage::new(role, message_text(i, m.content)?);
                cm.extra = m.extra;
                out.push(cm);
            }
            let top = non_negative("top_logprobs", b.top_logprobs)?;
            let lp = match (b.logprobs.unwrap_or(false), top) {
                (true, t) => Some(t.unwrap_or(0)),
                (false, Some(t)) if t > 0 => {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        "'top_logprobs' needs 'logprobs': true",
                    ))
                }
                (false, _) => None,
            };
            let choice = tools::parse_choice(b.tool_choice.as_ref(), b.tools.as_ref())?;
            // With `none` the tools are not shown to the model at all.
            let shown = if choice == ToolChoice::None {
                None
            } else {
                b.tools
            };
            if let Some(t) = &shown {
                if choice != ToolChoice::Auto && grammar.is_some() {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "'tool_choice' that forces a call does not combine with 'response_format' or 'grammar'",
                    ));
                }
                tool_req = Some(ToolRequest {
                    tools: t.clone(),
                    choice,
                    parallel: b.parallel_tool_calls.unwrap_or(true),
                    format: None,
                });
            }
            (vec![PromptInput::Chat(out)], shown, lp, false)
        }
        Endpoint::Completions => {
            let b = CompletionBody::deserialize(&v).map_err(shape_error)?;
            let p = b
                .prompt
                .ok_or_else(|| ApiError::invalid("prompt", "'prompt' is required"))?;
            let ps = prompts(p)?;
            if ps.len() > MAX_PROMPTS {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "at most {MAX_PROMPTS} prompts per request, got {}",
                        ps.len()
                    ),
                ));
            }
            let lp = non_negative("logprobs", b.logprobs)?;
            (ps, None, lp, b.echo.unwrap_or(false))
        }
    };
    let n = non_negative("n", c.n)?.unwrap_or(1);
    let max_tokens = match (
        non_negative("max_completion_tokens", c.max_completion_tokens)?,
        non_negative("max_tokens", c.max_tokens)?,
    ) {
        (Some(m), _) | (None, Some(m)) => Some(m),
        (None, None) => None,
    };
    let stop = match c.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    let top_k = non_negative("top_k", c.top_k)?;
    let seed = c.seed.map(|s| s as u64);
    let echo = echo.then(|| {
        inputs
            .iter()
            .map(|p| match p {
                PromptInput::Text(s) => s.clone(),
                _ => String::new(),
            })
            .collect()
    });
    let requests = inputs
        .into_iter()
        .map(|prompt| {
            let mut r = GenerationRequest::new(prompt);
            r.max_tokens = max_tokens;
            r.temperature = c.temperature;
            r.top_p = c.top_p;
            r.top_k = top_k;
            r.min_p = c.min_p;
            r.repetition_penalty = c.repetition_penalty;
            r.presence_penalty = c.presence_penalty;
            r.frequency_penalty = c.frequency_penalty;
            r.seed = seed;
            r.n = Some(n);
            r.stop = stop.clone();
            r.logprobs = logprobs;
            r.ignore_eos = c.ignore_eos.unwrap_or(false);
            r.speculative = c.speculative;
            r.tools = tools.clone();
            r.grammar = grammar.clone();
            r
        })
        .collect();
    Ok(Parsed {
        model: c.model,
        requests,
        n,
        stream: c.stream.unwrap_or(false),
        include_usage: c
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        echo,
        logprobs,
        tools: tool_req,
    })
}

/// Token counts of a whole request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub prompt: usize,
    pub completion: usize,
    pub cached: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

fn top_entry(t: &(u32, String, Vec<u8>, f32)) -> Value {
    json!({"token": t.1, "logprob": t.3, "bytes": t.2})
}

/// Chat's per-token logprob entry.
pub fn chat_logprob(l: &TokenLogprob) -> Value {
    json!({
        "token": l.text,
        "logprob": l.logprob,
        "bytes": l.bytes,
        "top_logprobs": l.top.iter().map(top_entry).collect::<Vec<_>>(),
    })
}

/// Completions' logprobs object for a run of tokens starting at text
/// offset `offset`.
pub fn completion_logprobs(ls: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = Vec::with_capacity(ls.len());
    let mut lps = Vec::with_capacity(ls.len());
    let mut tops = Vec::with_capacity(ls.len());
    let mut offsets = Vec::with_capacity(ls.len());
    for l in ls {
        tokens.push(Value::from(l.text.clone()));
        lps.push(Value::from(l.logprob));
        let mut m = serde_json::Map::new();
        for t in &l.top {
            m.insert(t.1.clone(), Value::from(t.3));
        }
        tops.push(Value::Object(m));
        offsets.push(Value::from(offset));
        offset += l.text.len();
    }
    json!({
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}
