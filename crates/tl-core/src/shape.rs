//! Tensor shapes: dimension sizes in row-major order (outermost first).
//!
//! A shape is host metadata held inline (no heap), so building views in a
//! decode step allocates nothing and never touches a device.

use std::fmt;

use crate::error::{CoreError, Result};

/// The highest rank a tensor may have. GGML tensors have at most 4 dims; the
/// headroom is for attention views and language programs.
pub const MAX_RANK: usize = 8;

/// Dimension sizes, outermost first. The element count is known to fit in
/// `usize` (checked at construction).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; MAX_RANK],
    rank: usize,
}

impl Shape {
    /// A shape with these dims; errors if the rank exceeds [`MAX_RANK`] or
    /// the element count overflows.
    pub fn new(dims: &[usize]) -> Result<Self> {
        Self::checked("shape", dims)
    }

    pub(crate) fn checked(op: &'static str, dims: &[usize]) -> Result<Self> {
        if dims.len() > MAX_RANK {
            return Err(CoreError::RankTooHigh {
                op,
                rank: dims.len(),
                max: MAX_RANK,
            });
        }
        dims.iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| CoreError::ShapeOverflow {
                op,
                shape: dims.to_vec(),
            })?;
        let mut s = Shape {
            dims: [0; MAX_RANK],
            rank: dims.len(),
        };
        s.dims[..dims.len()].copy_from_slice(dims);
        Ok(s)
    }

    /// The rank-0 shape of a single value.
    pub fn scalar() -> Self {
        Shape {
            dims: [0; MAX_RANK],
            rank: 0,
        }
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    /// The size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.dims().last().copied().unwrap_or(1)
    }

    /// This shape with dim `dim` set to `size`. Callers only shrink a dim
    /// or swap two dims' sizes, which keeps the element count in range.
    pub(crate) fn with_dim(mut self, dim: usize, size: usize) -> Self {
        self.dims[dim] = size;
        self
    }

    /// Row-major strides in elements for a contiguous tensor of this shape.
    pub fn contiguous_strides(&self) -> [usize; MAX_RANK] {
        let mut strides = [0; MAX_RANK];
        let mut acc = 1;
        for d in (0..self.rank).rev() {
            strides[d] = acc;
            acc *= self.dims[d];
        }
        strides
    }

    /// The shape both `a` and `b` broadcast to (numpy rules: align on the
    /// last dimension; sizes must match or one of them be 1).
    pub fn broadcast(op: &'static str, a: &[usize], b: &[usize]) -> Result<Self> {
        let rank = a.len().max(b.len());
        let mut dims = [0; MAX_RANK];
        if rank > MAX_RANK {
            return Err(CoreError::RankTooHigh {
                op,
                rank,
                max: MAX_RANK,
            });
        }
        for (i, slot) in dims[..rank].iter_mut().enumerate() {
            // Index from the right: missing leading dims act as size 1.
            let da = (i + a.len()).checked_sub(rank).map_or(1, |j| a[j]);
            let db = (i + b.len()).checked_sub(rank).map_or(1, |j| b[j]);
            *slot = match (da, db) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => {
                    return Err(CoreError::ShapeMismatch {
                        op,
                        lhs: a.to_vec(),
                        rhs: b.to_vec(),
                    })
                }
            };
        }
        Self::checked(op, &dims[..rank])
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.dims(), f)
    }
}

impl TryFrom<&[usize]> for Shape {
    type Error = CoreError;
    fn try_from(dims: &[usize]) -> Result<Self> {
        Shape::new(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basics() -> Result<()> {
        let s = Shape::new(&[2, 3, 4])?;
        assert_eq!(s.dims(), &[2, 3, 4]);
        assert_eq!(s.elem_count(), 24);
        assert_eq!(&s.contiguous_strides()[..3], &[12, 4, 1]);
        assert_eq!(Shape::scalar().elem_count(), 1);
        assert_eq!(format!("{s:?}"), "[2, 3, 4]");
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(matches!(
            Shape::new(&[1; MAX_RANK + 1]),
            Err(CoreError::RankTooHigh { .. })
        ));
        assert!(matches!(
            Shape::new(&[usize::MAX, 2]),
            Err(CoreError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn broadcasting() -> Result<()> {
        assert_eq!(Shape::broadcast("t", &[4, 3], &[3])?.dims(), &[4, 3]);
        assert_eq!(Shape::broadcast("t", &[4, 1], &[1, 3])?.dims(), &[4, 3]);
        assert_eq!(
            Shape::broadcast("t", &[2, 1, 5], &[7, 1])?.dims(),
            &[2, 7, 5]
        );
        assert!(Shape::broadcast("t", &[4, 3], &[4]).is_err());
        Ok(())
    }
}
