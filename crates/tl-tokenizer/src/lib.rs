//! Tokenizers and chat templates built from GGUF metadata alone, matching
//! llama.cpp token for token.
//!
//! - [`Tokenizer`]: `tokenizer.ggml.model = gpt2` (byte-level BPE, with the
//!   pre-tokenizer named by `tokenizer.ggml.pre`) and `llama`
//!   (SentencePiece-style merges by score, byte fallback), and `bert`
//!   (WordPiece, for BERT-family embedding models). Encode, decode,
//!   pieces, special ids, and a [`StreamDecoder`] for streaming.
//! - [`ChatTemplate`]: the model's `tokenizer.chat_template` (Jinja) rendered
//!   with minijinja, or a built-in template chosen by architecture.
//!
//! The algorithms are ports of llama.cpp `src/llama-vocab.cpp` and
//! `src/unicode.cpp`; each file names what it ports.
//!
//! ```no_run
//! use tl_gguf::GgufFile;
//! use tl_tokenizer::{ChatMessage, ChatTemplate, DecodeOptions, EncodeOptions, RenderOptions, Tokenizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gguf = GgufFile::open("qwen2.5-coder-0.5b-instruct-q4.gguf")?;
//! let tok = Tokenizer::from_gguf(&gguf)?;
//! let template = ChatTemplate::from_metadata(&gguf.metadata, &tok)?;
//! let prompt = template.render(
//!     &[ChatMessage::new("user", "Hello!")],
//!     &RenderOptions { add_generation_prompt: true, ..Default::default() },
//! )?;
//! // The rendered prompt holds special-token text: parse it.
//! let ids = tok.encode(&prompt, EncodeOptions { add_special: true, parse_special: true })?;
//!
//! let mut stream = tok.stream_decoder(false);
//! for &id in &ids {
//!     print!("{}", stream.push(id)?);
//!     if tok.is_eog(id) {
//!         break;
//!     }
//! }
//! print!("{}", stream.finish());
//! let text = tok.decode(&ids, DecodeOptions::default())?;
//! # let _ = text;
//! # Ok(())
//! # }
//! ```

mod bpe;
pub mod chat;
mod error;
mod pretok;
mod pretok_regex;
mod special;
mod spm;
mod stream;
mod tokenizer;
mod ugm;
mod unicode;
mod unicode_data;
mod vocab;
mod wpm;

pub use chat::{builtin_template, ChatMessage, ChatTemplate, RenderOptions, TemplateError};
pub use error::{Result, TokenizerError};
pub use pretok_regex::RegexSet;
pub use stream::StreamDecoder;
pub use tokenizer::{DecodeOptions, EncodeOptions, Tokenizer};
pub use vocab::{PreTokenizer, SpecialTokens, TokenAttr, Vocab, VocabKind};

/// A token id (an index into the vocabulary).
pub type TokenId = u32;

#[cfg(test)]
mod tests {
    /// The engine shares one tokenizer and template across request threads.
    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<crate::Tokenizer>();
        assert_send_sync::<crate::ChatTemplate>();
    }
}
