//! Bad input gets a clear error, never a panic. Uses small synthetic
//! vocabularies, so no model file is needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tl_gguf::{Array, Metadata, Value};
use tl_tokenizer::{
    ChatMessage, ChatTemplate, DecodeOptions, EncodeOptions, RenderOptions, Tokenizer,
    TokenizerError,
};

/// A byte-level BPE vocabulary: the 256 byte symbols, "he", "hel", "hell", "hello", "<|eot|>".
fn gpt2_metadata(pre: &str) -> Metadata {
    let mut tokens: Vec<String> = Vec::new();
    // GPT-2 byte symbols, in byte order.
    let mut n = 0;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let cp = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        tokens.push(char::from_u32(cp).unwrap().to_string());
    }
    tokens.extend(["he", "hel", "hell", "hello", "<|eot|>"].map(String::from));
    let mut types = vec![1i32; tokens.len()];
    *types.last_mut().unwrap() = 3;
    let mut md = Metadata::new();
    md.insert("tokenizer.ggml.model", Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre", Value::String(pre.into()));
    md.insert("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    md.insert("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    md.insert(
        "tokenizer.ggml.merges",
        Value::Array(Array::String(
            ["h e", "he l", "hel l", "hell o"]
                .map(String::from)
                .to_vec(),
        )),
    );
    md.insert("tokenizer.ggml.eos_token_id", Value::U32(260));
    md
}

#[test]
fn unknown_pre_tokenizer_is_named() {
    let err = Tokenizer::from_metadata(&gpt2_metadata("klingon-v2")).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::UnknownPreTokenizer(p) if p == "klingon-v2"),
        "{err}"
    );
    assert!(err.to_string().contains("'klingon-v2'"), "{err}");
}

#[test]
fn unknown_model_is_named() {
    let mut md = gpt2_metadata("default");
    md.insert("tokenizer.ggml.model", Value::String("wordpiece9".into()));
    let err = Tokenizer::from_metadata(&md).unwrap_err();
    assert!(err.to_string().contains("wordpiece9"), "{err}");
}

#[test]
fn missing_vocabulary_is_an_error() {
    let mut md = Metadata::new();
    md.insert("tokenizer.ggml.model", Value::String("gpt2".into()));
    let err = Tokenizer::from_metadata(&md).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");
}

#[test]
fn small_vocab_encodes_and_decodes() {
    let tok = Tokenizer::from_metadata(&gpt2_metadata("qwen2")).unwrap();
    let opts = EncodeOptions {
        add_special: true,
        parse_special: true,
    };
    let ids = tok.encode("hello<|eot|>hello", opts).unwrap();
    assert_eq!(ids, [259, 260, 259]);
    let plain = tok
        .encode("hello<|eot|>", EncodeOptions::default())
        .unwrap();
    assert_eq!(
        plain.len(),
        1 + 7,
        "special text stays text without parse_special: {plain:?}"
    );
    assert_eq!(
        tok.decode(&ids, DecodeOptions::default()).unwrap(),
        "hellohello"
    );
    let shown = DecodeOptions {
        unparse_special: true,
        ..Default::default()
    };
    assert_eq!(tok.decode(&ids, shown).unwrap(), "hello<|eot|>hello");
    assert!(tok.is_eog(260));
}

#[test]
fn empty_input() {
    let tok = Tokenizer::from_metadata(&gpt2_metadata("default")).unwrap();
    assert!(tok.encode("", EncodeOptions::default()).unwrap().is_empty());
    assert_eq!(tok.decode(&[], DecodeOptions::default()).unwrap(), "");
    assert_eq!(tok.stream_decoder(false).finish(), "");
}

#[test]
fn invalid_utf8_bytes_are_refused_with_offset() {
    let tok = Tokenizer::from_metadata(&gpt2_metadata("default")).unwrap();
    let err = tok
        .encode_bytes(b"abc\xffdef", EncodeOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::InvalidUtf8 { offset: 3 }),
        "{err}"
    );
    assert!(err.to_string().contains("offset 3"));
}

#[test]
fn out_of_range_ids_are_refused() {
    let tok = Tokenizer::from_metadata(&gpt2_metadata("default")).unwrap();
    let err = tok
        .decode(&[1, 999_999], DecodeOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::TokenOutOfRange { id: 999_999, .. }),
        "{err}"
    );
    assert!(tok.token_to_piece(999_999, true).is_err());
    let mut s = tok.stream_decoder(false);
    assert!(s.push(999_999).is_err());
}

#[test]
fn stream_holds_split_characters() {
    let tok = Tokenizer::from_metadata(&gpt2_metadata("default")).unwrap();
    // "é" is two byte tokens here; the first alone must not produce text.
    let ids = tok.encode("é!", EncodeOptions::default()).unwrap();
    assert_eq!(ids.len(), 3);
    let mut s = tok.stream_decoder(false);
    assert_eq!(s.push(ids[0]).unwrap(), "");
    assert_eq!(s.pending_bytes(), 1);
    assert_eq!(s.push(ids[1]).unwrap(), "é");
    assert_eq!(s.push(ids[2]).unwrap(), "!");
    // A lone continuation byte can never complete: it becomes U+FFFD at once.
    let mut s = tok.stream_decoder(false);
    assert_eq!(s.push(ids[1]).unwrap(), "\u{FFFD}");
    // A cut-off character at the end is flushed as U+FFFD.
    let mut s = tok.stream_decoder(false);
    assert_eq!(s.push(ids[0]).unwrap(), "");
    assert_eq!(s.finish(), "\u{FFFD}");
}

#[test]
fn template_errors_name_line_and_cause() {
    let tok = Tokenizer::from_metadata(&gpt2_metadata("default")).unwrap();
    let mut md = gpt2_metadata("default");
    md.insert(
        "tokenizer.chat_template",
        Value::String("{% for m in messages %}\n{{ m.content }}\n{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}\n{% endfor %}".into()),
    );
    let tmpl = ChatTemplate::from_metadata(&md, &tok).unwrap();
    let ok = tmpl
        .render(&[ChatMessage::new("user", "hi")], &RenderOptions::default())
        .unwrap();
    assert_eq!(ok, "hi\n");
    let err = tmpl
        .render(&[ChatMessage::new("tool", "x")], &RenderOptions::default())
        .unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.message.contains("no tools here"), "{err}");

    let t = ChatTemplate::new(
        "{{ messages[0].content | no_such_filter }}",
        "custom.jinja",
        "",
        "",
    )
    .unwrap();
    let err = t
        .render(&[ChatMessage::new("user", "x")], &RenderOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("custom.jinja"), "{err}");
    assert!(err.to_string().contains("no_such_filter"), "{err}");

    let err = ChatTemplate::from_file("/nonexistent/template.jinja", &tok).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/template.jinja"),
        "{err}"
    );
}

#[test]
fn builtin_template_by_architecture() {
    let tok = Tokenizer::from_metadata(&gpt2_metadata("default")).unwrap();
    let mut md = gpt2_metadata("default");
    md.insert("general.architecture", Value::String("gemma3".into()));
    let t = ChatTemplate::from_metadata(&md, &tok).unwrap();
    let opts = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    assert_eq!(
        t.render(&[ChatMessage::new("user", "Hi")], &opts).unwrap(),
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
    md.insert("general.architecture", Value::String("llama".into()));
    let t = ChatTemplate::from_metadata(&md, &tok).unwrap();
    assert_eq!(
        t.render(&[ChatMessage::new("user", "Hi")], &opts).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}
