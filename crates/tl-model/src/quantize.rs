//! Model quantization: rewrites a GGUF model with its weight matrices in
//! another block type, choosing each tensor's type as llama.cpp's
//! `llama-quantize` does (`src/llama-quant.cpp`), so that for the same input
//! and file type the output's tensors are byte-identical to llama.cpp's.
//!
//! What decides a tensor's type ([`plan`]):
//! - Only weight matrices are quantized: 2-D or 3-D tensors whose names end in
//!   `weight`, minus norms, MoE routers, position/token-type embeddings and the
//!   small special tensors llama.cpp lists ([`allows_quantization`]). Other
//!   tensors are copied byte for byte.
//! - A file type ([`FileType`]) has a default block type; mixes (`Q4_K_M`,
//!   `Q3_K_S`, …) give more bits to the tensors quantization hurts most:
//!   `output`/tied `token_embd` (Q6_K, or Q8_0 when rows aren't whole
//!   super-blocks), `attn_v` and `ffn_down` by layer position
//!   ([`use_more_bits`]), `attn_output`, and Q8_0 for `attn_k`/`attn_v` of
//!   8-expert models.
//! - A type whose block does not divide a row falls back to a 32-value type
//!   (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0), and to F16
//!   when even that does not fit.
//!
//! Tensors are written in llama.cpp's order (by layer number, then by name)
//! and the metadata is the input's with `general.quantization_version` and
//! `general.file_type` moved to the end, so for the same choices the whole
//! file is byte-identical, not only its tensors.
//!
//! With an importance matrix ([`crate::imatrix`], llama-quantize's
//! `--imatrix`), each tensor with an entry of the right size is quantized by
//! the weighted quantizers (`tl_core::quant::quantize_weighted`, one slice of
//! the matrix per expert), tensors without one as before; the Q2_K_S mix
//! needs one for all its Q2_K tensors, Q4_0/Q5_0 give the first eighth of
//! `ffn_down` Q4_1/Q5_1, and the output metadata gets llama-quantize's
//! `quantize.imatrix.*` keys.
//!
//! The IQ file types have llama.cpp's rules: IQ4_NL and IQ4_XS (Q5_K for
//! `attn_v` of GQA >= 4 models and, without an importance matrix, for the
//! first eighth of `ffn_down`), IQ3_XXS, IQ3_XS, IQ3_S and IQ3_M, and the
//! IQ2/IQ1 mixes (Q2_K or IQ3_S `attn_v`, first `ffn_down` and
//! `token_embd`, Q5_K output); every IQ type falls back to IQ4_NL for rows
//! that are not whole 256-value super-blocks. As in llama.cpp, IQ3_XXS,
//! IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M tensors (other than `output` and
//! `token_embd`) need importance-matrix data: without it the plan fails
//! before anything is written. A file type whose mix picks a type that has
//! no quantizer here yet is refused by name.
//!
//! `--tensor-type PATTERN=TYPE` ([`QuantizeOptions::tensor_types`]) sets the
//! type of every quantized tensor whose name the pattern (a regular
//! expression, searched anywhere in the name, as llama-quantize's
//! `std::regex_search` does) matches, in place of the mix's choice; the
//! first matching pattern wins, and the row-length fallback still applies.
//! `--tensor-type-file FILE` ([`read_tensor_type_file`]) reads such
//! `PATTERN=TYPE` words from a file.
//!
//! MXFP4_MOE (gpt-oss's file type) puts every expert tensor (3-D with more
//! than one expert) in MXFP4 and everything else that is quantized,
//! `output` and a tied `token_embd` included, in Q8_0, as llama-quantize.
//!
//! TQ1_0 and TQ2_0 (the ternary types) put every quantized matrix in the
//! ternary type except `output` (Q6_K, Q8_0 for rows that are not whole
//! super-blocks) and `token_embd` (Q4_K), as llama.cpp; rows that are not
//! whole 256-value super-blocks fall back to Q4_0.
//!
//! A split input (llama.cpp's `gguf-split` parts, given by the first) is
//! quantized as the model it was split from, into one file, as
//! llama-quantize does (its output for the parts is the same file as for
//! the whole).
//!
//! Split output ([`SplitOutput`]): `--keep-split` writes as many parts as
//! the input has, each holding the tensors of the input part of the same
//! number, as llama-quantize's `--keep-split` (tensors in input order, so
//! the mix's layer counters run in that order too);
//! `--split-max-tensors N` and `--split-max-size SIZE` cut the output as
//! llama-gguf-split cuts a file (N tensors a part; or as many as fit in
//! SIZE bytes of padded tensor data). Parts are named
//! `PREFIX-0000k-of-0000N.gguf` (PREFIX: the output path, a trailing
//! `.gguf` dropped), the first holding all the metadata, each the keys
//! `split.no`, `split.count` and `split.tensors.count`.

use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use rayon::prelude::*;
use tl_gguf::{GgmlType, GgufFile, GgufStreamWriter, Metadata, TensorLayout, Value};

use crate::imatrix::Imatrix;

/// Errors of quantization; each names the tensor or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("unknown file type '{name}' (known: {known})")]
    UnknownFileType { name: String, known: String },
    #[error("file type '{name}' is not supported by tl quantize yet (supported: {known})")]
    UnsupportedFileType { name: String, known: String },
    #[error("tensor '{tensor}': the {ftype} mix quantizes it to {ty}, which needs an importance matrix; pass one with --imatrix FILE")]
    NeedsImatrix {
        tensor: String,
        ty: GgmlType,
        ftype: FileType,
    },
    #[error("tensor '{tensor}': the {ftype} mix quantizes it to {ty}, which needs importance-matrix data, and the importance matrix {file} has no entry for it")]
    MissingImatrixEntry {
        tensor: String,
        ty: GgmlType,
        ftype: FileType,
        file: String,
    },
    #[error("importance matrix {file}: the entry for tensor '{tensor}' has {got} values, the tensor needs {want} ({n_cols} columns x {n_experts} experts)")]
    ImatrixSize {
        tensor: String,
        file: String,
        got: usize,
        want: u64,
        n_cols: u64,
        n_experts: u64,
    },
    #[error("importance matrix {path}: {reason}")]
    Imatrix { path: PathBuf, reason: String },
    #[error("tensor '{tensor}' is already quantized ({from}); pass --allow-requantize to quantize it again to {to} (quality drops: quantize from the F16/F32 original when you have it)")]
    Requantize {
        tensor: String,
        from: GgmlType,
        to: GgmlType,
    },
    #[error("tensor '{tensor}': row {row} holds a non-finite value (inf or NaN); refusing to quantize it")]
    NonFinite { tensor: String, row: usize },
    #[error("tensor '{tensor}': {reason}")]
    Tensor { tensor: String, reason: String },
    #[error("--tensor-type {pattern}: {reason}")]
    TensorTypePattern { pattern: String, reason: String },
    #[error("tensor type file {path}, line {line}: '{word}': {reason}")]
    TensorTypeFile {
        path: PathBuf,
        line: usize,
        word: String,
        reason: String,
    },
    #[error("model metadata: {0}")]
    Metadata(String),
    #[error("split output: {0}")]
    Split(String),
    #[error("the output {0} is the input file (or a part of it)")]
    SameFile(PathBuf),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Gguf(#[from] tl_gguf::GgufError),
}

pub type Result<T, E = QuantizeError> = std::result::Result<T, E>;

macro_rules! file_types {
    ($($var:ident = $id:literal, $name:literal, $ty:ident, $doc:literal;)*) => {
        /// A model file type: llama.cpp's `llama_ftype` (the value stored in
        /// `general.file_type`), i.e. a default block type plus a rule for
        /// which tensors get more bits.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum FileType {
            $(#[doc = $doc] $var,)*
        }

        impl FileType {
            pub const ALL: &'static [FileType] = &[$(FileType::$var),*];

            /// The `llama_ftype` number written to `general.file_type`.
            pub fn id(self) -> u32 {
                match self { $(FileType::$var => $id,)* }
            }

            /// llama-quantize's name for it (`Q4_K_M`).
            pub fn name(self) -> &'static str {
                match self { $(FileType::$var => $name,)* }
            }

            /// The block type most tensors get.
            pub fn default_type(self) -> GgmlType {
                match self { $(FileType::$var => GgmlType::$ty,)* }
            }

            /// One line of help: name and what it is.
            pub fn describe(self) -> &'static str {
                match self { $(FileType::$var => $doc,)* }
            }
        }
    };
}

file_types! {
    F32 = 0, "F32", F32, "32-bit floats";
    F16 = 1, "F16", F16, "16-bit floats";
    BF16 = 32, "BF16", BF16, "bfloat16";
    Q8_0 = 7, "Q8_0", Q8_0, "8.5 bits per weight";
    Q4_0 = 2, "Q4_0", Q4_0, "4.5 bpw, scale per 32";
    Q4_1 = 3, "Q4_1", Q4_1, "5 bpw, scale and minimum per 32";
    Q5_0 = 8, "Q5_0", Q5_0, "5.5 bpw, scale per 32";
    Q5_1 = 9, "Q5_1", Q5_1, "6 bpw, scale and minimum per 32";
    Q2_K = 10, "Q2_K", Q2_K, "Q2_K with Q3_K/Q4_K attn_v and Q3_K ffn_down, attn_output";
    Q2_K_S = 21, "Q2_K_S", Q2_K, "Q2_K throughout (needs an importance matrix)";
    Q3_K_S = 11, "Q3_K_S", Q3_K, "Q3_K throughout";
    Q3_K_M = 12, "Q3_K_M", Q3_K, "Q3_K with Q4_K/Q5_K attn_v, ffn_down, attn_output";
    Q3_K_L = 13, "Q3_K_L", Q3_K, "Q3_K with Q5_K attn_v, ffn_down, attn_output";
    Q4_K_S = 14, "Q4_K_S", Q4_K, "Q4_K with Q5_K in the first attn_v and ffn_down";
    Q4_K_M = 15, "Q4_K_M", Q4_K, "Q4_K with Q6_K in half of attn_v and ffn_down";
    Q5_K_S = 16, "Q5_K_S", Q5_K, "Q5_K throughout";
    Q5_K_M = 17, "Q5_K_M", Q5_K, "Q5_K with Q6_K in half of attn_v and ffn_down";
    Q6_K = 18, "Q6_K", Q6_K, "6.56 bpw";
    IQ4_NL = 25, "IQ4_NL", IQ4_NL, "4.5 bpw, non-linear levels, scale per 32";
    IQ4_XS = 30, "IQ4_XS", IQ4_XS, "4.25 bpw, non-linear levels, 6-bit scales per 32 in blocks of 256";
    IQ3_M = 27, "IQ3_M", IQ3_S, "3.66 bpw: IQ3_S with Q4_K attn_v, attn_output and first ffn_down";
    IQ3_S = 26, "IQ3_S", IQ3_S, "3.44 bpw, 4-value grid points with signs, 4-bit scales per 32";
    IQ3_XS = 22, "IQ3_XS", IQ3_S, "3.3 bpw: IQ3_S with IQ3_XXS attn_q, attn_k and middle ffn_gate/ffn_up (needs an importance matrix)";
    IQ3_XXS = 23, "IQ3_XXS", IQ3_XXS, "3.06 bpw, 4-value grid points (needs an importance matrix)";
    IQ2_M = 29, "IQ2_M", IQ2_S, "2.7 bpw: IQ2_S with IQ3_S attn_v, attn_output, first ffn_down (needs an importance matrix)";
    IQ2_S = 28, "IQ2_S", IQ2_XS, "2.5 bpw: IQ2_XS with IQ3_S attn_v, attn_output, first ffn_down (needs an importance matrix)";
    IQ2_XS = 20, "IQ2_XS", IQ2_XS, "2.31 bpw, 8-value grid points (needs an importance matrix)";
    IQ2_XXS = 19, "IQ2_XXS", IQ2_XXS, "2.06 bpw, 8-value grid points (needs an importance matrix)";
    IQ1_M = 31, "IQ1_M", IQ1_M, "1.75 bpw (needs an importance matrix)";
    IQ1_S = 24, "IQ1_S", IQ1_S, "1.56 bpw (needs an importance matrix)";
    TQ1_0 = 36, "TQ1_0", TQ1_0, "1.69 bpw ternary (for models trained ternary), Q4_K token_embd";
    TQ2_0 = 37, "TQ2_0", TQ2_0, "2.06 bpw ternary (for models trained ternary), Q4_K token_embd";
    MXFP4_MOE = 38, "MXFP4_MOE", MXFP4, "MXFP4 experts (4.25 bpw), Q8_0 elsewhere";
}

impl FileType {
    /// The IQ2/IQ1 mixes of llama.cpp (one branch of its rules).
    fn is_iq2_mix(self) -> bool {
        matches!(
            self,
            FileType::IQ2_XXS
                | FileType::IQ2_XS
                | FileType::IQ1_S
                | FileType::IQ2_S
                | FileType::IQ2_M
                | FileType::IQ1_M
        )
    }

    /// Whether every type the mix can choose has a quantizer here.
    fn is_writable(self) -> bool {
        use GgmlType as G;
        let types: &[GgmlType] = match self {
            FileType::IQ3_XXS => &[G::IQ3_XXS, G::IQ3_S, G::IQ2_S],
            FileType::IQ2_S | FileType::IQ2_M => &[G::IQ2_XS, G::IQ2_S, G::IQ3_S],
            FileType::IQ1_S | FileType::IQ1_M => &[self.default_type(), G::IQ2_XXS],
            _ => &[],
        };
        can_write(self.default_type()) && types.iter().all(|&t| can_write(t))
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for FileType {
    type Err = QuantizeError;

    /// A name as llama-quantize takes it (any case; `Q4_K` means `Q4_K_M`,
    /// `Q3_K` means `Q3_K_M`, `Q5_K` means `Q5_K_M`) or its number.
    fn from_str(s: &str) -> Result<Self> {
        let up = s.trim().to_ascii_uppercase();
        let known = || {
            FileType::ALL
                .iter()
                .filter(|t| t.is_writable())
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if up.starts_with("MXFP4") && up != "MXFP4_MOE" {
            return Err(QuantizeError::UnsupportedFileType {
                name: s.to_owned(),
                known: known(),
            });
        }
        let alias = match up.as_str() {
            "Q3_K" => "Q3_K_M",
            "Q4_K" => "Q4_K_M",
            "Q5_K" => "Q5_K_M",
            other => other,
        };
        let ft = FileType::ALL
            .iter()
            .copied()
            .find(|t| t.name() == alias || up.parse::<u32>().ok() == Some(t.id()))
            .ok_or_else(|| QuantizeError::UnknownFileType {
                name: s.to_owned(),
                known: known(),
            })?;
        if !ft.is_writable() {
            return Err(QuantizeError::UnsupportedFileType {
                name: s.to_owned(),
                known: known(),
            });
        }
        Ok(ft)
    }
}

/// What to do, as llama-quantize's flags say it.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub ftype: FileType,
    /// Quantize tensors that are already quantized (dequantized to f32 first).
    pub allow_requantize: bool,
    /// Copy `output.weight` as it is.
    pub leave_output_tensor: bool,
    /// Every quantized tensor gets the default type (no mix rules; shapes
    /// that don't fit still fall back).
    pub pure: bool,
    pub output_tensor_type: Option<GgmlType>,
    pub token_embedding_type: Option<GgmlType>,
    /// Worker threads; 0 uses all cores.
    pub threads: usize,
    /// The importance matrix (already filtered by `--include-weights` /
    /// `--exclude-weights`); one without entries counts as none, as in
    /// llama-quantize.
    pub imatrix: Option<Arc<Imatrix>>,
    /// llama-quantize's `--tensor-type PATTERN=TYPE`, in order: a quantized
    /// tensor whose name the first matching pattern matches gets its type
    /// instead of the mix's (see [`TensorTypeOverride`]).
    pub tensor_types: Vec<TensorTypeOverride>,
    /// How the output is cut into files.
    pub split: SplitOutput,
}

/// How the output is cut into files (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitOutput {
    /// One file, at the output path.
    #[default]
    Single,
    /// llama-quantize's `--keep-split`: the input's parts, each part's
    /// tensors in a part of its own. An input that is one file gives one
    /// file named `PREFIX-00001-of-00001.gguf`, without split keys, as
    /// llama-quantize.
    KeepInput,
    /// llama-gguf-split's `--split-max-tensors N`: N tensors a part.
    MaxTensors(u64),
    /// llama-gguf-split's `--split-max-size`: a part takes tensors while
    /// their data, each padded to 32 bytes, stays within this many bytes
    /// (a tensor larger than that gets a part of its own).
    MaxBytes(u64),
}

/// llama-gguf-split's `--split-max-size` value: a whole number followed by
/// `M` (10^6 bytes) or `G` (10^9 bytes), as `128M` or `4G`.
pub fn parse_split_size(s: &str) -> Result<u64> {
    let bad = |why: &str| {
        QuantizeError::Split(format!(
            "--split-max-size '{s}': {why} (a whole number followed by M for megabytes or G for gigabytes, as 500M or 4G)"
        ))
    };
    let t = s.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, 'M')) => (&t[..i], 1_000_000u64),
        Some((i, 'G')) => (&t[..i], 1_000_000_000u64),
        Some(_) => return Err(bad("the unit must be M or G")),
        None => return Err(bad("empty")),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not a whole number before the unit"));
    }
    let n: u64 = digits.parse().map_err(|_| bad("number too large"))?;
    if n == 0 {
        return Err(bad("the size must be positive"));
    }
    n.checked_mul(unit).ok_or_else(|| bad("number too large"))
}

/// Part `i` (from 0) of `count` of a split output at `prefix`
/// (llama.cpp's `llama_split_path`: `PREFIX-0000k-of-0000N.gguf`, a
/// trailing `.gguf` of `prefix` dropped first, as llama-quantize drops it).
pub fn split_output_path(prefix: &Path, i: usize, count: usize) -> PathBuf {
    let mut s = match prefix.to_str() {
        Some(p) => std::ffi::OsString::from(p.strip_suffix(".gguf").unwrap_or(p)),
        None => prefix.as_os_str().to_owned(),
    };
    s.push(format!("-{:05}-of-{count:05}.gguf", i + 1));
    PathBuf::from(s)
}

/// One output file: its path and the plans (a run of [`Quantization::plans`])
/// it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputPart {
    pub path: PathBuf,
    pub tensors: std::ops::Range<usize>,
}

/// Cuts `plans` (in output order) into the output files `split` asks for.
/// Also says whether the parts carry split keys.
fn output_parts(
    file: &GgufFile,
    plans: &[TensorPlan],
    output: &Path,
    split: SplitOutput,
) -> Result<(Vec<OutputPart>, bool)> {
    const ALIGN: u64 = 32; // GGUF_DEFAULT_ALIGNMENT, as gguf-split counts
    let n = plans.len();
    let part_of: Vec<usize> = match split {
        SplitOutput::Single => {
            return Ok((
                vec![OutputPart {
                    path: output.to_owned(),
                    tensors: 0..n,
                }],
                false,
            ))
        }
        SplitOutput::KeepInput => plans
            .iter()
            .map(|p| file.tensor_location(&file.tensors[p.input]).0)
            .collect(),
        SplitOutput::MaxTensors(0) => {
            return Err(QuantizeError::Split(
                "--split-max-tensors must be at least 1".into(),
            ))
        }
        SplitOutput::MaxTensors(per) => (0..n).map(|i| (i as u64 / per) as usize).collect(),
        SplitOutput::MaxBytes(0) => {
            return Err(QuantizeError::Split(
                "--split-max-size must be positive".into(),
            ))
        }
        SplitOutput::MaxBytes(max) => {
            let (mut part, mut used, mut in_part) = (0usize, 0u64, 0usize);
            let mut v = Vec::with_capacity(n);
            for p in plans {
                let size = p.out_bytes().div_ceil(ALIGN) * ALIGN;
                if in_part > 0 && used + size > max {
                    part += 1;
                    used = 0;
                    in_part = 0;
                }
                used += size;
                in_part += 1;
                v.push(part);
            }
            v
        }
    };
    let count = match split {
        SplitOutput::KeepInput => file.parts.len().max(1),
        _ => part_of.last().map_or(1, |&p| p + 1),
    };
    if count > usize::from(u16::MAX) {
        return Err(QuantizeError::Split(format!(
            "{count} parts: split.count holds at most {}",
            u16::MAX
        )));
    }
    if part_of.windows(2).any(|w| w[1] < w[0]) || part_of.iter().any(|&p| p >= count) {
        return Err(QuantizeError::Split(
            "the tensors don't come in part order".into(),
        ));
    }
    let parts = (0..count)
        .map(|i| OutputPart {
            path: split_output_path(output, i, count),
            tensors: part_of.partition_point(|&p| p < i)..part_of.partition_point(|&p| p <= i),
        })
        .collect();
    // llama-quantize writes split keys only for more than one part;
    // llama-gguf-split always.
    let keys = split != SplitOutput::KeepInput || count > 1;
    Ok((parts, keys))
}

/// One `--tensor-type PATTERN=TYPE`: a regular expression searched in
/// tensor names (ECMAScript-like syntax, as `std::regex` takes it), and the
/// type the matching tensors get.
#[derive(Clone, Debug)]
pub struct TensorTypeOverride {
    /// The pattern as given (lower-cased, as llama-quantize lower-cases it).
    pub pattern: String,
    pub ty: GgmlType,
    regex: fancy_regex::Regex,
}

impl TensorTypeOverride {
    /// Compiles `pattern` (lower-cased first) for tensors of type `ty`.
    pub fn new(pattern: &str, ty: GgmlType) -> Result<Self> {
        let pattern = pattern.to_ascii_lowercase();
        if pattern.is_empty() {
            return Err(QuantizeError::TensorTypePattern {
                pattern,
                reason: "missing tensor name pattern".into(),
            });
        }
        if !can_write(ty) {
            return Err(QuantizeError::TensorTypePattern {
                pattern,
                reason: format!("can't write tensors of type {ty}"),
            });
        }
        let regex =
            fancy_regex::Regex::new(&pattern).map_err(|e| QuantizeError::TensorTypePattern {
                pattern: pattern.clone(),
                reason: format!("bad regular expression: {e}"),
            })?;
        Ok(TensorTypeOverride { pattern, ty, regex })
    }

    /// Parses llama-quantize's `PATTERN=TYPE` (the type name in any case).
    pub fn parse(arg: &str) -> Result<Self> {
        let bad = |reason: &str| QuantizeError::TensorTypePattern {
            pattern: arg.to_owned(),
            reason: reason.to_owned(),
        };
        let (pat, ty) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected PATTERN=TYPE"))?;
        if ty.is_empty() {
            return Err(bad("missing quantization type"));
        }
        let t = GgmlType::from_name(&ty.to_ascii_uppercase())
            .or_else(|| GgmlType::from_name(ty))
            .ok_or_else(|| bad(&format!("unknown tensor type '{ty}'")))?;
        Self::new(pat, t)
    }

    /// Whether the pattern is found in `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.regex.is_match(name).unwrap_or(false)
    }
}

/// llama-quantize's `--tensor-type-file FILE`: the whitespace-separated
/// words of the file, each a `PATTERN=TYPE` as `--tensor-type` takes it, in
/// order. Lines whose first non-blank character is `#` are comments (an
/// addition: llama-quantize has none). A bad word is an error naming the
/// file, its line and the word.
pub fn read_tensor_type_file(path: &Path) -> Result<Vec<TensorTypeOverride>> {
    let text = std::fs::read_to_string(path).map_err(|err| QuantizeError::Io {
        path: path.to_owned(),
        err,
    })?;
    parse_tensor_type_file(path, &text)
}

/// [`read_tensor_type_file`] of the text `text` read from `path`.
pub fn parse_tensor_type_file(path: &Path, text: &str) -> Result<Vec<TensorTypeOverride>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        for word in line.split_whitespace() {
            let o = TensorTypeOverride::parse(word).map_err(|e| {
                let reason = match e {
                    QuantizeError::TensorTypePattern { reason, .. } => reason,
                    other => other.to_string(),
                };
                QuantizeError::TensorTypeFile {
                    path: path.to_owned(),
                    line: i + 1,
                    word: word.to_owned(),
                    reason,
                }
            })?;
            out.push(o);
        }
    }
    Ok(out)
}

/// The type of the first override whose pattern matches `name`.
fn override_for(overrides: &[TensorTypeOverride], name: &str) -> Option<GgmlType> {
    overrides.iter().find(|o| o.matches(name)).map(|o| o.ty)
}

impl QuantizeOptions {
    pub fn new(ftype: FileType) -> Self {
        QuantizeOptions {
            ftype,
            allow_requantize: false,
            leave_output_tensor: false,
            pure: false,
            output_tensor_type: None,
            token_embedding_type: None,
            threads: 0,
            imatrix: None,
            tensor_types: Vec::new(),
            split: SplitOutput::Single,
        }
    }

    /// The importance matrix in use: `None` when none was given or it has
    /// no entries left.
    pub fn active_imatrix(&self) -> Option<&Imatrix> {
        self.imatrix.as_deref().filter(|m| !m.entries.is_empty())
    }
}

/// One output tensor: where it comes from and the type it gets.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorPlan {
    /// Index in the input file's tensor list.
    pub input: usize,
    pub name: String,
    pub dims: Vec<u64>,
    pub from: GgmlType,
    pub to: GgmlType,
    /// The mix's type did not fit the row length and a fallback was taken.
    pub fallback: bool,
    /// What the importance matrix does for this tensor.
    pub imatrix: ImatrixUse,
}

/// Whether a tensor is quantized with importance weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImatrixUse {
    /// No importance matrix, or the tensor is copied as it is.
    NotGiven,
    /// Its entry weights the quantization.
    Used,
    /// The matrix has no entry for it: quantized without weights
    /// (llama-quantize: "did not find weights").
    NoEntry,
    /// `token_embd`'s entry has the wrong size: ignored, as llama-quantize
    /// ignores it (for any other tensor that is an error).
    WrongSizeIgnored { got: usize, want: u64 },
}

impl TensorPlan {
    pub fn in_bytes(&self) -> u64 {
        self.from.bytes_for(self.n_elements()).unwrap_or(0)
    }

    pub fn out_bytes(&self) -> u64 {
        self.to.bytes_for(self.n_elements()).unwrap_or(0)
    }

    fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Broad tensor roles, by name, as llama.cpp's quantizer sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    AttnQ,
    AttnV,
    AttnK,
    AttnQkv,
    AttnKvB,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Output,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    if name == "output.weight" {
        Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        AttnQkv
    } else if name.contains("attn_kv_b.weight") {
        AttnKvB
    } else if name.contains("attn_v.weight") {
        AttnV
    } else if name.contains("attn_k.weight") {
        AttnK
    } else if name.contains("attn_q.weight") {
        AttnQ
    } else if name.contains("attn_output.weight") {
        AttnOutput
    } else if name.contains("ffn_up") {
        FfnUp
    } else if name.contains("ffn_gate") {
        FfnGate
    } else if name.contains("ffn_down") {
        FfnDown
    } else {
        Other
    }
}

/// `attn_v`-like tensors, the most sensitive to quantization.
fn is_attn_v(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// llama.cpp's layer choice for extra bits: the first and last eighth of the
/// layers, and every third layer between them.
pub fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8
        || i_layer >= 7 * n_layers / 8
        || (i_layer - n_layers / 8).rem_euclid(3) == 2
}

/// ggml's dimension count: trailing 1s don't count, and it is at least 1.
fn n_dims(dims: &[u64]) -> usize {
    dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1)
}

/// Whether llama-quantize would quantize this tensor at all.
pub fn allows_quantization(name: &str, dims: &[u64], leave_output_tensor: bool) -> bool {
    if n_dims(dims) < 2 || !name.ends_with("weight") || name.contains("_norm.weight") {
        return false;
    }
    if leave_output_tensor && name == "output.weight" {
        return false;
    }
    const KEPT: &[&str] = &[
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    if KEPT.iter().any(|k| name.contains(k)) {
        return false;
    }
    name != "position_embd.weight" && name != "token_types.weight"
}

/// Whether `tl quantize` can write tensors of type `ty`: the types tl-core
/// quantizes to, less the activation-only Q8_1 and Q8_K.
pub fn can_write(ty: GgmlType) -> bool {
    tl_core::quant::is_weighted_supported(ty)
}

/// The layer of a tensor named `blk.N.…`, or -1 (llama.cpp sorts by it).
fn layer_of(name: &str) -> i64 {
    name.strip_prefix("blk.")
        .and_then(|r| {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            r[..end].parse::<i64>().ok()
        })
        .unwrap_or(-1)
}

/// The hyper-parameters the mix rules look at.
#[derive(Clone, Debug)]
struct ModelInfo {
    arch: String,
    n_layer: i64,
    n_head: u64,
    n_head_kv: u64,
    n_expert: u64,
    /// llama.cpp's `LLM_TYPE_70B` (8 heads share each `attn_v`).
    is_70b: bool,
}

/// The first element of a per-layer array, or the number itself.
fn first_u64(md: &Metadata, key: &str) -> Result<Option<u64>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => match a {
            tl_gguf::Array::U32(v) => Ok(v.first().map(|&x| u64::from(x))),
            tl_gguf::Array::I32(v) => Ok(v.first().and_then(|&x| u64::try_from(x).ok())),
            tl_gguf::Array::U64(v) => Ok(v.first().copied()),
            _ => Err(QuantizeError::Metadata(format!(
                "{key}: expected integers, found {:?}",
                a.elem_type()
            ))),
        },
        Some(_) => md
            .get_u64(key)
            .map(Some)
            .map_err(|e| QuantizeError::Metadata(e.to_string())),
    }
}

impl ModelInfo {
    fn read(md: &Metadata) -> Result<Self> {
        let meta = |e: tl_gguf::GgufError| QuantizeError::Metadata(e.to_string());
        let arch = md.get_str("general.architecture").map_err(meta)?.to_owned();
        let n_layer = md.get_u64(&format!("{arch}.block_count")).map_err(meta)? as i64;
        let n_head = first_u64(md, &format!("{arch}.attention.head_count"))?.unwrap_or(0);
        let n_head_kv =
            first_u64(md, &format!("{arch}.attention.head_count_kv"))?.unwrap_or(n_head);
        let n_expert = md
            .opt_u64(&format!("{arch}.expert_count"))
            .map_err(meta)?
            .unwrap_or(0);
        let is_70b = match arch.as_str() {
            "llama" => n_layer == 80 && n_head != n_head_kv,
            "qwen2" | "deci" | "olmo" => n_layer == 80,
            "jais2" => n_layer == 68,
            _ => false,
        };
        Ok(ModelInfo {
            arch,
            n_layer,
            n_head,
            n_head_kv,
            n_expert,
            is_70b,
        })
    }

    fn n_gqa(&self) -> u64 {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(0)
    }
}

/// The mix rules' running state: counters over the tensors seen so far.
struct MixState<'a> {
    info: &'a ModelInfo,
    opts: &'a QuantizeOptions,
    n_attention_wv: i64,
    i_attention_wv: i64,
    i_ffn_down: i64,
    i_ffn_gate: i64,
    i_ffn_up: i64,
    tied_embeddings: bool,
    has_imatrix: bool,
}

impl MixState<'_> {
    /// (layer, layer count) for the layer-position rules: the running
    /// counter, or, in MoE models, the number in the tensor's name.
    fn layer_info(&self, counter: i64, name: &str) -> Result<(i64, i64)> {
        let n = self.info.n_layer;
        if self.info.n_expert > 1 {
            let i = layer_of(name);
            if i < 0 || i >= n {
                return Err(QuantizeError::Tensor {
                    tensor: name.to_owned(),
                    reason: format!("no layer number in [0, {n}) in the name"),
                });
            }
            return Ok((i, n));
        }
        Ok((counter, n))
    }

    /// llama.cpp's `llama_tensor_get_type_impl` for the file types here.
    fn mix(
        &mut self,
        mut ty: GgmlType,
        name: &str,
        dims: &[u64],
        cat: Category,
    ) -> Result<GgmlType> {
        use FileType as F;
        use GgmlType as G;
        let ft = self.opts.ftype;
        let falcon = self.info.arch == "falcon";
        let gqa = self.info.n_gqa();
        let n_expert = self.info.n_expert;
        if cat == Category::Output || (self.tied_embeddings && cat == Category::TokenEmbd) {
            if let Some(t) = self.opts.output_tensor_type {
                ty = t;
            } else {
                let nx = dims.first().copied().unwrap_or(0);
                let qk = ty.block_size() as u64;
                if ft == F::MXFP4_MOE || falcon || qk == 0 || nx % qk != 0 {
                    ty = G::Q8_0;
                } else if ft.is_iq2_mix() || ft == F::IQ3_XXS {
                    ty = G::Q5_K;
                } else if ty != G::Q8_0 {
                    ty = G::Q6_K;
                }
            }
        } else if ft == F::MXFP4_MOE {
            // llama.cpp checks this before the token embedding's own type.
            ty = if dims.get(2).is_some_and(|&e| e > 1) {
                G::MXFP4
            } else {
                G::Q8_0
            };
        } else if cat == Category::TokenEmbd {
            if let Some(t) = self.opts.token_embedding_type {
                ty = t;
            } else {
                match ft {
                    F::IQ2_XXS | F::IQ2_XS | F::IQ1_S | F::IQ1_M => ty = G::Q2_K,
                    F::IQ2_S | F::IQ2_M | F::IQ3_XXS => ty = G::IQ3_S,
                    F::TQ1_0 | F::TQ2_0 => ty = G::Q4_K,
                    _ => {}
                }
            }
        } else if ft.is_iq2_mix() {
            let iq2_s = matches!(ft, F::IQ2_S | F::IQ2_M);
            if is_attn_v(cat) {
                ty = if gqa >= 4 || n_expert >= 4 {
                    G::Q4_K
                } else if iq2_s {
                    G::IQ3_S
                } else {
                    G::Q2_K
                };
                self.i_attention_wv += 1;
            } else if n_expert == 8 && cat == Category::AttnK {
                ty = G::Q4_K;
            } else if cat == Category::FfnDown {
                // The running count against all layers, even in MoE models.
                if self.i_ffn_down < self.info.n_layer / 8 {
                    ty = if iq2_s { G::IQ3_S } else { G::Q2_K };
                }
                self.i_ffn_down += 1;
            } else if cat == Category::AttnOutput {
                if n_expert == 8 {
                    ty = G::Q5_K;
                } else if matches!(ft, F::IQ1_S | F::IQ1_M) {
                    ty = G::IQ2_XXS;
                } else if iq2_s {
                    ty = G::IQ3_S;
                }
            }
        } else if is_attn_v(cat) {
            let (i, n) = (self.i_attention_wv, self.n_attention_wv);
            match ft {
                F::Q2_K => ty = if gqa >= 4 { G::Q4_K } else { G::Q3_K },
                F::Q2_K_S if gqa >= 4 => ty = G::Q4_K,
                F::IQ3_XXS => {
                    ty = if gqa >= 4 {
                        G::Q4_K
                    } else if !self.has_imatrix {
                        G::IQ3_S
                    } else {
                        G::IQ3_XXS
                    }
                }
                F::IQ3_XS | F::IQ3_S if gqa >= 4 => ty = G::Q4_K,
                F::IQ3_M => ty = G::Q4_K,
                F::Q3_K_M => ty = if i < 2 { G::Q5_K } else { G::Q4_K },
                F::Q3_K_L => ty = G::Q5_K,
                F::IQ4_NL | F::IQ4_XS if gqa >= 4 => ty = G::Q5_K,
                F::Q4_K_M | F::Q5_K_M if use_more_bits(i, n) => ty = G::Q6_K,
                F::Q4_K_S if i < 4 => ty = G::Q5_K,
                _ => {}
            }
            if self.info.is_70b && matches!(ty, G::Q3_K | G::Q4_K) {
                ty = G::Q5_K;
            }
            if n_expert == 8 {
                ty = G::Q8_0;
            }
            self.i_attention_wv += 1;
        } else if cat == Category::AttnK {
            if n_expert == 8 {
                ty = G::Q8_0;
            } else if ft == F::IQ3_XS {
                ty = G::IQ3_XXS;
            } else if ft == F::IQ3_XXS {
                ty = G::IQ2_S;
            }
        } else if cat == Category::AttnQ {
            if ft == F::IQ3_XS {
                ty = G::IQ3_XXS;
            } else if ft == F::IQ3_XXS {
                ty = G::IQ2_S;
            }
        } else if cat == Category::FfnDown {
            let (i, n) = self.layer_info(self.i_ffn_down, name)?;
            match ft {
                F::Q2_K => ty = G::Q3_K,
                F::Q2_K_S if i < n / 8 => ty = G::Q4_K,
                F::IQ3_XXS if !self.has_imatrix => ty = if i < n / 8 { G::Q4_K } else { G::Q3_K },
                F::IQ3_M if i < n / 8 || (n_expert == 8 && use_more_bits(i, n)) => ty = G::Q4_K,
                F::Q3_K_M => {
                    ty = if i < n / 16 {
                        G::Q5_K
                    } else if !falcon || use_more_bits(i, n) {
                        G::Q4_K
                    } else {
                        G::Q3_K
                    }
                }
                F::Q3_K_L => ty = if falcon { G::Q4_K } else { G::Q5_K },
                F::Q4_K_M => {
                    if falcon {
                        ty = if i < n / 16 {
                            G::Q6_K
                        } else if use_more_bits(i, n) {
                            G::Q5_K
                        } else {
                            G::Q4_K
                        };
                    } else if use_more_bits(i, n) {
                        ty = G::Q6_K;
                    }
                }
                F::IQ4_NL | F::IQ4_XS if i < n / 8 && !self.has_imatrix => ty = G::Q5_K,
                F::Q5_K_M if use_more_bits(i, n) => ty = G::Q6_K,
                F::Q4_K_S if !falcon && i < n / 8 => ty = G::Q5_K,
                // With an importance matrix the first eighth of ffn_down of
                // Q4_0/Q5_0 gets the variant with a minimum.
                F::Q4_0 if self.has_imatrix && i < n / 8 => ty = G::Q4_1,
                F::Q5_0 if self.has_imatrix && i < n / 8 => ty = G::Q5_1,
                _ => {}
            }
            self.i_ffn_down += 1;
        } else if cat == Category::AttnOutput {
            if !falcon {
                if n_expert == 8 {
                    if matches!(
                        ft,
                        F::Q2_K
                            | F::Q3_K_S
                            | F::Q3_K_M
                            | F::Q4_K_S
                            | F::Q4_K_M
                            | F::IQ4_NL
                            | F::IQ4_XS
                            | F::IQ3_XS
                            | F::IQ3_XXS
                            | F::IQ3_S
                            | F::IQ3_M
                    ) {
                        ty = G::Q5_K;
                    }
                } else {
                    match ft {
                        F::Q2_K => ty = G::Q3_K,
                        F::IQ3_XXS => ty = G::IQ3_S,
                        F::IQ3_M => ty = G::Q4_K,
                        F::Q3_K_M => ty = G::Q4_K,
                        F::Q3_K_L => ty = G::Q5_K,
                        _ => {}
                    }
                }
            } else if ft == F::Q3_K_L {
                ty = G::Q4_K;
            }
        } else if cat == Category::FfnGate {
            // The layer check can fail on a badly named MoE tensor, as in llama.cpp.
            let (i, n) = self.layer_info(self.i_ffn_gate, name)?;
            if ft == F::IQ3_XS && i >= n / 8 && i < 7 * n / 8 {
                ty = G::IQ3_XXS;
            }
            self.i_ffn_gate += 1;
        } else if cat == Category::FfnUp {
            let (i, n) = self.layer_info(self.i_ffn_up, name)?;
            if ft == F::IQ3_XS && i >= n / 8 && i < 7 * n / 8 {
                ty = G::IQ3_XXS;
            }
            self.i_ffn_up += 1;
        }
        Ok(ty)
    }
}

/// llama.cpp's `tensor_type_fallback`: a type whose block doesn't divide the
/// row length becomes a 32-value type, or F16. Returns (type, fell back).
fn fallback(ty: GgmlType, ncols: u64) -> (GgmlType, bool) {
    use GgmlType as G;
    let qk = ty.block_size() as u64;
    if qk == 0 || ncols.is_multiple_of(qk) {
        return (ty, false);
    }
    let mut to = match ty {
        G::Q2_K | G::Q3_K | G::TQ1_0 | G::TQ2_0 => G::Q4_0,
        G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        G::IQ4_XS
        | G::IQ3_S
        | G::IQ3_XXS
        | G::IQ2_S
        | G::IQ2_XS
        | G::IQ2_XXS
        | G::IQ1_M
        | G::IQ1_S => G::IQ4_NL,
        other => other,
    };
    if !ncols.is_multiple_of(to.block_size() as u64) {
        to = G::F16;
    }
    (to, true)
}

/// Chooses every output tensor's type, in output order. Fails on what the
/// quantization itself would fail on (a needed importance matrix, a
/// requantization not allowed, a type that can't be produced), before
/// anything is written.
pub fn plan(file: &GgufFile, opts: &QuantizeOptions) -> Result<Vec<TensorPlan>> {
    // A split model is quantized whole (its parts joined, as
    // `GgufFile::open` joins them); one part read alone is refused.
    if file.parts.is_empty()
        && file
            .metadata
            .opt_u64("split.count")
            .ok()
            .flatten()
            .is_some_and(|n| n > 1)
    {
        return Err(QuantizeError::Metadata(
            "one part of a split model: open the model from its first part".into(),
        ));
    }
    let info = ModelInfo::read(&file.metadata)?;
    let mut order: Vec<usize> = (0..file.tensors.len()).collect();
    if opts.split == SplitOutput::KeepInput {
        // llama-quantize's --keep-split: the input's order (part, then
        // offset in it).
        order.sort_by_key(|&i| file.tensor_location(&file.tensors[i]));
    } else {
        order.sort_by(|&a, &b| {
            let (na, nb) = (&file.tensors[a].name, &file.tensors[b].name);
            (layer_of(na), na.as_str()).cmp(&(layer_of(nb), nb.as_str()))
        });
    }
    let cats: Vec<Category> = file.tensors.iter().map(|t| category(&t.name)).collect();
    let mut st = MixState {
        info: &info,
        opts,
        n_attention_wv: cats.iter().filter(|&&c| is_attn_v(c)).count() as i64,
        i_attention_wv: 0,
        i_ffn_down: 0,
        i_ffn_gate: 0,
        i_ffn_up: 0,
        tied_embeddings: !cats.contains(&Category::Output),
        has_imatrix: opts.active_imatrix().is_some(),
    };
    let imatrix = opts.active_imatrix();
    let default = opts.ftype.default_type();
    let mut out = Vec::with_capacity(order.len());
    for i in order {
        let t = &file.tensors[i];
        let cat = cats[i];
        let mut fell_back = false;
        let to = if !allows_quantization(&t.name, &t.dims, opts.leave_output_tensor) {
            t.ty
        } else if let (Some(ty), Category::TokenEmbd, false) = (
            opts.token_embedding_type,
            cat,
            // An explicit --tensor-type naming per_layer_token_embd wins.
            t.name == "per_layer_token_embd.weight"
                && override_for(&opts.tensor_types, &t.name).is_some(),
        ) {
            ty
        } else if let (Some(ty), Category::Output) = (opts.output_tensor_type, cat) {
            ty
        } else if default.is_quantized() {
            let mixed = if let Some(ty) = override_for(&opts.tensor_types, &t.name) {
                // A manual type: the mix rules (and their counters) are skipped.
                ty
            } else if opts.pure {
                default
            } else {
                st.mix(default, &t.name, &t.dims, cat)?
            };
            let (ty, fb) = fallback(mixed, t.dims.first().copied().unwrap_or(0));
            fell_back = fb;
            ty
        } else {
            default
        };
        let mut use_imatrix = ImatrixUse::NotGiven;
        if to != t.ty {
            if !can_write(to) {
                return Err(QuantizeError::Tensor {
                    tensor: t.name.clone(),
                    reason: format!("can't write type {to}"),
                });
            }
            if let Some(m) = imatrix {
                use_imatrix = match m.entries.get(&t.name) {
                    None => ImatrixUse::NoEntry,
                    Some(e) => {
                        let n_cols = t.dims.first().copied().unwrap_or(0);
                        let n_experts = t.dims.get(2).copied().unwrap_or(1);
                        let want = n_cols * n_experts;
                        if e.len() as u64 == want {
                            ImatrixUse::Used
                        } else if cat == Category::TokenEmbd {
                            ImatrixUse::WrongSizeIgnored { got: e.len(), want }
                        } else {
                            return Err(QuantizeError::ImatrixSize {
                                tensor: t.name.clone(),
                                file: m.file.clone(),
                                got: e.len(),
                                want,
                                n_cols,
                                n_experts,
                            });
                        }
                    }
                };
            }
            // llama.cpp's tensor_requires_imatrix.
            let requires_imatrix = !matches!(cat, Category::TokenEmbd | Category::Output)
                && match to {
                    GgmlType::IQ3_XXS
                    | GgmlType::IQ2_XXS
                    | GgmlType::IQ2_XS
                    | GgmlType::IQ2_S
                    | GgmlType::IQ1_M
                    | GgmlType::IQ1_S => true,
                    GgmlType::Q2_K => opts.ftype == FileType::Q2_K_S,
                    _ => false,
                };
            if requires_imatrix && use_imatrix != ImatrixUse::Used {
                return Err(match imatrix {
                    None => QuantizeError::NeedsImatrix {
                        tensor: t.name.clone(),
                        ty: to,
                        ftype: opts.ftype,
                    },
                    Some(m) => QuantizeError::MissingImatrixEntry {
                        tensor: t.name.clone(),
                        ty: to,
                        ftype: opts.ftype,
                        file: m.file.clone(),
                    },
                });
            }
            if t.ty.is_quantized() && !opts.allow_requantize {
                return Err(QuantizeError::Requantize {
                    tensor: t.name.clone(),
                    from: t.ty,
                    to,
                });
            }
            if !tl_core::quant::is_supported(t.ty) {
                return Err(QuantizeError::Tensor {
                    tensor: t.name.clone(),
                    reason: format!("can't read type {} to convert it to {to}", t.ty),
                });
            }
            if to.bytes_for(t.n_elements()).is_none()
                || t.dims.first().copied().unwrap_or(0) % to.block_size() as u64 != 0
            {
                return Err(QuantizeError::Tensor {
                    tensor: t.name.clone(),
                    reason: format!("rows of {} values are not whole {to} blocks", t.dims[0]),
                });
            }
        }
        out.push(TensorPlan {
            input: i,
            name: t.name.clone(),
            // Trailing 1s are dropped, as ggml writes dims (`ggml_n_dims`).
            dims: t.dims[..n_dims(&t.dims).min(t.dims.len())].to_vec(),
            from: t.ty,
            to,
            fallback: fell_back,
            imatrix: use_imatrix,
        });
    }
    Ok(out)
}

/// The output metadata: the input's, with the quantization version and the
/// file type set last (as llama.cpp re-adds them) and split keys removed.
/// With an importance matrix, its `quantize.imatrix.*` keys follow (as
/// llama-quantize's key overrides, set last).
pub fn output_metadata(input: &Metadata, ftype: FileType, imatrix: Option<&Imatrix>) -> Metadata {
    let mut md = input.clone();
    md.remove("general.quantization_version");
    md.insert("general.quantization_version", Value::U32(2));
    md.remove("general.file_type");
    md.insert("general.file_type", Value::U32(ftype.id()));
    for k in ["split.no", "split.count", "split.tensors.count"] {
        md.remove(k);
    }
    for (k, v) in imatrix.map(Imatrix::metadata).unwrap_or_default() {
        md.remove(k);
        md.insert(k, v);
    }
    md
}

/// Totals of a finished quantization.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub tensors: usize,
    pub quantized: usize,
    pub fallbacks: usize,
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub elements: u64,
}

/// Converts rows of `plan.from` to `plan.to`; `src` and `dst` hold the same
/// whole rows, from row `first_row` of the tensor on. Rows are independent,
/// so threads split them. `weights` is the tensor's importance-matrix entry
/// (one run of `n_per_row` per expert, the rows of expert `e` being
/// `e * dims[1]..(e + 1) * dims[1]`).
fn convert_rows(
    plan: &TensorPlan,
    src: &[u8],
    dst: &mut [u8],
    first_row: usize,
    weights: Option<&[f32]>,
) -> Result<()> {
    let n_per_row = plan.dims.first().copied().unwrap_or(0) as usize;
    let in_row = plan.from.bytes_for(n_per_row as u64).unwrap_or(0) as usize;
    let out_row = plan.to.bytes_for(n_per_row as u64).unwrap_or(0) as usize;
    if n_per_row == 0 || in_row == 0 || out_row == 0 {
        return Ok(());
    }
    // Enough rows per task that small rows don't drown in scheduling.
    let rows_per_task = (16384 / n_per_row).max(1);
    let rows_per_expert = plan.dims.get(1).copied().unwrap_or(1).max(1) as usize;
    let core = |e: tl_core::CoreError| QuantizeError::Tensor {
        tensor: plan.name.clone(),
        reason: e.to_string(),
    };
    src.par_chunks(in_row * rows_per_task)
        .zip(dst.par_chunks_mut(out_row * rows_per_task))
        .enumerate()
        .try_for_each(|(task, (s, d))| {
            let mut f = vec![0f32; n_per_row];
            for (r, (si, di)) in s
                .chunks_exact(in_row)
                .zip(d.chunks_exact_mut(out_row))
                .enumerate()
            {
                tl_core::quant::dequantize_named(plan.from, &plan.name, si, &mut f)
                    .map_err(core)?;
                let row = first_row + task * rows_per_task + r;
                if f.iter().any(|x| !x.is_finite()) {
                    return Err(QuantizeError::NonFinite {
                        tensor: plan.name.clone(),
                        row,
                    });
                }
                let expert = row / rows_per_expert;
                let qw = weights.and_then(|w| w.get(expert * n_per_row..(expert + 1) * n_per_row));
                if weights.is_some() && qw.is_none() {
                    return Err(QuantizeError::Tensor {
                        tensor: plan.name.clone(),
                        reason: format!("row {row}: no importance weights for expert {expert}"),
                    });
                }
                tl_core::quant::quantize_weighted(plan.to, &f, n_per_row, qw, di).map_err(core)?;
            }
            Ok(())
        })
}

/// Writes `plan`'s tensors from `file` as a GGUF stream into `out`; calls
/// `progress(tensor, bytes of output done)` after each slab.
fn write_model<W: Write>(
    file: &GgufFile,
    plans: &[TensorPlan],
    imatrix: Option<&Imatrix>,
    metadata: &Metadata,
    out: &mut W,
    pool: &rayon::ThreadPool,
    progress: &mut dyn FnMut(&TensorPlan, u64),
) -> Result<()> {
    let layouts = plans
        .iter()
        .map(|p| TensorLayout {
            name: p.name.clone(),
            dims: p.dims.clone(),
            ty: p.to,
        })
        .collect();
    let mut w = GgufStreamWriter::new(out, metadata, layouts)?;
    // Output is produced in slabs of rows so memory stays bounded.
    const SLAB_BYTES: usize = 256 << 20;
    let mut buf = Vec::new();
    for p in plans {
        let info = &file.tensors[p.input];
        let data = file.tensor_data(info);
        if p.from == p.to {
            for chunk in data.chunks(SLAB_BYTES) {
                w.write_tensor(chunk)?;
                progress(p, chunk.len() as u64);
            }
            continue;
        }
        let weights = match (p.imatrix, imatrix) {
            (ImatrixUse::Used, Some(m)) => m.entries.get(&p.name).map(Vec::as_slice),
            _ => None,
        };
        let n_per_row = p.dims.first().copied().unwrap_or(0);
        let rows = p.dims.iter().skip(1).product::<u64>() as usize;
        let in_row = p.from.bytes_for(n_per_row).unwrap_or(0) as usize;
        let out_row = p.to.bytes_for(n_per_row).unwrap_or(0) as usize;
        let f32_row = n_per_row as usize * 4;
        let slab_rows = (SLAB_BYTES / (in_row + out_row + f32_row).max(1)).max(1);
        let mut row = 0;
        while row < rows {
            let n = slab_rows.min(rows - row);
            buf.clear();
            buf.resize(n * out_row, 0u8);
            let src = &data[row * in_row..(row + n) * in_row];
            pool.install(|| convert_rows(p, src, &mut buf, row, weights))?;
            w.write_tensor(&buf)?;
            progress(p, buf.len() as u64);
            row += n;
        }
    }
    w.finish()?;
    Ok(())
}

/// A quantization whose plan is made: the input mapped, every tensor's
/// type chosen ([`plan`]), nothing written yet.
pub struct Quantization {
    file: GgufFile,
    plans: Vec<TensorPlan>,
    parts: Vec<OutputPart>,
    /// Whether the parts carry `split.*` keys.
    split_keys: bool,
    opts: QuantizeOptions,
}

impl Quantization {
    /// Opens `input` and plans its quantization into `output` (a prefix
    /// for a split output, see [`SplitOutput`]); refuses an output file
    /// that is the input file or one of its parts.
    pub fn prepare(input: &Path, output: &Path, opts: &QuantizeOptions) -> Result<Self> {
        if opts.split == SplitOutput::Single {
            if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
                if a == b {
                    return Err(QuantizeError::SameFile(output.to_owned()));
                }
            }
        }
        if let Some(m) = opts.active_imatrix() {
            m.check_finite()?;
        }
        let file = GgufFile::open(input)?;
        let plans = plan(&file, opts)?;
        let (parts, split_keys) = output_parts(&file, &plans, output, opts.split)?;
        let inputs: Vec<PathBuf> = std::iter::once(input.to_owned())
            .chain(file.parts.iter().map(|p| p.path.clone()))
            .filter_map(|p| p.canonicalize().ok())
            .collect();
        for part in &parts {
            if let Ok(out) = part.path.canonicalize() {
                if inputs.contains(&out) {
                    return Err(QuantizeError::SameFile(part.path.clone()));
                }
            }
        }
        Ok(Quantization {
            file,
            plans,
            parts,
            split_keys,
            opts: opts.clone(),
        })
    }

    /// The output files, in order, with the plans each holds.
    pub fn parts(&self) -> &[OutputPart] {
        &self.parts
    }

    /// Every output tensor, in output order.
    pub fn plans(&self) -> &[TensorPlan] {
        &self.plans
    }

    /// Writes the output (to `output.partial`, renamed at the end, so a
    /// failure never leaves a half-written file under the output's name).
    /// `progress` gets each tensor's plan and the output bytes done for it
    /// as they are written.
    pub fn write(&self, progress: &mut dyn FnMut(&TensorPlan, u64)) -> Result<Summary> {
        let plans = self.plans.as_slice();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |err| QuantizeError::Io { path, err }
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.opts.threads)
            .build()
            .map_err(|e| QuantizeError::Metadata(format!("thread pool: {e}")))?;
        let count = self.parts.len();
        let total = i32::try_from(plans.len()).map_err(|_| {
            QuantizeError::Split(format!(
                "{} tensors: split.tensors.count holds at most {}",
                plans.len(),
                i32::MAX
            ))
        })?;
        // Every part goes to PATH.partial; they are renamed into place
        // only once all are written.
        let tmps: Vec<PathBuf> = self
            .parts
            .iter()
            .map(|p| {
                let mut t = p.path.as_os_str().to_owned();
                t.push(".partial");
                PathBuf::from(t)
            })
            .collect();
        let result = (|| {
            for (i, (part, tmp)) in self.parts.iter().zip(&tmps).enumerate() {
                // The first part holds the metadata (as llama-quantize and
                // llama-gguf-split write it); the split keys come last.
                let mut metadata = if i == 0 {
                    output_metadata(
                        &self.file.metadata,
                        self.opts.ftype,
                        self.opts.active_imatrix(),
                    )
                } else {
                    Metadata::new()
                };
                if self.split_keys {
                    metadata.insert("split.no", Value::U16(i as u16));
                    metadata.insert("split.count", Value::U16(count as u16));
                    metadata.insert("split.tensors.count", Value::I32(total));
                }
                let f = std::fs::File::create(tmp).map_err(io(tmp))?;
                let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                write_model(
                    &self.file,
                    &plans[part.tensors.clone()],
                    self.opts.active_imatrix(),
                    &metadata,
                    &mut w,
                    &pool,
                    progress,
                )?;
                let f = w.into_inner().map_err(|e| QuantizeError::Io {
                    path: tmp.clone(),
                    err: e.into_error(),
                })?;
                f.sync_all().map_err(io(tmp))?;
            }
            for (part, tmp) in self.parts.iter().zip(&tmps) {
                std::fs::rename(tmp, &part.path).map_err(io(&part.path))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for tmp in &tmps {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
        Ok(Summary {
            tensors: plans.len(),
            quantized: plans.iter().filter(|p| p.from != p.to).count(),
            fallbacks: plans.iter().filter(|p| p.fallback).count(),
            in_bytes: plans.iter().map(TensorPlan::in_bytes).sum(),
            out_bytes: plans.iter().map(TensorPlan::out_bytes).sum(),
            elements: plans.iter().map(|p| p.n_elements()).sum(),
        })
    }
}

/// Quantizes the model at `input` into `output`: [`Quantization::prepare`]
/// then [`Quantization::write`].
pub fn quantize_file(
    input: &Path,
    output: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(&TensorPlan, u64),
) -> Result<Summary> {
    Quantization::prepare(input, output, opts)?.write(progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_type_names_and_aliases() {
        assert_eq!("q4_k_m".parse::<FileType>().ok(), Some(FileType::Q4_K_M));
        assert_eq!("Q4_K".parse::<FileType>().ok(), Some(FileType::Q4_K_M));
        assert_eq!("15".parse::<FileType>().ok(), Some(FileType::Q4_K_M));
        assert_eq!("f16".parse::<FileType>().ok(), Some(FileType::F16));
        let e = "Q9_X".parse::<FileType>().err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("Q9_X") && e.contains("Q4_K_M")));
        assert_eq!("iq4_xs".parse::<FileType>().ok(), Some(FileType::IQ4_XS));
        assert_eq!("25".parse::<FileType>().ok(), Some(FileType::IQ4_NL));
        assert_eq!("iq3_s".parse::<FileType>().ok(), Some(FileType::IQ3_S));
        assert_eq!("IQ3_M".parse::<FileType>().ok(), Some(FileType::IQ3_M));
        assert_eq!("22".parse::<FileType>().ok(), Some(FileType::IQ3_XS));
        for ft in [
            FileType::IQ3_XXS,
            FileType::IQ2_XXS,
            FileType::IQ2_XS,
            FileType::IQ2_S,
            FileType::IQ2_M,
            FileType::IQ1_S,
            FileType::IQ1_M,
        ] {
            assert_eq!(ft.name().to_lowercase().parse::<FileType>().ok(), Some(ft));
            assert_eq!(ft.id().to_string().parse::<FileType>().ok(), Some(ft));
        }
        assert_eq!(
            "mxfp4_moe".parse::<FileType>().ok(),
            Some(FileType::MXFP4_MOE)
        );
        assert_eq!("38".parse::<FileType>().ok(), Some(FileType::MXFP4_MOE));
        assert_eq!("tq1_0".parse::<FileType>().ok(), Some(FileType::TQ1_0));
        assert_eq!("37".parse::<FileType>().ok(), Some(FileType::TQ2_0));
        assert!(matches!(
            "MXFP4".parse::<FileType>(),
            Err(QuantizeError::UnsupportedFileType { .. })
        ));
    }

    /// MXFP4_MOE: experts MXFP4, every other quantized matrix Q8_0 (the
    /// LM head too), vectors copied.
    #[test]
    fn mxfp4_moe_puts_experts_in_mxfp4() {
        let spec = crate::synth::SynthSpec {
            arch: crate::synth::SynthArch::GptOss,
            weight_type: GgmlType::F16,
            output_type: GgmlType::F16,
            ffn: 64,
            n_expert: 4,
            ..Default::default()
        };
        let bytes = crate::synth::synthesize(&spec).unwrap().to_bytes().unwrap();
        let file = GgufFile::from_bytes(bytes).unwrap();
        let mut opts = QuantizeOptions::new(FileType::MXFP4_MOE);
        opts.allow_requantize = true;
        let plans = plan(&file, &opts).unwrap();
        let mut seen = 0;
        for p in &plans {
            let want = if p.name.contains("_exps.weight") {
                GgmlType::MXFP4
            } else if p.dims.len() >= 2
                && p.name.ends_with(".weight")
                && !p.name.contains("gate_inp")
            {
                GgmlType::Q8_0
            } else {
                p.from
            };
            assert_eq!(p.to, want, "{}", p.name);
            seen += usize::from(p.to == GgmlType::MXFP4);
        }
        // Gate, up and down of both layers.
        assert_eq!(seen, 6);
        assert!(plans
            .iter()
            .any(|p| p.name == "output.weight" && p.to == GgmlType::Q8_0));
    }

    #[test]
    fn tensor_type_file() {
        let path = Path::new("types.txt");
        let text = "# attention\nblk\\.0\\.attn_v=Q8_0  ffn_up=q5_0\n\n  # ffn\nffn_down=IQ4_NL\n";
        let got = parse_tensor_type_file(path, text).unwrap();
        let pairs: Vec<(&str, GgmlType)> = got.iter().map(|o| (o.pattern.as_str(), o.ty)).collect();
        assert_eq!(
            pairs,
            [
                ("blk\\.0\\.attn_v", GgmlType::Q8_0),
                ("ffn_up", GgmlType::Q5_0),
                ("ffn_down", GgmlType::IQ4_NL)
            ]
        );
        for (text, line, word, reason) in [
            (
                "ffn_up=Q5_0\nffn_down\n",
                2,
                "ffn_down",
                "expected PATTERN=TYPE",
            ),
            (
                "a=Q8_0\n\nb=Q9_K",
                3,
                "b=Q9_K",
                "unknown tensor type 'Q9_K'",
            ),
            ("ffn=", 1, "ffn=", "missing quantization type"),
            ("(ffn=Q8_0", 1, "(ffn=Q8_0", "bad regular expression"),
        ] {
            let err = parse_tensor_type_file(path, text).unwrap_err().to_string();
            let want = format!("tensor type file types.txt, line {line}: '{word}': {reason}");
            assert!(err.starts_with(&want), "{err} / {want}");
        }
        let err = read_tensor_type_file(Path::new("/nonexistent/types.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/types.txt"), "{err}");
    }

    #[test]
    fn tensor_type_patterns() {
        let o = TensorTypeOverride::parse("BLK\\.1[0-9]\\.ATTN_V=q8_0").unwrap();
        assert_eq!(o.ty, GgmlType::Q8_0);
        assert_eq!(o.pattern, "blk\\.1[0-9]\\.attn_v");
        assert!(o.matches("blk.12.attn_v.weight"));
        assert!(!o.matches("blk.2.attn_v.weight"));
        assert!(!o.matches("blk.12.attn_k.weight"));
        let all = [
            TensorTypeOverride::parse("ffn_down=IQ4_NL").unwrap(),
            TensorTypeOverride::parse("ffn=Q6_K").unwrap(),
        ];
        assert_eq!(
            override_for(&all, "blk.0.ffn_down.weight"),
            Some(GgmlType::IQ4_NL)
        );
        assert_eq!(
            override_for(&all, "blk.0.ffn_up.weight"),
            Some(GgmlType::Q6_K)
        );
        assert_eq!(override_for(&all, "blk.0.attn_q.weight"), None);
        for bad in ["ffn", "=Q8_0", "ffn=", "ffn=Q7_K", "ffn=Q8_K", "(ffn=Q8_0"] {
            assert!(
                matches!(
                    TensorTypeOverride::parse(bad),
                    Err(QuantizeError::TensorTypePattern { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // 24 layers: n/8 = 3, 7n/8 = 21; between them every third from 5.
        let got: Vec<i64> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        assert_eq!(got, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    }

    #[test]
    fn fallbacks() {
        use GgmlType as G;
        assert_eq!(fallback(G::Q4_K, 896), (G::Q5_0, true));
        assert_eq!(fallback(G::Q6_K, 896), (G::Q8_0, true));
        assert_eq!(fallback(G::Q3_K, 896), (G::Q4_0, true));
        assert_eq!(fallback(G::Q5_K, 896), (G::Q5_1, true));
        assert_eq!(fallback(G::Q4_K, 4864), (G::Q4_K, false));
        assert_eq!(fallback(G::Q4_K, 80), (G::F16, true));
        assert_eq!(fallback(G::Q8_0, 80), (G::F16, true));
        assert_eq!(fallback(G::IQ4_XS, 896), (G::IQ4_NL, true));
        assert_eq!(fallback(G::IQ4_XS, 80), (G::F16, true));
        assert_eq!(fallback(G::IQ4_NL, 896), (G::IQ4_NL, false));
        for ty in [
            G::IQ3_S,
            G::IQ3_XXS,
            G::IQ2_S,
            G::IQ2_XS,
            G::IQ2_XXS,
            G::IQ1_S,
            G::IQ1_M,
        ] {
            assert_eq!(fallback(ty, 896), (G::IQ4_NL, true), "{ty}");
            assert_eq!(fallback(ty, 2048), (ty, false), "{ty}");
        }
    }

    #[test]
    fn which_tensors_are_quantized() {
        assert!(allows_quantization("blk.0.attn_q.weight", &[64, 64], false));
        assert!(!allows_quantization("blk.0.attn_q.bias", &[64], false));
        assert!(!allows_quantization("blk.0.attn_norm.weight", &[64], false));
        assert!(!allows_quantization(
            "blk.0.attn_q_norm.weight",
            &[64, 1],
            false
        ));
        assert!(!allows_quantization(
            "blk.0.ffn_gate_inp.weight",
            &[64, 8],
            false
        ));
        assert!(allows_quantization("output.weight", &[64, 100], false));
        assert!(!allows_quantization("output.weight", &[64, 100], true));
        assert!(allows_quantization(
            "blk.3.ffn_down_exps.weight",
            &[64, 64, 8],
            false
        ));
    }

    #[test]
    fn layers_sort_numerically() {
        assert_eq!(layer_of("blk.12.attn_q.weight"), 12);
        assert_eq!(layer_of("token_embd.weight"), -1);
        assert_eq!(layer_of("blk.x.weight"), -1);
    }

    #[test]
    fn metadata_keys_move_to_the_end() {
        let mut md = Metadata::new();
        md.insert("general.architecture", Value::String("llama".into()));
        md.insert("general.file_type", Value::U32(1));
        md.insert("llama.block_count", Value::U32(2));
        let out = output_metadata(&md, FileType::Q4_K_M, None);
        let keys: Vec<&str> = out.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            vec![
                "general.architecture",
                "llama.block_count",
                "general.quantization_version",
                "general.file_type"
            ]
        );
        assert_eq!(out.get("general.file_type"), Some(&Value::U32(15)));
    }
}
