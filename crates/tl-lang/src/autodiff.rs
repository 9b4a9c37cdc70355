//! Reverse-mode automatic differentiation over the runtime's tensor
//! values.
//!
//! While a program holds `learnable` tensors, the interpreter records a
//! [`Tape`]: every operation that reads a tracked tensor (a learnable one,
//! or one computed from one) appends a node holding its inputs and its
//! output. A tensor value is identified by the address of its shared
//! storage (`Rc<Tens>`); the tape keeps a reference to each recorded value,
//! so no address is reused while the tape lives. Operations on untracked
//! values are never recorded, so programs without learnable tensors pay
//! nothing.
//!
//! [`Tape::backward`] walks the nodes from the objective back to the
//! tensor asked about (nodes are appended in evaluation order, so that is
//! a topological order), accumulating vector-Jacobian products. Control
//! flow (`if`, `for`, function calls) needs nothing special: the tape holds
//! the operations as they were executed. An operation without a gradient
//! (`step`, `%`, quantized kernels, …) is recorded as such and is an error
//! only when the objective depends on it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

use crate::ast::{BinOp, Equation};
use crate::diag::Span;
use crate::error::{LangError, Result};
use crate::value::{numel, TData, Tens, Value};

/// One input of a recorded operation: its tape node (untracked inputs are
/// constants) and its value.
#[derive(Clone, Debug)]
pub struct In {
    pub id: Option<usize>,
    pub value: Rc<Tens>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Mean,
    Max,
    Min,
}

#[derive(Clone, Debug)]
pub enum Op {
    /// A learnable tensor (or one registered as a leaf).
    Leaf,
    /// Elementwise `+ - * /` with numpy broadcasting.
    Binary(BinOp, In, In),
    Neg(In),
    /// An elementwise function by name (`relu`, `sigmoid`, …).
    Unary(&'static str, In),
    Softmax(In),
    LogSoftmax(In),
    /// `matmul(a, b)`: `a[.., m, k]`, `b[k, n]` or `b[.., k, n]`.
    Matmul(In, In),
    /// `linear(x, w, bias?)`: `x[.., k] · w[n, k]ᵀ (+ bias[n])`.
    Linear(In, In, Option<In>),
    RmsNorm(In, In, f32),
    LayerNorm(In, In, In, f32),
    Reduce(Reduce, In),
    /// Indexing or slicing: output element `k` is input element `offs[k]`.
    Gather(In, Rc<Vec<usize>>),
    /// Same elements, another shape (`reshape`, `f32`).
    Reshape(In),
    /// `transpose` of a matrix.
    Transpose(In),
    /// `embedding(table, ids)`: rows of the table.
    Embedding(In, Rc<Vec<usize>>),
    /// `rope(x[t, h, d], pos, base, mode)`: each head of token `i` turned
    /// by the angles of position `pos[i]`; `true` for NeoX pairing.
    Rope(In, Rc<Vec<f32>>, f32, bool),
    /// `attention(q, k, v, cache, layer, 0)`: causal attention of the
    /// call's own tokens (see [`AttnSpec`]).
    Attention(In, In, In, AttnSpec),
    /// A tensor equation, with the values its right side read.
    /// (name, value, tape node) of each name the right side reads.
    Einsum(Rc<Equation>, Rc<Vec<(String, Value, Option<usize>)>>),
    /// An operation that has no gradient.
    NoGrad(String),
}

/// What the gradient of the cached `attention` needs: token `i`'s query
/// head `h` attends over keys and values `0..=i` of KV head
/// `h / (n_heads / n_kv_heads)`, with scores `scale · q̂ · k̂` where
/// `q̂ = f16(q_mul · q)` and `k̂`, `v̂` are the f16 values the cache holds
/// (the forward kernel's numbers). Rounding to f16 passes gradients
/// through unchanged (straight-through), as a cast does in PyTorch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub q_mul: f32,
    pub scale: f32,
}

/// The gradients of [`Op::Attention`] for the output gradient `g`:
/// `(dq, dk, dv)`, or `None` when the shapes do not agree with `spec`.
fn attention_grads(
    spec: &AttnSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let AttnSpec {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: d,
        q_mul,
        scale,
    } = *spec;
    let r16 = |x: f32| half::f16::from_f32(x).to_f32();
    let (qd, kvd) = (nh * d, nkv * d);
    if nkv == 0 || d == 0 || !nh.is_multiple_of(nkv) || qd == 0 {
        return None;
    }
    let t = q.len() / qd;
    if q.len() != t * qd || k.len() != t * kvd || v.len() != t * kvd || g.len() != t * qd {
        return None;
    }
    let group = nh / nkv;
    let qe: Vec<f32> = q.iter().map(|&x| r16(x * q_mul)).collect();
    let ke: Vec<f32> = k.iter().map(|&x| r16(x)).collect();
    let ve: Vec<f32> = v.iter().map(|&x| r16(x)).collect();
    let (mut dq, mut dk, mut dv) = (
        crate::bufs::zeros(q.len()),
        vec![0.0f64; k.len()],
        vec![0.0f64; v.len()],
    );
    let (scale, q_mul) = (f64::from(scale), f64::from(q_mul));
    let mut p = vec![0.0f64; t];
    let mut dqh = vec![0.0f64; d];
    for i in 0..t {
        for h in 0..nh {
            let kvh = h / group;
            let qi = &qe[i * qd + h * d..][..d];
            let gi = &g[i * qd + h * d..][..d];
            let key = |j: usize| &ke[j * kvd + kvh * d..][..d];
            let val = |j: usize| &ve[j * kvd + kvh * d..][..d];
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter()
                    .zip(b)
                    .map(|(&x, &y)| f64::from(x) * f64::from(y))
                    .sum()
            };
            // Probabilities over keys 0..=i.
            let mut max = f64::NEG_INFINITY;
            for (j, pj) in p.iter_mut().enumerate().take(i + 1) {
                *pj = scale * dot(qi, key(j));
                max = max.max(*pj);
            }
            let mut sum = 0.0;
            for pj in &mut p[..=i] {
                *pj = (*pj - max).exp();
                sum += *pj;
            }
            // dP_j = g · v_j; dS_j = P_j (dP_j - Σ P dP).
            let mut pdp = 0.0;
            for (j, pj) in p[..=i].iter_mut().enumerate() {
                *pj /= sum;
                pdp += *pj * dot(gi, val(j));
            }
            dqh.fill(0.0);
            for (j, &pj) in p[..=i].iter().enumerate() {
                let ds = pj * (dot(gi, val(j)) - pdp) * scale;
                let (kj, base) = (key(j), j * kvd + kvh * d);
                for c in 0..d {
                    dqh[c] += ds * f64::from(kj[c]);
                    dk[base + c] += ds * f64::from(qi[c]);
                    dv[base + c] += pj * f64::from(gi[c]);
                }
            }
            for (o, &x) in dq[i * qd + h * d..][..d].iter_mut().zip(&dqh) {
                *o = (x * q_mul) as f32;
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    Some((dq, f(dk), f(dv)))
}

#[derive(Debug)]
struct TNode {
    value: Rc<Tens>,
    op: Op,
    span: Span,
}

/// The recorded operations, in evaluation order.
#[derive(Debug, Default)]
pub struct Tape {
    nodes: Vec<TNode>,
    index: HashMap<*const Tens, usize>,
}

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    /// An empty tape with room for `n` nodes.
    pub fn with_capacity(n: usize) -> Tape {
        Tape {
            nodes: Vec::with_capacity(n),
            index: HashMap::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node of a tensor value, if it is tracked.
    pub fn id_of(&self, v: &Value) -> Option<usize> {
        match v {
            Value::Tensor(t) => self.index.get(&Rc::as_ptr(t)).copied(),
            _ => None,
        }
    }

    pub fn input(&self, v: &Value) -> Option<In> {
        let value = match v {
            Value::Tensor(t) => t.clone(),
            Value::Int(i) => Rc::new(Tens::f32(vec![], vec![*i as f32])),
            Value::Float(f) => Rc::new(Tens::f32(vec![], vec![*f as f32])),
            _ => return None,
        };
        Some(In {
            id: self.id_of(v),
            value,
        })
    }

    /// Registers `t` as a leaf (a learnable tensor); its node id.
    pub fn leaf(&mut self, t: &Rc<Tens>, span: Span) -> usize {
        self.push(t.clone(), Op::Leaf, span)
    }

    fn push(&mut self, value: Rc<Tens>, op: Op, span: Span) -> usize {
        let key = Rc::as_ptr(&value);
        if let Some(&id) = self.index.get(&key) {
            return id;
        }
        let id = self.nodes.len();
        self.nodes.push(TNode { value, op, span });
        self.index.insert(key, id);
        id
    }

    /// Records `op` as producing `out`; a float result becomes a rank-0
    /// tensor, so that it can be tracked. Results that are not numbers
    /// (ints, bools, strings) are constants and stay as they are.
    pub fn record(&mut self, out: Value, op: Op, span: Span) -> Value {
        let t = match out {
            Value::Float(f) => Rc::new(Tens::f32(vec![], vec![f as f32])),
            Value::Tensor(t) if matches!(t.data, TData::F32(_) | TData::Core(_)) => t,
            other => return other,
        };
        self.push(t.clone(), op, span);
        Value::Tensor(t)
    }

    /// d`root`/d`wrt` for each node in `wrt` (zeros where the root does not
    /// depend on it). `root` must be a tracked scalar.
    pub fn backward(&self, root: usize, wrt: &[usize], max_iter: u128) -> Result<Vec<Vec<f32>>> {
        let stop = wrt.iter().copied().min().unwrap_or(root);
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; root + 1];
        let n0 = self.nodes.get(root).map_or(0, |n| n.value.len());
        grads[root] = Some(vec![1.0; n0]);
        for id in (stop..=root).rev() {
            let Some(g) = grads[id].take() else {
                continue;
            };
            let Some(node) = self.nodes.get(id) else {
                continue;
            };
            for (k, dg) in vjp(node, &g, max_iter)? {
                if k < stop {
                    crate::bufs::give(dg);
                    continue;
                }
                match &mut grads[k] {
                    Some(acc) => {
                        acc.iter_mut().zip(&dg).for_each(|(a, b)| *a += b);
                        crate::bufs::give(dg);
                    }
                    slot => *slot = Some(dg),
                }
            }
            if wrt.contains(&id) {
                grads[id] = Some(g);
            } else {
                crate::bufs::give(g);
            }
        }
        Ok(wrt
            .iter()
            .map(|&w| {
                grads[w]
                    .clone()
                    .unwrap_or_else(|| vec![0.0; self.nodes[w].value.len()])
            })
            .collect())
    }
}

/// The values of `t` as f32, borrowed where they are stored as f32.
fn data(t: &Tens) -> Cow<'_, [f32]> {
    match &t.data {
        TData::F32(v) => Cow::Borrowed(v.as_slice()),
        _ => Cow::Owned(t.to_f32(Span::default()).unwrap_or_default()),
    }
}

/// `a[m, k] · b[k, n]` on the blocked kernel, with either operand stored
/// transposed (`ta`: `a` is given as `[k, m]`; `tb`: `b` as `[n, k]`),
/// read in place.
fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Option<Vec<f32>> {
    crate::gemm::matmul(a, b, m, k, n, ta, tb)
}

/// The number of elements of `inp` when, less leading 1s, it is the
/// trailing axes of `out` (so a broadcast repeats it whole).
pub fn trailing(out: &[usize], inp: &[usize]) -> Option<usize> {
    let k = inp.iter().position(|&d| d != 1).unwrap_or(inp.len());
    let core = &inp[k..];
    (core.len() <= out.len() && out.ends_with(core)).then(|| numel(core))
}

/// For each output element of a broadcast of `inp` to `out`, the input
/// element it reads.
pub fn broadcast_map(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let n = out.len();
    let total = numel(out);
    let mut m = Vec::with_capacity(total);
    for f in 0..total {
        let mut rem = f;
        let mut off = 0;
        let mut stride = 1;
        for k in (0..n).rev() {
            let i = rem % out[k];
            rem /= out[k];
            if let Some(tk) = (k + inp.len()).checked_sub(n) {
                let d = inp[tk];
                if d != 1 {
                    off += i * stride;
                }
                stride *= d;
            }
        }
        m.push(off);
    }
    m
}

/// The derivative of an elementwise function at `x` (with `y = f(x)`);
/// `None` for one without a gradient.
pub fn deriv(name: &str, x: f32, y: f32) -> Option<f32> {
    Some(match name {
        "relu" => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        "sigmoid" => y * (1.0 - y),
        "exp" => y,
        "log" => 1.0 / x,
        "tanh" => 1.0 - y * y,
        "sqrt" => 0.5 / y,
        "abs" => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        "silu" => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
        "gelu" => crate::vmath::gelu_deriv(x),
        _ => return None,
    })
}

fn no_grad(span: Span, what: &str) -> LangError {
    let hint = if what == "step" {
        "; for a differentiable threshold use `sigmoid(x, T)`, a step with temperature T"
    } else {
        ""
    };
    LangError::invalid(
        span,
        format!("`{what}` has no gradient, but the objective depends on its result here{hint}"),
    )
}

fn give(out: &mut Vec<(usize, Vec<f32>)>, i: &In, d: Vec<f32>) {
    if let Some(id) = i.id {
        out.push((id, d));
    }
}

/// The gradient contributions of one node's inputs, given the gradient of
/// its output.
fn vjp(node: &TNode, g: &[f32], max_iter: u128) -> Result<Vec<(usize, Vec<f32>)>> {
    let mut out = Vec::new();
    let y = &node.value;
    match &node.op {
        Op::Leaf => {}
        Op::NoGrad(what) => return Err(no_grad(node.span, what)),
        Op::Binary(op, a, b) if a.value.shape == y.shape && b.value.shape == y.shape => {
            // Equal shapes: no broadcasting to undo; constants get nothing.
            let (av, bv) = (data(&a.value), data(&b.value));
            // One loop per case (monomorphic, so each vectorizes).
            fn zip(g: &[f32], p: &[f32], q: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> Vec<f32> {
                let mut d = crate::bufs::take(g.len().min(p.len()).min(q.len()));
                for (o, (&gf, (&p, &q))) in d.iter_mut().zip(g.iter().zip(p.iter().zip(q.iter()))) {
                    *o = f(gf, p, q);
                }
                d
            }
            let (want_a, want_b) = (a.id.is_some(), b.id.is_some());
            let (ga, gb) = match op {
                BinOp::Add => (
                    want_a.then(|| crate::bufs::copy(g)),
                    want_b.then(|| crate::bufs::copy(g)),
                ),
                BinOp::Sub => (
                    want_a.then(|| crate::bufs::copy(g)),
                    want_b.then(|| crate::bufs::map(g, |x| -x)),
                ),
                BinOp::Mul => (
                    want_a.then(|| zip(g, &av, &bv, |gf, _, q| gf * q)),
                    want_b.then(|| zip(g, &av, &bv, |gf, p, _| gf * p)),
                ),
                BinOp::Div => (
                    want_a.then(|| zip(g, &av, &bv, |gf, _, q| gf / q)),
                    want_b.then(|| zip(g, &av, &bv, |gf, p, q| -gf * p / (q * q))),
                ),
                _ => return Err(no_grad(node.span, op.symbol())),
            };
            if let Some(d) = ga {
                give(&mut out, a, d);
            }
            if let Some(d) = gb {
                give(&mut out, b, d);
            }
        }
        Op::Binary(op, a, b)
            if a.value.shape == y.shape
                && trailing(&y.shape, &b.value.shape).is_some()
                && matches!(op, BinOp::Add | BinOp::Sub) =>
        {
            // `b` over the trailing axes of `a` (a bias, a position
            // table): `a` gets `g`, `b` its sum over the leading axes.
            let n = b.value.len().max(1);
            if a.id.is_some() {
                give(&mut out, a, crate::bufs::copy(g));
            }
            if b.id.is_some() {
                let mut gb = crate::bufs::zeros(b.value.len());
                for row in g.chunks_exact(n) {
                    gb.iter_mut().zip(row).for_each(|(x, v)| *x += v);
                }
                if *op == BinOp::Sub {
                    gb.iter_mut().for_each(|x| *x = -*x);
                }
                give(&mut out, b, gb);
            }
        }
        Op::Binary(op, a, b) => {
            let (av, bv) = (data(&a.value), data(&b.value));
            let ma = broadcast_map(&y.shape, &a.value.shape);
            let mb = broadcast_map(&y.shape, &b.value.shape);
            let mut ga = crate::bufs::zeros(av.len());
            let mut gb = crate::bufs::zeros(bv.len());
            for (f, &gf) in g.iter().enumerate() {
                let (ia, ib) = (ma[f], mb[f]);
                let (p, q) = (av[ia], bv[ib]);
                let (da, db) = match op {
                    BinOp::Add => (gf, gf),
                    BinOp::Sub => (gf, -gf),
                    BinOp::Mul => (gf * q, gf * p),
                    BinOp::Div => (gf / q, -gf * p / (q * q)),
                    _ => return Err(no_grad(node.span, op.symbol())),
                };
                ga[ia] += da;
                gb[ib] += db;
            }
            give(&mut out, a, ga);
            give(&mut out, b, gb);
        }
        Op::Neg(a) => give(&mut out, a, crate::bufs::map(g, |x| -x)),
        Op::Unary(name, a) => {
            let (xv, yv) = (data(&a.value), data(y));
            if a.id.is_none() {
                return Ok(out);
            }
            if *name == "gelu" {
                let mut d = crate::bufs::zeros(g.len().min(xv.len()));
                crate::vmath::gelu_grad_into(g, &xv, &mut d);
                give(&mut out, a, d);
                return Ok(out);
            }
            deriv(name, 0.0, 0.0).ok_or_else(|| no_grad(node.span, name))?;
            let mut d = crate::bufs::take(g.len().min(xv.len()).min(yv.len()));
            for (o, ((&gi, &x), &yi)) in d.iter_mut().zip(g.iter().zip(xv.iter()).zip(yv.iter())) {
                *o = gi * deriv(name, x, yi).unwrap_or(0.0);
            }
            give(&mut out, a, d);
        }
        Op::Softmax(a) => {
            let yv = data(y);
            let n = y.shape.last().copied().unwrap_or(1).max(1);
            let mut d = crate::bufs::zeros(yv.len());
            for ((dr, yr), gr) in d.chunks_mut(n).zip(yv.chunks(n)).zip(g.chunks(n)) {
                let dot: f32 = yr.iter().zip(gr).map(|(p, q)| p * q).sum();
                for ((o, &p), &q) in dr.iter_mut().zip(yr).zip(gr) {
                    *o = p * (q - dot);
                }
            }
            give(&mut out, a, d);
        }
        Op::LogSoftmax(a) => {
            let yv = data(y);
            let n = y.shape.last().copied().unwrap_or(1).max(1);
            let mut d = crate::bufs::zeros(yv.len());
            crate::vmath::log_softmax_grad(&yv, g, n, &mut d);
            give(&mut out, a, d);
        }
        Op::Matmul(a, b) => {
            let (av, bv) = (data(&a.value), data(&b.value));
            let k = a.value.shape.last().copied().unwrap_or(0);
            let n = b.value.shape.last().copied().unwrap_or(0);
            let m = av.len().checked_div(k).unwrap_or(0);
            let shared_b = b.value.shape.len() == 2;
            let kernel = || LangError::invalid(node.span, "matmul: gradient kernel failed");
            // Rows of `a` (all leading dims folded) against the matrix of
            // `b` for their batch: ga = g · bᵀ, gb = aᵀ · g, per batch
            // (one batch of all rows when `b` is shared), on the kernel.
            let rows = if shared_b {
                m
            } else {
                a.value
                    .shape
                    .len()
                    .checked_sub(2)
                    .map_or(m, |i| a.value.shape.get(i).copied().unwrap_or(m))
            };
            let mut ga = Vec::with_capacity(av.len());
            let mut gb = crate::bufs::zeros(bv.len());
            for (bi, (ab, gbat)) in av
                .chunks(rows.max(1) * k.max(1))
                .zip(g.chunks(rows.max(1) * n.max(1)))
                .enumerate()
            {
                let r = ab.len().checked_div(k).unwrap_or(0);
                let boff = if shared_b { 0 } else { bi * k * n };
                let bmat = bv.get(boff..boff + k * n).ok_or_else(kernel)?;
                ga.extend(mm(gbat, bmat, r, n, k, false, true).ok_or_else(kernel)?);
                let d = mm(ab, gbat, k, r, n, true, false).ok_or_else(kernel)?;
                for (x, v) in gb[boff..boff + k * n].iter_mut().zip(&d) {
                    *x += v;
                }
                crate::bufs::give(d);
            }
            ga.resize(av.len(), 0.0);
            give(&mut out, a, ga);
            give(&mut out, b, gb);
        }
        Op::Linear(x, w, bias) => {
            let (xv, wv) = (data(&x.value), data(&w.value));
            let k = x.value.shape.last().copied().unwrap_or(0);
            let n = w.value.shape.first().copied().unwrap_or(0);
            let m = xv.len().checked_div(k).unwrap_or(0);
            // gx[m, k] = g[m, n] · w[n, k]; gw[n, k] = gᵀ[n, m] · x[m, k].
            let kernel = || LangError::invalid(node.span, "linear: gradient kernel failed");
            let gx = mm(g, &wv, m, n, k, false, false).ok_or_else(kernel)?;
            let gw = mm(g, &xv, n, m, k, true, false).ok_or_else(kernel)?;
            let mut gbias = crate::bufs::zeros(n);
            for row in g.chunks_exact(n.max(1)) {
                gbias.iter_mut().zip(row).for_each(|(b, v)| *b += v);
            }
            give(&mut out, x, gx);
            give(&mut out, w, gw);
            if let Some(b) = bias {
                give(&mut out, b, gbias);
            }
        }
        Op::RmsNorm(x, w, eps) => {
            let (xv, wv) = (data(&x.value), data(&w.value));
            let d = wv.len().max(1);
            let mut gx = crate::bufs::zeros(xv.len());
            let mut gw = crate::bufs::zeros(wv.len());
            for ((xr, gr), gxr) in xv.chunks(d).zip(g.chunks(d)).zip(gx.chunks_mut(d)) {
                let ms: f64 =
                    xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + f64::from(*eps)).sqrt();
                let dot: f64 = xr
                    .iter()
                    .zip(gr)
                    .zip(wv.iter())
                    .map(|((&a, &b), &c)| f64::from(a) * f64::from(b) * f64::from(c))
                    .sum();
                for i in 0..xr.len() {
                    let gi = f64::from(gr[i]) * f64::from(wv[i]);
                    gxr[i] = (r * gi - r * r * r * f64::from(xr[i]) * dot / d as f64) as f32;
                    gw[i] += (f64::from(gr[i]) * f64::from(xr[i]) * r) as f32;
                }
            }
            give(&mut out, x, gx);
            give(&mut out, w, gw);
        }
        Op::LayerNorm(x, w, b, eps) => {
            let (xv, wv) = (data(&x.value), data(&w.value));
            let d = wv.len().max(1);
            let mut gx = crate::bufs::zeros(xv.len());
            let mut gw = crate::bufs::zeros(wv.len());
            let mut gb = crate::bufs::zeros(wv.len());
            // In f32 as the forward kernel (its mean and variance summed
            // in f64), one row at a time without temporaries.
            for ((xr, gr), gxr) in xv.chunks(d).zip(g.chunks(d)).zip(gx.chunks_mut(d)) {
                let n = xr.len() as f64;
                let mean = (xr.iter().map(|&v| f64::from(v)).sum::<f64>() / n) as f32;
                let var = xr
                    .iter()
                    .map(|&v| f64::from((v - mean) * (v - mean)))
                    .sum::<f64>()
                    / n;
                let r = 1.0 / (var as f32 + *eps).sqrt();
                let (mut m1, mut m2) = (0.0f32, 0.0f32);
                for ((&xi, &gi), &wi) in xr.iter().zip(gr).zip(wv.iter()) {
                    let dxhat = gi * wi;
                    m1 += dxhat;
                    m2 += dxhat * ((xi - mean) * r);
                }
                let (m1, m2) = (m1 / n as f32, m2 / n as f32);
                for (i, ((&xi, &gi), &wi)) in xr.iter().zip(gr).zip(wv.iter()).enumerate() {
                    let xhat = (xi - mean) * r;
                    gxr[i] = r * (gi * wi - m1 - xhat * m2);
                    gw[i] += gi * xhat;
                    gb[i] += gi;
                }
            }
            give(&mut out, x, gx);
            give(&mut out, w, gw);
            give(&mut out, b, gb);
        }
        Op::Reduce(kind, a) => {
            let av = data(&a.value);
            let g0 = g.first().copied().unwrap_or(0.0);
            let d = match kind {
                Reduce::Sum => vec![g0; av.len()],
                Reduce::Mean => vec![g0 / av.len().max(1) as f32; av.len()],
                Reduce::Max | Reduce::Min => {
                    // As PyTorch: shared evenly among the entries that attain it.
                    let best = data(y).first().copied().unwrap_or(0.0);
                    let ties = av.iter().filter(|&&v| v == best).count().max(1);
                    av.iter()
                        .map(|&v| if v == best { g0 / ties as f32 } else { 0.0 })
                        .collect()
                }
            };
            give(&mut out, a, d);
        }
        Op::Gather(a, offs) => {
            let mut d = crate::bufs::zeros(a.value.len());
            for (&o, &gv) in offs.iter().zip(g) {
                if let Some(x) = d.get_mut(o) {
                    *x += gv;
                }
            }
            give(&mut out, a, d);
        }
        Op::Reshape(a) => give(&mut out, a, crate::bufs::copy(g)),
        Op::Transpose(a) => {
            let (r, c) = match a.value.shape[..] {
                [r, c] => (r, c),
                _ => (a.value.len(), 1),
            };
            let mut d = crate::bufs::zeros(r * c);
            for i in 0..r {
                for j in 0..c {
                    d[i * c + j] = g[j * r + i];
                }
            }
            give(&mut out, a, d);
        }
        Op::Embedding(table, ids) => {
            let dim = table.value.shape.get(1).copied().unwrap_or(0);
            let mut d = crate::bufs::zeros(table.value.len());
            for (row, &id) in ids.iter().enumerate() {
                for j in 0..dim {
                    if let (Some(x), Some(&gv)) = (d.get_mut(id * dim + j), g.get(row * dim + j)) {
                        *x += gv;
                    }
                }
            }
            give(&mut out, table, d);
        }
        Op::Rope(x, pos, base, neox) => {
            // A rotation: its transpose is the rotation by the opposite
            // angles, i.e. rope at position -p.
            let d = x.value.shape.last().copied().unwrap_or(0);
            let t = pos.len();
            let mode = if *neox {
                tl_core::RopeMode::Neox
            } else {
                tl_core::RopeMode::Normal
            };
            let mut dx = crate::bufs::copy(g);
            if d == 0 || d % 2 != 0 || t == 0 || !dx.len().is_multiple_of(t) {
                return Err(no_grad(node.span, "rope on this shape"));
            }
            let per_token = dx.len() / t;
            let mut cs = crate::bufs::zeros(d);
            for (row, &p) in dx.chunks_exact_mut(per_token).zip(pos.iter()) {
                tl_core::cpu::kernels::rope_cache(-p, *base, 1.0, None, &mut cs);
                for head in row.chunks_exact_mut(d) {
                    tl_core::cpu::kernels::rope_rotate(head, &cs, mode);
                }
            }
            give(&mut out, x, dx);
        }
        Op::Attention(q, k, v, spec) => {
            let (qv, kv, vv) = (data(&q.value), data(&k.value), data(&v.value));
            let (dq, dk, dv) = attention_grads(spec, &qv, &kv, &vv, g).ok_or_else(|| {
                LangError::invalid(node.span, "attention: gradient shapes disagree")
            })?;
            give(&mut out, q, dq);
            give(&mut out, k, dk);
            give(&mut out, v, dv);
        }
        Op::Einsum(eq, vals) => {
            let lookup = |n: &str| {
                vals.iter()
                    .find(|(name, _, _)| name == n)
                    .map(|(_, v, _)| v.clone())
            };
            // Only the tracked tensors need a gradient.
            let wanted = |n: &str| vals.iter().any(|(name, _, id)| name == n && id.is_some());
            for (name, d) in crate::einsum::equation_grads(eq, &lookup, g, max_iter, &wanted)? {
                if let Some((_, _, Some(id))) = vals.iter().find(|(n, _, _)| *n == name) {
                    out.push((*id, d));
                }
            }
        }
    }
    Ok(out)
}

impl Tape {
    /// The operation a builtin call performed, for its tape node.
    pub fn builtin_op(&self, name: &str, args: &[(Value, Span)]) -> Op {
        let inp = |k: usize| {
            args.get(k)
                .and_then(|(v, _)| self.input(v))
                .unwrap_or_else(|| In {
                    id: None,
                    value: Rc::new(Tens::f32(vec![], vec![0.0])),
                })
        };
        let num = |k: usize| match args.get(k) {
            Some((Value::Float(f), _)) => *f as f32,
            Some((Value::Int(i), _)) => *i as f32,
            _ => 0.0,
        };
        let unary: Option<&'static str> = match name {
            "relu" => Some("relu"),
            "sigmoid" => Some("sigmoid"),
            "exp" => Some("exp"),
            "log" => Some("log"),
            "tanh" => Some("tanh"),
            "sqrt" => Some("sqrt"),
            "abs" => Some("abs"),
            "silu" => Some("silu"),
            "gelu" => match args.get(1) {
                None => Some("gelu"),
                Some((Value::Str(m), _)) if &**m == "tanh" => Some("gelu"),
                _ => None,
            },
            _ => None,
        };
        if let Some(u) = unary {
            return Op::Unary(u, inp(0));
        }
        match name {
            "softmax" => Op::Softmax(inp(0)),
            "log_softmax" => Op::LogSoftmax(inp(0)),
            "matmul" => {
                let (a, b) = (inp(0), inp(1));
                let (ra, rb) = (a.value.shape.len(), b.value.shape.len());
                // A 2-D `b` shared by every row of `a`, or equal batch dims.
                if ra >= 2
                    && (rb == 2 || (ra == rb && a.value.shape[..ra - 2] == b.value.shape[..rb - 2]))
                {
                    Op::Matmul(a, b)
                } else {
                    Op::NoGrad("matmul with broadcast batch dimensions".into())
                }
            }
            "linear" => Op::Linear(inp(0), inp(1), (args.len() > 2).then(|| inp(2))),
            "rms_norm" => Op::RmsNorm(inp(0), inp(1), num(2)),
            "layer_norm" => Op::LayerNorm(inp(0), inp(1), inp(2), num(3)),
            "sum" => Op::Reduce(Reduce::Sum, inp(0)),
            "mean" => Op::Reduce(Reduce::Mean, inp(0)),
            "max" => Op::Reduce(Reduce::Max, inp(0)),
            "min" => Op::Reduce(Reduce::Min, inp(0)),
            "reshape" | "f32" => Op::Reshape(inp(0)),
            "transpose" => Op::Transpose(inp(0)),
            "embedding" => {
                let ids = match args.get(1) {
                    Some((Value::Tensor(t), _)) => t
                        .to_f32(Span::default())
                        .unwrap_or_default()
                        .iter()
                        .map(|&x| x.max(0.0) as usize)
                        .collect(),
                    _ => Vec::new(),
                };
                Op::Embedding(inp(0), Rc::new(ids))
            }
            "rope" => {
                let pos = match args.get(1) {
                    Some((Value::Tensor(t), _)) => t.to_f32(Span::default()).unwrap_or_default(),
                    _ => Vec::new(),
                };
                let neox = !matches!(args.get(3), Some((Value::Str(m), _)) if &**m == "normal");
                Op::Rope(inp(0), Rc::new(pos), num(2), neox)
            }
            "gelu" => Op::NoGrad("gelu(x, \"ggml\")".into()),
            "attention" => {
                let int = |k: usize| match args.get(k) {
                    Some((Value::Int(i), _)) => usize::try_from(*i).ok(),
                    _ => None,
                };
                let t = match args.first() {
                    Some((Value::Tensor(q), _)) => q.shape.first().copied().unwrap_or(0),
                    _ => 0,
                };
                let spec = match (args.get(3), int(4), int(5)) {
                    (Some((Value::Cache(c), _)), Some(layer), Some(pos)) => {
                        c.borrow().grad_spec(layer, pos, t)
                    }
                    _ => Err("attention".to_string()),
                };
                match spec {
                    Ok(spec) => Op::Attention(inp(0), inp(1), inp(2), spec),
                    Err(why) => Op::NoGrad(why),
                }
            }
            other => Op::NoGrad(other.to_string()),
        }
    }
}
