//! Softmax over the last dim, plain or causally masked, with ggml's
//! numerics: subtract the row max, sum the exponentials in f64, multiply
//! by the f32 inverse (`ggml_compute_forward_soft_max_f32`).

use crate::error::Result;
use crate::layout::Layout;

/// Softmax of `row[..limit]`; `row[limit..]` (masked) becomes 0.
fn softmax_row(row: &mut [f32], limit: usize) {
    let (kept, masked) = row.split_at_mut(limit.min(row.len()));
    let max = kept.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f64;
    for v in kept.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    kept.iter_mut().for_each(|v| *v *= inv);
    masked.fill(0.0);
}

/// How many leading columns row number `r` (in row-major order over all
/// rows) keeps: all without a mask; `i + offset + 1` with a causal mask,
/// where `i` is the row's index in its `[rows, cols]` matrix.
fn limit(l: &Layout, r: usize, causal: Option<usize>) -> usize {
    let cols = l.shape().last_dim();
    match causal {
        None => cols,
        Some(offset) => {
            let rank = l.rank();
            let rows = if rank >= 2 { l.dims()[rank - 2] } else { 1 };
            (r % rows.max(1)).saturating_add(offset).saturating_add(1)
        }
    }
}

pub(crate) fn softmax_into(
    op: &'static str,
    (x, xl): (&[f32], &Layout),
    causal: Option<usize>,
    out: &mut [f32],
) -> Result<()> {
    let (rows, d) = xl.rows(op)?;
    if d == 0 {
        return Ok(());
    }
    for (r, (off, o_row)) in rows.zip(out.chunks_exact_mut(d)).enumerate() {
        o_row.copy_from_slice(&x[off..off + d]);
        softmax_row(o_row, limit(xl, r, causal));
    }
    Ok(())
}

pub(crate) fn softmax_inplace(
    op: &'static str,
    (x, xl): (&mut [f32], &Layout),
    causal: Option<usize>,
) -> Result<()> {
    let (rows, d) = xl.rows(op)?;
    for (r, off) in rows.enumerate() {
        softmax_row(&mut x[off..off + d], limit(xl, r, causal));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::backend::Backend;
    use crate::cpu::ops::test_util::{assert_close, t};
    use crate::cpu::CpuBackend;
    use crate::error::Result;
    use crate::tensor::Tensor;

    const B: CpuBackend = CpuBackend;

    #[test]
    fn softmax_by_hand() -> Result<()> {
        let x = t(&[0., 2f32.ln()], &[2])?;
        assert_close(&B.softmax(&x)?.to_vec_f32()?, &[1. / 3., 2. / 3.], 1e-6)?;
        // The max is subtracted first, so huge values do not overflow.
        let x = t(&[1000., 1000., 5., 5.], &[2, 2])?;
        assert_close(&B.softmax(&x)?.to_vec_f32()?, &[0.5, 0.5, 0.5, 0.5], 1e-6)
    }

    #[test]
    fn causal_mask_zeroes_the_future() -> Result<()> {
        let x = t(&[0.; 9], &[3, 3])?;
        let want = [1., 0., 0., 0.5, 0.5, 0., 1. / 3., 1. / 3., 1. / 3.];
        assert_close(&B.softmax_causal(&x, 0)?.to_vec_f32()?, &want, 1e-6)?;
        // Two new tokens after three cached ones: row i sees columns ≤ i + 3.
        let x = t(&[0.; 10], &[2, 5])?;
        let want = [0.25, 0.25, 0.25, 0.25, 0., 0.2, 0.2, 0.2, 0.2, 0.2];
        assert_close(&B.softmax_causal(&x, 3)?.to_vec_f32()?, &want, 1e-6)?;
        // The mask restarts for each head of [heads, rows, cols].
        let mut x = t(&[0.; 8], &[2, 2, 2])?;
        B.softmax_causal_inplace(&mut x, 0)?;
        assert_close(
            &x.to_vec_f32()?,
            &[1., 0., 0.5, 0.5, 1., 0., 0.5, 0.5],
            1e-6,
        )
    }

    #[test]
    fn softmax_of_a_strided_view_in_place() -> Result<()> {
        let base = t(&[0., 0., 7., 7.], &[2, 2])?;
        let mut first = base.narrow(0, 0, 1)?;
        B.softmax_inplace(&mut first, None)?;
        assert_close(&base.to_vec_f32()?, &[0.5, 0.5, 7., 7.], 1e-6)?;
        assert!(B.softmax(&base.transpose(0, 1)?).is_err());
        Ok(())
    }

    proptest! {
        #[test]
        fn rows_sum_to_one(
            rows in 1usize..5,
            cols in 1usize..9,
            offset in 0usize..4,
            v in prop::collection::vec(-30.0f32..30.0, 40),
        ) {
            let x = Tensor::from_vec(v[..rows * cols].to_vec(), &[rows, cols])?;
            for causal in [None, Some(offset)] {
                let mut out = B.zeros(crate::DType::F32, &[rows, cols])?;
                B.softmax_into(&x, causal, &mut out)?;
                let got = out.to_vec_f32()?;
                for (i, row) in got.chunks(cols).enumerate() {
                    let sum: f32 = row.iter().sum();
                    prop_assert!((sum - 1.0).abs() < 1e-5, "row {i} sums to {sum}");
                    prop_assert!(row.iter().all(|p| (0.0..=1.0).contains(p)));
                    if let Some(off) = causal {
                        prop_assert!(row[(i + off + 1).min(cols)..].iter().all(|&p| p == 0.0));
                    }
                }
            }
        }
    }
}
