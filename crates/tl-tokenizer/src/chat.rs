//! Chat templates: the model's `tokenizer.chat_template` (Jinja) rendered
//! with minijinja, set up the way HF transformers and llama-cpp-python's
//! `Jinja2ChatFormatter` set up Jinja2 (`trim_blocks`, `lstrip_blocks`, loop
//! controls, Python string methods, a `tojson` that is Python's `json.dumps`,
//! `raise_exception`), or a built-in template for models without one.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use tl_gguf::Metadata;

use crate::tokenizer::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// A chat template failed to load or render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chat template '{source_name}'{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct TemplateError {
    /// Where the template came from: the model file's metadata key, a path, or a built-in name.
    pub source_name: String,
    /// 1-based line in the template, where known.
    pub line: Option<usize>,
    /// What went wrong (for `raise_exception`, the template's own message).
    pub message: String,
}

/// One chat message. Fields beyond `role` and `content` (`tool_calls`,
/// `name`, `tool_call_id`, …) are passed to the template as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            extra: serde_json::Map::new(),
        }
    }
}

/// Rendering switches.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// End with the opening of an assistant turn.
    pub add_generation_prompt: bool,
    /// OpenAI-style tool definitions, for templates that use `tools`.
    pub tools: Option<serde_json::Value>,
    /// More template variables (e.g. `enable_thinking`).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Built-in template for architectures whose files carry none. Gemma's is
/// llama.cpp's `LLM_CHAT_TEMPLATE_GEMMA` (`src/llama-chat.cpp`): no system
/// turn (a system message is prepended to the next user turn), assistant is
/// "model", contents trimmed. Anything else gets ChatML, llama.cpp's default.
pub fn builtin_template(architecture: &str) -> (&'static str, &'static str) {
    if architecture.starts_with("gemma") {
        ("gemma", GEMMA_TEMPLATE)
    } else {
        ("chatml", CHATML_TEMPLATE)
    }
}

const GEMMA_TEMPLATE: &str = "\
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{%- set ns.system = ns.system + (message.content | c_trim) -%}
{%- else -%}
{%- set role = 'model' if message.role == 'assistant' else message.role -%}
{{- '<start_of_turn>' + role + '\\n' -}}
{%- if ns.system and role != 'model' -%}
{{- ns.system + '\\n\\n' -}}
{%- set ns.system = '' -%}
{%- endif -%}
{{- (message.content | c_trim) + '<end_of_turn>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\\n' -}}
{%- endif -%}";

const CHATML_TEMPLATE: &str = "\
{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}";

/// A compiled chat template plus the BOS/EOS texts it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    source_name: String,
    source: Arc<str>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_name", &self.source_name)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `source_name` shows up in errors.
    pub fn new(
        source: impl Into<String>,
        source_name: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate, TemplateError> {
        let source: String = source.into();
        let source_name = source_name.into();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| to_template_error(&source_name, &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("c_trim", c_trim);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| to_template_error(&source_name, &e))?;
        Ok(ChatTemplate {
            env,
            source_name,
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The model's own template, or the built-in one for its architecture.
    pub fn from_metadata(md: &Metadata, tok: &Tokenizer) -> Result<ChatTemplate, TemplateError> {
        let (bos, eos) = special_texts(tok);
        if let Some(src) = md.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            return ChatTemplate::new(src, "tokenizer.chat_template", bos, eos);
        }
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let (name, src) = builtin_template(arch);
        ChatTemplate::new(src, format!("built-in {name}"), bos, eos)
    }

    /// A template read from a file (the CLI's `--chat-template FILE`).
    pub fn from_file(
        path: impl AsRef<Path>,
        tok: &Tokenizer,
    ) -> Result<ChatTemplate, TemplateError> {
        let path = path.as_ref();
        let src = std::fs::read_to_string(path).map_err(|e| TemplateError {
            source_name: path.display().to_string(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        let (bos, eos) = special_texts(tok);
        ChatTemplate::new(src, path.display().to_string(), bos, eos)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Renders a conversation to the prompt text.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| to_template_error(&self.source_name, &e))?;
        let mut ctx = serde_json::Map::new();
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        let msgs = serde_json::to_value(messages).map_err(|e| TemplateError {
            source_name: self.source_name.clone(),
            line: None,
            message: format!("messages: {e}"),
        })?;
        ctx.insert("messages".into(), msgs);
        ctx.insert(
            "add_generation_prompt".into(),
            opts.add_generation_prompt.into(),
        );
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        ctx.insert(
            "tools".into(),
            opts.tools.clone().unwrap_or(serde_json::Value::Null),
        );
        tmpl.render(Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| to_template_error(&self.source_name, &e))
    }
}

fn special_texts(tok: &Tokenizer) -> (String, String) {
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
    (text(tok.bos()), text(tok.eos()))
}

fn to_template_error(source_name: &str, e: &Error) -> TemplateError {
    let mut message = match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        },
    };
    // Errors raised inside a function call carry the cause one level down.
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let _ = write!(message, ": {s}");
        src = s.source();
    }
    TemplateError {
        source_name: source_name.to_string(),
        line: e.line(),
        message,
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// C `isspace` trim, as llama.cpp's built-in templates trim.
fn c_trim(s: String) -> String {
    s.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r'))
        .to_string()
}

/// `strftime_now(fmt)` with the directives chat templates use (%Y %m %d %B %b %H %M %S %A %a %%), UTC.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_time(secs, &fmt)
}

fn format_time(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let day = DAYS[weekday];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(day),
            Some('a') => out.push_str(&day[..3]),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, the `tojson` HF transformers installs for chat
/// templates (minijinja's own is compact and HTML-escaped, which changes
/// the prompt).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
            _ => Some(" ".repeat(usize::try_from(i64::try_from(v)?.max(0)).unwrap_or(0))),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item(&Value::from(0))?;
            let b = s.get_item(&Value::from(1))?;
            (
                a.as_str().unwrap_or(",").to_string(),
                b.as_str().unwrap_or(":").to_string(),
            )
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7E) => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn newline_indent(opts: &JsonOpts, depth: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

fn write_json(v: &Value, opts: &JsonOpts, depth: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                let _ = write!(out, "{i}");
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => write_json_str(v.as_str().unwrap_or(""), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, depth + 1, out);
                write_json(item, opts, depth + 1, out)?;
            }
            newline_indent(opts, depth, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, depth + 1, out);
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => k.to_string(),
                };
                write_json_str(&key, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(&v.get_item(k)?, opts, depth + 1, out)?;
            }
            newline_indent(opts, depth, out);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of kind {}", v.kind()),
            ))
        }
    }
    Ok(())
}

/// Python's `repr(float)`: shortest round-trip digits, always with a `.` or exponent.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust's `{:e}` gives "1e20"; Python writes "1e+20".
        let s = format!("{f:e}");
        return match s.split_once('e') {
            Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e:0>2}"),
            Some((m, e)) => format!("{m}e-{:0>2}", &e[1..]),
            None => s,
        };
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(src: &str) -> ChatTemplate {
        match ChatTemplate::new(src, "test", "<s>", "</s>") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn python_string_methods() {
        let t = tmpl("{{ messages[0].content.strip().upper() }}{% if messages[0].content.startswith(' hi') %}!{% endif %}");
        let out = t.render(
            &[ChatMessage::new("user", " hi there ")],
            &RenderOptions::default(),
        );
        assert_eq!(out.as_deref(), Ok("HI THERE!"));
    }

    #[test]
    fn raise_exception_names_line_and_message() {
        let t = tmpl("ok\n{% if messages|length > 0 %}{{ raise_exception('roles must alternate') }}{% endif %}");
        let err = t.render(&[ChatMessage::new("user", "x")], &RenderOptions::default());
        let Err(e) = err else {
            panic!("expected an error")
        };
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("roles must alternate"), "{e}");
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn syntax_error_names_line() {
        let Err(e) = ChatTemplate::new("a\nb\n{% for x in %}", "bad", "", "") else {
            panic!("expected an error")
        };
        assert_eq!(e.line, Some(3));
        assert_eq!(e.source_name, "bad");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = tmpl("{{ tools | tojson }}|{{ tools | tojson(indent=2) }}");
        let tools = serde_json::json!({"b": [1, 2.5, true, null], "a": "é\"\n<"});
        let out = t.render(
            &[],
            &RenderOptions {
                tools: Some(tools),
                ..Default::default()
            },
        );
        assert_eq!(
            out.as_deref(),
            Ok("{\"b\": [1, 2.5, true, null], \"a\": \"é\\\"\\n<\"}|{\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"a\": \"é\\\"\\n<\"\n}")
        );
    }

    #[test]
    fn float_repr() {
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e20), "1e+20");
        assert_eq!(python_float_repr(1.5e-7), "1.5e-07");
    }

    #[test]
    fn dates() {
        assert_eq!(
            format_time(0, "%d %b %Y %H:%M:%S %A"),
            "01 Jan 1970 00:00:00 Thursday"
        );
        assert_eq!(format_time(1_709_251_200, "%Y-%m-%d %a"), "2024-03-01 Fri");
    }

    #[test]
    fn gemma_builtin() {
        let t = tmpl(GEMMA_TEMPLATE);
        let msgs = [
            ChatMessage::new("system", " Be brief. "),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Bye"),
        ];
        let out = t.render(
            &msgs,
            &RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        );
        assert_eq!(
            out.as_deref(),
            Ok("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
        );
    }
}
