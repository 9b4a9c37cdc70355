//! Locking tensors' storage for one op and viewing it as typed slices.
//!
//! Each op takes its inputs' read locks once, then its output's write lock
//! (outputs never share storage with inputs; `backend::checks` enforces
//! that first, so the write lock cannot wait on a lock this thread holds).

use std::cell::RefCell;
use std::sync::RwLockReadGuard;

use crate::dtype::Element;
use crate::error::{CoreError, Result};
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{check_in_bounds, Tensor};

/// Read locks on up to `N` input tensors (absent optional inputs are
/// `None`). Inputs that share storage share one lock: taking a std
/// `RwLock`'s read lock twice on one thread may deadlock or panic.
pub(crate) struct ReadSet<'a, const N: usize> {
    tensors: [Option<&'a Tensor>; N],
    guards: [Option<RwLockReadGuard<'a, Storage>>; N],
    /// `owner[i]`: the index whose guard covers tensor `i`'s storage.
    owner: [usize; N],
}

impl<'a, const N: usize> ReadSet<'a, N> {
    pub(crate) fn new(op: &'static str, tensors: [Option<&'a Tensor>; N]) -> Result<Self> {
        let mut owner = [0; N];
        let mut guards = std::array::from_fn(|_| None);
        for i in 0..N {
            let Some(t) = tensors[i] else { continue };
            let first = (0..i).find(|&j| tensors[j].is_some_and(|u| u.same_storage(t)));
            owner[i] = first.unwrap_or(i);
            if first.is_none() {
                guards[i] = Some(t.read_storage(op)?);
            }
        }
        Ok(ReadSet {
            tensors,
            guards,
            owner,
        })
    }

    fn tensor(&self, op: &'static str, i: usize) -> Result<&'a Tensor> {
        self.tensors
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| missing(op, i))
    }

    /// The CPU storage of input `i`.
    pub(crate) fn storage(&self, op: &'static str, i: usize) -> Result<&CpuStorage> {
        let owner = self.owner.get(i).copied().unwrap_or(i);
        match self.guards.get(owner).and_then(|g| g.as_deref()) {
            Some(Storage::Cpu(s)) => Ok(s),
            None => Err(missing(op, i)),
        }
    }

    /// All of input `i`'s storage as `T`, checked to cover its layout, to be
    /// indexed through the layout's offsets.
    pub(crate) fn data<T: Element>(&self, op: &'static str, i: usize) -> Result<&[T]> {
        let t = self.tensor(op, i)?;
        let s = self.storage(op, i)?;
        let data = s.as_slice::<T>().ok_or(CoreError::DTypeMismatch {
            op,
            what: "an input",
            expected: T::DTYPE,
            got: s.dtype(),
        })?;
        check_in_bounds(op, t.layout(), data.len())?;
        Ok(data)
    }

    /// Input `i`'s elements, which must be contiguous (1-D parameters:
    /// norm weights, positions, ids, frequency factors).
    pub(crate) fn contiguous<T: Element>(&self, op: &'static str, i: usize) -> Result<&[T]> {
        let t = self.tensor(op, i)?;
        let range = t
            .layout()
            .contiguous_range()
            .ok_or_else(|| t.layout().not_contiguous(op))?;
        Ok(&self.data::<T>(op, i)?[range])
    }

    /// Like [`ReadSet::contiguous`], `None` for an absent optional input.
    pub(crate) fn optional<T: Element>(&self, op: &'static str, i: usize) -> Result<Option<&[T]>> {
        match self.tensors.get(i).copied().flatten() {
            Some(_) => self.contiguous(op, i).map(Some),
            None => Ok(None),
        }
    }
}

fn missing(op: &'static str, i: usize) -> CoreError {
    CoreError::Invalid {
        op,
        reason: format!("input {i} was not locked for reading"),
    }
}

fn writable<'g, T: Element>(op: &'static str, s: &'g mut Storage) -> Result<&'g mut [T]> {
    let Storage::Cpu(s) = s;
    let dtype = s.dtype();
    if dtype != T::DTYPE {
        return Err(CoreError::DTypeMismatch {
            op,
            what: "the output",
            expected: T::DTYPE,
            got: dtype,
        });
    }
    s.as_mut_slice::<T>().ok_or(CoreError::ReadOnly { op })
}

/// Runs `f` on the contiguous elements of output `out`.
pub(crate) fn with_output<T: Element, R>(
    op: &'static str,
    out: &Tensor,
    f: impl FnOnce(&mut [T]) -> Result<R>,
) -> Result<R> {
    let range = out
        .layout()
        .contiguous_range()
        .ok_or_else(|| out.layout().not_contiguous(op))?;
    let mut guard = out.write_storage(op)?;
    let data = writable::<T>(op, &mut guard)?;
    check_in_bounds(op, out.layout(), data.len())?;
    f(&mut data[range])
}

/// Runs `f` on all of `x`'s storage, checked to cover its layout, for ops
/// that update `x` in place through its layout's offsets.
pub(crate) fn with_in_place<T: Element, R>(
    op: &'static str,
    x: &Tensor,
    f: impl FnOnce(&mut [T]) -> Result<R>,
) -> Result<R> {
    let mut guard = x.write_storage(op)?;
    let data = writable::<T>(op, &mut guard)?;
    check_in_bounds(op, x.layout(), data.len())?;
    f(data)
}

thread_local! {
    /// Per-thread scratch (a dequantized weight row, a RoPE sin/cos table),
    /// grown to the largest request and then reused, so steady-state ops
    /// allocate nothing; per thread so parallel kernels need no locking.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` floats of this thread's scratch (contents undefined).
pub(crate) fn with_scratch<R>(
    op: &'static str,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> Result<R>,
) -> Result<R> {
    SCRATCH.with(|cell| {
        let mut buf = cell.try_borrow_mut().map_err(|_| CoreError::Invalid {
            op,
            reason: "scratch buffer already in use on this thread".into(),
        })?;
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}
