//! Tensor core: dtypes (incl. GGML block formats), shapes and layouts,
//! tensors with shared storage, the Backend trait and the CPU backend.

pub mod error;
pub mod quant;

pub use error::{CoreError, Result};
pub use tl_gguf::GgmlType;
