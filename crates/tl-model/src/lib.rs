//! Architectures, weight loading by GGUF name, and synthetic model files.

pub mod error;
pub mod synth;

pub use error::{ModelError, Result};
