//! Elementwise kernels: unary maps, broadcasting binary ops and the gated
//! feed-forward product `act(gate) * up`.

use std::ops::Range;

use crate::backend::{Activation, BinaryOp, UnaryOp};
use crate::error::Result;
use crate::layout::Layout;

pub(crate) use crate::cpu::kernels::{gelu, silu};

pub(crate) fn unary_into(op: UnaryOp, x: &[f32], xl: &Layout, out: &mut [f32]) {
    match op {
        UnaryOp::Act(Activation::Silu) => map_into(x, xl, out, silu),
        UnaryOp::Act(Activation::Gelu) => map_into(x, xl, out, gelu),
        UnaryOp::Scale(s) => map_into(x, xl, out, |v| v * s),
    }
}

pub(crate) fn unary_inplace(op: UnaryOp, x: &mut [f32], xl: &Layout) {
    match op {
        UnaryOp::Act(Activation::Silu) => map_inplace(x, xl, silu),
        UnaryOp::Act(Activation::Gelu) => map_inplace(x, xl, gelu),
        UnaryOp::Scale(s) => map_inplace(x, xl, |v| v * s),
    }
}

fn map_into(x: &[f32], xl: &Layout, out: &mut [f32], f: impl Fn(f32) -> f32) {
    match xl.contiguous_range() {
        Some(r) => out.iter_mut().zip(&x[r]).for_each(|(o, &v)| *o = f(v)),
        None => out
            .iter_mut()
            .zip(xl.offsets())
            .for_each(|(o, i)| *o = f(x[i])),
    }
}

fn map_inplace(x: &mut [f32], xl: &Layout, f: impl Fn(f32) -> f32) {
    match xl.contiguous_range() {
        Some(r) => x[r].iter_mut().for_each(|v| *v = f(*v)),
        None => xl.offsets().for_each(|i| x[i] = f(x[i])),
    }
}

pub(crate) fn binary_into(
    op: BinaryOp,
    a: (&[f32], &Layout),
    b: (&[f32], &Layout),
    out: &mut [f32],
    dims: &[usize],
) -> Result<()> {
    match op {
        BinaryOp::Add => zip_into(a, b, out, dims, |x, y| x + y),
        BinaryOp::Mul => zip_into(a, b, out, dims, |x, y| x * y),
    }
}

pub(crate) fn binary_inplace(
    op: BinaryOp,
    x: (&mut [f32], &Layout),
    y: (&[f32], &Layout),
) -> Result<()> {
    match op {
        BinaryOp::Add => zip_inplace(x, y, |x, y| x + y),
        BinaryOp::Mul => zip_inplace(x, y, |x, y| x * y),
    }
}

pub(crate) fn gated_into(
    act: Activation,
    gate: (&[f32], &Layout),
    up: (&[f32], &Layout),
    out: &mut [f32],
    dims: &[usize],
) -> Result<()> {
    match act {
        Activation::Silu => zip_into(gate, up, out, dims, |g, u| silu(g) * u),
        Activation::Gelu => zip_into(gate, up, out, dims, |g, u| gelu(g) * u),
    }
}

pub(crate) fn gated_inplace(
    act: Activation,
    gate: (&mut [f32], &Layout),
    up: (&[f32], &Layout),
) -> Result<()> {
    match act {
        Activation::Silu => zip_inplace(gate, up, |g, u| silu(g) * u),
        Activation::Gelu => zip_inplace(gate, up, |g, u| gelu(g) * u),
    }
}

/// The storage range of a layout that repeats one contiguous row over all
/// its other dims (a bias or norm-like vector broadcast over tokens).
fn broadcast_row(l: &Layout) -> Option<Range<usize>> {
    let (&d, lead) = l.dims().split_last()?;
    let (&s, lead_strides) = l.strides().split_last()?;
    let repeats = lead
        .iter()
        .zip(lead_strides)
        .all(|(&n, &st)| n == 1 || st == 0);
    (repeats && (s == 1 || d <= 1)).then(|| l.offset()..l.offset() + d)
}

/// `out = f(a, b)` over `dims`, `a` and `b` broadcast to it. Fast paths for
/// same-shape contiguous inputs and a row vector repeated over rows; any
/// other layout walks strided offsets.
fn zip_into(
    (a, al): (&[f32], &Layout),
    (b, bl): (&[f32], &Layout),
    out: &mut [f32],
    dims: &[usize],
    f: impl Fn(f32, f32) -> f32,
) -> Result<()> {
    let (al, bl) = (al.broadcast_as(dims)?, bl.broadcast_as(dims)?);
    let d = dims.last().copied().unwrap_or(1);
    if out.is_empty() {
        return Ok(());
    }
    match (
        al.contiguous_range(),
        bl.contiguous_range(),
        broadcast_row(&bl),
    ) {
        (Some(ra), Some(rb), _) => {
            for ((o, &x), &y) in out.iter_mut().zip(&a[ra]).zip(&b[rb]) {
                *o = f(x, y);
            }
        }
        (Some(ra), None, Some(row)) => {
            let b_row = &b[row];
            for (o_row, a_row) in out.chunks_exact_mut(d).zip(a[ra].chunks_exact(d)) {
                for ((o, &x), &y) in o_row.iter_mut().zip(a_row).zip(b_row) {
                    *o = f(x, y);
                }
            }
        }
        _ => {
            for ((o, i), j) in out.iter_mut().zip(al.offsets()).zip(bl.offsets()) {
                *o = f(a[i], b[j]);
            }
        }
    }
    Ok(())
}

/// `x = f(x, y)` with `y` broadcast to `x`'s shape.
fn zip_inplace(
    (x, xl): (&mut [f32], &Layout),
    (y, yl): (&[f32], &Layout),
    f: impl Fn(f32, f32) -> f32,
) -> Result<()> {
    let yl = yl.broadcast_as(xl.dims())?;
    let d = xl.shape().last_dim();
    if xl.elem_count() == 0 {
        return Ok(());
    }
    match (
        xl.contiguous_range(),
        yl.contiguous_range(),
        broadcast_row(&yl),
    ) {
        (Some(rx), Some(ry), _) => {
            for (v, &w) in x[rx].iter_mut().zip(&y[ry]) {
                *v = f(*v, w);
            }
        }
        (Some(rx), None, Some(row)) => {
            let y_row = &y[row];
            for x_row in x[rx].chunks_exact_mut(d) {
                for (v, &w) in x_row.iter_mut().zip(y_row) {
                    *v = f(*v, w);
                }
            }
        }
        _ => {
            for (i, j) in xl.offsets().zip(yl.offsets()) {
                x[i] = f(x[i], y[j]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{gelu, silu};
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    use crate::backend::{Activation, Backend};
    use crate::cpu::ops::test_util::{assert_close, t};
    use crate::cpu::CpuBackend;
    use crate::error::{CoreError, Result};
    use crate::tensor::Tensor;

    const B: CpuBackend = CpuBackend;

    #[test]
    fn add_mul_scale_by_hand() -> Result<()> {
        let a = t(&[1., 2., 3., 4.], &[2, 2])?;
        let b = t(&[10., 20., 30., 40.], &[2, 2])?;
        assert_close(&B.add(&a, &b)?.to_vec_f32()?, &[11., 22., 33., 44.], 0.0)?;
        assert_close(&B.mul(&a, &b)?.to_vec_f32()?, &[10., 40., 90., 160.], 0.0)?;
        assert_close(&B.scale(&a, 0.5)?.to_vec_f32()?, &[0.5, 1., 1.5, 2.], 0.0)
    }

    #[test]
    fn row_vector_broadcasts_over_rows() -> Result<()> {
        let x = t(&[1., 2., 3., 4., 5., 6.], &[2, 3])?;
        let bias = t(&[10., 20., 30.], &[3])?;
        assert_close(
            &B.add(&x, &bias)?.to_vec_f32()?,
            &[11., 22., 33., 14., 25., 36.],
            0.0,
        )?;
        // Broadcast on the left operand, and a column vector.
        let col = t(&[1., 2.], &[2, 1])?;
        assert_close(
            &B.mul(&col, &x)?.to_vec_f32()?,
            &[1., 2., 3., 8., 10., 12.],
            0.0,
        )?;
        // In place, the residual-add shape of the forward pass.
        let mut y = x.clone();
        B.add_inplace(&mut y, &bias)?;
        assert_close(&x.to_vec_f32()?, &[11., 22., 33., 14., 25., 36.], 0.0)
    }

    #[test]
    fn one_tensor_as_both_inputs() -> Result<()> {
        // Both inputs share one read lock; locking twice could deadlock.
        let x = t(&[1., 2., 3., 4.], &[2, 2])?;
        assert_close(&B.mul(&x, &x)?.to_vec_f32()?, &[1., 4., 9., 16.], 0.0)?;
        assert_close(
            &B.add(&x, &x.transpose(0, 1)?)?.to_vec_f32()?,
            &[2., 5., 5., 8.],
            0.0,
        )
    }

    #[test]
    fn strided_inputs_and_in_place_views() -> Result<()> {
        let x = t(&[1., 2., 3., 4.], &[2, 2])?;
        let xt = x.transpose(0, 1)?;
        assert_close(&B.add(&x, &xt)?.to_vec_f32()?, &[2., 5., 5., 8.], 0.0)?;
        // Update one column of x in place through a strided view.
        let mut col = x.narrow(1, 1, 1)?;
        B.scale_inplace(&mut col, 10.0)?;
        assert_close(&x.to_vec_f32()?, &[1., 20., 3., 40.], 0.0)
    }

    #[test]
    fn elementwise_errors() -> Result<()> {
        let x = t(&[1., 2., 3., 4., 5., 6.], &[2, 3])?;
        let y = t(&[1., 2.], &[2])?;
        let e = B.add(&x, &y).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("add: shape mismatch: [2, 3] vs [2]"));
        // In place, the result must keep x's shape.
        let mut row = t(&[1., 2., 3.], &[3])?;
        assert!(B.add_inplace(&mut row, &x).is_err());
        // Updating a broadcast view in place would write one element twice.
        let mut b = row.broadcast_as(&[2, 3])?;
        assert!(B.scale_inplace(&mut b, 2.0).is_err());
        let mut alias = x.clone();
        assert!(matches!(
            B.add_inplace(&mut alias, &x),
            Err(CoreError::Aliasing { .. })
        ));
        Ok(())
    }

    #[test]
    fn gelu_constant_is_the_nearest_f32() {
        assert_eq!(SQRT_2_OVER_PI, (2.0 / std::f64::consts::PI).sqrt() as f32);
    }

    #[test]
    fn activations_by_hand() -> Result<()> {
        let x = t(&[0., 1., -1.], &[3])?;
        let e = std::f32::consts::E;
        assert_close(
            &B.silu(&x)?.to_vec_f32()?,
            &[0., 1. / (1. + 1. / e), -1. / (1. + e)],
            1e-6,
        )?;
        // gelu(1) = 0.5 (1 + tanh(sqrt(2/π) · 1.044715)) = 0.841192.
        assert_close(&B.gelu(&x)?.to_vec_f32()?, &[0., 0.841192, -0.158808], 1e-5)?;
        Ok(())
    }

    #[test]
    fn gated_by_hand() -> Result<()> {
        let g = t(&[0., 1., 2.], &[3])?;
        let u = t(&[5., 2., -1.], &[3])?;
        let want = [0., 2. * silu(1.), -silu(2.)];
        assert_close(&B.silu_mul(&g, &u)?.to_vec_f32()?, &want, 1e-6)?;
        let want = [0., 2. * gelu(1.), -gelu(2.)];
        assert_close(
            &B.gated(Activation::Gelu, &g, &u)?.to_vec_f32()?,
            &want,
            1e-6,
        )?;
        let mut gi = g.clone();
        B.gated_inplace(Activation::Gelu, &mut gi, &u)?;
        assert_close(&g.to_vec_f32()?, &want, 1e-6)?;
        assert!(B.silu_mul(&g, &t(&[1., 2.], &[2])?).is_err());
        Ok(())
    }

    proptest! {
        #[test]
        fn broadcast_add_matches_manual(
            rows in 1usize..6,
            cols in 1usize..6,
            seed in prop::collection::vec(-10.0f32..10.0, 36 + 6),
        ) {
            let a: Vec<f32> = seed[..rows * cols].to_vec();
            let b: Vec<f32> = seed[36..36 + cols].to_vec();
            let want: Vec<f32> = (0..rows * cols).map(|i| a[i] + b[i % cols]).collect();
            let at = Tensor::from_vec(a, &[rows, cols])?;
            let bt = Tensor::from_vec(b, &[cols])?;
            assert_close(&B.add(&at, &bt)?.to_vec_f32()?, &want, 0.0)?;
            // The general strided path agrees with the fast paths.
            let bt2 = bt.unsqueeze(0)?.broadcast_as(&[rows, cols])?;
            let stored_t: Vec<f32> = (0..rows * cols).map(|i| seed[(i % rows) * cols + i / rows]).collect();
            let at_t = Tensor::from_vec(stored_t, &[cols, rows])?.transpose(0, 1)?;
            assert_close(&B.add(&at_t, &bt2)?.to_vec_f32()?, &want, 0.0)?;
        }
    }
}
