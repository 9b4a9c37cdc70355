//! `tl tokenize`: show how a model's tokenizer splits a text.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use tl_tokenizer::{EncodeOptions, Tokenizer};

/// Tokenize text with a model's tokenizer and print ids and pieces.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// GGUF model file whose tokenizer to use.
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    pub model: PathBuf,

    /// Text to tokenize ("-" reads standard input).
    #[arg(value_name = "TEXT")]
    pub text: String,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Treat special-token text such as `<|im_start|>` as plain text.
    #[arg(long, conflicts_with = "parse_special")]
    pub no_special: bool,

    /// Turn special-token text into special tokens (the default).
    #[arg(long)]
    pub parse_special: bool,

    /// Do not add BOS/EOS even where the model asks for them.
    #[arg(long)]
    pub no_bos: bool,
}

/// A piece for the table: control characters escaped, bytes that are not
/// UTF-8 (half a character) as `\xNN`.
fn show_piece(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{{{:04X}}}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

pub fn run(args: &TokenizeArgs) -> anyhow::Result<()> {
    let tok = Tokenizer::from_file(&args.model)
        .with_context(|| format!("loading the tokenizer of {}", args.model.display()))?;
    let text = if args.text == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        String::from_utf8(buf).map_err(|e| {
            anyhow::anyhow!(
                "standard input is not valid UTF-8 (offset {})",
                e.utf8_error().valid_up_to()
            )
        })?
    } else {
        args.text.clone()
    };
    let opts = EncodeOptions {
        add_special: !args.no_bos,
        parse_special: !args.no_special,
    };
    let ids = tok.encode(&text, opts)?;
    let pieces = ids
        .iter()
        .map(|&id| tok.token_to_piece(id, true))
        .collect::<Result<Vec<_>, _>>()?;

    if args.json {
        let tokens: Vec<serde_json::Value> = ids
            .iter()
            .zip(&pieces)
            .map(|(id, p)| match std::str::from_utf8(p) {
                Ok(text) => serde_json::json!({ "id": id, "piece": text }),
                // Half a character: the exact bytes, and a readable form.
                Err(_) => serde_json::json!({ "id": id, "piece": show_piece(p), "bytes": p }),
            })
            .collect();
        let out = serde_json::json!({
            "model": args.model.display().to_string(),
            "n_tokens": ids.len(),
            "ids": ids,
            "tokens": tokens,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (id, p) in ids.iter().zip(&pieces) {
            println!("{id:>7} -> '{}'", show_piece(p));
        }
        println!("{} tokens", ids.len());
    }
    Ok(())
}
