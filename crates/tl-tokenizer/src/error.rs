use thiserror::Error;

use crate::TokenId;

/// Everything the tokenizer and chat templates can fail on.
#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("GGUF metadata: {0}")]
    Gguf(#[from] tl_gguf::GgufError),

    #[error(
        "unknown tokenizer model '{0}' (tokenizer.ggml.model); supported: gpt2, llama, bert, t5"
    )]
    UnknownModel(String),

    #[error(
        "unknown pre-tokenizer '{name}' (tokenizer.ggml.pre); known: {known}",
        name = .0,
        known = crate::PreTokenizer::known_names().join(", ")
    )]
    UnknownPreTokenizer(String),

    #[error("metadata key '{key}': {reason}")]
    BadMetadata { key: &'static str, reason: String },

    #[error("token id {id} is out of range (vocabulary size {n_vocab})")]
    TokenOutOfRange { id: TokenId, n_vocab: usize },

    #[error("input is not valid UTF-8: invalid byte sequence at offset {offset}")]
    InvalidUtf8 { offset: usize },

    #[error("the model has no {what} token but encoding needs one")]
    MissingSpecialToken { what: &'static str },

    #[error("no token for byte 0x{byte:02X}: the vocabulary has neither <0x{byte:02X}> nor the raw byte")]
    NoByteToken { byte: u8 },

    #[error(transparent)]
    Template(#[from] crate::chat::TemplateError),
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
