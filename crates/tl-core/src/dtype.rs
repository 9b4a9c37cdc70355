//! Element types of tensors: the plain types kernels compute in (f32, f16,
//! bf16, i32) and the GGML block formats weights are stored in.

use std::fmt;

use half::{bf16, f16};
use tl_gguf::GgmlType;

use crate::error::{CoreError, Result};
use crate::storage::CpuStorage;

/// A GGML block format (`Q4_K`, `Q8_0`, `IQ2_XS`, …): `block_size()` elements
/// packed into `type_size()` bytes.
///
/// Built only through [`QuantType::new`], which refuses the plain types, so
/// `F32` has exactly one spelling ([`DType::F32`]) and dtype equality is
/// plain `==`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantType(GgmlType);

impl QuantType {
    /// The block format for `ty`, or `None` if `ty` is not a block format.
    pub fn new(ty: GgmlType) -> Option<Self> {
        (ty.block_size() > 1).then_some(QuantType(ty))
    }

    pub fn ggml_type(self) -> GgmlType {
        self.0
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.0.block_size()
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.0.type_size()
    }
}

/// A tensor's element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    /// A GGML block format; such tensors hold raw blocks and are read only by
    /// kernels that dequantize (matmul against weights, embedding lookups).
    Quantized(QuantType),
}

impl DType {
    /// The dtype of a GGUF tensor type. GGML's other plain integer and f64
    /// types never hold weights of the supported architectures and have no
    /// kernels, so they are refused here rather than deep inside an op.
    pub fn from_ggml(ty: GgmlType) -> Result<Self> {
        Ok(match ty {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            GgmlType::I32 => DType::I32,
            other => match QuantType::new(other) {
                Some(q) => DType::Quantized(q),
                None => {
                    return Err(CoreError::UnsupportedType {
                        ty: other,
                        tensor: "<dtype>".into(),
                    })
                }
            },
        })
    }

    /// The GGML type with the same memory layout.
    pub fn to_ggml(self) -> GgmlType {
        match self {
            DType::F32 => GgmlType::F32,
            DType::F16 => GgmlType::F16,
            DType::BF16 => GgmlType::BF16,
            DType::I32 => GgmlType::I32,
            DType::Quantized(q) => q.ggml_type(),
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Quantized(_))
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.to_ggml().block_size()
    }

    /// Bytes per block (the element size for plain types).
    pub fn type_size(self) -> usize {
        self.to_ggml().type_size()
    }

    /// Bytes that `n_elements` elements take, or `None` when `n_elements` is
    /// not a whole number of blocks or the size overflows `usize`.
    pub fn size_in_bytes(self, n_elements: usize) -> Option<usize> {
        let bs = self.block_size();
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size())
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_ggml().name())
    }
}

/// A plain element type that host buffers can hold.
///
/// `Pod` lets storage reinterpret bytes (from an mmap or an owned buffer) as
/// typed slices with alignment checked, without `unsafe` here.
pub trait Element: bytemuck::Pod + Send + Sync + fmt::Debug + 'static {
    const DTYPE: DType;
    /// Lossless for the float types; `i32` above 2^24 rounds.
    fn to_f32(self) -> f32;
    /// Moves a buffer of this type into CPU storage.
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F16(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::BF16(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Element for i32 {
    const DTYPE: DType = DType::I32;
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::I32(v)
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_round_trip() -> Result<()> {
        for ty in tl_gguf::types::ALL_TYPES {
            match DType::from_ggml(ty) {
                Ok(d) => assert_eq!(d.to_ggml(), ty),
                Err(_) => assert!(matches!(
                    ty,
                    GgmlType::I8 | GgmlType::I16 | GgmlType::I64 | GgmlType::F64
                )),
            }
        }
        assert_eq!(DType::from_ggml(GgmlType::F16)?, DType::F16);
        assert!(DType::from_ggml(GgmlType::Q4_K)?.is_quantized());
        assert_eq!(QuantType::new(GgmlType::F32), None);
        Ok(())
    }

    #[test]
    fn sizes() -> Result<()> {
        assert_eq!(DType::F32.size_in_bytes(3), Some(12));
        assert_eq!(DType::BF16.size_in_bytes(3), Some(6));
        let q8 = DType::from_ggml(GgmlType::Q8_0)?;
        assert_eq!(q8.block_size(), 32);
        assert_eq!(q8.size_in_bytes(64), Some(68));
        assert_eq!(q8.size_in_bytes(33), None);
        assert_eq!(q8.to_string(), "Q8_0");
        Ok(())
    }
}
