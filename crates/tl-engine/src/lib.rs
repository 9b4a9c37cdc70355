//! The serving engine: request lifecycle, continuous batching over the
//! ragged-batch forward pass, the paged KV block pool with prefix caching.
//!
//! - [`request`]: requests as received, validated once into
//!   [`ValidRequest`], and the [`Event`]s they stream back.
//! - [`pool`]: KV blocks, reference counts, the prefix cache (block layout
//!   and hashing are described there).
//! - [`scheduler`]: one step = one forward over every running sequence's
//!   next token plus prompt chunks (the policy is described there).
//! - [`engine`]: the scheduler on its own OS thread, driven by commands.
//! - `masks`: the threads that compute grammar masks while a step's
//!   forward runs.

pub mod engine;
pub mod error;
mod masks;
pub mod pool;
pub mod request;
pub mod scheduler;
mod stop;

pub use engine::{Engine, EngineConfig, RequestStream};
pub use error::{EngineError, Result};
pub use request::{
    Event, FinishReason, GenerationRequest, PromptInput, TokenLogprob, ValidRequest, Validator,
};
pub use scheduler::{DraftModel, RequestId, Scheduler, SchedulerConfig, Stats};
