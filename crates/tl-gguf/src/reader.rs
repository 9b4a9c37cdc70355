//! GGUF reader: parses the header, metadata and tensor infos, validates every
//! count and offset against the file's length before allocating or indexing,
//! and hands out zero-copy slices of tensor data from a memory map.
//!
//! Layout (ggml `docs/gguf.md`): magic "GGUF", u32 version, u64 tensor count,
//! u64 metadata count, the metadata key/value pairs, the tensor infos, padding
//! to `general.alignment` (default 32), then the tensor data; each tensor's
//! offset is relative to the start of the data section.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{GgufError, Result};
use crate::types::GgmlType;
use crate::value::{Array, Value, ValueType};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused (no real file nests more than 2).
const MAX_NESTING: usize = 8;

/// Backing bytes of a file: a memory map or an owned buffer.
enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// One tensor's description. `dims` are in GGML order: `dims[0]` is the
/// innermost (contiguous) dimension, e.g. `[896, 151936]` for an embedding
/// table of 151,936 rows of 896 values.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the data section.
    pub offset: u64,
    /// Size in bytes of the tensor's data.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major order (outermost first), as tensors in `tl-core` use it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// Ordered metadata with lookup by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces a key, keeping first-insertion order.
    pub fn insert(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        if let Some(&i) = self.index.get(&key) {
            self.entries[i].1 = value;
        } else {
            self.index.insert(key.clone(), self.entries.len());
            self.entries.push((key, value));
        }
    }

    /// Removes a key (later keys keep their order); returns its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.index.remove(key)?;
        let (_, v) = self.entries.remove(i);
        for j in self.index.values_mut() {
            if *j > i {
                *j -= 1;
            }
        }
        Some(v)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn missing(key: &str) -> GgufError {
        GgufError::Metadata {
            key: key.to_string(),
            reason: "missing".into(),
        }
    }

    fn wrong(key: &str, want: &str, got: &Value) -> GgufError {
        GgufError::Metadata {
            key: key.to_string(),
            reason: format!(
                "expected {want}, found {:?} value {}",
                got.value_type(),
                got.display_short(4)
            ),
        }
    }

    /// An unsigned integer stored as any integer type (u8…u64, i8…i64 ≥ 0).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "a non-negative integer", v)),
        }
    }

    /// `get_u64` narrowed to `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get_u64(key)?;
        u32::try_from(v).map_err(|_| GgufError::Metadata {
            key: key.into(),
            reason: format!("{v} does not fit in u32"),
        })
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_u32(key).map(Some),
        }
    }

    /// A signed integer stored as any integer type.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.opt_i64(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "an integer", v)),
        }
    }

    /// A float stored as f32, f64 or an integer.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|f| Some(f as f32))
                .ok_or_else(|| Self::wrong(key, "a number", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "a string", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.opt_bool(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "a bool", v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&Array> {
        self.opt_array(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "an array", v)),
        }
    }
}

/// A parsed GGUF file. Cheap to clone; tensor data is borrowed from the
/// shared memory map.
#[derive(Clone)]
pub struct GgufFile {
    backing: Arc<Backing>,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// The parts of a split model, in order (empty for a single file).
    pub parts: Vec<SplitPart>,
}

/// One part of a split model joined by [`GgufFile::open`].
#[derive(Clone, Debug, PartialEq)]
pub struct SplitPart {
    pub path: std::path::PathBuf,
    /// Absolute offset of the part's data section in its own file.
    pub data_offset: u64,
    /// Where its data starts in the joined data section (tensor offsets at
    /// or past this, and below the next part's, are in this part).
    pub base: u64,
}

impl GgufFile {
    /// For a split model, the part (index from 0) holding `info` and the
    /// tensor's absolute offset in that part's file; for a single file,
    /// part 0 and its absolute offset.
    pub fn tensor_location(&self, info: &TensorInfo) -> (usize, u64) {
        match self.parts.iter().rposition(|p| p.base <= info.offset) {
            Some(i) => {
                let p = &self.parts[i];
                (i, p.data_offset + (info.offset - p.base))
            }
            None => (0, self.data_offset + info.offset),
        }
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("metadata_len", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps a file, then parses it.
    ///
    /// A split model (`split.count` > 1, as llama.cpp's `gguf-split`
    /// writes it) is opened from its first part, `NAME-00001-of-0000N.gguf`:
    /// the other parts are found next to it by name and joined into one
    /// file (see [`GgufFile::open_split`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let first = Self::open_one(path)?;
        match split_keys(&first.metadata).map_err(|reason| GgufError::Split {
            path: path.to_path_buf(),
            reason,
        })? {
            Some((_, count)) if count > 1 => Self::open_split(path, first),
            _ => Ok(first),
        }
    }

    /// Opens one file, ignoring any split keys.
    pub fn open_one(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. A file
        // truncated by another process while mapped would fault on access;
        // that is the documented contract of mapping model files, the same
        // one llama.cpp relies on.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_backing(Backing::Mmap(mmap))
    }

    /// Parses a file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::from_backing(Backing::Owned(bytes))
    }

    fn from_backing(backing: Backing) -> Result<Self> {
        let parsed = parse(backing.bytes())?;
        let tensor_index = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            backing: Arc::new(backing),
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            tensor_index,
            parts: Vec::new(),
        })
    }

    /// Joins the parts of the split model whose first part `first` was
    /// read from `path`, as llama.cpp's model loader does: the metadata is
    /// the first part's (split keys included), the tensors are every
    /// part's in part order, and each part must say it is that part
    /// (`split.no`) of the same count. A missing or mismatched part, a
    /// tensor in two parts or a tensor count other than
    /// `split.tensors.count` is an error naming the part.
    ///
    /// The parts' data sections are read into memory one after the other
    /// (each starting on an alignment boundary) behind the first part's
    /// header; [`GgufFile::bytes`] is that buffer and every tensor's offset
    /// is relative to [`GgufFile::data_offset`] as for a single file.
    pub fn open_split(path: &Path, first: GgufFile) -> Result<Self> {
        let err = |p: &Path, reason: String| GgufError::Split {
            path: p.to_path_buf(),
            reason,
        };
        let (no, count) = split_keys(&first.metadata)
            .map_err(|r| err(path, r))?
            .unwrap_or((0, 1));
        if no != 0 {
            return Err(err(
                path,
                format!(
                    "this is part {} of {count}; open the first part, {}",
                    no + 1,
                    split_path(path, 0, count)
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "NAME-00001-of-N.gguf".into())
                ),
            ));
        }
        let mut parts = vec![first];
        for i in 1..count {
            let part = split_path(path, i, count).ok_or_else(|| {
                err(
                    path,
                    format!(
                        "the name does not end in -00001-of-{count:05}.gguf, so part {} can't be found",
                        i + 1
                    ),
                )
            })?;
            if !part.exists() {
                return Err(err(&part, format!("part {} of {count} is missing", i + 1)));
            }
            let f = Self::open_one(&part)?;
            match split_keys(&f.metadata).map_err(|r| err(&part, r))? {
                Some((n, c)) if n == i && c == count => {}
                Some((n, c)) => {
                    return Err(err(
                        &part,
                        format!(
                            "expected part {} of {count}, the file says part {} of {c}",
                            i + 1,
                            n + 1
                        ),
                    ))
                }
                None => {
                    return Err(err(
                        &part,
                        format!(
                            "expected part {} of {count}, the file has no split.no/split.count",
                            i + 1
                        ),
                    ))
                }
            }
            parts.push(f);
        }

        let head = &parts[0];
        let align = parts
            .iter()
            .map(|p| p.alignment)
            .max()
            .unwrap_or(DEFAULT_ALIGNMENT);
        let mut bytes = head.bytes()[..head.data_offset as usize].to_vec();
        let data_offset = head.data_offset;
        let mut tensors = Vec::new();
        let mut tensor_index = HashMap::new();
        let mut split_parts = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let base = (bytes.len() as u64 - data_offset).next_multiple_of(align);
            bytes.resize((data_offset + base) as usize, 0);
            bytes.extend_from_slice(&p.bytes()[p.data_offset as usize..]);
            let part = if i == 0 {
                path.to_path_buf()
            } else {
                split_path(path, i as u64, count).unwrap_or_default()
            };
            split_parts.push(SplitPart {
                path: part.clone(),
                data_offset: p.data_offset,
                base,
            });
            for t in &p.tensors {
                if tensor_index.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(err(
                        &part,
                        format!("tensor '{}' is also in an earlier part", t.name),
                    ));
                }
                let mut t = t.clone();
                t.offset += base;
                tensors.push(t);
            }
        }
        if let Some(want) = head
            .metadata
            .opt_u64("split.tensors.count")
            .map_err(|e| err(path, e.to_string()))?
        {
            if want != tensors.len() as u64 {
                return Err(err(
                    path,
                    format!(
                        "split.tensors.count is {want}, the {count} parts hold {} tensors",
                        tensors.len()
                    ),
                ));
            }
        }
        Ok(GgufFile {
            backing: Arc::new(Backing::Owned(bytes)),
            version: head.version,
            alignment: head.alignment,
            data_offset,
            metadata: head.metadata.clone(),
            tensors,
            tensor_index,
            parts: split_parts,
        })
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    /// Gives back the pages of the byte range `start..start + len` to the
    /// kernel (a memory-mapped file only; page-aligned inside the range, so
    /// no byte outside it is affected). The bytes stay readable and
    /// unchanged: a later read faults them in again from the file. Used
    /// once a weight's bytes were copied elsewhere, so that they stop
    /// counting in the process's resident memory.
    pub fn release_pages(&self, start: usize, len: usize) {
        #[cfg(unix)]
        if let Backing::Mmap(m) = &*self.backing {
            const PAGE: usize = 4096;
            let end = start.saturating_add(len).min(m.len());
            let (a, b) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
            if a < b {
                // SAFETY: the map is read-only and file-backed, so dropping
                // its pages loses nothing: the next access reads the same
                // bytes from the file (no private or anonymous pages).
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
                };
            }
        }
        let _ = (start, len);
    }

    pub fn file_len(&self) -> u64 {
        self.bytes().len() as u64
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, borrowed from the map (bounds were checked at parse).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        let end = start + info.size as usize;
        self.bytes().get(start..end).unwrap_or(&[])
    }

    /// Looks up a tensor by name and returns its info and bytes.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::NoTensor(name.to_string()))?;
        Ok((info, self.tensor_data(info)))
    }

    /// A handle that keeps the mapping alive, for tensors that borrow it.
    pub fn shared_bytes(&self) -> SharedBytes {
        SharedBytes {
            backing: self.backing.clone(),
        }
    }
}

/// `(split.no, split.count)` if the file has them; an error string if one
/// is there without the other or they don't make sense.
fn split_keys(m: &Metadata) -> std::result::Result<Option<(u64, u64)>, String> {
    let no = m.opt_u64("split.no").map_err(|e| e.to_string())?;
    let count = m.opt_u64("split.count").map_err(|e| e.to_string())?;
    match (no, count) {
        (None, None) => Ok(None),
        (Some(no), Some(count)) if no < count => Ok(Some((no, count))),
        (Some(no), Some(count)) => Err(format!("split.no {no} is not below split.count {count}")),
        _ => Err("split.no and split.count must come together".into()),
    }
}

/// llama.cpp's `llama_split_path`: part `i` (from 0) of `count` next to
/// the part `path`, whose name ends in `-NNNNN-of-CCCCC.gguf` (`None`
/// otherwise).
pub fn split_path(path: &Path, i: u64, count: u64) -> Option<std::path::PathBuf> {
    let name = path.file_name()?.to_str()?;
    let suffix = format!("-of-{count:05}.gguf");
    let stem = name.strip_suffix(&suffix)?;
    let (prefix, digits) = stem.rsplit_once('-')?;
    if digits.len() != 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(path.with_file_name(format!("{prefix}-{:05}{suffix}", i + 1)))
}

/// A reference-counted handle on a file's bytes; clones share the mapping.
#[derive(Clone)]
pub struct SharedBytes {
    backing: Arc<Backing>,
}

impl SharedBytes {
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.bytes().len())
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                offset: self.offset(),
                needed: n - self.remaining(),
                len: self.buf.len() as u64,
                what: what.to_string(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.arr::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.arr::<8>(what).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in
    /// what remains, before anything is allocated for them.
    fn check_count(&self, what: &'static str, count: u64, min_size: u64, at: u64) -> Result<()> {
        if count.saturating_mul(min_size) > self.remaining() {
            return Err(GgufError::AbsurdCount {
                what,
                count,
                offset: at,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &'static str) -> Result<String> {
        let at = self.offset();
        let len = self.u64(what)?;
        self.check_count(what, len, 1, at)?;
        let start = self.offset();
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| GgufError::InvalidUtf8 {
                what,
                offset: start + e.valid_up_to() as u64,
            })
    }

    fn value(&mut self, key: &str, ty: ValueType, depth: usize) -> Result<Value> {
        let what = "a metadata value";
        Ok(match ty {
            ValueType::U8 => Value::U8(self.arr::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.arr::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.arr(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            ValueType::Bool => {
                let at = self.offset();
                match self.arr::<1>(what)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::Metadata {
                            key: key.into(),
                            reason: format!("bool byte {b} at offset {at} is neither 0 nor 1"),
                        })
                    }
                }
            }
            ValueType::String => Value::String(self.string("a string value")?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.arr(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            ValueType::Array => Value::Array(self.array(key, depth + 1)?),
        })
    }

    fn array(&mut self, key: &str, depth: usize) -> Result<Array> {
        let at = self.offset();
        if depth > MAX_NESTING {
            return Err(GgufError::NestingTooDeep {
                key: key.into(),
                max: MAX_NESTING,
                offset: at,
            });
        }
        let type_id = self.u32("an array element type")?;
        let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.into(),
            type_id,
            offset: at,
        })?;
        let count_at = self.offset();
        let n = self.u64("an array length")?;
        self.check_count("array length", n, ty.min_size(), count_at)?;
        let n = n as usize;
        macro_rules! prim {
            ($variant:ident, $t:ty) => {{
                let sz = std::mem::size_of::<$t>();
                let bytes = self.take((n * sz) as u64, "array elements")?;
                Array::$variant(
                    bytes
                        .chunks_exact(sz)
                        .map(|c| {
                            let mut a = [0u8; std::mem::size_of::<$t>()];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            ValueType::U8 => Array::U8(self.take(n as u64, "array elements")?.to_vec()),
            ValueType::I8 => prim!(I8, i8),
            ValueType::U16 => prim!(U16, u16),
            ValueType::I16 => prim!(I16, i16),
            ValueType::U32 => prim!(U32, u32),
            ValueType::I32 => prim!(I32, i32),
            ValueType::F32 => prim!(F32, f32),
            ValueType::U64 => prim!(U64, u64),
            ValueType::I64 => prim!(I64, i64),
            ValueType::F64 => prim!(F64, f64),
            ValueType::Bool => {
                let start = self.offset();
                let bytes = self.take(n as u64, "array elements")?;
                if let Some(i) = bytes.iter().position(|&b| b > 1) {
                    return Err(GgufError::Metadata {
                        key: key.into(),
                        reason: format!(
                            "bool byte {} at offset {} is neither 0 nor 1",
                            bytes[i],
                            start + i as u64
                        ),
                    });
                }
                Array::Bool(bytes.iter().map(|&b| b == 1).collect())
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string("an array string")?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array(key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}

fn parse(buf: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.take(4, "the magic").map_err(|_| GgufError::BadMagic {
        found: buf[..buf.len().min(4)].to_vec(),
    })?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let tc_at = c.offset();
    let n_tensors = c.u64("the tensor count")?;
    let kv_at = c.offset();
    let n_kv = c.u64("the metadata count")?;
    // Smallest possible tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
    c.check_count("tensor count", n_tensors, 24, tc_at)?;
    // Smallest possible key/value: empty key (8) + type (4) + one byte.
    c.check_count("metadata count", n_kv, 13, kv_at)?;

    let mut metadata = Metadata::new();
    let mut alignment_at = 0;
    for _ in 0..n_kv {
        let key_at = c.offset();
        let key = c.string("a metadata key")?;
        if metadata.contains(&key) {
            return Err(GgufError::DuplicateKey {
                key,
                offset: key_at,
            });
        }
        let ty_at = c.offset();
        let type_id = c.u32("a metadata value type")?;
        let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.clone(),
            type_id,
            offset: ty_at,
        })?;
        let value = c.value(&key, ty, 0)?;
        if key == "general.alignment" {
            alignment_at = key_at;
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v.as_u64().unwrap_or(0);
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufError::BadAlignment {
                    alignment: a,
                    offset: alignment_at,
                });
            }
            a
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen: HashMap<String, ()> = HashMap::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let at = c.offset();
        let name = c.string("a tensor name")?;
        if seen.contains_key(&name) {
            return Err(GgufError::DuplicateTensor { name, offset: at });
        }
        let bad = |reason: String| GgufError::BadTensorInfo {
            name: name.clone(),
            offset: at,
            reason,
        };
        let n_dims = c.u32("a tensor's dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(bad(format!("{n_dims} dimensions (at most {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64("a tensor dimension")?);
        }
        let ty_at = c.offset();
        let type_id = c.u32("a tensor type")?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            type_id,
            offset: ty_at,
        })?;
        let offset = c.u64("a tensor data offset")?;
        let n_el = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("element count of dims {dims:?} overflows")))?;
        if dims.first().copied().unwrap_or(1) % ty.block_size() as u64 != 0 {
            return Err(bad(format!(
                "first dimension {} is not a multiple of the {} block size {}",
                dims.first().copied().unwrap_or(1),
                ty,
                ty.block_size()
            )));
        }
        let size = ty
            .bytes_for(n_el)
            .ok_or_else(|| bad(format!("byte size of {n_el} {ty} elements overflows")))?;
        seen.insert(name.clone(), ());
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size,
        });
    }

    let data_offset = c.offset().div_ceil(alignment) * alignment;
    let len = buf.len() as u64;
    if !tensors.is_empty() && data_offset > len {
        return Err(GgufError::Truncated {
            offset: c.offset(),
            needed: data_offset - len,
            len,
            what: "the padding before the tensor data".into(),
        });
    }
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::Misaligned {
                name: t.name.clone(),
                data_offset: t.offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.size));
        match (start, end) {
            (Some(_), Some(e)) if e <= len => {}
            _ => {
                return Err(GgufError::DataPastEnd {
                    name: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    len,
                })
            }
        }
    }
    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}
