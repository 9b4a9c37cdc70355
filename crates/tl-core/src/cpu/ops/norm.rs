//! Normalizations over the last dim, with ggml's numerics: sums in f64,
//! the inverse root taken in f32 (`ggml_compute_forward_rms_norm_f32`,
//! `ggml_compute_forward_norm_f32` in ggml-cpu `ops.cpp`).

use crate::error::Result;
use crate::layout::Layout;

/// `out = x / sqrt(mean(x²) + eps) * w`, row by row.
pub(crate) fn rms_norm(
    op: &'static str,
    (x, xl): (&[f32], &Layout),
    w: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    let (rows, d) = xl.rows(op)?;
    if d == 0 {
        return Ok(());
    }
    for (off, o_row) in rows.zip(out.chunks_exact_mut(d)) {
        crate::cpu::kernels::rms_norm_row(&x[off..off + d], w, eps, o_row);
    }
    Ok(())
}

/// `out = (x - mean) / sqrt(var + eps) * w + b`, row by row.
pub(crate) fn layer_norm(
    op: &'static str,
    (x, xl): (&[f32], &Layout),
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    let (rows, d) = xl.rows(op)?;
    if d == 0 {
        return Ok(());
    }
    for (off, o_row) in rows.zip(out.chunks_exact_mut(d)) {
        let row = &x[off..off + d];
        let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
        let mean = (sum / d as f64) as f32;
        let mut sum2 = 0.0f64;
        for (o, &v) in o_row.iter_mut().zip(row) {
            *o = v - mean;
            sum2 += f64::from(*o * *o);
        }
        let scale = 1.0 / ((sum2 / d as f64) as f32 + eps).sqrt();
        for (i, o) in o_row.iter_mut().enumerate() {
            *o *= scale;
            if let Some(w) = w {
                *o *= w[i];
            }
            if let Some(b) = b {
                *o += b[i];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::backend::Backend;
    use crate::cpu::ops::test_util::{assert_close, t};
    use crate::cpu::CpuBackend;
    use crate::error::Result;

    const B: CpuBackend = CpuBackend;

    #[test]
    fn rms_norm_by_hand() -> Result<()> {
        // mean(x²) of [1, 2, 3, 4] is 30 / 4 = 7.5.
        let x = t(&[1., 2., 3., 4.], &[1, 4])?;
        let ones = t(&[1.; 4], &[4])?;
        let r = 7.5f32.sqrt();
        assert_close(
            &B.rms_norm(&x, &ones, 0.0)?.to_vec_f32()?,
            &[1. / r, 2. / r, 3. / r, 4. / r],
            1e-6,
        )?;
        // eps adds under the root; w scales per column; rows are independent.
        let x = t(&[1., 2., 3., 4., 2., 2., 2., 2.], &[2, 4])?;
        let w = t(&[1., 0., 2., 1.], &[4])?;
        let r = (7.5f32 + 0.5).sqrt();
        let s = (4.0f32 + 0.5).sqrt();
        assert_close(
            &B.rms_norm(&x, &w, 0.5)?.to_vec_f32()?,
            &[1. / r, 0., 6. / r, 4. / r, 2. / s, 0., 4. / s, 2. / s],
            1e-6,
        )
    }

    #[test]
    fn rms_norm_reads_strided_rows() -> Result<()> {
        // Every other row of a [4, 2] buffer.
        let x = t(&[3., 4., 9., 9., 0., 5., 9., 9.], &[2, 2, 2])?.narrow(1, 0, 1)?;
        let w = t(&[1., 1.], &[2])?;
        let out = B.rms_norm(&x, &w, 0.0)?;
        let (a, b) = (12.5f32.sqrt(), 12.5f32.sqrt());
        assert_close(&out.to_vec_f32()?, &[3. / a, 4. / a, 0., 5. / b], 1e-6)
    }

    #[test]
    fn layer_norm_by_hand() -> Result<()> {
        // [1, 2, 3, 4]: mean 2.5, variance 1.25.
        let x = t(&[1., 2., 3., 4.], &[4])?;
        let s = 1.25f32.sqrt();
        let plain = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s];
        assert_close(
            &B.layer_norm(&x, None, None, 0.0)?.to_vec_f32()?,
            &plain,
            1e-6,
        )?;
        let w = t(&[2.; 4], &[4])?;
        let b = t(&[1., 0., 0., 0.], &[4])?;
        let want: Vec<f32> = plain
            .iter()
            .enumerate()
            .map(|(i, v)| 2. * v + if i == 0 { 1. } else { 0. })
            .collect();
        assert_close(
            &B.layer_norm(&x, Some(&w), Some(&b), 0.0)?.to_vec_f32()?,
            &want,
            1e-6,
        )
    }

    #[test]
    fn norm_errors_name_op_and_shapes() -> Result<()> {
        let x = t(&[1., 2., 3., 4.], &[2, 2])?;
        let w = t(&[1., 1., 1.], &[3])?;
        let e = B.rms_norm(&x, &w, 1e-6).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("rms_norm: the weight must have shape [2] (the last dim of x [2, 2]), got [3]")
        );
        assert!(B.layer_norm(&x, None, Some(&w), 0.0).is_err());
        Ok(())
    }
}
