//! Scalar reference kernels of the CPU backend, one file per op family.
//! They take typed slices plus layouts; locking and shape checks happen in
//! `cpu/mod.rs` and `backend::checks`. Tests drive them through
//! [`CpuBackend`](crate::cpu::CpuBackend) so each covers the whole path.

pub(crate) mod elementwise;
pub(crate) mod embedding;
pub(crate) mod matmul;
pub(crate) mod norm;
pub(crate) mod reduce;
pub(crate) mod rope;
pub(crate) mod softmax;
pub(crate) mod weights;

#[cfg(test)]
pub(crate) mod test_util;
