//! Tokenizers and chat templates built from GGUF metadata alone, matching
//! llama.cpp token for token.
//!
//! - [`Tokenizer`]: `tokenizer.ggml.model = gpt2` (byte-level BPE, with the
//!   pre-tokenizer named by `tokenizer.ggml.pre`) and `llama`
//!   (SentencePiece-style merges by score, byte fallback). Encode, decode,
//!   pieces, special ids, and a [`StreamDecoder`] for streaming.
//! - [`ChatTemplate`]: the model's `tokenizer.chat_template` (Jinja) rendered
//!   with minijinja, or a built-in template chosen by architecture.
//!
//! The algorithms are ports of llama.cpp `src/llama-vocab.cpp` and
//! `src/unicode.cpp`; each file names what it ports.

mod bpe;
pub mod chat;
mod error;
mod pretok;
mod special;
mod spm;
mod stream;
mod tokenizer;
mod unicode;
mod unicode_data;
mod vocab;

pub use chat::{ChatMessage, ChatTemplate, RenderOptions, TemplateError};
pub use error::{Result, TokenizerError};
pub use stream::StreamDecoder;
pub use tokenizer::{DecodeOptions, EncodeOptions, Tokenizer};
pub use vocab::{PreTokenizer, SpecialTokens, TokenAttr, Vocab, VocabKind};

/// A token id (an index into the vocabulary).
pub type TokenId = u32;
