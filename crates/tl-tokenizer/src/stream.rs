//! Incremental decoding for streaming: tokens in, text out, never a broken
//! UTF-8 sequence. A token often ends inside a multi-byte character (byte
//! fallback, or a BPE token holding half an emoji); those bytes wait for the
//! next token.

use crate::error::Result;
use crate::tokenizer::Tokenizer;
use crate::TokenId;

/// Turns generated tokens into text as they arrive. The pieces are
/// llama.cpp's `token_to_piece` ones (no `clean_spaces` pass, which needs the
/// whole text); the concatenated output equals `String::from_utf8_lossy` of
/// the concatenated pieces.
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    unparse_special: bool,
    pending: Vec<u8>,
    first: bool,
}

impl<'t> StreamDecoder<'t> {
    pub(crate) fn new(tok: &'t Tokenizer, unparse_special: bool) -> Self {
        StreamDecoder {
            tok,
            unparse_special,
            pending: Vec::new(),
            first: true,
        }
    }

    /// Adds one token; returns the text that became complete (maybe empty).
    pub fn push(&mut self, id: TokenId) -> Result<String> {
        let mut piece = self.tok.token_to_piece(id, self.unparse_special)?;
        // llama.cpp's detokenize drops one leading space of the first piece
        // when the model adds a space prefix.
        if self.first && self.tok.add_space_prefix() {
            if let Some(rest) = piece.strip_prefix(b" ") {
                piece = rest;
            }
        }
        self.first = false;
        self.pending.extend_from_slice(piece);
        Ok(self.take_complete())
    }

    /// Flushes what is left; an unfinished character becomes U+FFFD.
    pub fn finish(mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Bytes held back, waiting for the rest of a character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut at = 0;
        loop {
            match std::str::from_utf8(&self.pending[at..]) {
                Ok(s) => {
                    out.push_str(s);
                    at = self.pending.len();
                    break;
                }
                Err(e) => {
                    let good = at + e.valid_up_to();
                    // Safe slicing: `valid_up_to` bytes are valid UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[at..good]));
                    match e.error_len() {
                        // Cut short: keep the tail for the next token.
                        None => {
                            at = good;
                            break;
                        }
                        // Can never become valid: replace it, as a lossy decode would.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            at = good + n;
                        }
                    }
                }
            }
        }
        self.pending.drain(..at);
        out
    }
}
