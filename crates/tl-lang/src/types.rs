//! Static types: scalars, tensors with (partly) known shapes, and the
//! handles later steps add (models).

use std::fmt;

use crate::ast::{Dim, ElemType, TypeExpr};

#[derive(Clone, Debug, PartialEq)]
pub enum Type {
    Unit,
    Int,
    Float,
    Bool,
    Str,
    /// Dims `None`: rank unknown until the program runs.
    Tensor(ElemType, Option<Vec<Dim>>),
    /// A loaded model (`load_model`); its fields are checked when read.
    Model,
    /// A paged KV cache (`kv_cache`).
    Cache,
    /// Unknown (the result of a builtin whose type depends on values).
    Any,
}

impl Type {
    pub fn from_expr(t: &TypeExpr) -> Type {
        match t {
            TypeExpr::Int => Type::Int,
            TypeExpr::Float => Type::Float,
            TypeExpr::Bool => Type::Bool,
            TypeExpr::Str => Type::Str,
            TypeExpr::Tensor(e, d) => Type::Tensor(*e, Some(d.clone())),
            TypeExpr::Model => Type::Model,
            TypeExpr::Cache => Type::Cache,
        }
    }

    pub fn tensor(e: ElemType, dims: Vec<Dim>) -> Type {
        Type::Tensor(e, Some(dims))
    }

    pub fn is_numeric_scalar(&self) -> bool {
        matches!(self, Type::Int | Type::Float | Type::Any)
    }

    pub fn dims(&self) -> Option<&[Dim]> {
        match self {
            Type::Tensor(_, Some(d)) => Some(d),
            _ => None,
        }
    }

    /// The scalar type of one element.
    pub fn elem_scalar(e: ElemType) -> Type {
        match e {
            ElemType::I32 => Type::Int,
            ElemType::Bool => Type::Bool,
            _ => Type::Float,
        }
    }
}

pub fn elem_name(e: ElemType) -> &'static str {
    match e {
        ElemType::F32 => "f32",
        ElemType::F16 => "f16",
        ElemType::BF16 => "bf16",
        ElemType::I32 => "i32",
        ElemType::Bool => "bool",
        ElemType::Quant => "q",
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Lit(n) => write!(f, "{n}"),
            Dim::Named(s) => write!(f, "{s}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

pub fn dims_string(d: &[Dim]) -> String {
    let parts: Vec<String> = d.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Unit => write!(f, "()"),
            Type::Int => write!(f, "int"),
            Type::Float => write!(f, "float"),
            Type::Bool => write!(f, "bool"),
            Type::Str => write!(f, "string"),
            Type::Tensor(e, Some(d)) => write!(f, "{}{}", elem_name(*e), dims_string(d)),
            Type::Tensor(e, None) => write!(f, "{}[..]", elem_name(*e)),
            Type::Model => write!(f, "model"),
            Type::Cache => write!(f, "kv_cache"),
            Type::Any => write!(f, "any"),
        }
    }
}

/// Whether two dims can be the same size. Distinct names are distinct
/// sizes: inside a function `n` and `d` are whatever its caller passes.
pub fn dims_agree(a: &Dim, b: &Dim) -> bool {
    match (a, b) {
        (Dim::Unknown, _) | (_, Dim::Unknown) => true,
        (Dim::Lit(x), Dim::Lit(y)) => x == y,
        (Dim::Named(x), Dim::Named(y)) => x == y,
        // A name against a number: only a call can tell.
        _ => true,
    }
}

/// numpy broadcasting of two known shapes, aligned at the right.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let da = (k + a.len()).checked_sub(n).and_then(|i| a.get(i));
        let db = (k + b.len()).checked_sub(n).and_then(|i| b.get(i));
        out.push(match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(Dim::Lit(1)), Some(y)) => y.clone(),
            (Some(x), Some(Dim::Lit(1))) => x.clone(),
            (Some(x), Some(y)) => {
                if !dims_agree(x, y) {
                    return None;
                }
                if matches!(x, Dim::Unknown) {
                    y.clone()
                } else {
                    x.clone()
                }
            }
            (None, None) => Dim::Unknown,
        });
    }
    Some(out)
}
