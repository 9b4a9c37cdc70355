//! The builtin function table: each entry's signature and status (the
//! table is what docs/LANGUAGE.md lists), its type/shape rule, and its
//! implementation on tl-core's CPU kernels.

use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tl_core::{Activation, Backend, CpuBackend, RopeConfig, RopeMode, Tensor, UnaryOp};

use crate::ast::{Dim, ElemType, Expr, ExprKind};
use crate::diag::Span;
use crate::error::{LangError, Result};
use crate::model::{CacheVal, ModelVal};
use crate::types::{dims_agree, dims_string, Type};
use crate::value::{numel, TData, Tens, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ready,
    /// Parsed and listed, but a call is a "not yet implemented" diagnostic.
    Later(&'static str),
}

pub struct Builtin {
    pub name: &'static str,
    pub signature: &'static str,
    pub doc: &'static str,
    pub status: Status,
}

const fn ready(name: &'static str, signature: &'static str, doc: &'static str) -> Builtin {
    Builtin {
        name,
        signature,
        doc,
        status: Status::Ready,
    }
}

pub static BUILTINS: &[Builtin] = &[
    ready("print", "print(x, ...) -> ()", "Prints its arguments separated by spaces."),
    ready("print_top_k", "print_top_k(x: f32[n], k: int) -> ()", "Prints the k largest entries as `index: value`, largest first."),
    ready("relu", "relu(x: float | f32[..]) -> same", "max(x, 0), elementwise."),
    ready("sigmoid", "sigmoid(x: float | f32[..], t: float?) -> same", "1 / (1 + e^-x), elementwise; with a temperature t, sigmoid(x / t): a differentiable step."),
    ready("exp", "exp(x: float | f32[..]) -> same", "e^x, elementwise."),
    ready("log", "log(x: float | f32[..]) -> same", "Natural logarithm, elementwise."),
    ready("tanh", "tanh(x: float | f32[..]) -> same", "Hyperbolic tangent, elementwise."),
    ready("sqrt", "sqrt(x: float | f32[..]) -> same", "Square root, elementwise."),
    ready("abs", "abs(x: float | f32[..]) -> same", "Absolute value, elementwise."),
    ready("step", "step(x: float | f32[..]) -> same", "1 where x > 0, else 0 (the threshold rules compile to)."),
    ready("silu", "silu(x: float | f32[..]) -> same", "x * sigmoid(x) (tl-core kernel)."),
    ready("gelu", "gelu(x: float | f32[..], mode: string?) -> same", "GELU, tanh approximation (vectorized on f32 tensors); mode \"ggml\" on a tensor: ggml's CPU GELU (input rounded to f16, f16 table), as the native Gemma forward computes it."),
    ready("softmax", "softmax(x: f32[.., n]) -> f32[.., n]", "Softmax over the last axis (vectorized on f32 tensors)."),
    ready("log_softmax", "log_softmax(x: f32[.., n]) -> f32[.., n]", "log(softmax(x)) over the last axis, computed stably (x - max - log Σ exp(x - max))."),
    ready("grad", "grad(loss: float | f32[], x: f32[..]) -> f32[..]", "The gradient of `loss` with respect to `x`, a learnable tensor or one computed from learnable tensors (reverse mode over the operations recorded since; zeros where `loss` does not depend on `x`)."),
    ready("save", "save(path: string) -> ()", "Writes every learnable tensor in scope to a safetensors file, each under its variable name."),
    ready("manual_seed", "manual_seed(seed: int) -> ()", "Seeds the generator of the random initializers (normal, uniform, xavier, kaiming); the default seed is 0."),
    ready("matmul", "matmul(a: f32[.., m, k], b: f32[k, n] | f32[.., k, n]) -> f32[.., m, n]", "Matrix product (tl-core kernel); a 2-D `b` is shared by all leading dims of `a`."),
    ready("linear", "linear(x: f32[.., k], w: f32|f16|bf16|q[n, k], bias: f32[n]?) -> f32[.., n]", "x · wᵀ (+ bias) with the weight stored one output per row, as in GGUF (tl-core kernel; quantized weights stay quantized)."),
    ready("rms_norm", "rms_norm(x: f32[.., d], w: f32[d], eps: float) -> f32[.., d]", "x / sqrt(mean(x²) + eps) * w over the last axis (tl-core kernel)."),
    ready("layer_norm", "layer_norm(x: f32[.., d], w: f32[d], b: f32[d], eps: float) -> f32[.., d]", "(x - mean) / sqrt(var + eps) * w + b over the last axis (tl-core kernel)."),
    ready("rope", "rope(x: f32[t, h, d], pos: i32[t], base: float, mode: string?) -> f32[t, h, d]", "Rotary position embedding; mode \"neox\" (default, qwen2/gemma) or \"normal\" (llama) (tl-core kernel)."),
    ready("embedding", "embedding(table: f32|f16|bf16|q[v, d], ids: i32[n]) -> f32[n, d]", "Rows `ids` of the table (tl-core kernel)."),
    ready("argmax", "argmax(x: f32[n]) -> int; argmax(x: f32[.., n]) -> i32[..]", "Index of the largest entry along the last axis, the first on ties."),
    ready("topk", "topk(x: f32[n], k: int) -> i32[k]", "Indices of the k largest entries, largest first."),
    ready("sample", "sample(logits: f32[n], temperature: float, top_k: int, top_p: float, seed: int) -> int", "Samples a token id: temperature ≤ 0 is greedy; else softmax(logits / temperature) restricted to the top_k (0: all) and to the smallest set of mass ≥ top_p, drawn with a ChaCha8 RNG seeded by `seed`."),
    ready("sum", "sum(x: tensor) -> float", "Sum of all entries."),
    ready("mean", "mean(x: tensor) -> float", "Mean of all entries."),
    ready("max", "max(x: tensor) -> float", "Largest entry."),
    ready("min", "min(x: tensor) -> float", "Smallest entry."),
    ready("len", "len(x: tensor | string) -> int", "Size of the first dimension (characters of a string)."),
    ready("dim", "dim(x: tensor, k: int) -> int", "Size of dimension k."),
    ready("bytes", "bytes(s: string) -> i32[n]", "The UTF-8 bytes of a string (0..=255), e.g. the token ids of a byte-level language model."),
    ready("zeros", "zeros(d0: int, ...) -> f32[d0, ...]", "A tensor of zeros."),
    ready("ones", "ones(d0: int, ...) -> f32[d0, ...]", "A tensor of ones."),
    ready("arange", "arange(n: int) -> f32[n]", "0, 1, …, n-1."),
    ready("reshape", "reshape(x: T[..], d0: int, ...) -> T[d0, ...]", "Same elements, new shape (element counts must match)."),
    ready("transpose", "transpose(x: T[m, n]) -> T[n, m]", "Swaps the two axes of a matrix."),
    ready("f32", "f32(x: tensor) -> f32[..]", "Converts the elements to f32."),
    ready("f16", "f16(x: tensor) -> f16[..]", "Converts the elements to f16."),
    ready("bf16", "bf16(x: tensor) -> bf16[..]", "Converts the elements to bf16."),
    ready("i32", "i32(x: tensor) -> i32[..]", "Converts the elements to i32 (truncating)."),
    ready("int", "int(x: float | int | bool) -> int", "Truncates a float; true is 1."),
    ready("float", "float(x: int | float) -> float", "Widens an int."),
    ready("str", "str(x) -> string", "The value as `print` shows it."),
    ready("allclose", "allclose(a: tensor, b: tensor, tol: float) -> bool", "Same shape and every |a - b| ≤ tol."),
    ready("nargs", "nargs() -> int", "Number of arguments after the file name of `tl run FILE [ARGS]`."),
    ready("arg", "arg(i: int) -> string", "Argument i of `tl run`."),
    ready("parse_int", "parse_int(s: string) -> int", "Parses a decimal integer."),
    ready("parse_float", "parse_float(s: string) -> float", "Parses a number."),
    ready("fixpoint_limit", "fixpoint_limit(n: int) -> ()", "Sets the most rounds the rules may take to reach their fixpoint (default 100000); more is an error."),
    ready("clock", "clock() -> float", "Seconds on a monotonic clock (differences time a part of a program)."),
    ready("load_model", "load_model(path: string, device: string?) -> model", "Opens a GGUF model on `device` (\"cpu\", \"cuda\", \"cuda:N\"; default `tl run --device`, else the CPU); on a GPU, `linear` by its weights and `attention` over its caches run there. `model.blk[i].attn_q.weight` (any GGUF tensor name, `blk.i.` written `blk[i].`) is its tensor, a zero-copy view that keeps its block format; `model.config.<field>` is a hyper-parameter: n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn, vocab, context (int), rope_base, rms_eps, embed_scale (float), arch (string)."),
    ready("tokenize", "tokenize(model, text: string) -> i32[n]", "Token ids of a text with the model's tokenizer, as `tl generate` encodes a prompt (BOS where the model adds one, special tokens parsed)."),
    ready("detokenize", "detokenize(model, ids: i32[n] | int) -> string", "Text of token ids (control tokens render as nothing)."),
    ready("apply_chat_template", "apply_chat_template(model, text: string, system: string?) -> string", "The model's chat template applied to one user message (and a system message), ending with the opening of the assistant's turn."),
    ready("is_eog", "is_eog(model, id: int) -> bool", "Whether a token id ends generation (EOS, EOT, …)."),
    ready("kv_cache", "kv_cache(model, n_tokens: int) -> kv_cache", "A paged KV cache (blocks of 16 tokens, f16) for one sequence of up to n_tokens tokens."),
    ready("attention", "attention(q: f32[t, h, d], k: f32[t, hk, d], v: f32[t, hk, d], cache: kv_cache, layer: int, pos: int) -> f32[t, h, d]", "Writes k and v of the tokens at positions pos..pos+t of `layer` into the paged cache in place, then attends each token causally over the cache (tl-model's attention; grouped heads; the model's score scale)."),
];

pub fn lookup(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

fn arity(name: &str, span: Span, got: usize, min: usize, max: usize) -> Result<()> {
    if got < min || got > max {
        let expected = if min == max {
            min.to_string()
        } else if max == usize::MAX {
            format!("at least {min}")
        } else {
            format!("{min} to {max}")
        };
        return Err(LangError::Arity {
            span,
            name: name.to_string(),
            expected,
            got,
        });
    }
    Ok(())
}

type Ta = (Type, Span);

fn tensor_of<'a>(a: &'a Ta, what: &str) -> Result<(ElemType, Option<&'a [Dim]>)> {
    match &a.0 {
        Type::Tensor(e, d) => Ok((*e, d.as_deref())),
        Type::Any => Ok((ElemType::F32, None)),
        other => Err(LangError::ty(a.1, what, other)),
    }
}

fn float_tensor<'a>(a: &'a Ta, what: &str) -> Result<Option<&'a [Dim]>> {
    let (e, d) = tensor_of(a, what)?;
    if e != ElemType::F32 {
        return Err(LangError::ty(a.1, what, &a.0));
    }
    Ok(d)
}

fn scalar(a: &Ta, want: Type) -> Result<()> {
    let ok = match (&want, &a.0) {
        (_, Type::Any) => true,
        (Type::Float, Type::Int) => true,
        (w, f) => w == f,
    };
    if ok {
        Ok(())
    } else {
        Err(LangError::ty(a.1, want, &a.0))
    }
}

fn same_dim(a: Option<&Dim>, b: Option<&Dim>, span: Span, what: &str) -> Result<()> {
    if let (Some(x), Some(y)) = (a, b) {
        if !dims_agree(x, y) {
            return Err(LangError::shape(span, format!("{what}: {x} vs {y}")));
        }
    }
    Ok(())
}

fn rank_at_least(d: Option<&[Dim]>, n: usize, a: &Ta, what: &str) -> Result<()> {
    if let Some(d) = d {
        if d.len() < n {
            return Err(LangError::shape(
                a.1,
                format!("{what} needs rank ≥ {n}, found {}", a.0),
            ));
        }
    }
    Ok(())
}

fn rank_is(d: Option<&[Dim]>, n: usize, a: &Ta, what: &str) -> Result<()> {
    if let Some(d) = d {
        if d.len() != n {
            return Err(LangError::shape(
                a.1,
                format!("{what} must have rank {n}, found {}", a.0),
            ));
        }
    }
    Ok(())
}

fn model_arg(a: &Ta) -> Result<()> {
    match a.0 {
        Type::Model | Type::Any => Ok(()),
        ref other => Err(LangError::ty(a.1, "a model (from load_model)", other)),
    }
}

fn lit_dims(exprs: &[Expr]) -> Vec<Dim> {
    exprs
        .iter()
        .map(|e| match e.kind {
            ExprKind::Int(n) if n >= 0 => Dim::Lit(n as usize),
            _ => Dim::Unknown,
        })
        .collect()
}

/// The result type of a builtin call, checking its arguments.
pub fn check(name: &str, name_span: Span, span: Span, a: &[Ta], exprs: &[Expr]) -> Result<Type> {
    let b = lookup(name).ok_or_else(|| LangError::Undefined {
        span: name_span,
        what: "function",
        name: name.to_string(),
    })?;
    if let Status::Later(reason) = b.status {
        return Err(LangError::NotImplemented {
            span: name_span,
            name: name.to_string(),
            reason,
        });
    }
    let n = a.len();
    let ar = |min, max| arity(name, span, n, min, max);
    Ok(match name {
        "print" => Type::Unit,
        "print_top_k" => {
            ar(2, 2)?;
            let d = float_tensor(&a[0], "f32[n]")?;
            rank_is(d, 1, &a[0], "print_top_k's input")?;
            scalar(&a[1], Type::Int)?;
            Type::Unit
        }
        "relu" | "sigmoid" | "exp" | "log" | "tanh" | "sqrt" | "abs" | "step" | "silu" | "gelu" => {
            if name == "gelu" {
                ar(1, 2)?;
                if n == 2 {
                    scalar(&a[1], Type::Str)?;
                }
            } else if name == "sigmoid" {
                ar(1, 2)?;
                let rank0 =
                    |t: &Type| matches!(t, Type::Tensor(ElemType::F32, Some(d)) if d.is_empty());
                if n == 2 && !a[1].0.is_numeric_scalar() && !rank0(&a[1].0) {
                    scalar(&a[1], Type::Float)?;
                }
            } else {
                ar(1, 1)?;
            }
            match &a[0].0 {
                Type::Int | Type::Float => Type::Float,
                Type::Any => Type::Any,
                _ => {
                    float_tensor(&a[0], "float or f32 tensor")?;
                    a[0].0.clone()
                }
            }
        }
        "grad" => {
            ar(2, 2)?;
            match &a[0].0 {
                Type::Float | Type::Any | Type::Tensor(ElemType::F32, None) => {}
                Type::Tensor(ElemType::F32, Some(d)) if d.is_empty() => {}
                other => {
                    return Err(LangError::ty(
                        a[0].1,
                        "a scalar (float or f32[]) to differentiate",
                        other,
                    ))
                }
            }
            float_tensor(&a[1], "an f32 tensor")?;
            a[1].0.clone()
        }
        "save" => {
            ar(1, 1)?;
            scalar(&a[0], Type::Str)?;
            Type::Unit
        }
        "manual_seed" => {
            ar(1, 1)?;
            scalar(&a[0], Type::Int)?;
            Type::Unit
        }
        "softmax" | "log_softmax" => {
            ar(1, 1)?;
            let d = float_tensor(&a[0], "f32 tensor")?;
            rank_at_least(d, 1, &a[0], "softmax's input")?;
            a[0].0.clone()
        }
        "matmul" => {
            ar(2, 2)?;
            let da = float_tensor(&a[0], "f32 tensor")?;
            let db = float_tensor(&a[1], "f32 tensor")?;
            rank_at_least(da, 2, &a[0], "matmul's left side")?;
            rank_at_least(db, 2, &a[1], "matmul's right side")?;
            match (da, db) {
                (Some(x), Some(y)) => {
                    let k1 = x.last();
                    let k2 = y.get(y.len() - 2);
                    if let (Some(p), Some(q)) = (k1, k2) {
                        if !dims_agree(p, q) {
                            return Err(LangError::shape(
                                span,
                                format!(
                                    "matmul of {} and {}: inner dimensions {p} and {q} differ",
                                    a[0].0, a[1].0
                                ),
                            ));
                        }
                    }
                    if y.len() > 2 && y.len() != x.len() {
                        return Err(LangError::shape(
                            span,
                            format!("matmul of {} and {}: batch ranks differ", a[0].0, a[1].0),
                        ));
                    }
                    let mut out: Vec<Dim> = x[..x.len() - 1].to_vec();
                    out.push(y[y.len() - 1].clone());
                    Type::tensor(ElemType::F32, out)
                }
                _ => Type::Tensor(ElemType::F32, None),
            }
        }
        "linear" => {
            ar(2, 3)?;
            let dx = float_tensor(&a[0], "f32 tensor")?;
            let (we, dw) = tensor_of(&a[1], "a weight tensor [n, k]")?;
            if matches!(we, ElemType::I32 | ElemType::Bool) {
                return Err(LangError::ty(
                    a[1].1,
                    "a float or quantized weight",
                    &a[1].0,
                ));
            }
            rank_at_least(dx, 1, &a[0], "linear's input")?;
            rank_is(dw, 2, &a[1], "linear's weight")?;
            same_dim(
                dx.and_then(|d| d.last()),
                dw.and_then(|d| d.get(1)),
                span,
                "linear: input features vs weight columns",
            )?;
            if n == 3 {
                let db = float_tensor(&a[2], "f32[n]")?;
                rank_is(db, 1, &a[2], "linear's bias")?;
                same_dim(
                    db.and_then(|d| d.first()),
                    dw.and_then(|d| d.first()),
                    a[2].1,
                    "linear: bias vs weight rows",
                )?;
            }
            match (dx, dw) {
                (Some(x), Some(w)) => {
                    let mut out = x[..x.len() - 1].to_vec();
                    out.push(w[0].clone());
                    Type::tensor(ElemType::F32, out)
                }
                _ => Type::Tensor(ElemType::F32, None),
            }
        }
        "rms_norm" | "layer_norm" => {
            let params = if name == "rms_norm" { 1 } else { 2 };
            ar(params + 2, params + 2)?;
            let dx = float_tensor(&a[0], "f32 tensor")?;
            rank_at_least(dx, 1, &a[0], "the normalized input")?;
            for p in &a[1..=params] {
                let dw = float_tensor(p, "f32[d]")?;
                rank_is(dw, 1, p, "a norm weight")?;
                same_dim(
                    dx.and_then(|d| d.last()),
                    dw.and_then(|d| d.first()),
                    p.1,
                    "norm weight vs the input's last dimension",
                )?;
            }
            scalar(&a[params + 1], Type::Float)?;
            a[0].0.clone()
        }
        "rope" => {
            ar(3, 4)?;
            let dx = float_tensor(&a[0], "f32[t, h, d]")?;
            rank_is(dx, 3, &a[0], "rope's input [tokens, heads, head_dim]")?;
            let (pe, dp) = tensor_of(&a[1], "i32[t]")?;
            if pe != ElemType::I32 {
                return Err(LangError::ty(a[1].1, "i32[t]", &a[1].0));
            }
            rank_is(dp, 1, &a[1], "rope's positions")?;
            same_dim(
                dx.and_then(|d| d.first()),
                dp.and_then(|d| d.first()),
                a[1].1,
                "rope: tokens vs positions",
            )?;
            scalar(&a[2], Type::Float)?;
            if n == 4 {
                scalar(&a[3], Type::Str)?;
            }
            a[0].0.clone()
        }
        "embedding" => {
            ar(2, 2)?;
            let (te, dt) = tensor_of(&a[0], "a table [vocab, d]")?;
            if matches!(te, ElemType::I32 | ElemType::Bool) {
                return Err(LangError::ty(a[0].1, "a float or quantized table", &a[0].0));
            }
            rank_is(dt, 2, &a[0], "the embedding table")?;
            let (ie, di) = tensor_of(&a[1], "i32[n]")?;
            if ie != ElemType::I32 {
                return Err(LangError::ty(a[1].1, "i32[n]", &a[1].0));
            }
            rank_is(di, 1, &a[1], "embedding ids")?;
            match (dt, di) {
                (Some(t), Some(i)) => Type::tensor(ElemType::F32, vec![i[0].clone(), t[1].clone()]),
                _ => Type::Tensor(ElemType::F32, None),
            }
        }
        "argmax" => {
            ar(1, 1)?;
            let d = float_tensor(&a[0], "f32 tensor")?;
            rank_at_least(d, 1, &a[0], "argmax's input")?;
            match d {
                Some(d) if d.len() == 1 => Type::Int,
                Some(d) => Type::tensor(ElemType::I32, d[..d.len() - 1].to_vec()),
                None => Type::Any,
            }
        }
        "topk" => {
            ar(2, 2)?;
            let d = float_tensor(&a[0], "f32[n]")?;
            rank_is(d, 1, &a[0], "topk's input")?;
            scalar(&a[1], Type::Int)?;
            Type::tensor(ElemType::I32, lit_dims(&exprs[1..2]))
        }
        "sample" => {
            ar(5, 5)?;
            let d = float_tensor(&a[0], "f32[n] logits")?;
            rank_is(d, 1, &a[0], "sample's logits")?;
            scalar(&a[1], Type::Float)?;
            scalar(&a[2], Type::Int)?;
            scalar(&a[3], Type::Float)?;
            scalar(&a[4], Type::Int)?;
            Type::Int
        }
        "sum" | "mean" | "max" | "min" => {
            ar(1, 1)?;
            let (e, _) = tensor_of(&a[0], "a tensor")?;
            if e == ElemType::Quant {
                return Err(LangError::ty(
                    a[0].1,
                    "a tensor that is not quantized",
                    &a[0].0,
                ));
            }
            Type::Float
        }
        "len" => {
            ar(1, 1)?;
            if a[0].0 != Type::Str {
                let (_, d) = tensor_of(&a[0], "a tensor or string")?;
                rank_at_least(d, 1, &a[0], "len's input")?;
            }
            Type::Int
        }
        "bytes" => {
            ar(1, 1)?;
            scalar(&a[0], Type::Str)?;
            Type::tensor(ElemType::I32, vec![Dim::Unknown])
        }
        "dim" => {
            ar(2, 2)?;
            let (_, d) = tensor_of(&a[0], "a tensor")?;
            scalar(&a[1], Type::Int)?;
            if let (Some(d), ExprKind::Int(k)) = (d, &exprs[1].kind) {
                if *k < 0 || *k as usize >= d.len() {
                    return Err(LangError::Index {
                        span: exprs[1].span,
                        index: *k,
                        len: d.len(),
                    });
                }
            }
            Type::Int
        }
        "zeros" | "ones" | "reshape" => {
            let first = usize::from(name == "reshape");
            ar(first + 1, usize::MAX)?;
            for x in &a[first..] {
                scalar(x, Type::Int)?;
            }
            for e in &exprs[first..] {
                if let ExprKind::Unary(crate::ast::UnOp::Neg, _) = e.kind {
                    return Err(LangError::invalid(e.span, "a dimension cannot be negative"));
                }
            }
            let dims = lit_dims(&exprs[first..]);
            if name == "reshape" {
                let (e, d) = tensor_of(&a[0], "a tensor")?;
                if let Some(d) = d {
                    let lits: Option<Vec<usize>> = d
                        .iter()
                        .chain(&dims)
                        .map(|x| match x {
                            Dim::Lit(n) => Some(*n),
                            _ => None,
                        })
                        .collect();
                    if let Some(l) = lits {
                        let (from, to) = l.split_at(d.len());
                        // Literal dims may be huge: count without overflow.
                        let count = |x: &[usize]| {
                            x.iter().try_fold(1u128, |a, &n| a.checked_mul(n as u128))
                        };
                        if count(from) != count(to) {
                            return Err(LangError::shape(
                                span,
                                format!(
                                    "cannot reshape {} ({} elements) to {} ({} elements)",
                                    a[0].0,
                                    count(from).map_or("too many".into(), |n| n.to_string()),
                                    dims_string(&dims),
                                    count(to).map_or("too many".into(), |n| n.to_string())
                                ),
                            ));
                        }
                    }
                }
                Type::tensor(e, dims)
            } else {
                Type::tensor(ElemType::F32, dims)
            }
        }
        "arange" => {
            ar(1, 1)?;
            scalar(&a[0], Type::Int)?;
            Type::tensor(ElemType::F32, lit_dims(exprs))
        }
        "transpose" => {
            ar(1, 1)?;
            let (e, d) = tensor_of(&a[0], "a matrix")?;
            rank_is(d, 2, &a[0], "transpose's input")?;
            match d {
                Some(d) => Type::tensor(e, vec![d[1].clone(), d[0].clone()]),
                None => Type::Tensor(e, None),
            }
        }
        "f32" | "f16" | "bf16" | "i32" => {
            ar(1, 1)?;
            let (e, d) = tensor_of(&a[0], "a tensor")?;
            if e == ElemType::Quant {
                return Err(LangError::ty(
                    a[0].1,
                    "a tensor that is not quantized",
                    &a[0].0,
                ));
            }
            let to = match name {
                "f32" => ElemType::F32,
                "f16" => ElemType::F16,
                "bf16" => ElemType::BF16,
                _ => ElemType::I32,
            };
            Type::Tensor(to, d.map(<[Dim]>::to_vec))
        }
        "int" => {
            ar(1, 1)?;
            if !matches!(a[0].0, Type::Int | Type::Float | Type::Bool | Type::Any) {
                return Err(LangError::ty(a[0].1, "int, float or bool", &a[0].0));
            }
            Type::Int
        }
        "float" => {
            ar(1, 1)?;
            scalar(&a[0], Type::Float)?;
            Type::Float
        }
        "str" => {
            ar(1, 1)?;
            Type::Str
        }
        "allclose" => {
            ar(3, 3)?;
            tensor_of(&a[0], "a tensor")?;
            tensor_of(&a[1], "a tensor")?;
            scalar(&a[2], Type::Float)?;
            Type::Bool
        }
        "nargs" => {
            ar(0, 0)?;
            Type::Int
        }
        "arg" => {
            ar(1, 1)?;
            scalar(&a[0], Type::Int)?;
            Type::Str
        }
        "parse_int" | "parse_float" => {
            ar(1, 1)?;
            scalar(&a[0], Type::Str)?;
            if name == "parse_int" {
                Type::Int
            } else {
                Type::Float
            }
        }
        "fixpoint_limit" => {
            ar(1, 1)?;
            scalar(&a[0], Type::Int)?;
            Type::Unit
        }
        "clock" => {
            ar(0, 0)?;
            Type::Float
        }
        "load_model" => {
            ar(1, 2)?;
            scalar(&a[0], Type::Str)?;
            if let Some(d) = a.get(1) {
                scalar(d, Type::Str)?;
            }
            Type::Model
        }
        "tokenize" => {
            ar(2, 2)?;
            model_arg(&a[0])?;
            scalar(&a[1], Type::Str)?;
            Type::tensor(ElemType::I32, vec![Dim::Unknown])
        }
        "detokenize" => {
            ar(2, 2)?;
            model_arg(&a[0])?;
            if !matches!(a[1].0, Type::Int | Type::Any) {
                let (e, d) = tensor_of(&a[1], "i32[n] or int")?;
                if e != ElemType::I32 {
                    return Err(LangError::ty(a[1].1, "i32[n] or int", &a[1].0));
                }
                rank_is(d, 1, &a[1], "token ids")?;
            }
            Type::Str
        }
        "apply_chat_template" => {
            ar(2, 3)?;
            model_arg(&a[0])?;
            for x in &a[1..] {
                scalar(x, Type::Str)?;
            }
            Type::Str
        }
        "is_eog" => {
            ar(2, 2)?;
            model_arg(&a[0])?;
            scalar(&a[1], Type::Int)?;
            Type::Bool
        }
        "kv_cache" => {
            ar(2, 2)?;
            model_arg(&a[0])?;
            scalar(&a[1], Type::Int)?;
            Type::Cache
        }
        "attention" => {
            ar(6, 6)?;
            for (x, what) in a[..3].iter().zip(["q", "k", "v"]) {
                let d = float_tensor(x, "f32[t, heads, head_dim]")?;
                rank_is(d, 3, x, what)?;
            }
            if !matches!(a[3].0, Type::Cache | Type::Any) {
                return Err(LangError::ty(a[3].1, "a kv_cache", &a[3].0));
            }
            scalar(&a[4], Type::Int)?;
            scalar(&a[5], Type::Int)?;
            a[0].0.clone()
        }
        _ => {
            return Err(LangError::NotImplemented {
                span: name_span,
                name: name.to_string(),
                reason: "no implementation",
            })
        }
    })
}

thread_local! {
    /// The origin of `clock()`.
    static CLOCK_START: std::time::Instant = std::time::Instant::now();
    /// Quantized activations and other buffers of the weight matmul,
    /// reused across calls so a decode step does not regrow them.
    static MM_SCRATCH: RefCell<tl_core::MatmulScratch> = RefCell::new(tl_core::MatmulScratch::default());
    /// Model weights the native loader repacked, by the address and length
    /// of their bytes in the mapped file (see [`register_packed`]).
    static PACKED: RefCell<std::collections::HashMap<(usize, usize), std::sync::Arc<tl_core::PackedWeight>>> =
        RefCell::new(std::collections::HashMap::new());
    /// Weights of models on a GPU, by the address and length of their
    /// mapped bytes: their model and GGUF name (see [`register_device`]).
    static ON_DEVICE: RefCell<DeviceWeights> = RefCell::new(DeviceWeights::new());
}

/// Model weights on a GPU: (address, length) of their mapped bytes → their
/// model and GGUF name.
type DeviceWeights = std::collections::HashMap<(usize, usize), (std::rc::Weak<ModelVal>, String)>;

/// Records that the weight whose mapped bytes are `bytes` belongs to the
/// model `m`, which runs on a GPU: `linear` by it then runs there.
pub fn register_device(bytes: &[u8], m: &Rc<ModelVal>, name: &str) {
    ON_DEVICE.with(|d| {
        d.borrow_mut().insert(
            (bytes.as_ptr() as usize, bytes.len()),
            (Rc::downgrade(m), name.to_string()),
        )
    });
}

fn device_model_for(bytes: &[u8]) -> Option<(Rc<ModelVal>, String)> {
    ON_DEVICE.with(|d| {
        let d = d.borrow();
        let (w, name) = d.get(&(bytes.as_ptr() as usize, bytes.len()))?;
        Some((w.upgrade()?, name.clone()))
    })
}

/// Records that the model weight whose mapped bytes are `bytes` has the
/// repacked copy `p`: `linear` then multiplies by the copy (the same bits,
/// and the file's pages of the weight stay given back).
pub fn register_packed(bytes: &[u8], p: std::sync::Arc<tl_core::PackedWeight>) {
    PACKED.with(|m| {
        m.borrow_mut()
            .insert((bytes.as_ptr() as usize, bytes.len()), p)
    });
}

fn packed_for(bytes: &[u8]) -> Option<std::sync::Arc<tl_core::PackedWeight>> {
    PACKED.with(|m| {
        m.borrow()
            .get(&(bytes.as_ptr() as usize, bytes.len()))
            .cloned()
    })
}

/// The repacked copy of a whole model weight `w` of shape `[n, k]` whose
/// products run on the host, with its row count; `None` for any other
/// tensor (learnables, weights without a copy, weights on a GPU).
fn packed_weight(w: &Tens, k: usize) -> Option<(std::sync::Arc<tl_core::PackedWeight>, usize)> {
    let tw = whole_weight(w)?;
    let [n, wk] = w.shape[..] else {
        return None;
    };
    if wk != k {
        return None;
    }
    let guard = tw.read_storage("linear").ok()?;
    let tl_core::Storage::Cpu(st) = &*guard;
    let bytes = st.bytes();
    if tw.dtype().size_in_bytes(n * k) != Some(bytes.len()) || device_model_for(bytes).is_some() {
        return None;
    }
    let p = packed_for(bytes).filter(|p| p.k() == k && p.n() == n)?;
    Some((p, n))
}

/// `linear(x, w_j, b_j)` for several weights over the same input, as one
/// product: the activations quantized once and the rows of all weights in
/// one pool dispatch (`tl_core::matmul_packed_many`, the bits of one
/// `linear` each). `None` unless `x` is f32 and every weight is a repacked
/// model weight on the host with a bias of its width, if any: the caller
/// then calls `linear` one by one, which also reports what is wrong.
pub fn linear_many(
    x: &Tens,
    ws: &[(&Tens, Option<&Tens>)],
    span: Span,
    max_elements: usize,
) -> Result<Option<Vec<Value>>> {
    let TData::F32(xf) = &x.data else {
        return Ok(None);
    };
    let k = x.shape.last().copied().unwrap_or(0);
    let m = numel(&x.shape[..x.shape.len().saturating_sub(1)]);
    if x.shape.is_empty() || k == 0 || m == 0 || ws.len() < 2 {
        return Ok(None);
    }
    let mut packed = Vec::with_capacity(ws.len());
    for (w, b) in ws {
        let Some((p, n)) = packed_weight(w, k) else {
            return Ok(None);
        };
        if m.saturating_mul(n) > max_elements || b.is_some_and(|b| b.shape != [n]) {
            return Ok(None);
        }
        packed.push(p);
    }
    let mut ys: Vec<Vec<f32>> = packed.iter().map(|p| vec![0.0f32; m * p.n()]).collect();
    {
        let refs: Vec<&tl_core::PackedWeight> = packed.iter().map(|p| &**p).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        MM_SCRATCH
            .with(|sc| tl_core::matmul_packed_many(xf, m, &refs, &mut outs, &mut sc.borrow_mut()))
            .map_err(|source| LangError::Kernel {
                span,
                op: "linear",
                source,
            })?;
    }
    let lead = &x.shape[..x.shape.len() - 1];
    let mut vals = Vec::with_capacity(ys.len());
    for ((_, b), (mut y, p)) in ws.iter().zip(ys.into_iter().zip(&packed)) {
        let n = p.n();
        if let Some(b) = b {
            let bf = f32_data(b, span)?;
            for row in y.chunks_exact_mut(n) {
                row.iter_mut().zip(bf.iter()).for_each(|(a, b)| *a += b);
            }
        }
        let mut dims = lead.to_vec();
        dims.push(n);
        vals.push(Value::tensor(Tens::f32(dims, y)));
    }
    Ok(Some(vals))
}

/// What a builtin may touch of the interpreter.
pub struct Ctx<'a> {
    pub out: &'a mut dyn Write,
    pub args: &'a [String],
    pub fixpoint_limit: &'a mut usize,
    /// [`crate::Limits::max_elements`]
    pub max_elements: usize,
    /// Where `load_model` puts a model unless the program names a device.
    pub device: tl_core::Device,
}

fn too_big(span: Span, what: &str, n: usize, max: usize) -> LangError {
    LangError::Limit {
        span,
        message: format!("{what} would have {n} elements, over the limit of {max}"),
    }
}

fn tens(v: &Value, span: Span) -> Result<Rc<Tens>> {
    match v {
        Value::Tensor(t) => Ok(t.clone()),
        other => Err(LangError::ty(span, "a tensor", other.type_name())),
    }
}

fn model(v: &Value, span: Span) -> Result<Rc<ModelVal>> {
    match v {
        Value::Model(m) => Ok(m.clone()),
        other => Err(LangError::ty(span, "a model", other.type_name())),
    }
}

fn token_id(i: i64, m: &ModelVal, span: Span) -> Result<u32> {
    let vocab = m.config().vocab;
    match u32::try_from(i) {
        Ok(t) if (t as usize) < vocab => Ok(t),
        _ => Err(LangError::Index {
            span,
            index: i,
            len: vocab,
        }),
    }
}

/// A core tensor that is a whole, contiguous storage (model weights and
/// their reshapes), whose raw bytes the block matmul can read as they are.
fn whole_weight(t: &Tens) -> Option<&Tensor> {
    match &t.data {
        TData::Core(c) if c.is_contiguous() && c.elem_count() == t.len() => Some(c),
        _ => None,
    }
}

/// The elements as f32, borrowed when they already are.
fn f32_data(t: &Tens, span: Span) -> Result<std::borrow::Cow<'_, [f32]>> {
    Ok(match &t.data {
        TData::F32(v) => std::borrow::Cow::Borrowed(v.as_slice()),
        _ => std::borrow::Cow::Owned(t.to_f32(span)?),
    })
}

fn int(v: &Value, span: Span) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(LangError::ty(span, "int", other.type_name())),
    }
}

fn float(v: &Value, span: Span) -> Result<f64> {
    match v {
        Value::Int(i) => Ok(*i as f64),
        Value::Float(f) => Ok(*f),
        other => Err(LangError::ty(span, "float", other.type_name())),
    }
}

fn string(v: &Value, span: Span) -> Result<Rc<str>> {
    match v {
        Value::Str(s) => Ok(s.clone()),
        other => Err(LangError::ty(span, "string", other.type_name())),
    }
}

fn usize_arg(v: &Value, span: Span) -> Result<usize> {
    let i = int(v, span)?;
    usize::try_from(i)
        .map_err(|_| LangError::invalid(span, format!("expected a count ≥ 0, found {i}")))
}

fn io(e: std::io::Error) -> LangError {
    LangError::Io {
        span: None,
        path: "<stdout>".into(),
        message: e.to_string(),
    }
}

fn core_out(t: &Tensor, span: Span, op: &'static str) -> Result<Value> {
    Ok(Value::tensor(Tens::from_core(t, span, op)?))
}

/// Runs builtin `name` on evaluated arguments (types already checked;
/// shapes are checked again here because `?` dims are known only now).
pub fn call(name: &str, span: Span, args: &[(Value, Span)], ctx: &mut Ctx<'_>) -> Result<Value> {
    let kernel = |op: &'static str| move |source| LangError::Kernel { span, op, source };
    let arg = |k: usize| -> Result<&(Value, Span)> {
        args.get(k).ok_or_else(|| LangError::Arity {
            span,
            name: name.to_string(),
            expected: format!("at least {}", k + 1),
            got: args.len(),
        })
    };
    let t0 = || -> Result<Rc<Tens>> {
        let (v, s) = arg(0)?;
        tens(v, *s)
    };
    let cpu = CpuBackend;
    Ok(match name {
        "print" => {
            let parts: Vec<String> = args.iter().map(|(v, _)| v.to_string()).collect();
            writeln!(ctx.out, "{}", parts.join(" ")).map_err(io)?;
            Value::Unit
        }
        "print_top_k" => {
            let t = t0()?;
            let k = usize_arg(&arg(1)?.0, arg(1)?.1)?;
            let v = t.to_f32(span)?;
            for i in top_indices(&v, k) {
                writeln!(ctx.out, "{i}: {}", v[i]).map_err(io)?;
            }
            Value::Unit
        }
        "relu" | "sigmoid" | "exp" | "log" | "tanh" | "sqrt" | "abs" | "step" | "silu" | "gelu" => {
            let (v, s) = arg(0)?;
            let f = crate::einsum::scalar_fn(name)
                .ok_or_else(|| LangError::invalid(span, format!("`{name}` is not elementwise")))?;
            match v {
                Value::Int(_) | Value::Float(_) => Value::Float(f(float(v, *s)? as f32) as f64),
                _ => {
                    let t = tens(v, *s)?;
                    if let (TData::F32(x), Some((mv, ms))) = (&t.data, args.get(1)) {
                        let y = match &*string(mv, *ms)? {
                            "tanh" => x.iter().map(|&v| tl_core::cpu::kernels::gelu(v)).collect(),
                            "ggml" => x
                                .iter()
                                .map(|&v| tl_core::cpu::kernels::gelu_ggml_cpu(v))
                                .collect(),
                            other => {
                                return Err(LangError::invalid(
                                    *ms,
                                    format!(
                                        "gelu mode must be \"tanh\" or \"ggml\", found {other:?}"
                                    ),
                                ))
                            }
                        };
                        return Ok(Value::tensor(Tens::f32(t.shape.clone(), y)));
                    }
                    if let (TData::F32(x), "gelu", None) = (&t.data, name, args.get(1)) {
                        // Vectorized: one exponential per element, no libm.
                        let mut y = crate::bufs::take(x.len());
                        crate::vmath::gelu_into(x, &mut y);
                        return Ok(Value::tensor(Tens::f32(t.shape.clone(), y)));
                    }
                    if let (TData::F32(x), "silu") = (&t.data, name) {
                        // The native forward's scalar silu, without a copy
                        // into and out of a core tensor.
                        let y = x.iter().map(|&v| tl_core::cpu::kernels::silu(v)).collect();
                        return Ok(Value::tensor(Tens::f32(t.shape.clone(), y)));
                    }
                    if name == "silu" || name == "gelu" {
                        let act = if name == "silu" {
                            Activation::Silu
                        } else {
                            Activation::Gelu
                        };
                        let x = t.to_core(*s, "activation")?;
                        let y = cpu
                            .unary(UnaryOp::Act(act), &x)
                            .map_err(kernel("activation"))?;
                        core_out(&y, span, "activation")?
                    } else {
                        let data = t.to_f32(*s)?.into_iter().map(f).collect();
                        Value::tensor(Tens::f32(t.shape.clone(), data))
                    }
                }
            }
        }
        "softmax" => {
            let t = t0()?;
            if let TData::F32(x) = &t.data {
                // Vectorized exponentials (no libm calls, none for the
                // masked entries that underflow to 0).
                let n = t.shape.last().copied().unwrap_or(1).max(1);
                let mut y = crate::bufs::copy(x);
                crate::vmath::softmax_rows(&mut y, n);
                return Ok(Value::tensor(Tens::f32(t.shape.clone(), y)));
            }
            let x = t.to_core(span, "softmax")?;
            core_out(
                &cpu.softmax(&x).map_err(kernel("softmax"))?,
                span,
                "softmax",
            )?
        }
        "log_softmax" => {
            let t = t0()?;
            let n = t.shape.last().copied().unwrap_or(1).max(1);
            let mut x = t.to_f32(span)?;
            crate::vmath::log_softmax_rows(&mut x, n, &mut Vec::with_capacity(n));
            Value::tensor(Tens::f32(t.shape.clone(), x))
        }
        "matmul" => {
            let a = t0()?;
            let (bv, bs) = arg(1)?;
            let b = tens(bv, *bs)?;
            let ka = a.shape.last().copied().unwrap_or(0);
            let kb = b
                .shape
                .len()
                .checked_sub(2)
                .and_then(|i| b.shape.get(i))
                .copied();
            if Some(ka) != kb {
                return Err(LangError::shape(
                    span,
                    format!(
                        "matmul of {:?} and {:?}: inner dimensions differ",
                        a.shape, b.shape
                    ),
                ));
            }
            let out_n = numel(&a.shape[..a.shape.len().saturating_sub(1)])
                .saturating_mul(b.shape.last().copied().unwrap_or(0));
            if out_n > ctx.max_elements {
                return Err(too_big(span, "matmul's result", out_n, ctx.max_elements));
            }
            let ta = a.to_core(span, "matmul")?;
            let tb = b.to_core(*bs, "matmul")?;
            if b.shape.len() == 2 && a.shape.len() > 2 {
                // Fold the leading dims of `a` into its rows.
                let m = numel(&a.shape[..a.shape.len() - 1]);
                let flat = ta.reshape(&[m, ka]).map_err(kernel("matmul"))?;
                let y = cpu.matmul_f32(&flat, &tb).map_err(kernel("matmul"))?;
                let mut dims = a.shape[..a.shape.len() - 1].to_vec();
                dims.push(b.shape[1]);
                let y = y.reshape(&dims).map_err(kernel("matmul"))?;
                core_out(&y, span, "matmul")?
            } else {
                core_out(
                    &cpu.matmul_f32(&ta, &tb).map_err(kernel("matmul"))?,
                    span,
                    "matmul",
                )?
            }
        }
        "linear" => {
            let x = t0()?;
            let (wv, ws) = arg(1)?;
            let w = tens(wv, *ws)?;
            let k = x.shape.last().copied().unwrap_or(0);
            if w.shape.len() != 2 || w.shape[1] != k {
                return Err(LangError::shape(
                    span,
                    format!(
                        "linear: input {:?} against weight {:?} (expected [n, {k}])",
                        x.shape, w.shape
                    ),
                ));
            }
            let m = numel(&x.shape[..x.shape.len().saturating_sub(1)]);
            if m.saturating_mul(w.shape[0]) > ctx.max_elements {
                return Err(too_big(
                    span,
                    "linear's result",
                    m.saturating_mul(w.shape[0]),
                    ctx.max_elements,
                ));
            }
            if let Some(tw) = whole_weight(&w) {
                // Model weights: straight to the block-format matmul the
                // native forward uses (activations quantized once, SIMD
                // block dots, the thread pool).
                let n = w.shape[0];
                let xf = f32_data(&x, span)?;
                let mut y = vec![0.0f32; m * n];
                {
                    let guard = tw.read_storage("linear").map_err(kernel("linear"))?;
                    let tl_core::Storage::Cpu(st) = &*guard;
                    let bytes = st.bytes();
                    if tw.dtype().size_in_bytes(n * k) != Some(bytes.len()) {
                        return Err(LangError::invalid(
                            *ws,
                            format!("linear: weight storage does not hold exactly {:?}", w.shape),
                        ));
                    }
                    // A model on a GPU: its product kernels there.
                    let on_device = match device_model_for(bytes) {
                        Some((mv, wname)) => mv
                            .llm
                            .model
                            .device_linear(&wname, tw.dtype().to_ggml(), n, k, bytes, &xf, m)
                            .map_err(|source| LangError::Model {
                                span,
                                op: "linear",
                                source: Box::new(source),
                            })?,
                        None => None,
                    };
                    if let Some(r) = on_device {
                        y = r;
                    } else {
                        let packed = packed_for(bytes).filter(|p| p.k() == k && p.n() == n);
                        MM_SCRATCH
                            .with(|sc| match &packed {
                                Some(p) => {
                                    tl_core::matmul_packed(&xf, m, p, &mut y, &mut sc.borrow_mut())
                                }
                                None => tl_core::matmul(
                                    &xf,
                                    m,
                                    k,
                                    bytes,
                                    tw.dtype().to_ggml(),
                                    n,
                                    &mut y,
                                    &mut sc.borrow_mut(),
                                ),
                            })
                            .map_err(kernel("linear"))?;
                    }
                }
                if let Some((bv, bs)) = args.get(2) {
                    let b = tens(bv, *bs)?;
                    if b.shape != [n] {
                        return Err(LangError::shape(
                            *bs,
                            format!("linear: bias {:?} for {n} outputs", b.shape),
                        ));
                    }
                    let bf = f32_data(&b, *bs)?;
                    for row in y.chunks_exact_mut(n) {
                        row.iter_mut().zip(bf.iter()).for_each(|(a, b)| *a += b);
                    }
                }
                let mut dims = x.shape[..x.shape.len().saturating_sub(1)].to_vec();
                dims.push(n);
                return Ok(Value::tensor(Tens::f32(dims, y)));
            }
            if let (TData::F32(xf), TData::F32(wf)) = (&x.data, &w.data) {
                // f32 weights (learnables): the blocked kernel, reading
                // the weight as the transposed right factor in place.
                let n = w.shape[0];
                let mut y = crate::gemm::matmul(xf, wf, m, k, n, false, true).ok_or_else(|| {
                    LangError::invalid(span, "linear: operands do not hold their shapes")
                })?;
                if let Some((bv, bs)) = args.get(2) {
                    let b = tens(bv, *bs)?;
                    if b.shape != [n] {
                        return Err(LangError::shape(
                            *bs,
                            format!("linear: bias {:?} for {n} outputs", b.shape),
                        ));
                    }
                    let bf = f32_data(&b, *bs)?;
                    for row in y.chunks_exact_mut(n.max(1)) {
                        row.iter_mut().zip(bf.iter()).for_each(|(a, b)| *a += b);
                    }
                }
                let mut dims = x.shape[..x.shape.len().saturating_sub(1)].to_vec();
                dims.push(n);
                return Ok(Value::tensor(Tens::f32(dims, y)));
            }
            let tx = x
                .to_core(span, "linear")?
                .reshape(&[m, k])
                .map_err(kernel("linear"))?;
            let tw = w.to_core(*ws, "linear")?;
            let mut y = cpu.matmul(&tx, &tw).map_err(kernel("linear"))?;
            if let Some((bv, bs)) = args.get(2) {
                let b = tens(bv, *bs)?;
                if b.shape != [w.shape[0]] {
                    return Err(LangError::shape(
                        *bs,
                        format!("linear: bias {:?} for {} outputs", b.shape, w.shape[0]),
                    ));
                }
                let tb = b.to_core(*bs, "linear")?;
                cpu.add_inplace(&mut y, &tb).map_err(kernel("linear"))?;
            }
            let mut dims = x.shape[..x.shape.len().saturating_sub(1)].to_vec();
            dims.push(w.shape[0]);
            core_out(&y.reshape(&dims).map_err(kernel("linear"))?, span, "linear")?
        }
        "rms_norm" => {
            // The row kernel of the native forward, so that a program's
            // numerics match it bit for bit.
            let xt = t0()?;
            let (wv, ws) = arg(1)?;
            let wt = tens(wv, *ws)?;
            let d = xt.shape.last().copied().unwrap_or(0);
            if wt.shape != [d] {
                return Err(LangError::shape(
                    *ws,
                    format!("rms_norm: weight {:?} for rows of {d}", wt.shape),
                ));
            }
            let eps = float(&arg(2)?.0, arg(2)?.1)? as f32;
            let xf = f32_data(&xt, span)?;
            let wf = f32_data(&wt, *ws)?;
            let mut out = vec![0.0f32; xf.len()];
            if d > 0 {
                for (o, r) in out.chunks_exact_mut(d).zip(xf.chunks_exact(d)) {
                    tl_core::cpu::kernels::rms_norm_row(r, &wf, eps, o);
                }
            }
            return Ok(Value::tensor(Tens::f32(xt.shape.clone(), out)));
        }
        "layer_norm" => {
            let xt = t0()?;
            let (wt, bt) = (tens(&arg(1)?.0, arg(1)?.1)?, tens(&arg(2)?.0, arg(2)?.1)?);
            let d = xt.shape.last().copied().unwrap_or(0);
            if let (TData::F32(xf), TData::F32(wf), TData::F32(bf), true) = (
                &xt.data,
                &wt.data,
                &bt.data,
                wt.shape == [d] && bt.shape == [d] && d > 0,
            ) {
                // tl-core's row kernel (the same arithmetic), on the
                // tensors' own storage instead of copies.
                let eps = float(&arg(3)?.0, arg(3)?.1)? as f32;
                let mut out = vec![0.0f32; xf.len()];
                for (o_row, row) in out.chunks_exact_mut(d).zip(xf.chunks_exact(d)) {
                    let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
                    let mean = (sum / d as f64) as f32;
                    let mut sum2 = 0.0f64;
                    for (o, &v) in o_row.iter_mut().zip(row) {
                        *o = v - mean;
                        sum2 += f64::from(*o * *o);
                    }
                    let scale = 1.0 / ((sum2 / d as f64) as f32 + eps).sqrt();
                    for ((o, &w), &b) in o_row.iter_mut().zip(wf).zip(bf) {
                        *o = *o * scale * w + b;
                    }
                }
                return Ok(Value::tensor(Tens::f32(xt.shape.clone(), out)));
            }
            let x = xt.to_core(span, "layer_norm")?;
            let w = tens(&arg(1)?.0, arg(1)?.1)?.to_core(arg(1)?.1, "layer_norm")?;
            let b = tens(&arg(2)?.0, arg(2)?.1)?.to_core(arg(2)?.1, "layer_norm")?;
            let eps = float(&arg(3)?.0, arg(3)?.1)? as f32;
            let y = cpu
                .layer_norm(&x, Some(&w), Some(&b), eps)
                .map_err(kernel("layer_norm"))?;
            core_out(&y, span, "layer_norm")?
        }
        "rope" => {
            let xt = t0()?;
            let x = xt.to_core(span, "rope")?;
            let pos = tens(&arg(1)?.0, arg(1)?.1)?.to_core(arg(1)?.1, "rope")?;
            let base = float(&arg(2)?.0, arg(2)?.1)? as f32;
            let mode = match args.get(3) {
                Some((v, s)) => match &*string(v, *s)? {
                    "neox" => RopeMode::Neox,
                    "normal" => RopeMode::Normal,
                    other => {
                        return Err(LangError::invalid(
                            *s,
                            format!("rope mode must be \"neox\" or \"normal\", found {other:?}"),
                        ))
                    }
                },
                None => RopeMode::Neox,
            };
            let head_dim = xt.shape.last().copied().unwrap_or(0);
            if let (TData::F32(xv), TData::I32(pv), [t, h, _]) =
                (&xt.data, &tens(&arg(1)?.0, arg(1)?.1)?.data, &xt.shape[..])
            {
                // The native forward's kernels: one cos/sin table per
                // position, rotated into every head in place.
                if pv.len() != *t || head_dim % 2 != 0 {
                    return Err(LangError::shape(
                        span,
                        format!("rope: {} positions for {:?}", pv.len(), xt.shape),
                    ));
                }
                let mut out = xv.clone();
                let mut cs = vec![0.0f32; head_dim];
                let km = match mode {
                    RopeMode::Neox => RopeMode::Neox,
                    _ => RopeMode::Normal,
                };
                for (i, &p) in pv.iter().enumerate() {
                    tl_core::cpu::kernels::rope_cache(p as f32, base, 1.0, None, &mut cs);
                    let row = &mut out[i * h * head_dim..(i + 1) * h * head_dim];
                    for head in row.chunks_exact_mut(head_dim.max(1)) {
                        tl_core::cpu::kernels::rope_rotate(head, &cs, km);
                    }
                }
                return Ok(Value::tensor(Tens::f32(xt.shape.clone(), out)));
            }
            let cfg = RopeConfig::new(mode, head_dim, base);
            core_out(
                &cpu.rope(&x, &pos, None, &cfg).map_err(kernel("rope"))?,
                span,
                "rope",
            )?
        }
        "embedding" => {
            let table = t0()?;
            let ids = tens(&arg(1)?.0, arg(1)?.1)?;
            if let TData::I32(v) = &ids.data {
                let vocab = table.shape.first().copied().unwrap_or(0);
                if let Some(&bad) = v.iter().find(|&&i| i < 0 || i as usize >= vocab) {
                    return Err(LangError::Index {
                        span: arg(1)?.1,
                        index: i64::from(bad),
                        len: vocab,
                    });
                }
            }
            let out_n = ids
                .len()
                .saturating_mul(table.shape.get(1).copied().unwrap_or(0));
            if out_n > ctx.max_elements {
                return Err(too_big(span, "embedding's result", out_n, ctx.max_elements));
            }
            let t = table.to_core(span, "embedding")?;
            let i = ids.to_core(arg(1)?.1, "embedding")?;
            core_out(
                &cpu.embedding(&t, &i).map_err(kernel("embedding"))?,
                span,
                "embedding",
            )?
        }
        "argmax" => {
            let t = t0()?;
            if t.shape.len() == 1 {
                let v = f32_data(&t, span)?;
                if v.is_empty() {
                    return Err(LangError::invalid(span, "argmax of an empty tensor"));
                }
                Value::Int(top_indices(&v, 1).first().copied().unwrap_or(0) as i64)
            } else {
                let x = t.to_core(span, "argmax")?;
                core_out(&cpu.argmax(&x).map_err(kernel("argmax"))?, span, "argmax")?
            }
        }
        "topk" => {
            let t = t0()?;
            let k = usize_arg(&arg(1)?.0, arg(1)?.1)?;
            let v = t.to_f32(span)?;
            if k > v.len() {
                return Err(LangError::Index {
                    span: arg(1)?.1,
                    index: k as i64,
                    len: v.len(),
                });
            }
            let idx: Vec<i32> = top_indices(&v, k).into_iter().map(|i| i as i32).collect();
            Value::tensor(Tens {
                shape: vec![idx.len()],
                data: TData::I32(idx),
            })
        }
        "sample" => {
            let v = t0()?.to_f32(span)?;
            let temp = float(&arg(1)?.0, arg(1)?.1)?;
            let top_k = usize_arg(&arg(2)?.0, arg(2)?.1)?;
            let top_p = float(&arg(3)?.0, arg(3)?.1)?;
            let seed = int(&arg(4)?.0, arg(4)?.1)?;
            if v.is_empty() {
                return Err(LangError::invalid(span, "sample from empty logits"));
            }
            Value::Int(sample(&v, temp, top_k, top_p, seed as u64) as i64)
        }
        "sum" | "mean" | "max" | "min" => {
            let t = t0()?;
            let v = t.to_f32(span)?;
            if v.is_empty() && name != "sum" {
                return Err(LangError::invalid(
                    span,
                    format!("{name} of an empty tensor"),
                ));
            }
            let s: f64 = match name {
                "sum" => v.iter().map(|&x| f64::from(x)).sum(),
                "mean" => v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64,
                "max" => f64::from(v.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
                _ => f64::from(v.iter().copied().fold(f32::INFINITY, f32::min)),
            };
            Value::Float(s)
        }
        "len" => match &arg(0)?.0 {
            Value::Str(s) => Value::Int(s.chars().count() as i64),
            _ => Value::Int(t0()?.shape.first().copied().unwrap_or(0) as i64),
        },
        "bytes" => match &arg(0)?.0 {
            Value::Str(s) => Value::tensor(Tens {
                shape: vec![s.len()],
                data: TData::I32(s.bytes().map(i32::from).collect()),
            }),
            other => {
                return Err(LangError::invalid(
                    arg(0)?.1,
                    format!("`bytes` takes a string, found {other}"),
                ))
            }
        },
        "dim" => {
            let t = t0()?;
            let k = int(&arg(1)?.0, arg(1)?.1)?;
            let d =
                usize::try_from(k)
                    .ok()
                    .and_then(|k| t.shape.get(k))
                    .ok_or(LangError::Index {
                        span: arg(1)?.1,
                        index: k,
                        len: t.shape.len(),
                    })?;
            Value::Int(*d as i64)
        }
        "zeros" | "ones" | "reshape" => {
            let first = usize::from(name == "reshape");
            let mut dims = Vec::new();
            for (v, s) in &args[first..] {
                dims.push(usize_arg(v, *s)?);
            }
            let n = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= ctx.max_elements)
                .ok_or_else(|| LangError::invalid(span, format!("shape {dims:?} is too large")))?;
            if name == "reshape" {
                let t = t0()?;
                if t.len() != n {
                    return Err(LangError::shape(
                        span,
                        format!(
                            "cannot reshape {:?} ({} elements) to {dims:?} ({n} elements)",
                            t.shape,
                            t.len()
                        ),
                    ));
                }
                let data = match &t.data {
                    TData::Core(c) => TData::Core(c.reshape(&dims).map_err(kernel("reshape"))?),
                    other => other.clone(),
                };
                Value::tensor(Tens { shape: dims, data })
            } else {
                let fill = if name == "ones" { 1.0 } else { 0.0 };
                Value::tensor(Tens::f32(dims, vec![fill; n]))
            }
        }
        "arange" => {
            let n = usize_arg(&arg(0)?.0, arg(0)?.1)?;
            if n > ctx.max_elements {
                return Err(too_big(span, "arange", n, ctx.max_elements));
            }
            Value::tensor(Tens::f32(vec![n], (0..n).map(|i| i as f32).collect()))
        }
        "transpose" => {
            let t = t0()?;
            let [m, n] = t.shape[..] else {
                return Err(LangError::shape(
                    span,
                    format!("transpose needs a matrix, found {:?}", t.shape),
                ));
            };
            let v = t.to_f32(span)?;
            let mut out = Vec::with_capacity(m * n);
            for j in 0..n {
                for i in 0..m {
                    out.push(v[i * n + j]);
                }
            }
            Value::tensor(Tens::f32(vec![n, m], out).cast(t.elem(), span)?)
        }
        "f32" | "f16" | "bf16" | "i32" => {
            let to = match name {
                "f32" => ElemType::F32,
                "f16" => ElemType::F16,
                "bf16" => ElemType::BF16,
                _ => ElemType::I32,
            };
            Value::tensor(t0()?.cast(to, span)?)
        }
        "int" => match &arg(0)?.0 {
            Value::Int(i) => Value::Int(*i),
            Value::Float(f) => {
                if !f.is_finite() || f.abs() > 9.2e18 {
                    return Err(LangError::invalid(span, format!("{f} does not fit an int")));
                }
                Value::Int(*f as i64)
            }
            Value::Bool(b) => Value::Int(i64::from(*b)),
            other => return Err(LangError::ty(span, "int, float or bool", other.type_name())),
        },
        "float" => Value::Float(float(&arg(0)?.0, arg(0)?.1)?),
        "str" => Value::Str(arg(0)?.0.to_string().into()),
        "allclose" => {
            let a = t0()?;
            let b = tens(&arg(1)?.0, arg(1)?.1)?;
            let tol = float(&arg(2)?.0, arg(2)?.1)? as f32;
            let ok = a.shape == b.shape && {
                let (x, y) = (a.to_f32(span)?, b.to_f32(span)?);
                x.iter().zip(&y).all(|(p, q)| (p - q).abs() <= tol)
            };
            Value::Bool(ok)
        }
        "nargs" => Value::Int(ctx.args.len() as i64),
        "arg" => {
            let i = int(&arg(0)?.0, arg(0)?.1)?;
            let s = usize::try_from(i)
                .ok()
                .and_then(|i| ctx.args.get(i))
                .ok_or(LangError::Index {
                    span: arg(0)?.1,
                    index: i,
                    len: ctx.args.len(),
                })?;
            Value::Str(s.as_str().into())
        }
        "parse_int" => {
            let s = string(&arg(0)?.0, arg(0)?.1)?;
            Value::Int(s.trim().parse().map_err(|_| {
                LangError::invalid(
                    arg(0).map_or(span, |a| a.1),
                    format!("{s:?} is not an integer"),
                )
            })?)
        }
        "parse_float" => {
            let s = string(&arg(0)?.0, arg(0)?.1)?;
            Value::Float(s.trim().parse().map_err(|_| {
                LangError::invalid(
                    arg(0).map_or(span, |a| a.1),
                    format!("{s:?} is not a number"),
                )
            })?)
        }
        "fixpoint_limit" => {
            *ctx.fixpoint_limit = usize_arg(&arg(0)?.0, arg(0)?.1)?.max(1);
            Value::Unit
        }
        "clock" => Value::Float(CLOCK_START.with(|t| t.elapsed().as_secs_f64())),
        "load_model" => {
            let path = string(&arg(0)?.0, arg(0)?.1)?;
            let device = match args.get(1) {
                Some((v, s)) => string(v, *s)?
                    .parse::<tl_core::Device>()
                    .map_err(|e| LangError::invalid(*s, format!("load_model: {e}")))?,
                None => ctx.device,
            };
            Value::Model(ModelVal::load(&path, device, span)?)
        }
        "tokenize" => {
            let m = model(&arg(0)?.0, arg(0)?.1)?;
            let text = string(&arg(1)?.0, arg(1)?.1)?;
            let ids = m
                .llm
                .encode_prompt(&text, true)
                .map_err(|source| LangError::Model {
                    span,
                    op: "tokenize",
                    source: Box::new(source),
                })?;
            let ids: Vec<i32> = ids.into_iter().map(|i| i as i32).collect();
            Value::tensor(Tens {
                shape: vec![ids.len()],
                data: TData::I32(ids),
            })
        }
        "detokenize" => {
            let m = model(&arg(0)?.0, arg(0)?.1)?;
            let (v, s) = arg(1)?;
            let ids: Vec<u32> = match v {
                Value::Int(i) => vec![token_id(*i, &m, *s)?],
                _ => {
                    let t = tens(v, *s)?;
                    let TData::I32(x) = &t.data else {
                        return Err(LangError::ty(*s, "i32[n] or int", v.type_name()));
                    };
                    x.iter()
                        .map(|&i| token_id(i64::from(i), &m, *s))
                        .collect::<Result<_>>()?
                }
            };
            let text = m
                .llm
                .tokenizer
                .decode(&ids, Default::default())
                .map_err(|e| LangError::invalid(span, format!("detokenize: {e}")))?;
            Value::Str(text.into())
        }
        "apply_chat_template" => {
            let m = model(&arg(0)?.0, arg(0)?.1)?;
            let text = string(&arg(1)?.0, arg(1)?.1)?;
            let mut msgs = Vec::new();
            if let Some((v, s)) = args.get(2) {
                msgs.push(tl_tokenizer::ChatMessage::new("system", &*string(v, *s)?));
            }
            msgs.push(tl_tokenizer::ChatMessage::new("user", &*text));
            let p = m
                .llm
                .chat_prompt(&msgs)
                .map_err(|source| LangError::Model {
                    span,
                    op: "apply_chat_template",
                    source: Box::new(source),
                })?;
            Value::Str(p.into())
        }
        "is_eog" => {
            let m = model(&arg(0)?.0, arg(0)?.1)?;
            let id = int(&arg(1)?.0, arg(1)?.1)?;
            Value::Bool(u32::try_from(id).is_ok_and(|i| m.llm.tokenizer.is_eog(i)))
        }
        "kv_cache" => {
            let m = model(&arg(0)?.0, arg(0)?.1)?;
            let n = usize_arg(&arg(1)?.0, arg(1)?.1)?;
            if n == 0 || n > m.config().context {
                return Err(LangError::invalid(
                    arg(1)?.1,
                    format!(
                        "kv_cache size {n} must be in 1..={} (the model's context)",
                        m.config().context
                    ),
                ));
            }
            Value::Cache(Rc::new(RefCell::new(CacheVal::new(&m, n, span)?)))
        }
        "attention" => {
            let q = t0()?;
            let k = tens(&arg(1)?.0, arg(1)?.1)?;
            let v = tens(&arg(2)?.0, arg(2)?.1)?;
            let Value::Cache(c) = &arg(3)?.0 else {
                return Err(LangError::ty(
                    arg(3)?.1,
                    "a kv_cache",
                    arg(3)?.0.type_name(),
                ));
            };
            let layer = usize_arg(&arg(4)?.0, arg(4)?.1)?;
            let pos = usize_arg(&arg(5)?.0, arg(5)?.1)?;
            let t = q.shape.first().copied().unwrap_or(0);
            if k.shape.first() != Some(&t) || v.shape.first() != Some(&t) {
                return Err(LangError::shape(
                    span,
                    format!(
                        "attention: q {:?}, k {:?}, v {:?} differ in tokens",
                        q.shape, k.shape, v.shape
                    ),
                ));
            }
            let out = {
                let (qf, kf, vf) = (
                    f32_data(&q, span)?,
                    f32_data(&k, span)?,
                    f32_data(&v, span)?,
                );
                c.borrow_mut()
                    .attention(&qf, &kf, &vf, t, layer, pos, span)?
            };
            Value::tensor(Tens::f32(q.shape.clone(), out))
        }
        other => {
            return Err(LangError::NotImplemented {
                span,
                name: other.to_string(),
                reason: "not available yet",
            })
        }
    })
}

/// Indices of the `k` largest values, largest first (lower index on ties).
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    if k == 1 {
        // argmax and greedy sampling: one pass over the logits, not a sort
        // of the whole vocabulary per token.
        let mut best = 0;
        for (i, x) in v.iter().enumerate().skip(1) {
            if x.total_cmp(&v[best]) == std::cmp::Ordering::Greater {
                best = i;
            }
        }
        return if v.is_empty() { Vec::new() } else { vec![best] };
    }
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Temperature, top-k and top-p (nucleus; Holtzman et al. 2019) sampling.
fn sample(logits: &[f32], temp: f64, top_k: usize, top_p: f64, seed: u64) -> usize {
    if temp <= 0.0 {
        return top_indices(logits, 1).first().copied().unwrap_or(0);
    }
    let mut idx = top_indices(logits, if top_k == 0 { logits.len() } else { top_k });
    let maxv = idx.first().map_or(0.0, |&i| f64::from(logits[i]));
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| ((f64::from(logits[i]) - maxv) / temp).exp())
        .collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    if top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (k, x) in p.iter().enumerate() {
            acc += x;
            if acc >= top_p {
                keep = k + 1;
                break;
            }
        }
        idx.truncate(keep);
        p.truncate(keep);
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let r: f64 = rng.gen();
    let mut acc = 0.0;
    for (k, x) in p.iter().enumerate() {
        acc += x;
        if r < acc {
            return idx[k];
        }
    }
    idx.last().copied().unwrap_or(0)
}
