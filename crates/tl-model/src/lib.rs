//! Architectures, weight loading by GGUF name, and synthetic model files.

pub mod attention;
pub mod config;
pub mod constrain;
mod cuda;
mod dump;
pub mod encoder;
pub mod error;
mod exec_cpu;
pub mod forward;
pub mod gbnf;
pub mod generate;
pub mod imatrix;
pub mod kv;
pub mod llm;
pub mod model;
mod ops;
pub mod quantize;
pub mod sampler;
pub mod spec;
pub mod synth;
pub mod weights;

pub use error::{ModelError, Result};
