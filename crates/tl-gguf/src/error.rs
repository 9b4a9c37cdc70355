use std::path::PathBuf;

/// Everything that can go wrong reading or writing a GGUF file. Parse errors
/// carry the byte offset where the problem was found.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write failed: {0}")]
    Write(#[from] std::io::Error),
    #[error("not a GGUF file: bad magic {found:02x?} at offset 0 (expected \"GGUF\")")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {version} at offset 4 (supported: 2, 3)")]
    UnsupportedVersion { version: u32 },
    #[error("file truncated at offset {offset}: needed {needed} more bytes for {what}, file is {len} bytes")]
    Truncated {
        offset: u64,
        needed: u64,
        len: u64,
        what: String,
    },
    #[error("absurd {what} {count} at offset {offset}: the file has only {remaining} bytes left")]
    AbsurdCount {
        what: &'static str,
        count: u64,
        offset: u64,
        remaining: u64,
    },
    #[error("invalid UTF-8 in {what} at offset {offset}")]
    InvalidUtf8 { what: &'static str, offset: u64 },
    #[error("unknown metadata value type {type_id} for key '{key}' at offset {offset}")]
    UnknownValueType {
        key: String,
        type_id: u32,
        offset: u64,
    },
    #[error("arrays nested deeper than {max} levels for key '{key}' at offset {offset}")]
    NestingTooDeep {
        key: String,
        max: usize,
        offset: u64,
    },
    #[error("duplicate metadata key '{key}' at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },
    #[error("duplicate tensor name '{name}' at offset {offset}")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("unknown tensor type id {type_id} in tensor '{name}' at offset {offset}")]
    UnknownTensorType {
        name: String,
        type_id: u32,
        offset: u64,
    },
    #[error("tensor '{name}' at offset {offset}: {reason}")]
    BadTensorInfo {
        name: String,
        offset: u64,
        reason: String,
    },
    #[error("invalid general.alignment {alignment} (must be a power of two) at offset {offset}")]
    BadAlignment { alignment: u64, offset: u64 },
    #[error(
        "tensor '{name}' data offset {data_offset} is not a multiple of the alignment {alignment}"
    )]
    Misaligned {
        name: String,
        data_offset: u64,
        alignment: u64,
    },
    #[error("tensor '{name}' data [{start}, {end}) (absolute file offsets) runs past the end of the file ({len} bytes)")]
    DataPastEnd {
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("metadata key '{key}': {reason}")]
    Metadata { key: String, reason: String },
    #[error("no tensor named '{0}'")]
    NoTensor(String),
    #[error("writer: {0}")]
    Writer(String),
    #[error("split model {path}: {reason}")]
    Split { path: PathBuf, reason: String },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
