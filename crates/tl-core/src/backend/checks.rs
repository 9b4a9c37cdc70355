//! What each op accepts: shape, dtype and aliasing rules shared by every
//! backend, so all devices reject the same inputs with the same errors.
//! Each check names the op and the offending shapes.

use crate::backend::{BinaryOp, RopeConfig};
use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::shape::Shape;
use crate::tensor::Tensor;

pub fn dtype(op: &'static str, what: &'static str, t: &Tensor, expected: DType) -> Result<()> {
    if t.dtype() == expected {
        Ok(())
    } else {
        Err(CoreError::DTypeMismatch {
            op,
            what,
            expected,
            got: t.dtype(),
        })
    }
}

pub fn rank(op: &'static str, what: &'static str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() == rank {
        Ok(())
    } else {
        Err(CoreError::Invalid {
            op,
            reason: format!("{what} must have rank {rank}, got shape {:?}", t.dims()),
        })
    }
}

/// An output must have the result's dtype and shape, be contiguous and
/// share no storage with the inputs (the kernel would read what it already
/// overwrote).
pub fn output(
    op: &'static str,
    out: &Tensor,
    dt: DType,
    dims: &[usize],
    inputs: &[Option<&Tensor>],
) -> Result<()> {
    dtype(op, "the output", out, dt)?;
    if out.dims() != dims {
        return Err(CoreError::ShapeMismatch {
            op,
            lhs: out.dims().to_vec(),
            rhs: dims.to_vec(),
        });
    }
    if !out.is_contiguous() {
        return Err(out.layout().not_contiguous(op));
    }
    distinct(op, out, inputs)
}

/// A tensor updated in place must not be a broadcast view (one element
/// seen at several indices) nor share storage with the op's other inputs.
pub fn in_place(op: &'static str, x: &Tensor, inputs: &[Option<&Tensor>]) -> Result<()> {
    let l = x.layout();
    if l.dims()
        .iter()
        .zip(l.strides())
        .any(|(&d, &s)| d > 1 && s == 0)
    {
        return Err(CoreError::Invalid {
            op,
            reason: format!("cannot update a broadcast view {l:?} in place"),
        });
    }
    distinct(op, x, inputs)
}

fn distinct(op: &'static str, out: &Tensor, inputs: &[Option<&Tensor>]) -> Result<()> {
    if inputs.iter().flatten().any(|t| t.same_storage(out)) {
        Err(CoreError::Aliasing { op })
    } else {
        Ok(())
    }
}

fn last_dim_vector(op: &'static str, what: &'static str, x: &Tensor, v: &Tensor) -> Result<()> {
    dtype(op, what, v, DType::F32)?;
    let d = x.shape().last_dim();
    if v.dims() != [d] {
        return Err(CoreError::Invalid {
            op,
            reason: format!(
                "{what} must have shape [{d}] (the last dim of x {:?}), got {:?}",
                x.dims(),
                v.dims()
            ),
        });
    }
    Ok(())
}

/// `x [m, k]` f32 × `w [n, k]` → `[m, n]`.
pub fn matmul_dims(x: &Tensor, w: &Tensor) -> Result<[usize; 2]> {
    let op = "matmul";
    dtype(op, "the activations", x, DType::F32)?;
    if w.dtype() == DType::I32 {
        return Err(CoreError::UnsupportedDType {
            op,
            dtype: w.dtype(),
        });
    }
    if x.rank() != 2 || w.rank() != 2 || x.dims()[1] != w.dims()[1] {
        return Err(CoreError::ShapeMismatch {
            op,
            lhs: x.dims().to_vec(),
            rhs: w.dims().to_vec(),
        });
    }
    Ok([x.dims()[0], w.dims()[0]])
}

/// `[.., m, k]` × `[.., k, n]` → `[.., m, n]`, both f32, same batch dims.
pub fn matmul_f32_dims(a: &Tensor, b: &Tensor) -> Result<Shape> {
    let op = "matmul_f32";
    dtype(op, "lhs", a, DType::F32)?;
    dtype(op, "rhs", b, DType::F32)?;
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        return Err(CoreError::ShapeMismatch {
            op,
            lhs: ad.to_vec(),
            rhs: bd.to_vec(),
        });
    }
    let mut dims = ad.to_vec();
    dims[r - 1] = bd[r - 1];
    Shape::checked(op, &dims)
}

pub fn binary_dims(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Shape> {
    let op = binary_name(op);
    dtype(op, "lhs", a, DType::F32)?;
    dtype(op, "rhs", b, DType::F32)?;
    Shape::broadcast(op, a.dims(), b.dims())
}

pub fn binary_name(op: BinaryOp) -> &'static str {
    match op {
        BinaryOp::Add => "add",
        BinaryOp::Mul => "mul",
    }
}

/// `y` must broadcast to `x`'s shape (the in-place result keeps `x`'s shape).
pub fn binary_inplace(op: BinaryOp, x: &Tensor, y: &Tensor) -> Result<()> {
    let out = binary_dims(op, x, y)?;
    if out.dims() != x.dims() {
        return Err(CoreError::ShapeMismatch {
            op: binary_name(op),
            lhs: x.dims().to_vec(),
            rhs: y.dims().to_vec(),
        });
    }
    in_place(binary_name(op), x, &[Some(y)])
}

pub fn gated_dims(gate: &Tensor, up: &Tensor) -> Result<Shape> {
    let op = "gated";
    dtype(op, "gate", gate, DType::F32)?;
    dtype(op, "up", up, DType::F32)?;
    if gate.dims() != up.dims() {
        return Err(CoreError::ShapeMismatch {
            op,
            lhs: gate.dims().to_vec(),
            rhs: up.dims().to_vec(),
        });
    }
    Ok(*gate.shape())
}

/// Norm inputs: f32 `x` of rank ≥ 1 and optional f32 vectors of its last dim.
pub fn norm(op: &'static str, x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>) -> Result<()> {
    dtype(op, "x", x, DType::F32)?;
    if x.rank() == 0 {
        return Err(CoreError::Invalid {
            op,
            reason: "x must have rank 1 or more, got a scalar".into(),
        });
    }
    if let Some(w) = w {
        last_dim_vector(op, "the weight", x, w)?;
    }
    if let Some(b) = b {
        last_dim_vector(op, "the bias", x, b)?;
    }
    Ok(())
}

pub fn softmax(x: &Tensor) -> Result<()> {
    norm("softmax", x, None, None)
}

pub fn rope(
    x: &Tensor,
    positions: &Tensor,
    freq_factors: Option<&Tensor>,
    cfg: &RopeConfig,
) -> Result<()> {
    let op = "rope";
    dtype(op, "x", x, DType::F32)?;
    rank(op, "x [n_tokens, n_heads, head_dim]", x, 3)?;
    dtype(op, "positions", positions, DType::I32)?;
    let (n_tokens, head_dim) = (x.dims()[0], x.dims()[2]);
    if positions.dims() != [n_tokens] {
        return Err(CoreError::ShapeMismatch {
            op,
            lhs: x.dims().to_vec(),
            rhs: positions.dims().to_vec(),
        });
    }
    if cfg.n_rot == 0 || !cfg.n_rot.is_multiple_of(2) || cfg.n_rot > head_dim {
        return Err(CoreError::Invalid {
            op,
            reason: format!(
                "n_rot {} must be even, positive and at most the head dim of x {:?}",
                cfg.n_rot,
                x.dims()
            ),
        });
    }
    if let Some(ff) = freq_factors {
        dtype(op, "freq_factors", ff, DType::F32)?;
        if ff.rank() != 1 || ff.dims()[0] < cfg.n_rot / 2 {
            return Err(CoreError::Invalid {
                op,
                reason: format!(
                    "freq_factors {:?} must be a vector of at least n_rot/2 = {} values",
                    ff.dims(),
                    cfg.n_rot / 2
                ),
            });
        }
    }
    Ok(())
}

/// `table [vocab, d]` by `ids [n]` (i32) → `[n, d]`.
pub fn embedding_dims(table: &Tensor, ids: &Tensor) -> Result<[usize; 2]> {
    let op = "embedding";
    if table.dtype() == DType::I32 {
        return Err(CoreError::UnsupportedDType {
            op,
            dtype: table.dtype(),
        });
    }
    rank(op, "the table [vocab, d]", table, 2)?;
    dtype(op, "ids", ids, DType::I32)?;
    rank(op, "ids [n]", ids, 1)?;
    Ok([ids.dims()[0], table.dims()[1]])
}

/// f32 `x` of rank ≥ 1 → its shape without the last dim.
pub fn argmax_dims(x: &Tensor) -> Result<Shape> {
    let op = "argmax";
    dtype(op, "x", x, DType::F32)?;
    match x.dims().split_last() {
        Some((&n, lead)) if n > 0 => Shape::checked(op, lead),
        _ => Err(CoreError::Invalid {
            op,
            reason: format!("x must have a non-empty last dim, got shape {:?}", x.dims()),
        }),
    }
}
