//! Runtime values. Tensors keep their shape on the host next to the data,
//! so no op ever reads a device to learn a shape or a loop bound.

use std::fmt;
use std::rc::Rc;

use half::{bf16, f16};
use tl_core::{DType, Tensor};

use crate::ast::ElemType;
use crate::diag::Span;
use crate::error::{LangError, Result};

#[derive(Clone, Debug)]
pub enum Value {
    Unit,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(Rc<str>),
    Tensor(Rc<Tens>),
    /// A loaded model (`load_model`).
    Model(Rc<crate::model::ModelVal>),
    /// A prefix of GGUF tensor names (`model.blk`, `model.blk[3].attn_q`)
    /// or `model.config`; the leaf `.weight` / `.bias` is a tensor.
    Node(Rc<crate::model::ModelVal>, Rc<str>),
    /// A paged KV cache (`kv_cache`), written in place by `attention`.
    Cache(Rc<std::cell::RefCell<crate::model::CacheVal>>),
}

/// A tensor value: row-major, contiguous, shape on the host.
#[derive(Clone, Debug)]
pub struct Tens {
    pub shape: Vec<usize>,
    pub data: TData,
}

#[derive(Clone, Debug)]
pub enum TData {
    F32(Vec<f32>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
    /// f16, bf16 and GGML block formats stay in their own storage and are
    /// read by the kernels that understand them.
    Core(Tensor),
}

/// f32 storage goes back to [`crate::bufs`] for the next value of its
/// length (a training step's values, next step).
impl Drop for Tens {
    fn drop(&mut self) {
        if let TData::F32(v) = &mut self.data {
            crate::bufs::give(std::mem::take(v));
        }
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tens {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tens {
        Tens {
            shape,
            data: TData::F32(data),
        }
    }

    pub fn elem(&self) -> ElemType {
        match &self.data {
            TData::F32(_) => ElemType::F32,
            TData::I32(_) => ElemType::I32,
            TData::Bool(_) => ElemType::Bool,
            TData::Core(t) => match t.dtype() {
                DType::F32 => ElemType::F32,
                DType::F16 => ElemType::F16,
                DType::BF16 => ElemType::BF16,
                DType::I32 => ElemType::I32,
                DType::Quantized(_) => ElemType::Quant,
            },
        }
    }

    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as f32 (bools as 0/1, block formats dequantized).
    pub fn to_f32(&self, span: Span) -> Result<Vec<f32>> {
        Ok(match &self.data {
            TData::F32(v) => crate::bufs::copy(v),
            TData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            TData::Bool(v) => v.iter().map(|&x| f32::from(u8::from(x))).collect(),
            TData::Core(t) => t.to_vec_f32().map_err(|source| LangError::Kernel {
                span,
                op: "to_f32",
                source,
            })?,
        })
    }

    /// A tl-core tensor over this value for a kernel (f32 and i32 are
    /// copied once into tl-core storage; core tensors are shared).
    pub fn to_core(&self, span: Span, op: &'static str) -> Result<Tensor> {
        let kernel = |source| LangError::Kernel { span, op, source };
        match &self.data {
            TData::F32(v) => Tensor::from_vec(v.clone(), &self.shape).map_err(kernel),
            TData::I32(v) => Tensor::from_vec_i32(v.clone(), &self.shape).map_err(kernel),
            TData::Bool(_) => Err(LangError::ty(span, "a numeric tensor", "bool tensor")),
            TData::Core(t) => Ok(t.clone()),
        }
    }

    pub fn from_core(t: &Tensor, span: Span, op: &'static str) -> Result<Tens> {
        let kernel = |source| LangError::Kernel { span, op, source };
        let shape = t.dims().to_vec();
        Ok(match t.dtype() {
            DType::I32 => Tens {
                shape,
                data: TData::I32(t.to_vec_i32().map_err(kernel)?),
            },
            _ => Tens::f32(shape, t.to_vec_f32().map_err(kernel)?),
        })
    }

    /// Converted to another element type.
    pub fn cast(&self, to: ElemType, span: Span) -> Result<Tens> {
        if self.elem() == to {
            return Ok(self.clone());
        }
        let kernel = |source| LangError::Kernel {
            span,
            op: "cast",
            source,
        };
        let f = self.to_f32(span)?;
        let data = match to {
            ElemType::F32 => TData::F32(f),
            ElemType::I32 => TData::I32(f.iter().map(|&x| x as i32).collect()),
            ElemType::Bool => TData::Bool(f.iter().map(|&x| x != 0.0).collect()),
            ElemType::F16 => TData::Core(
                Tensor::from_elements(f.iter().map(|&x| f16::from_f32(x)).collect(), &self.shape)
                    .map_err(kernel)?,
            ),
            ElemType::BF16 => TData::Core(
                Tensor::from_elements(f.iter().map(|&x| bf16::from_f32(x)).collect(), &self.shape)
                    .map_err(kernel)?,
            ),
            ElemType::Quant => {
                return Err(LangError::NotImplemented {
                    span,
                    name: "quantize".into(),
                    reason: "quantized tensors come from model files",
                })
            }
        };
        Ok(Tens {
            shape: self.shape.clone(),
            data,
        })
    }
}

impl Value {
    pub fn tensor(t: Tens) -> Value {
        Value::Tensor(Rc::new(t))
    }

    pub fn type_name(&self) -> String {
        match self {
            Value::Unit => "()".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Bool(_) => "bool".into(),
            Value::Str(_) => "string".into(),
            Value::Tensor(t) => format!("{}{:?}", crate::types::elem_name(t.elem()), t.shape),
            Value::Model(_) => "model".into(),
            Value::Node(_, p) => format!("model.{p}"),
            Value::Cache(_) => "kv_cache".into(),
        }
    }
}

fn fmt_f32(x: f32) -> String {
    if x.is_finite() && x == x.trunc() && x.abs() < 1e15 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn write_nested(
    f: &mut fmt::Formatter<'_>,
    shape: &[usize],
    elems: &[String],
    start: usize,
) -> fmt::Result {
    let Some((&n, rest)) = shape.split_first() else {
        return write!(f, "{}", elems.get(start).map_or("?", |s| s.as_str()));
    };
    let inner = numel(rest);
    write!(f, "[")?;
    for i in 0..n {
        if i > 0 {
            write!(f, ", ")?;
        }
        write_nested(f, rest, elems, start + i * inner)?;
    }
    write!(f, "]")
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Unit => write!(f, "()"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => {
                if x.is_finite() && *x == x.trunc() && x.abs() < 1e15 {
                    write!(f, "{x:.1}")
                } else {
                    write!(f, "{x}")
                }
            }
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "{s}"),
            Value::Model(m) => write!(f, "<model {}>", m.path),
            Value::Node(m, p) => write!(f, "<model {} .{p}>", m.path),
            Value::Cache(c) => write!(f, "<kv_cache of {} tokens>", c.borrow().capacity()),
            Value::Tensor(t) => {
                let elems: Vec<String> = match &t.data {
                    TData::F32(v) => v.iter().map(|&x| fmt_f32(x)).collect(),
                    TData::I32(v) => v.iter().map(|x| x.to_string()).collect(),
                    TData::Bool(v) => v.iter().map(|x| x.to_string()).collect(),
                    TData::Core(c) => match c.to_vec_f32() {
                        Ok(v) => v.iter().map(|&x| fmt_f32(x)).collect(),
                        Err(_) => return write!(f, "<{} tensor {:?}>", c.dtype(), t.shape),
                    },
                };
                write_nested(f, &t.shape, &elems, 0)
            }
        }
    }
}
