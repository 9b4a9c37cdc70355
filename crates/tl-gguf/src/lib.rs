//! GGUF reader (memory-mapped, zero-copy tensor views) and writer.
//!
//! Format: ggml `docs/gguf.md`. Versions 2 and 3 are read; version 3 is written.

pub mod error;
pub mod models;
pub mod reader;
pub mod types;
pub mod value;
pub mod writer;

pub use error::{GgufError, Result};
pub use models::{cached_model, model_cache_dir};
pub use reader::{GgufFile, Metadata, SharedBytes, SplitPart, TensorInfo};
pub use types::GgmlType;
pub use value::{Array, Value, ValueType};
pub use writer::{GgufStreamWriter, GgufWriter, TensorLayout};
