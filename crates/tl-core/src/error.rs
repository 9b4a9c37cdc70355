use tl_gguf::GgmlType;

use crate::dtype::DType;

/// Errors of the tensor core: unsupported types, shape and size mismatches.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("unsupported tensor type {ty} in tensor {tensor}")]
    UnsupportedType { ty: GgmlType, tensor: String },
    #[error("{op}: {len} values is not a whole number of {ty} blocks of {block}")]
    PartialBlock {
        op: &'static str,
        ty: GgmlType,
        len: usize,
        block: usize,
    },
    #[error("{op}: buffer size mismatch: {what}")]
    SizeMismatch { op: &'static str, what: String },
    #[error("{op}: shape mismatch: {lhs:?} vs {rhs:?}")]
    ShapeMismatch {
        op: &'static str,
        lhs: Vec<usize>,
        rhs: Vec<usize>,
    },
    #[error("{op}: {reason}")]
    Invalid { op: &'static str, reason: String },

    // Tensor, layout and op errors.
    #[error("{op}: dimension {dim} out of range for shape {shape:?}")]
    DimOutOfRange {
        op: &'static str,
        shape: Vec<usize>,
        dim: usize,
    },
    #[error("{op}: rank {rank} exceeds the maximum rank {max}")]
    RankTooHigh {
        op: &'static str,
        rank: usize,
        max: usize,
    },
    #[error("{op}: shape {shape:?} has more elements than fit in memory")]
    ShapeOverflow { op: &'static str, shape: Vec<usize> },
    #[error("{op}: shape {shape:?} with strides {strides:?} is not contiguous")]
    NotContiguous {
        op: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
    },
    #[error("{op}: dtype {dtype} is not supported here")]
    UnsupportedDType { op: &'static str, dtype: DType },
    #[error("{op}: {what} must be {expected}, got {got}")]
    DTypeMismatch {
        op: &'static str,
        what: &'static str,
        expected: DType,
        got: DType,
    },
    #[error("{op}: {what} {index} is out of range 0..{len}")]
    IndexOutOfRange {
        op: &'static str,
        what: &'static str,
        index: i64,
        len: usize,
    },
    #[error("{op}: the output shares storage with an input; use the in-place form of the op")]
    Aliasing { op: &'static str },
    #[error("{op}: tensor storage is read-only (borrowed from a model file)")]
    ReadOnly { op: &'static str },
    #[error("{op}: a thread panicked while writing this tensor; its contents are unreliable")]
    Poisoned { op: &'static str },
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
