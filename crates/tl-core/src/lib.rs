//! Tensor core: dtypes (incl. GGML block formats), shapes and layouts,
//! tensors with shared storage, the Backend trait and the CPU backend.
//!
//! Where things are: [`dtype`] (element types), [`shape`] and [`layout`]
//! (dims, strides, views), [`storage`] (owned buffers and zero-copy GGUF
//! mappings), [`tensor`], [`backend`] (the op trait and the shape rules of
//! each op), [`cpu`] (the CPU backend, kernels under `cpu/ops/`), [`quant`]
//! (GGML block formats).

// Storage reinterprets GGUF bytes (little-endian) as native numbers.
#[cfg(target_endian = "big")]
compile_error!(
    "tl-core reads little-endian GGUF data in place and supports little-endian targets only"
);

pub mod backend;
pub mod cpu;
pub mod device;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod matmul;
pub mod numerics;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod shape;
pub mod storage;
pub mod tensor;

pub use backend::{Activation, Backend, BinaryOp, RopeConfig, RopeMode, UnaryOp};
pub use cpu::CpuBackend;
pub use device::Device;
pub use dtype::{DType, Element, QuantType};
pub use error::{CoreError, Result};
pub use layout::Layout;
pub use matmul::{matmul, matmul_with, MatmulScratch, Threading};
pub use numerics::{numerics, set_numerics, Numerics};
pub use packed::{matmul_packed, matmul_packed_many, PackedWeight};
pub use shape::{Shape, MAX_RANK};
pub use storage::{CpuStorage, Storage};
pub use tensor::{CpuSlice, Tensor};
pub use tl_gguf::GgmlType;
