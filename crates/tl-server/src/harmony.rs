//! gpt-oss's harmony replies read back into OpenAI's shape.
//!
//! The chat template's generation prompt ends with `<|start|>assistant`;
//! the reply is then a run of messages, each a header up to
//! `<|message|>` (a `<|channel|>` name, maybe a recipient `to=…` and a
//! `<|constrain|>` type) and a body up to `<|end|>`, `<|call|>`,
//! `<|return|>` or the next `<|start|>` (the last two of those end the
//! generation and are not in the text):
//!
//! ```text
//! <|channel|>analysis<|message|>Need the weather.<|end|>
//! <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}
//! ```
//!
//! The `analysis` channel is the reasoning (`reasoning_content`), `final`
//! (and `commentary` without a recipient, the preamble harmony shows the
//! user) the content, and a message to `functions.NAME` a tool call with
//! the body as its arguments.

use crate::tools::ToolCall;
use tl_tokenizer::Tokenizer;

const MESSAGE: &str = "<|message|>";
const CHANNEL: &str = "<|channel|>";
/// What ends a message body.
const ENDS: [&str; 4] = ["<|end|>", "<|call|>", "<|return|>", "<|start|>"];
/// Every marker whose first characters, at the end of unfinished text,
/// are held back.
const MARKERS: [&str; 7] = [
    "<|end|>",
    "<|call|>",
    "<|return|>",
    "<|start|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
];

/// Whether the model writes harmony (its vocabulary has the channel and
/// call tokens).
pub fn is_harmony(tok: &Tokenizer) -> bool {
    tok.token_id(CHANNEL).is_some()
        && tok.token_id(MESSAGE).is_some()
        && tok.token_id("<|call|>").is_some()
}

/// A reply split by channel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parts {
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// Splits `text`, the reply so far. While it is unfinished, a message
/// whose header is incomplete, the first characters of a marker at its
/// end and a tool call not yet closed give nothing yet, so that what each
/// part holds only ever grows as the text does. A finished reply that is
/// not harmony at all (no message header) is content as it stands.
pub fn parse(text: &str, finished: bool) -> Parts {
    let mut parts = Parts::default();
    let starts_as_header = {
        let t = text.trim_start();
        t.starts_with(CHANNEL) || t.starts_with(" to=") || t.starts_with("to=")
    };
    let may_be_harmony =
        text.contains(MESSAGE) || starts_as_header || (!finished && held_prefix(text) == 0);
    if !may_be_harmony {
        // Plain text (or, unfinished, text that cannot be a header).
        if finished {
            parts.content = text.to_string();
        } else {
            let keep = text.len() - held_suffix(text);
            parts.content = text[..keep].to_string();
        }
        return parts;
    }
    let mut rest = text;
    while !rest.is_empty() {
        let Some(h) = rest.find(MESSAGE) else {
            // A header still being written (or, finished, one without a
            // body): nothing to show.
            break;
        };
        let header = &rest[..h];
        let body_all = &rest[h + MESSAGE.len()..];
        let end = ENDS
            .iter()
            .filter_map(|e| body_all.find(e).map(|p| (p, e.len())))
            .min();
        let (body, closed, next) = match end {
            Some((p, len)) => (&body_all[..p], true, &body_all[p + len..]),
            None if finished => (body_all, true, ""),
            None => {
                let keep = body_all.len() - held_suffix(body_all);
                (&body_all[..keep], false, "")
            }
        };
        let (channel, recipient) = read_header(header);
        match recipient {
            Some(r) => {
                if closed {
                    let name = r.strip_prefix("functions.").unwrap_or(r);
                    parts.calls.push(ToolCall {
                        name: name.to_string(),
                        arguments: body.trim().to_string(),
                    });
                }
            }
            None if channel == "analysis" => parts.reasoning.push_str(body),
            None => parts.content.push_str(body),
        }
        rest = next;
        // The next message's `<|start|>assistant` role is part of its
        // header, read by `read_header`.
    }
    parts
}

/// What one streamed step of a harmony reply adds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    /// At the end only: the reply's calls.
    pub calls: Vec<ToolCall>,
}

/// The parts of a reply already streamed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    reasoning: usize,
    content: usize,
}

impl Sent {
    /// The step after the reply grew to `text` (`finished`: it ended):
    /// the reasoning and content not yet sent and, at the end, the calls.
    pub fn step(&mut self, text: &str, finished: bool) -> Delta {
        let p = parse(text, finished);
        let new = |s: &str, from: usize| s.get(from..).filter(|t| !t.is_empty()).map(String::from);
        let d = Delta {
            reasoning: new(&p.reasoning, self.reasoning),
            content: new(&p.content, self.content),
            calls: if finished { p.calls } else { Vec::new() },
        };
        self.reasoning = self.reasoning.max(p.reasoning.len());
        self.content = self.content.max(p.content.len());
        d
    }
}

/// The channel name and the recipient (`to=…`) of a header such as
/// `assistant<|channel|>commentary to=functions.f <|constrain|>json` or
/// ` to=functions.f<|channel|>commentary json`.
fn read_header(header: &str) -> (&str, Option<&str>) {
    let channel = header
        .find(CHANNEL)
        .map(|p| {
            let c = &header[p + CHANNEL.len()..];
            let end = c
                .find(|ch: char| ch.is_whitespace() || ch == '<')
                .unwrap_or(c.len());
            &c[..end]
        })
        .unwrap_or("");
    let recipient = header.find("to=").map(|p| {
        let r = &header[p + 3..];
        let end = r
            .find(|ch: char| ch.is_whitespace() || ch == '<')
            .unwrap_or(r.len());
        &r[..end]
    });
    (channel, recipient.filter(|r| !r.is_empty()))
}

/// Bytes at the end of `text` that begin a marker.
fn held_suffix(text: &str) -> usize {
    MARKERS
        .iter()
        .filter_map(|m| (1..m.len()).rev().find(|&k| text.ends_with(&m[..k])))
        .max()
        .unwrap_or(0)
}

/// For text with no message yet: 0 when all of it may still become a
/// header (it is a marker's beginning, or blank), else its length.
fn held_prefix(text: &str) -> usize {
    let t = text.trim_start();
    if t.is_empty() || MARKERS.iter().any(|m| m.starts_with(t)) || "to=".starts_with(t) {
        0
    } else {
        text.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALL: &str = "<|channel|>analysis<|message|>User wants weather. Call tool.<|end|>\
        <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json\
        <|message|>{\"location\":\"Paris\"}";

    #[test]
    fn a_call_after_reasoning() {
        let p = parse(CALL, true);
        assert_eq!(p.reasoning, "User wants weather. Call tool.");
        assert_eq!(p.content, "");
        assert_eq!(
            p.calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: "{\"location\":\"Paris\"}".into()
            }]
        );
    }

    #[test]
    fn the_recipient_before_the_channel() {
        // The template's own rendering of a call in the history.
        let t = " to=functions.lookup<|channel|>commentary json<|message|>{\"q\": 1}";
        let p = parse(t, true);
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].name, "lookup");
        assert_eq!(p.calls[0].arguments, "{\"q\": 1}");
        assert!(p.content.is_empty() && p.reasoning.is_empty());
    }

    #[test]
    fn reasoning_then_final_answer() {
        let t = "<|channel|>analysis<|message|>2+2 is 4.<|end|><|start|>assistant\
                 <|channel|>final<|message|>The answer is 4.";
        let p = parse(t, true);
        assert_eq!(p.reasoning, "2+2 is 4.");
        assert_eq!(p.content, "The answer is 4.");
        assert!(p.calls.is_empty());
        // A preamble on the commentary channel is shown as content.
        let t = "<|channel|>commentary<|message|>Checking.<|end|>";
        assert_eq!(parse(t, true).content, "Checking.");
    }

    #[test]
    fn plain_text_is_content() {
        let p = parse("Just text, no channels.", true);
        assert_eq!(p.content, "Just text, no channels.");
        assert_eq!(parse("a < b", false).content, "a < b");
        // Text that may still become a marker is held.
        assert_eq!(parse("a <|", false).content, "a ");
    }

    #[test]
    fn unfinished_parts_only_grow() {
        // Every prefix of the reply (cut anywhere, also inside markers):
        // each part is a prefix of the finished one, and no call shows
        // before the reply is finished.
        let t = format!(
            "<|channel|>analysis<|message|>Think <a> bit.<|end|><|start|>assistant\
             <|channel|>final<|message|>Done <b>.<|end|>{}",
            &CALL["<|channel|>analysis<|message|>User wants weather. Call tool.<|end|>".len()..]
        );
        let done = parse(&t, true);
        assert_eq!(done.reasoning, "Think <a> bit.");
        assert_eq!(done.content, "Done <b>.");
        assert_eq!(done.calls.len(), 1);
        let mut prev = Parts::default();
        for cut in (0..=t.len()).filter(|&i| t.is_char_boundary(i)) {
            let p = parse(&t[..cut], false);
            assert!(done.reasoning.starts_with(&p.reasoning), "cut {cut}: {p:?}");
            assert!(done.content.starts_with(&p.content), "cut {cut}: {p:?}");
            assert!(p.reasoning.starts_with(&prev.reasoning), "cut {cut}");
            assert!(p.content.starts_with(&prev.content), "cut {cut}");
            assert!(p.calls.is_empty(), "cut {cut}");
            prev = p;
        }
        assert_eq!(prev.reasoning, done.reasoning);
        assert_eq!(prev.content, done.content);
    }

    #[test]
    fn streamed_token_by_token_adds_up_to_the_reply() {
        // The reply as gpt-oss's tokens arrive: markers whole, text in
        // pieces (one cut inside `<` that turns out not to be a marker).
        let pieces = [
            "<|channel|>",
            "analysis",
            "<|message|>",
            "Weather",
            " in Paris",
            " <",
            "3 calls.",
            "<|end|>",
            "<|start|>",
            "assistant",
            "<|channel|>",
            "final",
            "<|message|>",
            "It is",
            " sunny",
            ".",
        ];
        let mut text = String::new();
        let mut sent = Sent::default();
        let (mut r, mut c) = (String::new(), String::new());
        let mut steps = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            text.push_str(piece);
            let d = sent.step(&text, i + 1 == pieces.len());
            r.push_str(d.reasoning.as_deref().unwrap_or(""));
            c.push_str(d.content.as_deref().unwrap_or(""));
            assert!(d.calls.is_empty());
            steps.push(d);
        }
        assert_eq!(r, "Weather in Paris <3 calls.");
        assert_eq!(c, "It is sunny.");
        // Reasoning came as its tokens did; the lone `<` waited for the
        // next piece; no marker or header text leaked.
        assert_eq!(steps[3].reasoning.as_deref(), Some("Weather"));
        assert_eq!(steps[5].reasoning.as_deref(), Some(" "));
        assert_eq!(steps[6].reasoning.as_deref(), Some("<3 calls."));
        assert!(steps[7..13]
            .iter()
            .all(|d| d.content.is_none() && d.reasoning.is_none()));
        assert_eq!(steps[13].content.as_deref(), Some("It is"));

        // A call: nothing of it streams until the end, then the call.
        let mut sent = Sent::default();
        let mut text = String::new();
        let call_pieces = [
            "<|channel|>",
            "analysis",
            "<|message|>",
            "Call it.",
            "<|end|>",
            "<|start|>",
            "assistant",
            "<|channel|>",
            "commentary",
            " to",
            "=functions",
            ".get_weather",
            " ",
            "<|constrain|>",
            "json",
            "<|message|>",
            "{\"location\"",
            ":\"Paris\"}",
        ];
        let mut calls = Vec::new();
        let mut r = String::new();
        for (i, piece) in call_pieces.iter().enumerate() {
            text.push_str(piece);
            let d = sent.step(&text, i + 1 == call_pieces.len());
            assert!(d.content.is_none(), "{d:?}");
            r.push_str(d.reasoning.as_deref().unwrap_or(""));
            if i + 1 < call_pieces.len() {
                assert!(d.calls.is_empty());
            }
            calls = d.calls;
        }
        assert_eq!(r, "Call it.");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, "{\"location\":\"Paris\"}");
    }

    #[test]
    fn two_calls() {
        let t = format!("{CALL}<|call|><|start|>assistant<|channel|>commentary to=functions.time <|constrain|>json<|message|>{{}}");
        let p = parse(&t, true);
        let names: Vec<_> = p.calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["get_weather", "time"]);
    }
}
