//! [`Tensor`]: shared storage seen through a layout.
//!
//! Cloning a tensor or taking a view (narrow, transpose, reshape, …) copies
//! only the inline layout and bumps a reference count; data is never copied
//! behind the caller's back.
//!
//! Storage sits behind an `RwLock` so backend ops can write into a
//! caller-provided output (or update a tensor in place) while views of the
//! same buffer exist — a preallocated scratch buffer narrowed to this step's
//! token count, say. The lock is taken once per op, not per element.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, Range};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tl_gguf::{GgmlType, GgufFile, TensorInfo};

use crate::device::Device;
use crate::dtype::{DType, Element, QuantType};
use crate::error::{CoreError, Result};
use crate::layout::Layout;
use crate::shape::Shape;
use crate::storage::{CpuStorage, Storage};

/// An n-dimensional array: storage, dtype, layout and device.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<RwLock<Storage>>,
    layout: Layout,
    // Copies of the storage's dtype and device, readable without the lock.
    dtype: DType,
    device: Device,
}

impl Tensor {
    /// A contiguous tensor over `storage`, which must hold exactly the
    /// shape's element count.
    fn new(op: &'static str, storage: Storage, dims: &[usize]) -> Result<Self> {
        let shape = Shape::checked(op, dims)?;
        let dtype = storage.dtype();
        check_whole_blocks(op, dtype, &shape)?;
        let held = match &storage {
            Storage::Cpu(s) => s.elem_count(),
        };
        if held != shape.elem_count() {
            return Err(CoreError::SizeMismatch {
                op,
                what: format!("{held} elements for shape {dims:?}"),
            });
        }
        Ok(Tensor {
            device: storage.device(),
            storage: Arc::new(RwLock::new(storage)),
            layout: Layout::contiguous(shape),
            dtype,
        })
    }

    /// An f32 tensor owning `data` (row-major) with shape `dims`.
    pub fn from_vec(data: Vec<f32>, dims: &[usize]) -> Result<Self> {
        Self::from_elements(data, dims)
    }

    /// An i32 tensor (token ids, positions) owning `data`.
    pub fn from_vec_i32(data: Vec<i32>, dims: &[usize]) -> Result<Self> {
        Self::from_elements(data, dims)
    }

    /// A tensor of any plain element type owning `data`.
    pub fn from_elements<T: Element>(data: Vec<T>, dims: &[usize]) -> Result<Self> {
        Self::new("from_vec", Storage::Cpu(T::into_storage(data)), dims)
    }

    /// A tensor of GGML blocks owning `data`. The last dim must be a whole
    /// number of blocks.
    pub fn from_quantized(ty: GgmlType, data: Vec<u8>, dims: &[usize]) -> Result<Self> {
        let op = "from_quantized";
        let ty = QuantType::new(ty).ok_or(CoreError::Invalid {
            op,
            reason: format!("{ty} is not a block format"),
        })?;
        let block_bytes = ty.type_size();
        if data.len() % block_bytes != 0 {
            return Err(CoreError::SizeMismatch {
                op,
                what: format!(
                    "{} bytes is not a whole number of {block_bytes}-byte blocks",
                    data.len()
                ),
            });
        }
        Self::new(op, Storage::Cpu(CpuStorage::Quantized { ty, data }), dims)
    }

    /// A zero-filled contiguous tensor.
    pub fn zeros(dtype: DType, dims: &[usize], device: Device) -> Result<Self> {
        let shape = Shape::checked("zeros", dims)?;
        check_whole_blocks("zeros", dtype, &shape)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, shape.elem_count())?),
        };
        Self::new("zeros", storage, dims)
    }

    /// A tensor over a GGUF tensor's bytes in the file's memory map: no copy,
    /// quantized weights stay in their block format. The tensor keeps the
    /// mapping alive.
    pub fn from_gguf(file: &GgufFile, info: &TensorInfo) -> Result<Self> {
        let op = "from_gguf";
        let named = |e: CoreError| CoreError::Invalid {
            op,
            reason: format!("tensor '{}': {e}", info.name),
        };
        let dtype = DType::from_ggml(info.ty).map_err(|_| CoreError::UnsupportedType {
            ty: info.ty,
            tensor: info.name.clone(),
        })?;
        let dims = info.shape();
        let shape = Shape::checked(op, &dims).map_err(named)?;
        check_whole_blocks(op, dtype, &shape).map_err(named)?;
        let size = usize::try_from(info.size).ok();
        if dtype.size_in_bytes(shape.elem_count()) != size {
            return Err(named(CoreError::SizeMismatch {
                op,
                what: format!("{} bytes for {dtype} shape {dims:?}", info.size),
            }));
        }
        let start = file
            .data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok());
        let (Some(start), Some(size)) = (start, size) else {
            return Err(named(CoreError::Invalid {
                op,
                reason: "data offset does not fit in memory".into(),
            }));
        };
        let range = start..start.saturating_add(size);
        let storage = CpuStorage::mapped(dtype, file.shared_bytes(), range).map_err(named)?;
        Self::new(op, Storage::Cpu(storage), &dims).map_err(named)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn shape(&self) -> &Shape {
        self.layout.shape()
    }

    pub fn dims(&self) -> &[usize] {
        self.layout.dims()
    }

    pub fn rank(&self) -> usize {
        self.layout.rank()
    }

    pub fn elem_count(&self) -> usize {
        self.layout.elem_count()
    }

    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// Whether both tensors are views of the same buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    fn view(&self, op: &'static str, layout: Layout) -> Result<Self> {
        check_block_layout(op, self.dtype, &layout)?;
        Ok(Tensor {
            layout,
            ..self.clone()
        })
    }

    /// Elements `start..start + len` of dimension `dim` (a view).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        self.view("narrow", self.layout.narrow(dim, start, len)?)
    }

    /// The same data under a new shape; the tensor must be contiguous (a
    /// view, never a copy).
    pub fn reshape(&self, dims: &[usize]) -> Result<Self> {
        self.view("reshape", self.layout.reshape(dims)?)
    }

    /// Swaps two dimensions (a view).
    pub fn transpose(&self, a: usize, b: usize) -> Result<Self> {
        self.view("transpose", self.layout.transpose(a, b)?)
    }

    /// Reorders dimensions (a view): dim `i` of the result is `order[i]`.
    pub fn permute(&self, order: &[usize]) -> Result<Self> {
        self.view("permute", self.layout.permute(order)?)
    }

    /// Repeats size-1 and missing leading dims to reach `dims` (a view).
    pub fn broadcast_as(&self, dims: &[usize]) -> Result<Self> {
        self.view("broadcast_as", self.layout.broadcast_as(dims)?)
    }

    /// Drops size-1 dimension `dim` (a view).
    pub fn squeeze(&self, dim: usize) -> Result<Self> {
        self.view("squeeze", self.layout.squeeze(dim)?)
    }

    /// Inserts a size-1 dimension at `dim` (a view).
    pub fn unsqueeze(&self, dim: usize) -> Result<Self> {
        self.view("unsqueeze", self.layout.unsqueeze(dim)?)
    }

    /// Shared access to the storage, for backends.
    pub fn read_storage(&self, op: &'static str) -> Result<RwLockReadGuard<'_, Storage>> {
        self.storage.read().map_err(|_| CoreError::Poisoned { op })
    }

    /// Exclusive access to the storage, for backends writing outputs.
    pub fn write_storage(&self, op: &'static str) -> Result<RwLockWriteGuard<'_, Storage>> {
        self.storage.write().map_err(|_| CoreError::Poisoned { op })
    }

    /// The elements of a contiguous CPU tensor of element type `T`,
    /// borrowed. The returned guard holds a read lock: drop it before an op
    /// writes into this tensor.
    pub fn as_slice<T: Element>(&self) -> Result<CpuSlice<'_, T>> {
        let op = "as_slice";
        if self.dtype != T::DTYPE {
            return Err(CoreError::DTypeMismatch {
                op,
                what: "the tensor",
                expected: T::DTYPE,
                got: self.dtype,
            });
        }
        let range = self
            .layout
            .contiguous_range()
            .ok_or_else(|| self.layout.not_contiguous(op))?;
        let guard = self.read_storage(op)?;
        let Storage::Cpu(s) = &*guard;
        if s.as_slice::<T>()
            .and_then(|v| v.get(range.clone()))
            .is_none()
        {
            return Err(CoreError::SizeMismatch {
                op,
                what: format!(
                    "range {range:?} outside storage of {} elements",
                    s.elem_count()
                ),
            });
        }
        Ok(CpuSlice {
            guard,
            range,
            _elem: PhantomData,
        })
    }

    /// [`Tensor::as_slice`] for f32 tensors.
    pub fn as_f32_slice(&self) -> Result<CpuSlice<'_, f32>> {
        self.as_slice::<f32>()
    }

    /// All elements as f32 in row-major order, following the layout and
    /// dequantizing block formats. Copies; meant for tests, debugging and
    /// reading back final results, never for the forward pass.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        let op = "to_vec_f32";
        let guard = self.read_storage(op)?;
        let Storage::Cpu(s) = &*guard;
        match self.dtype {
            DType::F32 => gather::<f32>(op, s, &self.layout),
            DType::F16 => gather::<half::f16>(op, s, &self.layout),
            DType::BF16 => gather::<half::bf16>(op, s, &self.layout),
            DType::I32 => gather::<i32>(op, s, &self.layout),
            DType::Quantized(ty) => {
                let (rows, row_len) = self.layout.rows(op)?;
                let mut out = vec![0.0; self.elem_count()];
                if row_len == 0 {
                    return Ok(out);
                }
                for (row, dst) in rows.zip(out.chunks_exact_mut(row_len)) {
                    crate::quant::dequantize(
                        ty.ggml_type(),
                        block_row(op, s, ty, row, row_len)?,
                        dst,
                    )?;
                }
                Ok(out)
            }
        }
    }

    /// All elements of an i32 tensor in row-major order (e.g. sampled ids).
    pub fn to_vec_i32(&self) -> Result<Vec<i32>> {
        let op = "to_vec_i32";
        if self.dtype != DType::I32 {
            return Err(CoreError::DTypeMismatch {
                op,
                what: "the tensor",
                expected: DType::I32,
                got: self.dtype,
            });
        }
        let guard = self.read_storage(op)?;
        let Storage::Cpu(s) = &*guard;
        let data = s.as_slice::<i32>().unwrap_or(&[]);
        check_in_bounds(op, &self.layout, data.len())?;
        Ok(self.layout.offsets().map(|o| data[o]).collect())
    }

    /// Overwrites a contiguous tensor's elements with `src` (e.g. this
    /// step's token ids into a preallocated ids tensor).
    pub fn copy_from_slice<T: Element>(&mut self, src: &[T]) -> Result<()> {
        let op = "copy_from_slice";
        if self.dtype != T::DTYPE {
            return Err(CoreError::DTypeMismatch {
                op,
                what: "the tensor",
                expected: self.dtype,
                got: T::DTYPE,
            });
        }
        if src.len() != self.elem_count() {
            return Err(CoreError::SizeMismatch {
                op,
                what: format!("{} values for shape {:?}", src.len(), self.dims()),
            });
        }
        let range = self
            .layout
            .contiguous_range()
            .ok_or_else(|| self.layout.not_contiguous(op))?;
        let mut guard = self.write_storage(op)?;
        let Storage::Cpu(s) = &mut *guard;
        let dst = s
            .as_mut_slice::<T>()
            .ok_or(CoreError::ReadOnly { op })?
            .get_mut(range)
            .ok_or_else(|| CoreError::SizeMismatch {
                op,
                what: "layout outside its storage".into(),
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("layout", &self.layout)
            .finish()
    }
}

/// A borrowed contiguous run of a CPU tensor's elements; holds the storage's
/// read lock while alive.
pub struct CpuSlice<'a, T> {
    guard: RwLockReadGuard<'a, Storage>,
    range: Range<usize>,
    _elem: PhantomData<T>,
}

impl<T: Element> Deref for CpuSlice<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let Storage::Cpu(s) = &*self.guard;
        // Dtype and range were checked when the slice was made and the
        // storage cannot change under the read lock, so this always hits.
        s.as_slice::<T>()
            .and_then(|v| v.get(self.range.clone()))
            .unwrap_or(&[])
    }
}

/// Errors unless storage of `len` elements covers every element `layout`
/// reaches. Layouts built by views always pass; the check keeps kernels
/// from panicking on a hand-built layout.
pub(crate) fn check_in_bounds(op: &'static str, layout: &Layout, len: usize) -> Result<()> {
    match layout.storage_end() {
        Some(end) if end <= len => Ok(()),
        _ => Err(CoreError::SizeMismatch {
            op,
            what: format!("{layout:?} reaches beyond storage of {len} elements"),
        }),
    }
}

/// The bytes of one row of a block-format tensor: `row_len` elements
/// starting at element offset `row` (a whole number of blocks, which
/// [`check_block_layout`] guarantees for every tensor).
pub(crate) fn block_row<'a>(
    op: &'static str,
    s: &'a CpuStorage,
    ty: QuantType,
    row: usize,
    row_len: usize,
) -> Result<&'a [u8]> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let start = row / bs * ts;
    let len = row_len / bs * ts;
    s.bytes()
        .get(start..start + len)
        .ok_or_else(|| CoreError::SizeMismatch {
            op,
            what: format!(
                "row at element {row} outside storage of {} bytes",
                s.bytes().len()
            ),
        })
}

fn gather<T: Element>(op: &'static str, s: &CpuStorage, layout: &Layout) -> Result<Vec<f32>> {
    let data = s.as_slice::<T>().ok_or(CoreError::UnsupportedDType {
        op,
        dtype: s.dtype(),
    })?;
    check_in_bounds(op, layout, data.len())?;
    Ok(match layout.contiguous_range() {
        Some(r) => data[r].iter().map(|v| v.to_f32()).collect(),
        None => layout.offsets().map(|o| data[o].to_f32()).collect(),
    })
}

fn check_whole_blocks(op: &'static str, dtype: DType, shape: &Shape) -> Result<()> {
    let DType::Quantized(ty) = dtype else {
        return Ok(());
    };
    let row = shape.last_dim();
    if shape.rank() == 0 || row % ty.block_size() != 0 {
        return Err(CoreError::PartialBlock {
            op,
            ty: ty.ggml_type(),
            len: row,
            block: ty.block_size(),
        });
    }
    Ok(())
}

/// Block-format tensors can only be addressed a whole block at a time: rows
/// of whole blocks, contiguous within the row, starting on a block boundary.
fn check_block_layout(op: &'static str, dtype: DType, layout: &Layout) -> Result<()> {
    let DType::Quantized(ty) = dtype else {
        return Ok(());
    };
    check_whole_blocks(op, dtype, layout.shape())?;
    let bs = ty.block_size();
    let rank = layout.rank();
    let inner_ok = layout.dims()[rank - 1] == 0 || layout.strides()[rank - 1] == 1;
    let outer_ok = layout.strides()[..rank - 1].iter().all(|s| s % bs == 0);
    if inner_ok && outer_ok && layout.offset() % bs == 0 {
        Ok(())
    } else {
        Err(CoreError::Invalid {
            op,
            reason: format!("{dtype} view {layout:?} does not address whole {bs}-element blocks"),
        })
    }
}
