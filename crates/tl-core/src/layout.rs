//! Layouts: a shape plus strides and an offset (both in elements) into a
//! storage buffer. Every view (narrow, transpose, broadcast, reshape of a
//! contiguous tensor, squeeze, unsqueeze) is a new layout over the same
//! storage; none copies data.

use std::fmt;
use std::ops::Range;

use crate::error::{CoreError, Result};
use crate::shape::{Shape, MAX_RANK};

/// How a tensor's logical elements map to storage: element `[i0, i1, …]` is
/// at `offset + Σ ik·strides[k]`. A stride of 0 repeats (broadcasts) a dim.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: Shape,
    strides: [usize; MAX_RANK],
    offset: usize,
}

impl Layout {
    /// The row-major contiguous layout of `shape` at offset 0.
    pub fn contiguous(shape: Shape) -> Self {
        Layout {
            strides: shape.contiguous_strides(),
            shape,
            offset: 0,
        }
    }

    /// A layout with explicit strides; `strides` must have one entry per dim.
    pub fn new(shape: Shape, strides: &[usize], offset: usize) -> Result<Self> {
        if strides.len() != shape.rank() {
            return Err(CoreError::ShapeMismatch {
                op: "layout",
                lhs: shape.dims().to_vec(),
                rhs: strides.to_vec(),
            });
        }
        let mut s = [0; MAX_RANK];
        s[..strides.len()].copy_from_slice(strides);
        Ok(Layout {
            shape,
            strides: s,
            offset,
        })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides[..self.shape.rank()]
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn rank(&self) -> usize {
        self.shape.rank()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    /// Whether the elements occupy `offset..offset + elem_count` in
    /// row-major order. Strides of size-1 dims do not matter; an empty
    /// tensor is contiguous.
    pub fn is_contiguous(&self) -> bool {
        if self.elem_count() == 0 {
            return true;
        }
        let mut expected = 1;
        for (&d, &s) in self.dims().iter().zip(self.strides()).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// The storage range of a contiguous layout, `None` otherwise.
    pub fn contiguous_range(&self) -> Option<Range<usize>> {
        self.is_contiguous()
            .then(|| self.offset..self.offset + self.elem_count())
    }

    /// One past the largest storage index the layout reaches (0 when empty);
    /// storage at least this long makes every element addressable. `None` on
    /// overflow (only for layouts built by hand with huge strides).
    pub fn storage_end(&self) -> Option<usize> {
        if self.elem_count() == 0 {
            return Some(0);
        }
        self.dims()
            .iter()
            .zip(self.strides())
            .try_fold(self.offset, |acc, (&d, &s)| {
                acc.checked_add((d - 1).checked_mul(s)?)
            })?
            .checked_add(1)
    }

    fn check_dim(&self, op: &'static str, dim: usize) -> Result<()> {
        if dim < self.rank() {
            Ok(())
        } else {
            Err(CoreError::DimOutOfRange {
                op,
                shape: self.dims().to_vec(),
                dim,
            })
        }
    }

    /// Elements `start..start + len` of dimension `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        self.check_dim("narrow", dim)?;
        let size = self.dims()[dim];
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(CoreError::Invalid {
                op: "narrow",
                reason: format!(
                    "range {start}..{} of dim {dim} exceeds shape {:?}",
                    start.saturating_add(len),
                    self.dims()
                ),
            });
        }
        Ok(Layout {
            shape: self.shape.with_dim(dim, len),
            strides: self.strides,
            // An empty result may sit at the end of the dim; its offset is
            // never dereferenced.
            offset: self.offset + start * self.strides[dim],
        })
    }

    /// The same elements under another shape with the same element count.
    /// Only contiguous layouts can be reshaped: anything else would need a
    /// copy, and this never copies.
    pub fn reshape(&self, dims: &[usize]) -> Result<Self> {
        let shape = Shape::checked("reshape", dims)?;
        if shape.elem_count() != self.elem_count() {
            return Err(CoreError::ShapeMismatch {
                op: "reshape",
                lhs: self.dims().to_vec(),
                rhs: dims.to_vec(),
            });
        }
        if !self.is_contiguous() {
            return Err(self.not_contiguous("reshape"));
        }
        Ok(Layout {
            offset: self.offset,
            ..Layout::contiguous(shape)
        })
    }

    /// Swaps dimensions `a` and `b`.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Self> {
        self.check_dim("transpose", a)?;
        self.check_dim("transpose", b)?;
        let mut out = *self;
        out.shape = out
            .shape
            .with_dim(a, self.dims()[b])
            .with_dim(b, self.dims()[a]);
        out.strides.swap(a, b);
        Ok(out)
    }

    /// Reorders dimensions: dim `i` of the result is dim `order[i]` here.
    pub fn permute(&self, order: &[usize]) -> Result<Self> {
        let rank = self.rank();
        let mut seen = [false; MAX_RANK];
        let valid = order.len() == rank
            && order
                .iter()
                .all(|&d| d < rank && !std::mem::replace(&mut seen[d], true));
        if !valid {
            return Err(CoreError::Invalid {
                op: "permute",
                reason: format!(
                    "{order:?} is not a permutation of the dims of {:?}",
                    self.dims()
                ),
            });
        }
        let mut dims = [0; MAX_RANK];
        let mut strides = [0; MAX_RANK];
        for (i, &d) in order.iter().enumerate() {
            dims[i] = self.dims()[d];
            strides[i] = self.strides[d];
        }
        Ok(Layout {
            shape: Shape::checked("permute", &dims[..rank])?,
            strides,
            offset: self.offset,
        })
    }

    /// A view with shape `dims`, repeating size-1 and missing leading dims
    /// with stride 0 (numpy rules).
    pub fn broadcast_as(&self, dims: &[usize]) -> Result<Self> {
        let shape = Shape::checked("broadcast_as", dims)?;
        let mismatch = || CoreError::ShapeMismatch {
            op: "broadcast_as",
            lhs: self.dims().to_vec(),
            rhs: dims.to_vec(),
        };
        let extra = dims.len().checked_sub(self.rank()).ok_or_else(mismatch)?;
        let mut strides = [0; MAX_RANK];
        for (i, (&d, &s)) in self.dims().iter().zip(self.strides()).enumerate() {
            let target = dims[extra + i];
            strides[extra + i] = if d == target {
                s
            } else if d == 1 {
                0
            } else {
                return Err(mismatch());
            };
        }
        Ok(Layout {
            shape,
            strides,
            offset: self.offset,
        })
    }

    /// Removes dimension `dim`, which must have size 1.
    pub fn squeeze(&self, dim: usize) -> Result<Self> {
        self.check_dim("squeeze", dim)?;
        if self.dims()[dim] != 1 {
            return Err(CoreError::Invalid {
                op: "squeeze",
                reason: format!("dim {dim} of shape {:?} is not 1", self.dims()),
            });
        }
        let rank = self.rank();
        let mut dims = [0; MAX_RANK];
        let mut strides = [0; MAX_RANK];
        let keep = (0..rank).filter(|&d| d != dim);
        for (i, d) in keep.enumerate() {
            dims[i] = self.dims()[d];
            strides[i] = self.strides[d];
        }
        Ok(Layout {
            shape: Shape::checked("squeeze", &dims[..rank - 1])?,
            strides,
            offset: self.offset,
        })
    }

    /// Inserts a size-1 dimension at position `dim` (`0..=rank`).
    pub fn unsqueeze(&self, dim: usize) -> Result<Self> {
        let rank = self.rank();
        if dim > rank {
            return Err(CoreError::DimOutOfRange {
                op: "unsqueeze",
                shape: self.dims().to_vec(),
                dim,
            });
        }
        let mut dims = [0; MAX_RANK + 1];
        let mut strides = [0; MAX_RANK + 1];
        dims[..dim].copy_from_slice(&self.dims()[..dim]);
        strides[..dim].copy_from_slice(&self.strides[..dim]);
        dims[dim] = 1;
        // Any stride is valid for a size-1 dim; this one keeps a contiguous
        // layout's strides row-major.
        strides[dim] = if dim < rank {
            self.strides[dim] * self.dims()[dim]
        } else {
            1
        };
        dims[dim + 1..=rank].copy_from_slice(&self.dims()[dim..]);
        strides[dim + 1..=rank].copy_from_slice(&self.strides[dim..rank]);
        let shape = Shape::checked("unsqueeze", &dims[..=rank])?;
        let mut s = [0; MAX_RANK];
        s[..=rank].copy_from_slice(&strides[..=rank]);
        Ok(Layout {
            shape,
            strides: s,
            offset: self.offset,
        })
    }

    /// Storage offsets of all elements in row-major logical order.
    pub fn offsets(&self) -> StridedOffsets {
        StridedOffsets::new(self.dims(), self.strides(), self.offset)
    }

    /// For ops that work row by row over the last dimension: the storage
    /// offset of each row's first element and the row length. The last
    /// dimension must be contiguous (stride 1); the others may have any
    /// strides, so row-wise ops read strided views in place.
    pub fn rows(&self, op: &'static str) -> Result<(StridedOffsets, usize)> {
        let rank = self.rank();
        if rank == 0 {
            return Err(CoreError::Invalid {
                op,
                reason: "needs a tensor of rank 1 or more, got a scalar".into(),
            });
        }
        let len = self.dims()[rank - 1];
        if len > 1 && self.strides[rank - 1] != 1 {
            return Err(CoreError::NotContiguous {
                op,
                shape: self.dims().to_vec(),
                strides: self.strides().to_vec(),
            });
        }
        let rows = StridedOffsets::new(
            &self.dims()[..rank - 1],
            &self.strides[..rank - 1],
            self.offset,
        );
        Ok((rows, len))
    }

    pub(crate) fn not_contiguous(&self, op: &'static str) -> CoreError {
        CoreError::NotContiguous {
            op,
            shape: self.dims().to_vec(),
            strides: self.strides().to_vec(),
        }
    }
}

impl fmt::Debug for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Layout {{ shape: {:?}, strides: {:?}, offset: {} }}",
            self.dims(),
            self.strides(),
            self.offset
        )
    }
}

/// Iterator over the storage offsets of a strided index space, in row-major
/// order. Holds its state inline, so iterating allocates nothing.
#[derive(Clone, Debug)]
pub struct StridedOffsets {
    dims: [usize; MAX_RANK],
    strides: [usize; MAX_RANK],
    index: [usize; MAX_RANK],
    rank: usize,
    next: usize,
    remaining: usize,
}

impl StridedOffsets {
    fn new(dims: &[usize], strides: &[usize], offset: usize) -> Self {
        let rank = dims.len();
        let mut d = [0; MAX_RANK];
        let mut s = [0; MAX_RANK];
        d[..rank].copy_from_slice(dims);
        s[..rank].copy_from_slice(strides);
        StridedOffsets {
            dims: d,
            strides: s,
            index: [0; MAX_RANK],
            rank,
            next: offset,
            remaining: dims.iter().product(),
        }
    }
}

impl Iterator for StridedOffsets {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let current = self.next;
        if self.remaining > 0 {
            // Odometer step: bump the innermost index, carrying outwards.
            for d in (0..self.rank).rev() {
                self.index[d] += 1;
                if self.index[d] < self.dims[d] {
                    self.next += self.strides[d];
                    break;
                }
                self.next -= (self.dims[d] - 1) * self.strides[d];
                self.index[d] = 0;
            }
        }
        Some(current)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedOffsets {}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dims: &[usize]) -> Result<Layout> {
        Ok(Layout::contiguous(Shape::new(dims)?))
    }

    #[test]
    fn contiguity() -> Result<()> {
        let l = layout(&[2, 3])?;
        assert!(l.is_contiguous());
        assert_eq!(l.contiguous_range(), Some(0..6));
        let t = l.transpose(0, 1)?;
        assert_eq!(t.dims(), &[3, 2]);
        assert_eq!(t.strides(), &[1, 3]);
        assert!(!t.is_contiguous());
        // Narrowing the outer dim keeps contiguity, the inner dim breaks it.
        assert_eq!(l.narrow(0, 1, 1)?.contiguous_range(), Some(3..6));
        assert!(!l.narrow(1, 0, 2)?.is_contiguous());
        assert!(layout(&[2, 0, 3])?.is_contiguous());
        Ok(())
    }

    #[test]
    fn offsets_follow_strides() -> Result<()> {
        let t = layout(&[2, 3])?.transpose(0, 1)?;
        assert_eq!(t.offsets().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
        let n = layout(&[3, 4])?.narrow(1, 1, 2)?;
        assert_eq!(n.offsets().collect::<Vec<_>>(), vec![1, 2, 5, 6, 9, 10]);
        assert_eq!(n.storage_end(), Some(11));
        let s = Layout::contiguous(Shape::scalar());
        assert_eq!(s.offsets().collect::<Vec<_>>(), vec![0]);
        assert_eq!(layout(&[0, 3])?.offsets().count(), 0);
        Ok(())
    }

    #[test]
    fn reshape_only_contiguous() -> Result<()> {
        let l = layout(&[2, 6])?;
        assert_eq!(l.reshape(&[3, 4])?.dims(), &[3, 4]);
        assert!(matches!(
            l.reshape(&[5]),
            Err(CoreError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            l.transpose(0, 1)?.reshape(&[12]),
            Err(CoreError::NotContiguous { .. })
        ));
        // A contiguous narrow keeps its offset through a reshape.
        let r = layout(&[4, 3])?.narrow(0, 2, 2)?.reshape(&[6])?;
        assert_eq!(r.offset(), 6);
        Ok(())
    }

    #[test]
    fn broadcast_squeeze_unsqueeze() -> Result<()> {
        let row = layout(&[3])?;
        let b = row.broadcast_as(&[2, 3])?;
        assert_eq!(b.strides(), &[0, 1]);
        assert_eq!(b.offsets().collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2]);
        assert!(row.broadcast_as(&[2, 4]).is_err());
        assert!(layout(&[2, 3])?.broadcast_as(&[3]).is_err());

        let u = row.unsqueeze(0)?;
        assert_eq!(u.dims(), &[1, 3]);
        assert!(u.is_contiguous());
        assert_eq!(row.unsqueeze(1)?.dims(), &[3, 1]);
        assert_eq!(u.squeeze(0)?, row);
        assert!(u.squeeze(1).is_err());
        assert!(row.unsqueeze(2).is_err());
        Ok(())
    }

    #[test]
    fn view_errors_name_the_op() -> Result<()> {
        let l = layout(&[2, 3])?;
        let e = l.narrow(1, 2, 2).err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.starts_with("narrow:") && m.contains("[2, 3]")));
        assert!(matches!(
            l.transpose(0, 2),
            Err(CoreError::DimOutOfRange {
                op: "transpose",
                ..
            })
        ));
        assert!(l.permute(&[0, 0]).is_err());
        assert_eq!(l.permute(&[1, 0])?, l.transpose(0, 1)?);
        Ok(())
    }

    #[test]
    fn rows_need_a_contiguous_last_dim() -> Result<()> {
        let l = layout(&[2, 3])?;
        let (rows, len) = l.rows("t")?;
        assert_eq!((rows.collect::<Vec<_>>(), len), (vec![0, 3], 3));
        let (rows, _) = l.narrow(0, 1, 1)?.rows("t")?;
        assert_eq!(rows.collect::<Vec<_>>(), vec![3]);
        assert!(l.transpose(0, 1)?.rows("t").is_err());
        Ok(())
    }
}
