use tl_gguf::GgmlType;

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
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
