//! Reductions over the last dim.

use crate::error::{CoreError, Result};
use crate::layout::Layout;

/// Index of each row's maximum, the first on ties, as ggml's
/// `ggml_compute_forward_argmax_f32` picks it (strict `>` from -inf).
pub(crate) fn argmax(op: &'static str, (x, xl): (&[f32], &Layout), out: &mut [i32]) -> Result<()> {
    let (rows, n) = xl.rows(op)?;
    for (off, o) in rows.zip(out.iter_mut()) {
        let mut best = (0usize, f32::NEG_INFINITY);
        for (i, &v) in x[off..off + n].iter().enumerate() {
            if v > best.1 {
                best = (i, v);
            }
        }
        *o = i32::try_from(best.0).map_err(|_| CoreError::Invalid {
            op,
            reason: format!("index {} does not fit in i32", best.0),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::backend::Backend;
    use crate::cpu::ops::test_util::t;
    use crate::cpu::CpuBackend;
    use crate::error::Result;

    const B: CpuBackend = CpuBackend;

    #[test]
    fn argmax_by_hand() -> Result<()> {
        let x = t(&[1., 5., 3., 9., 9., -1.], &[2, 3])?;
        let out = B.argmax(&x)?;
        assert_eq!(out.dims(), &[2]);
        assert_eq!(out.to_vec_i32()?, vec![1, 0]);
        // A vector reduces to a scalar; a strided last dim is an error, as is
        // an empty row.
        assert_eq!(B.argmax(&t(&[0., 2., 1.], &[3])?)?.to_vec_i32()?, vec![1]);
        assert!(B.argmax(&x.transpose(0, 1)?).is_err());
        assert!(B.argmax(&t(&[], &[2, 0])?).is_err());
        Ok(())
    }
}
