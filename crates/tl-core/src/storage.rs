//! The memory behind tensors. A storage is a flat buffer; tensors see it
//! through a [`Layout`](crate::Layout).
//!
//! CPU storage is either an owned typed buffer or a read-only byte range of
//! a GGUF file's memory map, so weights are used in their on-disk (often
//! quantized) format without a copy.

use std::ops::Range;

use half::{bf16, f16};
use tl_gguf::SharedBytes;

use crate::device::Device;
use crate::dtype::{DType, Element, QuantType};
use crate::error::{CoreError, Result};

/// Storage on some device. Only the CPU exists today; a CUDA variant joins
/// with its backend.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
        }
    }
}

/// Host memory of one dtype.
#[derive(Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
    /// Whole blocks of a GGML block format.
    Quantized {
        ty: QuantType,
        data: Vec<u8>,
    },
    /// `range` of a mapped GGUF file, holding elements of `dtype`; read-only.
    /// For plain dtypes the range is aligned for the element type (checked
    /// when built by [`CpuStorage::mapped`]).
    Mapped {
        dtype: DType,
        bytes: SharedBytes,
        range: Range<usize>,
    },
}

impl CpuStorage {
    /// A zero-filled buffer of `n` elements. Zero bytes decode to zeros in
    /// every GGML block format (all scales are 0).
    pub fn zeros(dtype: DType, n: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; n]),
            DType::I32 => CpuStorage::I32(vec![0; n]),
            DType::Quantized(ty) => {
                let len = dtype.size_in_bytes(n).ok_or(CoreError::PartialBlock {
                    op: "zeros",
                    ty: ty.ggml_type(),
                    len: n,
                    block: ty.block_size(),
                })?;
                CpuStorage::Quantized {
                    ty,
                    data: vec![0; len],
                }
            }
        })
    }

    /// Wraps `range` of a mapped file without copying.
    pub fn mapped(dtype: DType, bytes: SharedBytes, range: Range<usize>) -> Result<Self> {
        let all = bytes.bytes();
        let data = all
            .get(range.clone())
            .ok_or_else(|| CoreError::SizeMismatch {
                op: "mapped storage",
                what: format!("byte range {range:?} outside a {}-byte file", all.len()),
            })?;
        let aligned = match dtype {
            DType::F32 => bytemuck::try_cast_slice::<u8, f32>(data).is_ok(),
            DType::F16 => bytemuck::try_cast_slice::<u8, f16>(data).is_ok(),
            DType::BF16 => bytemuck::try_cast_slice::<u8, bf16>(data).is_ok(),
            DType::I32 => bytemuck::try_cast_slice::<u8, i32>(data).is_ok(),
            // Block kernels read bytes; blocks need no alignment.
            DType::Quantized(_) => true,
        };
        if !aligned {
            return Err(CoreError::Invalid {
                op: "mapped storage",
                reason: format!(
                    "{dtype} data at byte {} is not aligned for its element type \
                     (GGUF requires general.alignment to be a multiple of 8)",
                    range.start
                ),
            });
        }
        Ok(CpuStorage::Mapped {
            dtype,
            bytes,
            range,
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::Quantized { ty, .. } => DType::Quantized(*ty),
            CpuStorage::Mapped { dtype, .. } => *dtype,
        }
    }

    /// The raw bytes, in GGML layout.
    pub fn bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::I32(v) => bytemuck::cast_slice(v),
            CpuStorage::Quantized { data, .. } => data,
            CpuStorage::Mapped { bytes, range, .. } => {
                bytes.bytes().get(range.clone()).unwrap_or(&[])
            }
        }
    }

    /// Number of elements held.
    pub fn elem_count(&self) -> usize {
        let dtype = self.dtype();
        self.bytes().len() / dtype.type_size() * dtype.block_size()
    }

    /// The elements as `T`, or `None` if the dtype is not `T`.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        if self.dtype() != T::DTYPE {
            return None;
        }
        bytemuck::try_cast_slice(self.bytes()).ok()
    }

    /// The elements as mutable `T`, or `None` if the dtype is not `T` or the
    /// storage is a read-only mapping.
    pub fn as_mut_slice<T: Element>(&mut self) -> Option<&mut [T]> {
        if self.dtype() != T::DTYPE {
            return None;
        }
        let bytes: &mut [u8] = match self {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::I32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::Quantized { data, .. } => data,
            CpuStorage::Mapped { .. } => return None,
        };
        bytemuck::try_cast_slice_mut(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_access() -> Result<()> {
        let mut s = CpuStorage::F32(vec![1.0, 2.0]);
        assert_eq!(s.as_slice::<f32>(), Some(&[1.0f32, 2.0][..]));
        assert_eq!(s.as_slice::<i32>(), None);
        if let Some(v) = s.as_mut_slice::<f32>() {
            v[1] = 5.0;
        }
        assert_eq!(s.bytes()[4..8], 5.0f32.to_le_bytes());
        assert_eq!(s.elem_count(), 2);
        let q = CpuStorage::zeros(DType::from_ggml(tl_gguf::GgmlType::Q8_0)?, 64)?;
        assert_eq!((q.bytes().len(), q.elem_count()), (68, 64));
        assert!(CpuStorage::zeros(DType::from_ggml(tl_gguf::GgmlType::Q8_0)?, 10).is_err());
        Ok(())
    }
}
