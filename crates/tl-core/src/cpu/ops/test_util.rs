//! Helpers shared by the kernel tests.

use half::f16;

use crate::error::{CoreError, Result};
use crate::tensor::Tensor;

/// An f32 tensor.
pub(crate) fn t(data: &[f32], dims: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data.to_vec(), dims)
}

/// Errors (so the test fails with a message) unless `got` and `want` match
/// elementwise within `tol`.
pub(crate) fn assert_close(got: &[f32], want: &[f32], tol: f32) -> Result<()> {
    let ok = got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(g, w)| (g - w).abs() <= tol * (1.0 + w.abs()));
    if ok {
        Ok(())
    } else {
        Err(CoreError::Invalid {
            op: "assert_close",
            reason: format!("got {got:?}, want {want:?}"),
        })
    }
}

/// One Q8_0 block as ggml lays it out (`block_q8_0` in `ggml-common.h`):
/// f16 scale `d`, then 32 signed bytes; value `i` is `d * qs[i]`.
pub(crate) fn q8_0_block(d: f32, qs: &[i8; 32]) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend(qs.iter().map(|&q| q as u8));
    b
}
