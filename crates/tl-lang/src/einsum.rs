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
//! two-factor product whose summed indices are in both factors (a matrix
//! product, batched over the indices both keep) runs on the blocked
//! kernel of [`crate::gemm`], reading each operand where it lies when its
//! axes allow and writing the result in the order the left side (or the
//! gradient's target) asks for. Operands are the tensors' own storage,
//! not copies.

use std::fmt::Write as _;
use std::rc::Rc;

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
        data: Buf,
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
                data: Buf::new(vec![]),
                shape: vec![],
                vars: vec![],
            },
            ExprKind::Var(name) => match (self.lookup)(name) {
                Some(Value::Int(i)) => Node::Scalar(i as f32),
                Some(Value::Float(f)) => Node::Scalar(f as f32),
                Some(Value::Tensor(t)) if t.shape.is_empty() => Node::Leaf {
                    // A leaf without indices, so that a gradient can reach it.
                    name: name.clone(),
                    data: Buf::of(&t, e.span)?,
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
                        data: Buf::new(vec![]),
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
                    data: Buf::of(&t, e.span)?,
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

/// f32 values: a tensor's own storage (shared, read in place) or a
/// vector of their own.
#[derive(Clone, Default)]
struct Buf {
    /// When set, the values are this tensor's (which holds f32).
    shared: Option<Rc<Tens>>,
    own: Vec<f32>,
}

impl Buf {
    fn new(v: Vec<f32>) -> Buf {
        Buf {
            shared: None,
            own: v,
        }
    }

    /// The tensor's values: its storage when it holds f32, else a copy.
    fn of(t: &Rc<Tens>, span: Span) -> Result<Buf> {
        Ok(match t.data {
            TData::F32(_) => Buf {
                shared: Some(t.clone()),
                own: Vec::new(),
            },
            _ => Buf::new(t.to_f32(span)?),
        })
    }

    /// The values, writable (copied first when shared).
    fn to_mut(&mut self) -> &mut Vec<f32> {
        if self.shared.is_some() {
            self.own = crate::bufs::copy(self);
            self.shared = None;
        }
        &mut self.own
    }

    fn into_vec(mut self) -> Vec<f32> {
        match self.shared.take() {
            None => std::mem::take(&mut self.own),
            Some(t) => match Rc::try_unwrap(t) {
                Ok(mut t) => match &mut t.data {
                    TData::F32(v) => std::mem::take(v),
                    _ => Vec::new(),
                },
                Err(t) => match &t.data {
                    TData::F32(v) => crate::bufs::copy(v),
                    _ => Vec::new(),
                },
            },
        }
    }
}

/// An intermediate's own values go back to [`crate::bufs`].
impl Drop for Buf {
    fn drop(&mut self) {
        crate::bufs::give(std::mem::take(&mut self.own));
    }
}

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self.shared.as_deref() {
            Some(Tens {
                data: TData::F32(v),
                ..
            }) => v,
            Some(_) => &[],
            None => &self.own,
        }
    }
}

impl From<Vec<f32>> for Buf {
    fn from(v: Vec<f32>) -> Buf {
        Buf::new(v)
    }
}

/// A dense intermediate: data over `vars` (in that axis order).
#[derive(Clone)]
struct Dense {
    vars: Vec<usize>,
    data: Buf,
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

/// `a op b` elementwise with `b` repeated over `a` (whose length is a
/// multiple of `b`'s); one loop per operation, so that each vectorizes.
pub fn repeat_op(op: BinOp, a: &[f32], b: &[f32]) -> Vec<f32> {
    fn each(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
        let n = b.len().max(1);
        let mut out = crate::bufs::take(a.len() / n * n);
        for (orow, row) in out.chunks_exact_mut(n).zip(a.chunks_exact(n)) {
            for ((o, &x), &y) in orow.iter_mut().zip(row).zip(b) {
                *o = f(x, y);
            }
        }
        out
    }
    match op {
        BinOp::Add => each(a, b, |x, y| x + y),
        BinOp::Sub => each(a, b, |x, y| x - y),
        BinOp::Div => each(a, b, |x, y| x / y),
        _ => each(a, b, |x, y| x * y),
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

    fn union(ds: &[&Dense]) -> Vec<usize> {
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

    fn combine(&self, ds: &[&Dense], f: impl Fn(&[f32]) -> f32) -> Result<Dense> {
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
        Ok(Dense {
            vars,
            data: data.into(),
        })
    }

    /// `a op b` elementwise; when both are over the same axes in the same
    /// order, or one is a single value, without the general index walk.
    fn binary(&self, op: BinOp, a: &Dense, b: &Dense) -> Result<Dense> {
        // `b` over the trailing axes of `a` in the same order (the same
        // axes, a bias or mask added to every leading entry, a single
        // value): `b` repeats over `a` whole.
        if a.vars.ends_with(&b.vars)
            && !b.data.is_empty()
            && a.data.len().is_multiple_of(b.data.len())
        {
            return Ok(Dense {
                vars: a.vars.clone(),
                data: repeat_op(op, &a.data, &b.data).into(),
            });
        }
        self.combine(&[a, b], |v| match op {
            BinOp::Add => v[0] + v[1],
            BinOp::Sub => v[0] - v[1],
            BinOp::Div => v[0] / v[1],
            _ => v[0] * v[1],
        })
    }

    fn eval(&self, n: &Node) -> Result<Dense> {
        self.eval_to(n, None)
    }

    /// The value of `n`; a sum of products is laid out over `target` when
    /// that costs nothing extra (the caller still checks the axes it got).
    fn eval_to(&self, n: &Node, target: Option<&[usize]>) -> Result<Dense> {
        match n {
            Node::Scalar(x) => Ok(Dense {
                vars: vec![],
                data: vec![*x].into(),
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
                if uniq.len() == vars.len() {
                    // No diagonal: the tensor as it is stored.
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
                    data: out.into(),
                })
            }
            Node::Neg(a) => {
                let mut d = self.eval(a)?;
                d.data.to_mut().iter_mut().for_each(|x| *x = -*x);
                Ok(d)
            }
            Node::Func(_, f, a) => {
                let mut d = self.eval(a)?;
                d.data.to_mut().iter_mut().for_each(|x| *x = f(*x));
                Ok(d)
            }
            Node::Bin(op, a, b) => {
                let (x, y) = (self.eval(a)?, self.eval(b)?);
                self.binary(*op, &x, &y)
            }
            Node::Prod(fs) => {
                let ds: Vec<Dense> = fs.iter().map(|f| self.eval(f)).collect::<Result<_>>()?;
                let refs: Vec<&Dense> = ds.iter().collect();
                self.combine(&refs, |v| v.iter().product())
            }
            Node::Sum(vs, c) => {
                let factors: Vec<Dense> = match c.as_ref() {
                    Node::Prod(fs) => fs.iter().map(|f| self.eval(f)).collect::<Result<_>>()?,
                    other => vec![self.eval(other)?],
                };
                let refs: Vec<&Dense> = factors.iter().collect();
                if let Some(d) = self.try_matmul(&refs, vs, target)? {
                    return Ok(d);
                }
                self.sum_product(&refs, vs)
            }
        }
    }

    /// `Σ_summed Π factors` as one loop nest: output indices outer, summed
    /// indices inner.
    fn sum_product(&self, factors: &[&Dense], summed: &[usize]) -> Result<Dense> {
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
        let mut data = crate::bufs::zeros(numel(&out_sizes));
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
            data: data.into(),
        })
    }

    /// The stride, in `d`'s row-major layout, of its axis `v` (0 for an
    /// axis `d` does not have).
    fn stride_in(&self, vars: &[usize], v: usize) -> usize {
        match vars.iter().position(|&x| x == v) {
            Some(p) => vars[p + 1..].iter().map(|&w| self.sizes[w]).product(),
            None => 0,
        }
    }

    /// The axes `group` (in this order) of a layout over `vars` as one
    /// strided axis: its stride, if the axes follow each other there as
    /// in one row-major block (axes of size 1 are ignored).
    fn merged(&self, vars: &[usize], group: &[usize]) -> Option<usize> {
        let vs: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&v| self.sizes[v] != 1)
            .collect();
        for w in vs.windows(2) {
            if !vars.contains(&w[0])
                || self.stride_in(vars, w[0]) != self.stride_in(vars, w[1]) * self.sizes[w[1]]
            {
                return None;
            }
        }
        match vs.last() {
            Some(&v) if vars.contains(&v) => Some(self.stride_in(vars, v)),
            Some(_) => None,
            None => Some(0),
        }
    }

    /// `Σ_K A[B, I, K] B[B, K, J]` for two factors: the indices both share
    /// and keep (`B`) are a batch, each factor's own kept indices (`I`,
    /// `J`) the rows and columns, the summed ones (`K`, in both factors)
    /// the inner dimension, on the blocked kernel of [`crate::gemm`]. Each
    /// factor is read where it lies when its row (column) and summed
    /// indices each form one strided axis of its layout, and permuted into
    /// `[B, I, K]` (`[B, K, J]`) otherwise; the batch may be strided any
    /// way. The result is laid out over `target` when that is a layout of
    /// `B, I, J` whose `I` and `J` are strided axes, else over `B, I, J`.
    /// `None` when the product is not of this form (a summed index in only
    /// one factor, nothing summed).
    fn contract2(
        &self,
        a: &Dense,
        b: &Dense,
        summed: &[usize],
        target: Option<&[usize]>,
    ) -> Result<Option<Dense>> {
        let ks: Vec<usize> = a
            .vars
            .iter()
            .copied()
            .filter(|v| summed.contains(v))
            .collect();
        if ks.is_empty()
            || b.vars
                .iter()
                .any(|v| summed.contains(v) && !a.vars.contains(v))
            || ks.iter().any(|v| !b.vars.contains(v))
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
        let (ni, nk, nj) = (size(&is), size(&ks), size(&js));
        let plain: Vec<usize> = bs.iter().chain(&is).chain(&js).copied().collect();
        let out_vars = match target {
            Some(t)
                if t.len() == plain.len()
                    && plain.iter().all(|v| t.contains(v))
                    && self.merged(t, &is).is_some()
                    && self.merged(t, &js).is_some() =>
            {
                t.to_vec()
            }
            _ => plain,
        };
        let a_fits = self.merged(&a.vars, &is).is_some() && self.merged(&a.vars, &ks).is_some();
        let pa;
        let a = if a_fits {
            a
        } else {
            let order: Vec<usize> = bs.iter().chain(&is).chain(&ks).copied().collect();
            pa = self.permute(a.clone(), &order);
            &pa
        };
        let b_fits = self.merged(&b.vars, &js).is_some() && self.merged(&b.vars, &ks).is_some();
        let pb;
        let b = if b_fits {
            b
        } else {
            let order: Vec<usize> = bs.iter().chain(&ks).chain(&js).copied().collect();
            pb = self.permute(b.clone(), &order);
            &pb
        };
        let kernel = || LangError::invalid(self.span, "tensor equation: product kernel failed");
        let st = |vars: &[usize], g: &[usize]| self.merged(vars, g).ok_or_else(kernel);
        let (rsa, csa) = (st(&a.vars, &is)?, st(&a.vars, &ks)?);
        let (rsb, csb) = (st(&b.vars, &ks)?, st(&b.vars, &js)?);
        let (rsc, csc) = (st(&out_vars, &is)?, st(&out_vars, &js)?);
        // One offset per batch entry in each of the three layouts.
        let bsizes: Vec<usize> = bs.iter().map(|&v| self.sizes[v]).collect();
        let bstrides: Vec<Vec<usize>> = [&a.vars, &b.vars, &out_vars]
            .iter()
            .map(|vars| bs.iter().map(|&v| self.stride_in(vars, v)).collect())
            .collect();
        let nb = numel(&bsizes);
        let (mut ao, mut bo, mut co) = (
            Vec::with_capacity(nb),
            Vec::with_capacity(nb),
            Vec::with_capacity(nb),
        );
        for_each(&bsizes, &bstrides, |o| {
            ao.push(o[0]);
            bo.push(o[1]);
            co.push(o[2]);
        });
        let mut out = crate::bufs::zeros(nb * ni * nj);
        crate::gemm::gemm(
            ni,
            nj,
            nk,
            crate::gemm::View {
                data: &a.data,
                offs: &ao,
                rs: rsa,
                cs: csa,
            },
            crate::gemm::View {
                data: &b.data,
                offs: &bo,
                rs: rsb,
                cs: csb,
            },
            crate::gemm::Out {
                data: &mut out,
                offs: &co,
                rs: rsc,
                cs: csc,
            },
            false,
        )
        .ok_or_else(kernel)?;
        Ok(Some(Dense {
            vars: out_vars,
            data: out.into(),
        }))
    }

    /// Two-factor products with summed indices shared by both factors on
    /// the blocked kernel ([`Self::contract2`]); scalar factors (`* scale`)
    /// multiply the result.
    fn try_matmul(
        &self,
        fs: &[&Dense],
        summed: &[usize],
        target: Option<&[usize]>,
    ) -> Result<Option<Dense>> {
        if fs.len() > 2 && fs.iter().any(|d| d.vars.is_empty()) {
            let scale: f32 = fs
                .iter()
                .filter(|d| d.vars.is_empty())
                .map(|d| d.data.first().copied().unwrap_or(0.0))
                .product();
            let rest: Vec<&Dense> = fs.iter().copied().filter(|d| !d.vars.is_empty()).collect();
            let Some(mut d) = self.try_matmul(&rest, summed, target)? else {
                return Ok(None);
            };
            d.data.to_mut().iter_mut().for_each(|x| *x *= scale);
            return Ok(Some(d));
        }
        match fs {
            [a, b] => self.contract2(a, b, summed, target),
            _ => Ok(None),
        }
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
    let out_vars: Vec<usize> = eq
        .indices
        .iter()
        .filter_map(|(n, _)| names.iter().position(|x| x == n))
        .collect();
    let d = ev.eval_to(&root, Some(&out_vars))?;
    let shape: Vec<usize> = out_vars.iter().map(|&v| sizes[v]).collect();
    // Into the left side's index order (nothing to do when it is already).
    let d = ev.permute(d, &out_vars);
    Ok(Tens::f32(shape, d.data.into_vec()))
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
        data: crate::bufs::copy(grad_out).into(),
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
    /// missing from `d` are broadcast. `d` itself when it already is.
    fn permute(&self, d: Dense, target: &[usize]) -> Dense {
        if d.vars == target {
            return d;
        }
        let sizes: Vec<usize> = target.iter().map(|&v| self.sizes[v]).collect();
        let strides = self.strides_over(&d, target);
        let mut data = crate::bufs::take(numel(&sizes));
        let mut k = 0;
        for_each(&sizes, &[strides], |o| {
            if let Some(x) = data.get_mut(k) {
                *x = d.data.get(o[0]).copied().unwrap_or(0.0);
            }
            k += 1;
        });
        Dense {
            vars: target.to_vec(),
            data: data.into(),
        }
    }

    /// `Σ Π factors` over the `summed` axes, laid out over `target`.
    fn contract_to(&self, factors: &[&Dense], summed: &[usize], target: &[usize]) -> Result<Dense> {
        let all = Self::union(factors);
        let summed: Vec<usize> = summed.iter().copied().filter(|v| all.contains(v)).collect();
        let d = if summed.is_empty() && factors.len() == 1 {
            factors[0].clone()
        } else if summed.is_empty() {
            self.combine(factors, |v| v.iter().product())?
        } else {
            match self.try_matmul(factors, &summed, Some(target))? {
                Some(d) => d,
                None => self.sum_product(factors, &summed)?,
            }
        };
        Ok(self.permute(d, target))
    }

    /// `g` summed down to the axes `target`.
    fn reduce_to(&self, g: Dense, target: &[usize]) -> Result<Dense> {
        if g.vars == target {
            return Ok(g);
        }
        let summed: Vec<usize> = g
            .vars
            .iter()
            .copied()
            .filter(|v| !target.contains(v))
            .collect();
        self.contract_to(&[&g], &summed, target)
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
                let g = self.reduce_to(g, &uniq)?;
                let total = numel(shape);
                let slot = acc.iter().position(|(n2, _)| n2 == name);
                if slot.is_none() && uniq == *vars && g.data.len() == total {
                    // The first contribution, in the tensor's own layout.
                    acc.push((name.clone(), g.data.into_vec()));
                    return Ok(());
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
                let slot = match slot {
                    Some(p) => p,
                    None => {
                        acc.push((name.clone(), crate::bufs::zeros(total)));
                        acc.len() - 1
                    }
                };
                let dst = &mut acc[slot].1;
                if uniq == *vars && dst.len() == g.data.len() {
                    dst.iter_mut().zip(g.data.iter()).for_each(|(x, v)| *x += v);
                    return Ok(());
                }
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
                g.data.to_mut().iter_mut().for_each(|x| *x = -*x);
                self.back(a, g, acc, wanted)
            }
            Node::Func(name, _, a) => {
                let x = self.eval(a)?;
                let y = self.eval(n)?;
                let g = self.permute(g, &x.vars);
                let mut d = Vec::with_capacity(x.data.len());
                for ((&gv, &xv), &yv) in g.data.iter().zip(x.data.iter()).zip(y.data.iter()) {
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
                        data: d.into(),
                    },
                    acc,
                    wanted,
                )
            }
            Node::Bin(op, a, b) => {
                let (va, vb) = (node_vars(a), node_vars(b));
                match op {
                    BinOp::Add | BinOp::Sub => {
                        let (ra, rb) = (a.reads(wanted), b.reads(wanted));
                        let gb_src = (ra && rb).then(|| g.clone());
                        if ra {
                            let ga = self.reduce_to(g, &va)?;
                            self.back(a, ga, acc, wanted)?;
                            if let Some(g2) = gb_src {
                                let mut gb = self.reduce_to(g2, &vb)?;
                                if *op == BinOp::Sub {
                                    gb.data.to_mut().iter_mut().for_each(|x| *x = -*x);
                                }
                                self.back(b, gb, acc, wanted)?;
                            }
                        } else if rb {
                            let mut gb = self.reduce_to(g, &vb)?;
                            if *op == BinOp::Sub {
                                gb.data.to_mut().iter_mut().for_each(|x| *x = -*x);
                            }
                            self.back(b, gb, acc, wanted)?;
                        }
                        Ok(())
                    }
                    _ => {
                        // Division (a product is a `Prod`).
                        let (xa, xb) = (self.eval(a)?, self.eval(b)?);
                        let da = self.combine(&[&g, &xa, &xb], |v| v[0] / v[2])?;
                        let db = self.combine(&[&da, &xa, &xb], |v| -v[0] * v[1] / v[2])?;
                        let ga = self.reduce_to(da, &va)?;
                        let gb = self.reduce_to(db, &vb)?;
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
                    let mut factors = vec![&g];
                    factors.extend(
                        vals.iter()
                            .enumerate()
                            .filter(|(m, _)| *m != k)
                            .map(|(_, v)| v),
                    );
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
                    &Dense {
                        vars: vec![0, 1],
                        data: a.clone().into(),
                    },
                    &Dense {
                        vars: vec![1, 2],
                        data: b.clone().into(),
                    },
                ],
                &[1],
            )
            .unwrap();
        assert_eq!(fast.shape, vec![2, 4]);
        let TData::F32(f) = &fast.data else { panic!() };
        assert_eq!(f.as_slice(), &*slow.data);
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
            let fs: Vec<&Dense> = fs.iter().collect();
            let fast = ev.try_matmul(&fs, vs, None).unwrap().expect(src);
            let slow = ev.sum_product(&fs, vs).unwrap();
            let slow = ev.permute(slow, &fast.vars);
            assert_eq!(fast.data.len(), slow.data.len(), "{src}");
            for (x, y) in fast.data.iter().zip(slow.data.iter()) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{src}: {x} vs {y}");
            }
            // And the whole equation through eval_equation.
            let whole = eval_equation(&e, &lookup, 1 << 20).unwrap();
            assert_eq!(whole.len(), fast.data.len(), "{src}");
        }
    }
}
