//! Tensor equations in Einstein notation.
//!
//! `Y[i, k] = W[i, j] X[j, k]`: the right side is compiled to a tree whose
//! leaves are indexed tensors. Every index that is not on the left is
//! summed, and the sum is placed around the smallest subexpression that
//! holds all of that index's occurrences — so in
//! `H[i] = relu(W[i, j] X[j] + b[i])` the sum over `j` wraps the product
//! `W[i, j] X[j]`, inside the `relu`. Indices shared by operands of `+`,
//! `-`, `*`, `/` or a product broadcast; an index that appears twice in one
//! tensor (`A[i, i]`) takes the diagonal.
//!
//! A sum over a product is one fused loop nest over the output and summed
//! indices (nothing of the size of the full product is materialized); a
//! two-factor product with one summed index and no batch index is a plain
//! matrix product and runs on tl-core's `matmul_f32` kernel.

use std::fmt::Write as _;

use tl_core::{Backend, CpuBackend, Tensor};

use crate::ast::{BinOp, Equation, Expr, ExprKind, UnOp};
use crate::diag::Span;
use crate::error::{LangError, Result};
use crate::value::{numel, TData, Tens, Value};

/// The elementwise functions allowed inside an equation.
pub fn scalar_fn(name: &str) -> Option<fn(f32) -> f32> {
    Some(match name {
        "relu" => |x: f32| x.max(0.0),
        "sigmoid" => |x: f32| 1.0 / (1.0 + (-x).exp()),
        "exp" => f32::exp,
        "log" => f32::ln,
        "tanh" => f32::tanh,
        "sqrt" => f32::sqrt,
        "abs" => f32::abs,
        "silu" => |x: f32| x / (1.0 + (-x).exp()),
        "gelu" => gelu,
        "step" => |x: f32| if x > 0.0 { 1.0 } else { 0.0 },
        _ => return None,
    })
}

/// GELU, tanh approximation (as ggml and tl-core compute it).
pub fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

enum Node {
    Leaf {
        name: String,
        data: Vec<f32>,
        shape: Vec<usize>,
        vars: Vec<usize>,
    },
    Scalar(f32),
    Bin(BinOp, Box<Node>, Box<Node>),
    Neg(Box<Node>),
    Func(String, fn(f32) -> f32, Box<Node>),
    Prod(Vec<Node>),
    Sum(Vec<usize>, Box<Node>),
}

impl Node {
    fn count(&self, v: usize) -> usize {
        match self {
            Node::Leaf { vars, .. } => vars.iter().filter(|&&x| x == v).count(),
            Node::Scalar(_) => 0,
            Node::Bin(_, a, b) => a.count(v) + b.count(v),
            Node::Neg(a) | Node::Func(_, _, a) | Node::Sum(_, a) => a.count(v),
            Node::Prod(fs) => fs.iter().map(|f| f.count(v)).sum(),
        }
    }

    /// Whether a leaf under this node is one `wanted` names.
    fn reads(&self, wanted: &dyn Fn(&str) -> bool) -> bool {
        match self {
            Node::Leaf { name, .. } => wanted(name),
            Node::Scalar(_) => false,
            Node::Bin(_, a, b) => a.reads(wanted) || b.reads(wanted),
            Node::Neg(a) | Node::Func(_, _, a) | Node::Sum(_, a) => a.reads(wanted),
            Node::Prod(fs) => fs.iter().any(|f| f.reads(wanted)),
        }
    }

    fn children_mut(&mut self) -> Vec<&mut Node> {
        match self {
            Node::Leaf { .. } | Node::Scalar(_) => vec![],
            Node::Bin(_, a, b) => vec![a.as_mut(), b.as_mut()],
            Node::Neg(a) | Node::Func(_, _, a) | Node::Sum(_, a) => vec![a.as_mut()],
            Node::Prod(fs) => fs.iter_mut().collect(),
        }
    }
}

/// Wraps the smallest subtree holding all `total` occurrences of `v` in a
/// sum over `v` (merging into a sum already there).
fn place(mut node: Node, v: usize, total: usize) -> Node {
    if let Node::Sum(vs, c) = &mut node {
        if c.count(v) == total {
            let deeper = c.children_mut().iter().any(|g| g.count(v) == total);
            if !deeper {
                vs.push(v);
                return node;
            }
        }
    }
    let mut pushed = false;
    for ch in node.children_mut() {
        if ch.count(v) == total {
            let taken = std::mem::replace(ch, Node::Scalar(0.0));
            *ch = place(taken, v, total);
            pushed = true;
            break;
        }
    }
    if pushed {
        return node;
    }
    match node {
        Node::Sum(mut vs, c) => {
            vs.push(v);
            Node::Sum(vs, c)
        }
        other => Node::Sum(vec![v], Box::new(other)),
    }
}

struct Builder<'a> {
    lookup: &'a dyn Fn(&str) -> Option<Value>,
    /// Structure only (for `--explain` before anything runs): no values
    /// are looked up.
    explain: bool,
    vars: Vec<String>,
    sizes: Vec<Option<usize>>,
}

impl Builder<'_> {
    fn var(&mut self, name: &str) -> usize {
        match self.vars.iter().position(|x| x == name) {
            Some(i) => i,
            None => {
                self.vars.push(name.to_string());
                self.sizes.push(None);
                self.vars.len() - 1
            }
        }
    }

    fn build(&mut self, e: &Expr) -> Result<Node> {
        Ok(match &e.kind {
            ExprKind::Int(i) => Node::Scalar(*i as f32),
            ExprKind::Float(f) => Node::Scalar(*f as f32),
            ExprKind::Var(name) if self.explain => Node::Leaf {
                name: name.clone(),
                data: vec![],
                shape: vec![],
                vars: vec![],
            },
            ExprKind::Var(name) => match (self.lookup)(name) {
                Some(Value::Int(i)) => Node::Scalar(i as f32),
                Some(Value::Float(f)) => Node::Scalar(f as f32),
                Some(Value::Tensor(t)) if t.shape.is_empty() => Node::Leaf {
                    // A leaf without indices, so that a gradient can reach it.
                    name: name.clone(),
                    data: t.to_f32(e.span)?,
                    shape: vec![],
                    vars: vec![],
                },
                Some(v) => {
                    return Err(LangError::invalid(
                        e.span,
                        format!(
                            "`{name}` ({}) needs indices in a tensor equation",
                            v.type_name()
                        ),
                    ))
                }
                None => {
                    return Err(LangError::Undefined {
                        span: e.span,
                        what: "variable",
                        name: name.clone(),
                    })
                }
            },
            ExprKind::Index(base, args) => {
                let ExprKind::Var(name) = &base.kind else {
                    return Err(LangError::invalid(
                        base.span,
                        "a tensor equation indexes variables only",
                    ));
                };
                if self.explain {
                    let mut vars = Vec::new();
                    for a in args {
                        if let crate::ast::IndexArg::At(Expr {
                            kind: ExprKind::Var(v),
                            ..
                        }) = a
                        {
                            vars.push(self.var(v));
                        }
                    }
                    return Ok(Node::Leaf {
                        name: name.clone(),
                        data: vec![],
                        shape: vec![],
                        vars,
                    });
                }
                let t = match (self.lookup)(name) {
                    Some(Value::Tensor(t)) => t,
                    Some(v) => return Err(LangError::ty(base.span, "a tensor", v.type_name())),
                    None => {
                        return Err(LangError::Undefined {
                            span: base.span,
                            what: "variable",
                            name: name.clone(),
                        })
                    }
                };
                if t.shape.len() != args.len() {
                    return Err(LangError::shape(
                        e.span,
                        format!(
                            "`{name}` has shape {:?} but is indexed with {} indices",
                            t.shape,
                            args.len()
                        ),
                    ));
                }
                let mut vars = Vec::new();
                for (k, a) in args.iter().enumerate() {
                    let crate::ast::IndexArg::At(Expr {
                        kind: ExprKind::Var(v),
                        span,
                    }) = a
                    else {
                        return Err(LangError::invalid(
                            e.span,
                            "indices in a tensor equation must be index names",
                        ));
                    };
                    let id = self.var(v);
                    let n = t.shape.get(k).copied().unwrap_or(0);
                    match self.sizes.get(id).copied().flatten() {
                        Some(m) if m != n => {
                            return Err(LangError::shape(
                                *span,
                                format!("index `{v}` has size {m} elsewhere but {n} in dimension {k} of `{name}`"),
                            ))
                        }
                        _ => {
                            if let Some(s) = self.sizes.get_mut(id) {
                                *s = Some(n);
                            }
                        }
                    }
                    vars.push(id);
                }
                Node::Leaf {
                    name: name.clone(),
                    data: t.to_f32(e.span)?,
                    shape: t.shape.clone(),
                    vars,
                }
            }
            ExprKind::Unary(UnOp::Neg, x) => Node::Neg(Box::new(self.build(x)?)),
            ExprKind::Binary(op, a, b)
                if matches!(op, BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div) =>
            {
                let (a, b) = (self.build(a)?, self.build(b)?);
                if *op == BinOp::Mul {
                    // `*` and juxtaposition are the same product, so a
                    // sum over it is fused either way.
                    let mut fs = Vec::new();
                    for n in [a, b] {
                        match n {
                            Node::Prod(inner) => fs.extend(inner),
                            other => fs.push(other),
                        }
                    }
                    Node::Prod(fs)
                } else {
                    Node::Bin(*op, Box::new(a), Box::new(b))
                }
            }
            ExprKind::Juxt(fs) => {
                let mut out = Vec::new();
                for f in fs {
                    match self.build(f)? {
                        Node::Prod(inner) => out.extend(inner),
                        other => out.push(other),
                    }
                }
                Node::Prod(out)
            }
            ExprKind::Call {
                name,
                args,
                name_span,
            } => {
                let f = scalar_fn(name).ok_or_else(|| {
                    LangError::invalid(
                        *name_span,
                        format!("`{name}` cannot be used inside a tensor equation"),
                    )
                })?;
                match args.as_slice() {
                    [arg] => Node::Func(name.clone(), f, Box::new(self.build(arg)?)),
                    // `sigmoid(x, T)`: a step with temperature T, σ(x / T).
                    [arg, temp] if name == "sigmoid" => {
                        let x = self.build(arg)?;
                        let t = self.build(temp)?;
                        Node::Func(
                            name.clone(),
                            f,
                            Box::new(Node::Bin(BinOp::Div, Box::new(x), Box::new(t))),
                        )
                    }
                    _ => {
                        return Err(LangError::Arity {
                            span: e.span,
                            name: name.clone(),
                            expected: if name == "sigmoid" { "1 or 2" } else { "1" }.into(),
                            got: args.len(),
                        })
                    }
                }
            }
            _ => {
                return Err(LangError::invalid(
                    e.span,
                    "this expression cannot appear in a tensor equation",
                ))
            }
        })
    }
}

/// A dense intermediate: data over `vars` (in that axis order).
struct Dense {
    vars: Vec<usize>,
    data: Vec<f32>,
}

/// Calls `f(offsets)` for every point of the index space `sizes`, where
/// `offsets[k] = Σ_d idx[d] * strides[k][d]`.
fn for_each(sizes: &[usize], strides: &[Vec<usize>], mut f: impl FnMut(&[usize])) {
    if sizes.contains(&0) {
        return;
    }
    let n = sizes.len();
    let mut idx = vec![0usize; n];
    let mut offs = vec![0usize; strides.len()];
    loop {
        f(&offs);
        let mut d = n;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            for (o, s) in offs.iter_mut().zip(strides) {
                *o += s[d];
            }
            if idx[d] < sizes[d] {
                break;
            }
            for (o, s) in offs.iter_mut().zip(strides) {
                *o -= s[d] * sizes[d];
            }
            idx[d] = 0;
        }
    }
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * shape[k + 1];
    }
    s
}

struct Eval<'a> {
    sizes: &'a [usize],
    span: Span,
    /// Loop nests longer than this are refused rather than run for hours
    /// (or allocate an intermediate of that many elements).
    max_iterations: u128,
}

impl Eval<'_> {
    fn check_size(&self, vars: &[usize]) -> Result<()> {
        let total: u128 = vars.iter().map(|&v| self.sizes[v] as u128).product();
        if total > self.max_iterations {
            return Err(LangError::Limit {
                span: self.span,
                message: format!(
                    "tensor equation needs {total} loop iterations, over the limit of {}",
                    self.max_iterations
                ),
            });
        }
        Ok(())
    }

    /// Strides of `d` over the loop variables `loop_vars`.
    fn strides_over(&self, d: &Dense, loop_vars: &[usize]) -> Vec<usize> {
        let shape: Vec<usize> = d.vars.iter().map(|&v| self.sizes[v]).collect();
        let own = row_major_strides(&shape);
        loop_vars
            .iter()
            .map(|lv| d.vars.iter().position(|x| x == lv).map_or(0, |p| own[p]))
            .collect()
    }

    fn union(ds: &[Dense]) -> Vec<usize> {
        let mut vars = Vec::new();
        for d in ds {
            for &v in &d.vars {
                if !vars.contains(&v) {
                    vars.push(v);
                }
            }
        }
        vars
    }

    fn combine(&self, ds: &[Dense], f: impl Fn(&[f32]) -> f32) -> Result<Dense> {
        let vars = Self::union(ds);
        self.check_size(&vars)?;
        let sizes: Vec<usize> = vars.iter().map(|&v| self.sizes[v]).collect();
        let strides: Vec<Vec<usize>> = ds.iter().map(|d| self.strides_over(d, &vars)).collect();
        let mut data = Vec::with_capacity(numel(&sizes));
        let mut buf = vec![0f32; ds.len()];
        for_each(&sizes, &strides, |offs| {
            for ((b, d), &o) in buf.iter_mut().zip(ds).zip(offs) {
                *b = d.data.get(o).copied().unwrap_or(0.0);
            }
            data.push(f(&buf));
        });
        Ok(Dense { vars, data })
    }

    fn eval(&self, n: &Node) -> Result<Dense> {
        match n {
            Node::Scalar(x) => Ok(Dense {
                vars: vec![],
                data: vec![*x],
            }),
            Node::Leaf {
                data, shape, vars, ..
            } => {
                let mut uniq = Vec::new();
                for &v in vars {
                    if !uniq.contains(&v) {
                        uniq.push(v);
                    }
                }
                if uniq.len() == vars.len() && uniq.windows(2).all(|w| w[0] < w[1]) {
                    return Ok(Dense {
                        vars: uniq,
                        data: data.clone(),
                    });
                }
                let own = row_major_strides(shape);
                let strides: Vec<usize> = uniq
                    .iter()
                    .map(|u| {
                        vars.iter()
                            .zip(&own)
                            .filter(|(v, _)| *v == u)
                            .map(|(_, s)| s)
                            .sum()
                    })
                    .collect();
                let sizes: Vec<usize> = uniq.iter().map(|&v| self.sizes[v]).collect();
                let mut out = Vec::with_capacity(numel(&sizes));
                for_each(&sizes, &[strides], |o| {
                    out.push(data.get(o[0]).copied().unwrap_or(0.0))
                });
                Ok(Dense {
                    vars: uniq,
                    data: out,
                })
            }
            Node::Neg(a) => {
                let mut d = self.eval(a)?;
                d.data.iter_mut().for_each(|x| *x = -*x);
                Ok(d)
            }
            Node::Func(_, f, a) => {
                let mut d = self.eval(a)?;
                d.data.iter_mut().for_each(|x| *x = f(*x));
                Ok(d)
            }
            Node::Bin(op, a, b) => {
                let ds = [self.eval(a)?, self.eval(b)?];
                let op = *op;
                self.combine(&ds, |v| match op {
                    BinOp::Add => v[0] + v[1],
                    BinOp::Sub => v[0] - v[1],
                    BinOp::Div => v[0] / v[1],
                    _ => v[0] * v[1],
                })
            }
            Node::Prod(fs) => {
                let ds: Vec<Dense> = fs.iter().map(|f| self.eval(f)).collect::<Result<_>>()?;
                self.combine(&ds, |v| v.iter().product())
            }
            Node::Sum(vs, c) => {
                let factors: Vec<Dense> = match c.as_ref() {
                    Node::Prod(fs) => fs.iter().map(|f| self.eval(f)).collect::<Result<_>>()?,
                    other => vec![self.eval(other)?],
                };
                if let Some(d) = self.try_matmul(&factors, vs)? {
                    return Ok(d);
                }
                self.sum_product(&factors, vs)
            }
        }
    }

    /// `Σ_summed Π factors` as one loop nest: output indices outer, summed
    /// indices inner.
    fn sum_product(&self, factors: &[Dense], summed: &[usize]) -> Result<Dense> {
        let all = Self::union(factors);
        let out_vars: Vec<usize> = all
            .iter()
            .copied()
            .filter(|v| !summed.contains(v))
            .collect();
        let mut loop_vars = out_vars.clone();
        loop_vars.extend(summed.iter().copied().filter(|v| all.contains(v)));
        self.check_size(&loop_vars)?;
        let out_sizes: Vec<usize> = out_vars.iter().map(|&v| self.sizes[v]).collect();
        let inner: usize = loop_vars[out_vars.len()..]
            .iter()
            .map(|&v| self.sizes[v])
            .product();
        let sizes: Vec<usize> = loop_vars.iter().map(|&v| self.sizes[v]).collect();
        let strides: Vec<Vec<usize>> = factors
            .iter()
            .map(|d| self.strides_over(d, &loop_vars))
            .collect();
        let mut data = vec![0f32; numel(&out_sizes)];
        let mut k = 0usize;
        for_each(&sizes, &strides, |offs| {
            let mut p = 1f32;
            for (d, &o) in factors.iter().zip(offs) {
                p *= d.data.get(o).copied().unwrap_or(0.0);
            }
            if let Some(slot) = data.get_mut(k / inner.max(1)) {
                *slot += p;
            }
            k += 1;
        });
        Ok(Dense {
            vars: out_vars,
            data,
        })
    }

    /// `Σ_K A[B, I, K] B[B, K, J]` for two factors: the indices both share
    /// and keep (`B`) are a batch, each factor's own kept indices (`I`,
    /// `J`) the rows and columns, the summed ones (`K`, in both factors)
    /// the inner dimension. Both factors are laid out as `[B, I, K]` and
    /// `[B, K, J]` and multiplied by tl-core's batched `matmul_f32`; the
    /// result is over `B, I, J`. `None` when the product is not of this
    /// form (one factor, a summed index in only one factor, nothing
    /// summed).
    fn try_batched(&self, fs: &[Dense], summed: &[usize]) -> Result<Option<Dense>> {
        let [a, b] = fs else {
            return Ok(None);
        };
        let ks: Vec<usize> = summed
            .iter()
            .copied()
            .filter(|v| a.vars.contains(v) || b.vars.contains(v))
            .collect();
        if ks.is_empty()
            || ks
                .iter()
                .any(|v| !a.vars.contains(v) || !b.vars.contains(v))
        {
            return Ok(None);
        }
        let keep = |v: &usize| !ks.contains(v);
        let bs: Vec<usize> = a
            .vars
            .iter()
            .copied()
            .filter(|v| keep(v) && b.vars.contains(v))
            .collect();
        let is: Vec<usize> = a
            .vars
            .iter()
            .copied()
            .filter(|v| keep(v) && !bs.contains(v))
            .collect();
        let js: Vec<usize> = b
            .vars
            .iter()
            .copied()
            .filter(|v| keep(v) && !bs.contains(v))
            .collect();
        let all: Vec<usize> = bs
            .iter()
            .chain(&is)
            .chain(&ks)
            .chain(&js)
            .copied()
            .collect();
        self.check_size(&all)?;
        let size = |vs: &[usize]| vs.iter().map(|&v| self.sizes[v]).product::<usize>();
        let (nb, ni, nk, nj) = (size(&bs), size(&is), size(&ks), size(&js));
        let kernel = |source| LangError::Kernel {
            span: self.span,
            op: "matmul",
            source,
        };
        let order_a: Vec<usize> = bs.iter().chain(&is).chain(&ks).copied().collect();
        let order_b: Vec<usize> = bs.iter().chain(&ks).chain(&js).copied().collect();
        let pa = self.permute(a, &order_a);
        let pb = self.permute(b, &order_b);
        let ta = Tensor::from_vec(pa.data, &[nb, ni, nk]).map_err(kernel)?;
        let tb = Tensor::from_vec(pb.data, &[nb, nk, nj]).map_err(kernel)?;
        let out = CpuBackend.matmul_f32(&ta, &tb).map_err(kernel)?;
        Ok(Some(Dense {
            vars: bs.iter().chain(&is).chain(&js).copied().collect(),
            data: out.to_vec_f32().map_err(kernel)?,
        }))
    }

    /// `Σ_j A[i, j] B[j, k]` (either factor may lack its free index or have
    /// its axes swapped) on the matmul kernel; other two-factor products
    /// with summed indices shared by both factors on the batched kernel.
    /// Scalar factors (`* scale`) multiply the result.
    fn try_matmul(&self, fs: &[Dense], summed: &[usize]) -> Result<Option<Dense>> {
        if fs.len() > 2 && fs.iter().any(|d| d.vars.is_empty()) {
            let scale: f32 = fs
                .iter()
                .filter(|d| d.vars.is_empty())
                .map(|d| d.data.first().copied().unwrap_or(0.0))
                .product();
            let rest: Vec<Dense> = fs
                .iter()
                .filter(|d| !d.vars.is_empty())
                .map(|d| Dense {
                    vars: d.vars.clone(),
                    data: d.data.clone(),
                })
                .collect();
            let Some(mut d) = self.try_matmul(&rest, summed)? else {
                return Ok(None);
            };
            d.data.iter_mut().for_each(|x| *x *= scale);
            return Ok(Some(d));
        }
        match self.try_plain_matmul(fs, summed)? {
            Some(d) => Ok(Some(d)),
            None => self.try_batched(fs, summed),
        }
    }

    fn try_plain_matmul(&self, fs: &[Dense], summed: &[usize]) -> Result<Option<Dense>> {
        let ([a, b], [j]) = (fs, summed) else {
            return Ok(None);
        };
        let j = *j;
        let free = |d: &Dense| -> Option<Option<usize>> {
            if !d.vars.contains(&j) || d.vars.len() > 2 {
                return None;
            }
            Some(d.vars.iter().copied().find(|&v| v != j))
        };
        let (Some(i), Some(k)) = (free(a), free(b)) else {
            return Ok(None);
        };
        if i.is_some() && i == k {
            return Ok(None); // a batch index: not a plain matrix product
        }
        let loop_vars: Vec<usize> = i.into_iter().chain([j]).chain(k).collect();
        self.check_size(&loop_vars)?;
        let kernel = |source| LangError::Kernel {
            span: self.span,
            op: "matmul",
            source,
        };
        let kk = self.sizes[j];
        // As [rows, cols] with `first` the axis that must come first.
        let as_matrix = |d: &Dense, other: Option<usize>, j_first: bool| -> Result<Tensor> {
            let n = other.map_or(1, |v| self.sizes[v]);
            let stored_j_first = d.vars.first() == Some(&j);
            let dims = if stored_j_first { [kk, n] } else { [n, kk] };
            let t = Tensor::from_vec(d.data.clone(), &dims).map_err(kernel)?;
            if stored_j_first == j_first || other.is_none() {
                if other.is_none() {
                    let want = if j_first { [kk, 1] } else { [1, kk] };
                    return t.reshape(&want).map_err(kernel);
                }
                Ok(t)
            } else {
                t.transpose(0, 1).map_err(kernel)
            }
        };
        let ta = as_matrix(a, i, false)?;
        let tb = as_matrix(b, k, true)?;
        let out = CpuBackend.matmul_f32(&ta, &tb).map_err(kernel)?;
        let data = out.to_vec_f32().map_err(kernel)?;
        Ok(Some(Dense {
            vars: i.into_iter().chain(k).collect(),
            data,
        }))
    }
}

fn compile(
    eq: &Equation,
    lookup: &dyn Fn(&str) -> Option<Value>,
    explain: bool,
) -> Result<(Node, Vec<String>, Vec<usize>)> {
    let mut b = Builder {
        lookup,
        explain,
        vars: Vec::new(),
        sizes: Vec::new(),
    };
    let mut root = b.build(&eq.rhs)?;
    for (name, sp) in &eq.indices {
        if !b.vars.contains(name) {
            return Err(LangError::invalid(
                *sp,
                format!("index `{name}` on the left does not appear on the right"),
            ));
        }
    }
    for v in 0..b.vars.len() {
        if eq.indices.iter().any(|(n, _)| *n == b.vars[v]) {
            continue;
        }
        let total = root.count(v);
        root = place(root, v, total);
    }
    let sizes = b.sizes.iter().map(|s| s.unwrap_or(0)).collect();
    Ok((root, b.vars, sizes))
}

/// Evaluates an equation's right side to the left side's tensor.
pub fn eval_equation(
    eq: &Equation,
    lookup: &dyn Fn(&str) -> Option<Value>,
    max_iterations: u128,
) -> Result<Tens> {
    let (root, names, sizes) = compile(eq, lookup, false)?;
    let ev = Eval {
        sizes: &sizes,
        span: eq.rhs.span,
        max_iterations,
    };
    let d = ev.eval(&root)?;
    let out_vars: Vec<usize> = eq
        .indices
        .iter()
        .filter_map(|(n, _)| names.iter().position(|x| x == n))
        .collect();
    let shape: Vec<usize> = out_vars.iter().map(|&v| sizes[v]).collect();
    if d.vars == out_vars {
        return Ok(Tens::f32(shape, d.data));
    }
    // Permute into the left side's index order.
    let strides = ev.strides_over(&d, &out_vars);
    let mut data = Vec::with_capacity(numel(&shape));
    for_each(&shape, &[strides], |o| {
        data.push(d.data.get(o[0]).copied().unwrap_or(0.0))
    });
    Ok(Tens {
        shape,
        data: TData::F32(data),
    })
}

/// The gradient of every tensor the right side of `eq` reads, given the
/// gradient `grad_out` of its left side (in the left side's index order):
/// (name, gradient in that tensor's layout), one entry per name.
pub fn equation_grads(
    eq: &Equation,
    lookup: &dyn Fn(&str) -> Option<Value>,
    grad_out: &[f32],
    max_iterations: u128,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Vec<f32>)>> {
    let (root, names, sizes) = compile(eq, lookup, false)?;
    let ev = Eval {
        sizes: &sizes,
        span: eq.rhs.span,
        max_iterations,
    };
    let out_vars: Vec<usize> = eq
        .indices
        .iter()
        .filter_map(|(n, _)| names.iter().position(|x| x == n))
        .collect();
    let g = Dense {
        vars: out_vars,
        data: grad_out.to_vec(),
    };
    let mut acc: Vec<(String, Vec<f32>)> = Vec::new();
    ev.back(&root, g, &mut acc, wanted)?;
    Ok(acc)
}

fn node_vars(n: &Node) -> Vec<usize> {
    match n {
        Node::Leaf { vars, .. } => {
            let mut u = Vec::new();
            for &v in vars {
                if !u.contains(&v) {
                    u.push(v);
                }
            }
            u
        }
        Node::Scalar(_) => vec![],
        Node::Neg(a) | Node::Func(_, _, a) => node_vars(a),
        Node::Sum(vs, a) => node_vars(a)
            .into_iter()
            .filter(|v| !vs.contains(v))
            .collect(),
        Node::Bin(_, a, b) => {
            let mut u = node_vars(a);
            for v in node_vars(b) {
                if !u.contains(&v) {
                    u.push(v);
                }
            }
            u
        }
        Node::Prod(fs) => {
            let mut u = Vec::new();
            for f in fs {
                for v in node_vars(f) {
                    if !u.contains(&v) {
                        u.push(v);
                    }
                }
            }
            u
        }
    }
}

impl Eval<'_> {
    /// `d` laid out over `target` (row-major in that order): axes of `d`
    /// missing from `target` must already be summed; axes of `target`
    /// missing from `d` are broadcast.
    fn permute(&self, d: &Dense, target: &[usize]) -> Dense {
        if d.vars == target {
            return Dense {
                vars: d.vars.clone(),
                data: d.data.clone(),
            };
        }
        let sizes: Vec<usize> = target.iter().map(|&v| self.sizes[v]).collect();
        let strides = self.strides_over(d, target);
        let mut data = Vec::with_capacity(numel(&sizes));
        for_each(&sizes, &[strides], |o| {
            data.push(d.data.get(o[0]).copied().unwrap_or(0.0))
        });
        Dense {
            vars: target.to_vec(),
            data,
        }
    }

    /// `Σ Π factors` over the `summed` axes, laid out over `target`.
    fn contract_to(&self, factors: &[Dense], summed: &[usize], target: &[usize]) -> Result<Dense> {
        let all = Self::union(factors);
        let summed: Vec<usize> = summed.iter().copied().filter(|v| all.contains(v)).collect();
        let d = if summed.is_empty() && factors.len() == 1 {
            Dense {
                vars: factors[0].vars.clone(),
                data: factors[0].data.clone(),
            }
        } else if summed.is_empty() {
            self.combine(factors, |v| v.iter().product())?
        } else {
            match self.try_matmul(factors, &summed)? {
                Some(d) => d,
                None => self.sum_product(factors, &summed)?,
            }
        };
        Ok(self.permute(&d, target))
    }

    /// `g` summed down to the axes `target`.
    fn reduce_to(&self, g: &Dense, target: &[usize]) -> Result<Dense> {
        let summed: Vec<usize> = g
            .vars
            .iter()
            .copied()
            .filter(|v| !target.contains(v))
            .collect();
        self.contract_to(std::slice::from_ref(g), &summed, target)
    }

    /// Propagates `g` (the gradient of `n`'s value, possibly missing axes
    /// of `n` along which it is constant) to the leaves under `n`.
    /// Only subtrees reading a `wanted` tensor are visited (constants such
    /// as an attention mask need no gradient).
    fn back(
        &self,
        n: &Node,
        g: Dense,
        acc: &mut Vec<(String, Vec<f32>)>,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        if !n.reads(wanted) {
            return Ok(());
        }
        match n {
            Node::Scalar(_) => Ok(()),
            Node::Leaf {
                name, shape, vars, ..
            } => {
                let uniq = node_vars(n);
                let g = self.reduce_to(&g, &uniq)?;
                let own = row_major_strides(shape);
                let strides: Vec<usize> = uniq
                    .iter()
                    .map(|u| {
                        vars.iter()
                            .zip(&own)
                            .filter(|(v, _)| *v == u)
                            .map(|(_, s)| s)
                            .sum()
                    })
                    .collect();
                let sizes: Vec<usize> = uniq.iter().map(|&v| self.sizes[v]).collect();
                let total = numel(shape);
                let slot = match acc.iter().position(|(n2, _)| n2 == name) {
                    Some(p) => p,
                    None => {
                        acc.push((name.clone(), vec![0.0; total]));
                        acc.len() - 1
                    }
                };
                let dst = &mut acc[slot].1;
                let mut k = 0usize;
                for_each(&sizes, &[strides], |o| {
                    if let (Some(x), Some(&gv)) = (dst.get_mut(o[0]), g.data.get(k)) {
                        *x += gv;
                    }
                    k += 1;
                });
                Ok(())
            }
            Node::Neg(a) => {
                let mut g = g;
                g.data.iter_mut().for_each(|x| *x = -*x);
                self.back(a, g, acc, wanted)
            }
            Node::Func(name, _, a) => {
                let x = self.eval(a)?;
                let y = self.eval(n)?;
                let g = self.permute(&g, &x.vars);
                let mut d = Vec::with_capacity(x.data.len());
                for ((&gv, &xv), &yv) in g.data.iter().zip(&x.data).zip(&y.data) {
                    let dv = crate::autodiff::deriv(name, xv, yv).ok_or_else(|| {
                        LangError::invalid(
                            self.span,
                            format!(
                                "`{name}` has no gradient, but the objective depends on this tensor equation{}",
                                if name == "step" {
                                    "; for a differentiable threshold use `sigmoid(x, T)`, a step with temperature T"
                                } else {
                                    ""
                                }
                            ),
                        )
                    })?;
                    d.push(gv * dv);
                }
                self.back(
                    a,
                    Dense {
                        vars: x.vars,
                        data: d,
                    },
                    acc,
                    wanted,
                )
            }
            Node::Bin(op, a, b) => {
                let (va, vb) = (node_vars(a), node_vars(b));
                match op {
                    BinOp::Add | BinOp::Sub => {
                        if a.reads(wanted) {
                            let ga = self.reduce_to(&g, &va)?;
                            self.back(a, ga, acc, wanted)?;
                        }
                        if b.reads(wanted) {
                            let mut gb = self.reduce_to(&g, &vb)?;
                            if *op == BinOp::Sub {
                                gb.data.iter_mut().for_each(|x| *x = -*x);
                            }
                            self.back(b, gb, acc, wanted)?;
                        }
                        Ok(())
                    }
                    _ => {
                        // Division (a product is a `Prod`).
                        let (xa, xb) = (self.eval(a)?, self.eval(b)?);
                        let da = self.combine(&[g, xa, xb], |v| v[0] / v[2])?;
                        let db = self.combine(
                            &[
                                Dense {
                                    vars: da.vars.clone(),
                                    data: da.data.clone(),
                                },
                                self.eval(a)?,
                                self.eval(b)?,
                            ],
                            |v| -v[0] * v[1] / v[2],
                        )?;
                        let ga = self.reduce_to(&da, &va)?;
                        let gb = self.reduce_to(&db, &vb)?;
                        self.back(a, ga, acc, wanted)?;
                        self.back(b, gb, acc, wanted)
                    }
                }
            }
            Node::Sum(_, c) => self.back(c, g, acc, wanted),
            Node::Prod(fs) => {
                let vals: Vec<Dense> = fs.iter().map(|f| self.eval(f)).collect::<Result<_>>()?;
                for (k, f) in fs.iter().enumerate() {
                    if !f.reads(wanted) {
                        continue;
                    }
                    let target = node_vars(f);
                    let mut factors = vec![Dense {
                        vars: g.vars.clone(),
                        data: g.data.clone(),
                    }];
                    for (m, v) in vals.iter().enumerate() {
                        if m != k {
                            factors.push(Dense {
                                vars: v.vars.clone(),
                                data: v.data.clone(),
                            });
                        }
                    }
                    let all = Self::union(&factors);
                    let summed: Vec<usize> =
                        all.into_iter().filter(|v| !target.contains(v)).collect();
                    let gk = self.contract_to(&factors, &summed, &target)?;
                    self.back(f, gk, acc, wanted)?;
                }
                Ok(())
            }
        }
    }
}

/// The equation with its sums made explicit, e.g.
/// `H[i] = relu((sum_{j}(W[i, j] X[j]) + b[i]))`; needs no values.
pub fn explain_equation(eq: &Equation) -> Result<String> {
    let (root, names, _) = compile(eq, &|_| None, true)?;
    let mut s = String::new();
    let idx: Vec<&str> = eq.indices.iter().map(|(n, _)| n.as_str()).collect();
    let _ = write!(s, "{}[{}] = ", eq.target, idx.join(", "));
    show(&root, &names, &mut s);
    Ok(s)
}

fn show(n: &Node, names: &[String], s: &mut String) {
    match n {
        Node::Scalar(x) => {
            let _ = write!(s, "{x}");
        }
        Node::Leaf { name, vars, .. } if vars.is_empty() => s.push_str(name),
        Node::Leaf { name, vars, .. } => {
            let v: Vec<&str> = vars.iter().map(|&i| names[i].as_str()).collect();
            let _ = write!(s, "{name}[{}]", v.join(", "));
        }
        Node::Neg(a) => {
            s.push('-');
            show(a, names, s);
        }
        Node::Func(f, _, a) => {
            let _ = write!(s, "{f}(");
            show(a, names, s);
            s.push(')');
        }
        Node::Bin(op, a, b) => {
            s.push('(');
            show(a, names, s);
            let _ = write!(s, " {} ", op.symbol());
            show(b, names, s);
            s.push(')');
        }
        Node::Prod(fs) => {
            for (k, f) in fs.iter().enumerate() {
                if k > 0 {
                    s.push(' ');
                }
                show(f, names, s);
            }
        }
        Node::Sum(vs, c) => {
            let v: Vec<&str> = vs.iter().map(|&i| names[i].as_str()).collect();
            let _ = write!(s, "sum_{{{}}}(", v.join(","));
            show(c, names, s);
            s.push(')');
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ast::StmtKind;

    fn eq(src: &str) -> Equation {
        let mut prog = crate::parser::parse(0, src).unwrap();
        let mut c = crate::check::Checker::new();
        c.check_program(&mut prog).unwrap();
        prog.items
            .into_iter()
            .find_map(|i| match i {
                crate::ast::Item::Stmt(crate::ast::Stmt {
                    kind: StmtKind::Equation(e),
                    ..
                }) => Some(e),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn sums_sit_at_the_smallest_subexpression() {
        let e = eq("let w = zeros(2, 2);\nlet x = zeros(2);\nlet b = zeros(2);\nH[i] = relu(w[i, j] x[j] + b[i]);");
        assert_eq!(
            explain_equation(&e).unwrap(),
            "H[i] = relu((sum_{j}(w[i, j] x[j]) + b[i]))"
        );
        let e = eq("let a = zeros(2, 2);\nlet b = zeros(2, 2);\nY[i] = a[i, j] + b[i, j];");
        assert_eq!(
            explain_equation(&e).unwrap(),
            "Y[i] = sum_{j}((a[i, j] + b[i, j]))"
        );
        let e = eq("let a = zeros(2, 2, 2);\nt[] = a[i, j, k];");
        assert_eq!(
            explain_equation(&e).unwrap(),
            "t[] = sum_{i,j,k}(a[i, j, k])"
        );
    }

    #[test]
    fn matmul_path_equals_loop_nest() {
        let a: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let b: Vec<f32> = (0..12).map(|x| (x as f32) * 0.5 - 1.0).collect();
        let e = eq("let a = zeros(2, 3);\nlet b = zeros(3, 4);\nC[i, k] = a[i, j] b[j, k];");
        let lookup = |n: &str| match n {
            "a" => Some(Value::tensor(Tens::f32(vec![2, 3], a.clone()))),
            "b" => Some(Value::tensor(Tens::f32(vec![3, 4], b.clone()))),
            _ => None,
        };
        let fast = eval_equation(&e, &lookup, 1 << 20).unwrap();
        let ev = Eval {
            sizes: &[2, 3, 4],
            span: Span::default(),
            max_iterations: 1 << 20,
        };
        let slow = ev
            .sum_product(
                &[
                    Dense {
                        vars: vec![0, 1],
                        data: a.clone(),
                    },
                    Dense {
                        vars: vec![1, 2],
                        data: b.clone(),
                    },
                ],
                &[1],
            )
            .unwrap();
        assert_eq!(fast.shape, vec![2, 4]);
        let TData::F32(f) = &fast.data else { panic!() };
        assert_eq!(f, &slow.data);
    }

    /// Two-factor products with batch indices, several summed indices or a
    /// factor without free indices run on the batched kernel; each equals
    /// the plain loop nest (up to f32 summation order: the sums here have
    /// at most 12 terms of size ≤ 30, so 1e-4 relative is ample).
    #[test]
    fn batched_path_equals_loop_nest() {
        let cases: [(&str, &[usize], &[usize]); 5] = [
            // Attention scores: batch n, k; rows i; cols s; summed j.
            (
                "S[n, k, i, s] = a[n, i, k, j] b[n, s, k, j];",
                &[2, 3, 2, 4],
                &[2, 3, 2, 4],
            ),
            // Two summed indices, one of them the leading axis.
            ("S[i, m] = a[j, i, l] b[l, m, j];", &[3, 2, 4], &[4, 5, 3]),
            // No rows: a vector against a batch of matrices.
            ("S[n, m] = a[n, j] b[n, j, m];", &[2, 3], &[2, 3, 4]),
            // Batch only (an elementwise product summed over j).
            ("S[n] = a[n, j] b[j, n];", &[2, 5], &[5, 2]),
            // A scalar factor.
            ("S[n, m] = a[n, j] b[n, j, m] * 0.5;", &[2, 3], &[2, 3, 4]),
        ];
        for (src, sa, sb) in cases {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let a: Vec<f32> = (0..na).map(|x| (x as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..nb).map(|x| (x as f32 * 0.21).cos()).collect();
            let dims = |s: &[usize]| {
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let e = eq(&format!(
                "let a = zeros({});\nlet b = zeros({});\n{src}",
                dims(sa),
                dims(sb)
            ));
            let (sa, sb) = (sa.to_vec(), sb.to_vec());
            let lookup = |n: &str| match n {
                "a" => Some(Value::tensor(Tens::f32(sa.clone(), a.clone()))),
                "b" => Some(Value::tensor(Tens::f32(sb.clone(), b.clone()))),
                _ => None,
            };
            let (root, _, sizes) = compile(&e, &lookup, false).unwrap();
            let ev = Eval {
                sizes: &sizes,
                span: Span::default(),
                max_iterations: 1 << 20,
            };
            let Node::Sum(vs, c) = &root else {
                panic!("{src}")
            };
            let Node::Prod(fs) = c.as_ref() else {
                panic!("{src}")
            };
            let fs: Vec<Dense> = fs.iter().map(|f| ev.eval(f).unwrap()).collect();
            let fast = ev.try_matmul(&fs, vs).unwrap().expect(src);
            let slow = ev.sum_product(&fs, vs).unwrap();
            let slow = ev.permute(&slow, &fast.vars);
            assert_eq!(fast.data.len(), slow.data.len(), "{src}");
            for (x, y) in fast.data.iter().zip(&slow.data) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{src}: {x} vs {y}");
            }
            // And the whole equation through eval_equation.
            let whole = eval_equation(&e, &lookup, 1 << 20).unwrap();
            assert_eq!(whole.len(), fast.data.len(), "{src}");
        }
    }
}
