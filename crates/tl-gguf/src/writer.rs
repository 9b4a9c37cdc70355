//! GGUF writer (version 3). Metadata is written in insertion order; tensor
//! data is laid out in the order tensors were added, each padded to the
//! alignment, so read → write → read reproduces metadata and tensor bytes.

use std::io::Write;

use crate::error::{GgufError, Result};
use crate::reader::{GgufFile, Metadata, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::types::GgmlType;
use crate::value::{Array, Value};

/// A tensor to be written: GGML-order dims, type and raw bytes.
pub struct TensorToWrite<'a> {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// Collects metadata and tensors, then writes a GGUF v3 file.
#[derive(Default)]
pub struct GgufWriter<'a> {
    pub metadata: Metadata,
    tensors: Vec<TensorToWrite<'a>>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer holding everything `file` holds (tensor bytes borrowed).
    pub fn from_file(file: &'a GgufFile) -> Self {
        let mut w = GgufWriter {
            metadata: file.metadata.clone(),
            tensors: Vec::new(),
        };
        for t in &file.tensors {
            w.tensors.push(TensorToWrite {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                data: std::borrow::Cow::Borrowed(file.tensor_data(t)),
            });
        }
        w
    }

    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        self.metadata.insert(key, value);
    }

    /// Adds a tensor; its byte length must match its dims and type.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: Vec<u64>,
        ty: GgmlType,
        data: impl Into<std::borrow::Cow<'a, [u8]>>,
    ) -> Result<()> {
        let name = name.into();
        let data = data.into();
        let n: u64 = dims.iter().product();
        let want = ty.bytes_for(n).ok_or_else(|| {
            GgufError::Writer(format!(
                "tensor '{name}': {n} elements is not a whole number of {ty} blocks"
            ))
        })?;
        if want != data.len() as u64 {
            return Err(GgufError::Writer(format!(
                "tensor '{name}': {} bytes given, {ty} dims {dims:?} need {want}",
                data.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::Writer(format!("duplicate tensor name '{name}'")));
        }
        self.tensors.push(TensorToWrite {
            name,
            dims,
            ty,
            data,
        });
        Ok(())
    }

    /// The file split into `parts` files as llama.cpp's `gguf-split` lays
    /// them out: the tensors in their order, in `parts` runs of (nearly)
    /// equal count; the first part holds all the metadata, every part
    /// `split.no` (u16, from 0), `split.count` (u16) and
    /// `split.tensors.count` (i32). Write part `i` to
    /// [`crate::reader::split_path`]`(first, i, parts)` to have
    /// [`GgufFile::open`] join them again.
    pub fn into_split(self, parts: u16) -> Result<Vec<GgufWriter<'a>>> {
        let n = self.tensors.len();
        let count = usize::from(parts);
        if count == 0 || count > n.max(1) {
            return Err(GgufError::Writer(format!(
                "can't split {n} tensors into {parts} parts"
            )));
        }
        let total = i32::try_from(n)
            .map_err(|_| GgufError::Writer(format!("{n} tensors are too many to split")))?;
        let mut out = Vec::with_capacity(count);
        let mut tensors = self.tensors.into_iter();
        for i in 0..count {
            let take = n * (i + 1) / count - n * i / count;
            let mut w = GgufWriter::new();
            if i == 0 {
                w.metadata = self.metadata.clone();
            }
            for k in ["split.no", "split.count", "split.tensors.count"] {
                w.metadata.remove(k);
            }
            w.set("split.no", Value::U16(i as u16));
            w.set("split.count", Value::U16(parts));
            w.set("split.tensors.count", Value::I32(total));
            w.tensors.extend(tensors.by_ref().take(take));
            out.push(w);
        }
        Ok(out)
    }

    /// Serializes the whole file into `out`.
    pub fn write_to(&self, out: &mut impl Write) -> Result<()> {
        let layouts: Vec<TensorLayout> = self
            .tensors
            .iter()
            .map(|t| TensorLayout {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
            })
            .collect();
        let mut stream = GgufStreamWriter::new(out, &self.metadata, layouts)?;
        for t in &self.tensors {
            stream.write_tensor(&t.data)?;
        }
        stream.finish()
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }

    /// Writes to `path` through a temporary file renamed into place, so a
    /// failed write never leaves a half-written model under the final name.
    pub fn write_file(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension("gguf.partial");
        {
            let f = std::fs::File::create(&tmp)?;
            let mut w = std::io::BufWriter::new(f);
            self.write_to(&mut w)?;
            w.flush()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// Where a tensor goes in a streamed file: its name, GGML-order dims and type
/// (its byte size follows from them).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorLayout {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// Writes a GGUF v3 file whose tensor data is produced one tensor at a time:
/// [`GgufStreamWriter::new`] writes the header (metadata and every tensor's
/// offset), then [`GgufStreamWriter::write_tensor`] takes each tensor's bytes
/// in order (in one call or several), padding between tensors, and
/// [`GgufStreamWriter::finish`] checks that every tensor was written whole.
/// Nothing but the current tensor need be in memory.
pub struct GgufStreamWriter<'w, W: Write> {
    out: &'w mut W,
    align: u64,
    sizes: Vec<u64>,
    names: Vec<String>,
    /// Index of the tensor being written and the bytes of it written so far.
    current: usize,
    written: u64,
}

impl<'w, W: Write> GgufStreamWriter<'w, W> {
    /// Writes the header. Each tensor's dims must be whole blocks of its
    /// type, and names must be unique.
    pub fn new(out: &'w mut W, metadata: &Metadata, tensors: Vec<TensorLayout>) -> Result<Self> {
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .filter(|a| *a > 0 && a.is_power_of_two())
            .unwrap_or(DEFAULT_ALIGNMENT);
        let mut sizes = Vec::with_capacity(tensors.len());
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            let n: u64 = t.dims.iter().product();
            let size = t.ty.bytes_for(n).ok_or_else(|| {
                GgufError::Writer(format!(
                    "tensor '{}': {n} elements is not a whole number of {} blocks",
                    t.name, t.ty
                ))
            })?;
            if !seen.insert(t.name.as_str()) {
                return Err(GgufError::Writer(format!(
                    "duplicate tensor name '{}'",
                    t.name
                )));
            }
            sizes.push(size);
        }
        let mut head = Vec::new();
        head.extend_from_slice(GGUF_MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata.iter() {
            put_str(&mut head, k);
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        for (t, size) in tensors.iter().zip(&sizes) {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + size).div_ceil(align) * align;
        }
        let pad = (head.len() as u64).div_ceil(align) * align - head.len() as u64;
        head.resize(head.len() + pad as usize, 0);
        out.write_all(&head)?;
        let current = sizes.iter().take_while(|&&s| s == 0).count();
        Ok(GgufStreamWriter {
            out,
            align,
            sizes,
            names: tensors.into_iter().map(|t| t.name).collect(),
            current,
            written: 0,
        })
    }

    /// Appends bytes of the current tensor; a tensor's bytes may come in
    /// several calls. Writing past a tensor's size is an error.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let Some(&size) = self.sizes.get(self.current) else {
            return Err(GgufError::Writer(format!(
                "{} bytes of tensor data after the last tensor",
                data.len()
            )));
        };
        if self.written + data.len() as u64 > size {
            return Err(GgufError::Writer(format!(
                "tensor '{}': {} bytes written, its size is {size}",
                self.names[self.current],
                self.written + data.len() as u64
            )));
        }
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        if self.written == size {
            let pad = size.div_ceil(self.align) * self.align - size;
            self.out.write_all(&vec![0u8; pad as usize])?;
            self.current += 1;
            self.written = 0;
            // Zero-sized tensors that follow take no bytes.
            while self.sizes.get(self.current) == Some(&0) {
                self.current += 1;
            }
        }
        Ok(())
    }

    /// Checks that every tensor was written whole.
    pub fn finish(mut self) -> Result<()> {
        while self.sizes.get(self.current) == Some(&0) {
            self.current += 1;
        }
        if self.current < self.sizes.len() {
            return Err(GgufError::Writer(format!(
                "tensor '{}' was not written whole ({} of {} bytes)",
                self.names[self.current], self.written, self.sizes[self.current]
            )));
        }
        self.out.flush()?;
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|x| put_array(out, x)),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
    }
}
