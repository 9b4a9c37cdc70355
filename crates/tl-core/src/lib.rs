//! Tensor core: dtypes (incl. GGML block formats), shapes and layouts,
//! tensors with shared storage, the Backend trait and the CPU backend.

pub mod error;
pub mod matmul;
pub mod pool;
pub mod quant;

pub use error::{CoreError, Result};
pub use matmul::{matmul, matmul_with, MatmulScratch, Threading};
pub use tl_gguf::GgmlType;
