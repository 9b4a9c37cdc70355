/// Errors of model loading and construction.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown architecture '{name}' (supported: {supported})")]
    UnknownArchitecture {
        name: String,
        supported: &'static str,
    },
    #[error("invalid model configuration: {0}")]
    BadConfig(String),
    #[error("invalid sampling parameter: {0}")]
    BadSampling(String),
    #[error("KV cache full: {needed} more blocks needed, {free} free")]
    KvFull { needed: usize, free: usize },
    #[error("grammar: {0}")]
    Constraint(String),
    #[error("KV cache: {0}")]
    Kv(String),
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has GGML dims {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("context overflow: {needed} tokens needed, the model's context is {context}")]
    ContextOverflow { needed: usize, context: usize },
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    BadToken { token: u32, vocab: usize },
    #[error("prompt {0} is empty")]
    EmptyPrompt(usize),
    #[error("prompt of {prompt} tokens does not fit the context of {context} (use a larger --ctx-size or truncation)")]
    PromptTooLong { prompt: usize, context: usize },
    #[error(transparent)]
    Tokenizer(#[from] tl_tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] tl_tokenizer::TemplateError),
    #[error("synthetic model: {0}")]
    Synth(String),
    #[error("tensor '{tensor}': {err}")]
    Core {
        tensor: String,
        err: tl_core::CoreError,
    },
    #[error(transparent)]
    Gguf(#[from] tl_gguf::GgufError),
    /// A GPU failure (driver, kernel compile), with its reason.
    #[error("{0}")]
    Device(String),
    /// The device could not allocate what a step needed; nothing of the
    /// step is kept, and a smaller step may succeed.
    #[error("{0}")]
    OutOfMemory(String),
    /// The device is lost to this process (a kernel faulted, the device
    /// hung or failed): no later step can run on it.
    #[error("the GPU can no longer be used by this process: {0}")]
    DeviceLost(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
