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

    fn alignment(&self) -> u64 {
        self.metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .filter(|a| *a > 0 && a.is_power_of_two())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Serializes the whole file into `out`.
    pub fn write_to(&self, out: &mut impl Write) -> Result<()> {
        let align = self.alignment();
        let mut head = Vec::new();
        head.extend_from_slice(GGUF_MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in self.metadata.iter() {
            put_str(&mut head, k);
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(align) * align;
        }
        let pad = (head.len() as u64).div_ceil(align) * align - head.len() as u64;
        head.resize(head.len() + pad as usize, 0);
        out.write_all(&head)?;
        let mut written = 0u64;
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            let gap = off - written;
            out.write_all(&vec![0u8; gap as usize])?;
            out.write_all(&t.data)?;
            written = off + t.data.len() as u64;
        }
        Ok(())
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
