//! The engine's one error type. Validation variants carry the name of the
//! offending request field so the HTTP layer can report it as OpenAI's
//! `param`.

/// Errors of request validation, admission and execution.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("'messages' must contain at least one message")]
    EmptyMessages,
    #[error("unknown role '{role}' in messages[{index}] (expected system, developer, user, assistant or tool)")]
    UnknownRole { index: usize, role: String },
    #[error("invalid value for '{param}': {message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    #[error("the prompt has {prompt} tokens; with max_tokens = {max_tokens} this needs {} tokens, more than the limit of {limit} ({what})", prompt + max_tokens)]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
        what: &'static str,
    },
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    BadToken { token: u32, vocab: usize },
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("the queue is full ({max} requests waiting); retry later")]
    QueueFull { max: usize },
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the request was cancelled")]
    Cancelled,
    #[error("model failure: {0}")]
    Model(String),
    #[error("KV cache setup: {0}")]
    Setup(String),
    /// The model's GPU is lost to this process; nothing more can run.
    #[error("the device failed: {0}")]
    DeviceLost(String),
}

impl EngineError {
    /// True for errors caused by the request itself (HTTP 4xx).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::EmptyPrompt
                | Self::EmptyMessages
                | Self::UnknownRole { .. }
                | Self::InvalidParam { .. }
                | Self::TooLong { .. }
                | Self::BadToken { .. }
                | Self::Template(_)
                | Self::Tokenizer(_)
        )
    }

    /// The request field the error is about, where there is one.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Self::EmptyPrompt | Self::BadToken { .. } | Self::Tokenizer(_) => Some("prompt"),
            Self::EmptyMessages | Self::UnknownRole { .. } | Self::Template(_) => Some("messages"),
            Self::InvalidParam { param, .. } => Some(param),
            Self::TooLong { .. } => Some("max_tokens"),
            _ => None,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
