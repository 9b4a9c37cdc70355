//! Matrix products: activations × weights stored one output row at a time
//! (any dtype), and plain strided f32 × f32.

use crate::cpu::buffers::with_scratch;
use crate::cpu::ops::weights::weight_row;
use crate::error::Result;
use crate::layout::Layout;
use crate::shape::Shape;
use crate::storage::CpuStorage;

/// `out [m, n] = x [m, k] · w [n, k]ᵀ`. Each weight row is decoded once
/// into scratch (f32 rows are read in place) and dotted with every
/// activation row, so a quantized weight is dequantized one row at a time
/// and never whole.
pub(crate) fn matmul_weight(
    op: &'static str,
    x: &[f32],
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    out: &mut [f32],
) -> Result<()> {
    let (x_rows, k) = xl.rows(op)?;
    let (w_rows, _) = wl.rows(op)?;
    let n = wl.dims()[0];
    with_scratch(op, k, |scratch| {
        for (j, w_off) in w_rows.enumerate() {
            let w_row = weight_row(op, w, w_off, k, scratch)?;
            for (i, x_off) in x_rows.clone().enumerate() {
                out[i * n + j] = dot(&x[x_off..x_off + k], w_row);
            }
        }
        Ok(())
    })
}

/// Dot product with eight independent partial sums: one running sum is a
/// dependency chain the compiler may not reorder, eight let it vectorize.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out [.., m, n] = a [.., m, k] · b [.., k, n]`, both strided, `out`
/// contiguous. Row-times-matrix order (i, p, j) streams rows of `b` when its
/// last dim is contiguous, the case of weights and of `v` in attention.
pub(crate) fn matmul_f32(
    op: &'static str,
    a: &[f32],
    al: &Layout,
    b: &[f32],
    bl: &Layout,
    out: &mut [f32],
) -> Result<()> {
    let r = al.rank();
    let (m, k, n) = (al.dims()[r - 2], al.dims()[r - 1], bl.dims()[r - 1]);
    let (as0, as1) = (al.strides()[r - 2], al.strides()[r - 1]);
    let (bs0, bs1) = (bl.strides()[r - 2], bl.strides()[r - 1]);
    if m * n == 0 {
        return Ok(());
    }
    let batch = Shape::checked(op, &al.dims()[..r - 2])?;
    let a_batches = Layout::new(batch, &al.strides()[..r - 2], al.offset())?.offsets();
    let b_batches = Layout::new(batch, &bl.strides()[..r - 2], bl.offset())?.offsets();
    for ((ao, bo), o) in a_batches.zip(b_batches).zip(out.chunks_exact_mut(m * n)) {
        for (i, o_row) in o.chunks_exact_mut(n).enumerate() {
            o_row.fill(0.0);
            let a_row = ao + i * as0;
            for p in 0..k {
                let av = a[a_row + p * as1];
                let b_row = bo + p * bs0;
                if bs1 == 1 {
                    for (o, &bv) in o_row.iter_mut().zip(&b[b_row..b_row + n]) {
                        *o += av * bv;
                    }
                } else {
                    for (j, o) in o_row.iter_mut().enumerate() {
                        *o += av * b[b_row + j * bs1];
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use proptest::prelude::*;
    use tl_gguf::GgmlType;

    use crate::backend::Backend;
    use crate::cpu::ops::test_util::{assert_close, q8_0_block, t};
    use crate::cpu::CpuBackend;
    use crate::error::{CoreError, Result};
    use crate::tensor::Tensor;

    const B: CpuBackend = CpuBackend;

    #[test]
    fn f32_weight_by_hand() -> Result<()> {
        // x [2, 3], w [2, 3] (two output features): out = x · wᵀ.
        let x = t(&[1., 2., 3., 4., 5., 6.], &[2, 3])?;
        let w = t(&[1., 0., -1., 0.5, 0.5, 0.5], &[2, 3])?;
        let out = B.matmul(&x, &w)?;
        assert_eq!(out.dims(), &[2, 2]);
        assert_close(&out.to_vec_f32()?, &[-2., 3., -2., 7.5], 0.0)
    }

    #[test]
    fn half_weights() -> Result<()> {
        let x = t(&[1., 2., 3., 4., 5., 6.], &[2, 3])?;
        let vals = [1., 0., -1., 0.5, 0.5, 0.5];
        let want = [-2., 3., -2., 7.5];
        let w16: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
        let out = B.matmul(&x, &Tensor::from_elements(w16, &[2, 3])?)?;
        assert_close(&out.to_vec_f32()?, &want, 0.0)?;
        let wb: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
        let out = B.matmul(&x, &Tensor::from_elements(wb, &[2, 3])?)?;
        assert_close(&out.to_vec_f32()?, &want, 0.0)
    }

    #[test]
    fn strided_activations_and_weights() -> Result<()> {
        // Narrowing rows keeps the last dim contiguous: read in place.
        let x = t(&[9., 9., 9., 1., 2., 3.], &[2, 3])?.narrow(0, 1, 1)?;
        let w = t(&[1., 1., 1., 0., 1., 0., 7., 7., 7.], &[3, 3])?.narrow(0, 0, 2)?;
        assert_close(&B.matmul(&x, &w)?.to_vec_f32()?, &[6., 2.], 0.0)?;
        // A transposed weight has a strided last dim: an explicit error.
        let wt = t(&[1., 2., 3., 4.], &[2, 2])?.transpose(0, 1)?;
        let x2 = t(&[1., 1.], &[1, 2])?;
        assert!(matches!(
            B.matmul(&x2, &wt),
            Err(CoreError::NotContiguous { .. })
        ));
        Ok(())
    }

    #[test]
    fn bad_shapes_and_outputs_are_errors() -> Result<()> {
        let x = t(&[1., 2., 3.], &[1, 3])?;
        let w = t(&[1., 2., 3., 4.], &[2, 2])?;
        let e = B.matmul(&x, &w).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("matmul: shape mismatch: [1, 3] vs [2, 2]")
        );
        let w = t(&[1., 2., 3.], &[1, 3])?;
        let mut wrong = Tensor::zeros(crate::DType::F32, &[2, 1], crate::Device::Cpu)?;
        assert!(matches!(
            B.matmul_into(&x, &w, &mut wrong),
            Err(CoreError::ShapeMismatch { .. })
        ));
        // An output that is a view of an input.
        let mut alias = x.narrow(1, 0, 1)?;
        assert!(matches!(
            B.matmul_into(&x, &w, &mut alias),
            Err(CoreError::Aliasing { .. })
        ));
        let ids = Tensor::from_vec_i32(vec![1, 2, 3], &[1, 3])?;
        assert!(B.matmul(&ids, &w).is_err());
        Ok(())
    }

    #[test]

    fn q8_0_weight() -> Result<()> {
        // Two rows of one Q8_0 block each: row 0 = 0.5 * [1, 2, …, 32],
        // row 1 = 2 * [-1, 0, 0, …].
        let mut q0 = [0i8; 32];
        for (i, q) in q0.iter_mut().enumerate() {
            *q = i as i8 + 1;
        }
        let mut q1 = [0i8; 32];
        q1[0] = -1;
        let mut bytes = q8_0_block(0.5, &q0);
        bytes.extend(q8_0_block(2.0, &q1));
        let w = Tensor::from_quantized(GgmlType::Q8_0, bytes, &[2, 32])?;
        let x = Tensor::from_vec(vec![1.0; 32], &[1, 32])?;
        // Row 0: 0.5 * (1 + … + 32) = 264; row 1: -2.
        assert_close(&B.matmul(&x, &w)?.to_vec_f32()?, &[264., -2.], 0.0)
    }

    #[test]
    fn quantized_rows_must_be_whole_blocks() {
        let r = Tensor::from_quantized(GgmlType::Q8_0, vec![0; 34], &[2, 16]);
        assert!(matches!(r, Err(CoreError::PartialBlock { .. })));
    }

    #[test]
    fn plain_matmul_by_hand() -> Result<()> {
        let a = t(&[1., 2., 3., 4., 5., 6.], &[2, 3])?;
        let b = t(&[1., 0., 0., 1., 1., 1.], &[3, 2])?;
        assert_close(
            &B.matmul_f32(&a, &b)?.to_vec_f32()?,
            &[4., 5., 10., 11.],
            0.0,
        )?;
        // q · kᵀ through a transposed view.
        let k = t(&[1., 0., 0., 1., 0., 0., 1., 1.], &[4, 2])?;
        let q = t(&[2., 3.], &[1, 2])?;
        let s = B.matmul_f32(&q, &k.transpose(0, 1)?)?;
        assert_close(&s.to_vec_f32()?, &[2., 3., 0., 5.], 0.0)
    }

    /// Naive triple loop over row-major vectors.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows)
            .map(|i| v[(i % rows) * cols + i / rows])
            .collect()
    }

    proptest! {
        #[test]
        fn matmuls_match_naive(
            (m, k, n, a, b) in (1usize..5, 1usize..20, 1usize..5).prop_flat_map(|(m, k, n)| (
                Just(m), Just(k), Just(n),
                prop::collection::vec(-2.0f32..2.0, m * k),
                prop::collection::vec(-2.0f32..2.0, k * n),
            ))
        ) {
            let want = naive(&a, &b, m, k, n);
            let at = Tensor::from_vec(a.clone(), &[m, k])?;
            let bt = Tensor::from_vec(b.clone(), &[k, n])?;
            assert_close(&B.matmul_f32(&at, &bt)?.to_vec_f32()?, &want, 1e-5)?;
            // The same product against b stored as a [n, k] weight.
            let w = Tensor::from_vec(transpose(&b, k, n), &[n, k])?;
            assert_close(&B.matmul(&at, &w)?.to_vec_f32()?, &want, 1e-5)?;
            // And through a strided view of the weight.
            assert_close(&B.matmul_f32(&at, &w.transpose(0, 1)?)?.to_vec_f32()?, &want, 1e-5)?;
        }

        #[test]
        fn batched_matmul_matches_per_batch(
            a in prop::collection::vec(-2.0f32..2.0, 2 * 3 * 4),
            b in prop::collection::vec(-2.0f32..2.0, 2 * 4 * 5),
        ) {
            let at = Tensor::from_vec(a.clone(), &[2, 3, 4])?;
            let bt = Tensor::from_vec(b.clone(), &[2, 4, 5])?;
            let got = B.matmul_f32(&at, &bt)?.to_vec_f32()?;
            let mut want = naive(&a[..12], &b[..20], 3, 4, 5);
            want.extend(naive(&a[12..], &b[20..], 3, 4, 5));
            assert_close(&got, &want, 1e-5)?;
        }
    }
}
