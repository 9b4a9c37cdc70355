//! Architectures, weight loading by GGUF name, and synthetic model files.

pub mod attention;
pub mod config;
pub mod error;
pub mod generate;
pub mod kv;
pub mod model;
mod ops;
pub mod sampler;
pub mod weights;
pub mod synth;

pub use error::{ModelError, Result};
