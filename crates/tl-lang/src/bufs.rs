//! Reused f32 buffers. A training loop computes the same shapes every
//! step (activations, their gradients, the optimizer's inputs); without
//! reuse each step allocates them anew, and the large ones come from fresh
//! pages the kernel must fault in and zero. Tensor values give their f32
//! storage back here when dropped ([`crate::value::Tens`]'s `Drop`), and
//! the hot paths (products, elementwise results, gradients) take their
//! outputs from here, so after the first step a step allocates almost
//! nothing.
//!
//! Buffers are kept per exact length, per thread, up to [`MAX_KEPT`]
//! elements in all and [`PER_LEN`] buffers of one length; smaller ones than
//! [`MIN_LEN`] are left to the allocator, which reuses those well.

use std::cell::RefCell;
use std::collections::HashMap;

/// Buffers shorter than this are not kept.
pub const MIN_LEN: usize = 1024;
/// At most this many buffers of one length are kept.
pub const PER_LEN: usize = 64;
/// At most this many elements (256 MiB of f32) are kept in all.
pub const MAX_KEPT: usize = 1 << 26;

#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    kept: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// A buffer of `n` elements whose contents are unspecified (values a
/// previous use left): for outputs that are written whole.
pub fn take(n: usize) -> Vec<f32> {
    if n >= MIN_LEN {
        let hit = POOL
            .try_with(|p| {
                let mut p = p.borrow_mut();
                let v = p.free.get_mut(&n)?.pop()?;
                p.kept -= n;
                Some(v)
            })
            .ok()
            .flatten();
        if let Some(v) = hit {
            return v;
        }
    }
    vec![0.0; n]
}

/// A buffer of `n` zeros.
pub fn zeros(n: usize) -> Vec<f32> {
    if n < MIN_LEN {
        return vec![0.0; n];
    }
    let mut v = take(n);
    v.fill(0.0);
    v
}

/// A copy of `src` in a reused buffer.
pub fn copy(src: &[f32]) -> Vec<f32> {
    if src.len() < MIN_LEN {
        return src.to_vec();
    }
    let mut v = take(src.len());
    v.copy_from_slice(src);
    v
}

/// `f` of each element of `a`, into a reused buffer.
pub fn map(a: &[f32], f: impl Fn(f32) -> f32) -> Vec<f32> {
    if a.len() < MIN_LEN {
        return a.iter().map(|&x| f(x)).collect();
    }
    let mut v = take(a.len());
    for (o, &x) in v.iter_mut().zip(a) {
        *o = f(x);
    }
    v
}

/// Gives `v` back for reuse (dropped instead when it is small, when its
/// capacity is not its length, or when the pool is full).
pub fn give(v: Vec<f32>) {
    let n = v.len();
    if n < MIN_LEN || v.capacity() != n {
        return;
    }
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.kept + n > MAX_KEPT {
            return;
        }
        let list = p.free.entry(n).or_default();
        if list.len() < PER_LEN {
            list.push(v);
            p.kept += n;
        }
    });
}

/// Elements kept for reuse on this thread.
pub fn kept() -> usize {
    POOL.try_with(|p| p.borrow().kept).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_by_length() {
        let n = MIN_LEN + 7;
        let before = kept();
        let mut a = take(n);
        a.fill(3.0);
        let ptr = a.as_ptr();
        give(a);
        assert_eq!(kept(), before + n);
        // The same storage, contents as left; `zeros` clears them.
        let b = take(n);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b[n - 1], 3.0);
        give(b);
        let z = zeros(n);
        assert_eq!(z.as_ptr(), ptr);
        assert!(z.iter().all(|&x| x == 0.0));
        assert_eq!(kept(), before);
        // Small buffers and other lengths are not handed out.
        give(vec![1.0; 8]);
        assert_eq!(kept(), before);
        give(z);
        assert_ne!(take(n + 1).len(), n);
    }
}
