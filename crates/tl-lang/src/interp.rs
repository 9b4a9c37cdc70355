//! The tree-walking runtime. It runs only programs the checker accepted;
//! it still checks every shape it depends on (`?` dims are known only
//! now), from host metadata — never by reading a device.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::ast::*;
use crate::autodiff::{Op, Tape};
use crate::builtins::{self, Ctx};
use crate::check::Checker;
use crate::diag::{SourceMap, Span};
use crate::einsum;
use crate::error::{LangError, Result};
use crate::logic::{ConstKey, ConstOracle, LogicDb};
use crate::value::{TData, Tens, Value};
use crate::Limits;

/// Deeper user-function recursion than this is an error, not a stack
/// overflow.
const MAX_CALL_DEPTH: usize = 150;

/// Nested expression evaluations across all active calls (each call's
/// expressions are bounded by the parser, but a recursive call inside a
/// deep expression multiplies them). The `tl` binary runs the interpreter
/// on a 256 MiB stack, which this keeps far from full.
const MAX_EVAL_DEPTH: usize = 4096;

impl ConstOracle for Checker {
    fn is_var(&self, name: &str, domain: &str) -> bool {
        Checker::is_var(self, name, domain)
    }
}

enum Flow {
    Next,
    Return(Value),
}

#[derive(Default)]
struct Env {
    scopes: Vec<HashMap<String, Value>>,
}

impl Env {
    fn get(&self, name: &str) -> Option<&Value> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        self.scopes.iter_mut().rev().find_map(|s| s.get_mut(name))
    }

    fn set_new(&mut self, name: &str, v: Value) {
        if let Some(s) = self.scopes.last_mut() {
            s.insert(name.to_string(), v);
        }
    }
}

/// A program being checked and run: sources, checker state, runtime
/// state. One per `tl run`/`tl check`/`tl test`, and one for a whole REPL
/// session.
pub struct Interp {
    pub sources: SourceMap,
    pub checker: Checker,
    pub logic: LogicDb,
    pub args: Vec<String>,
    /// Where `load_model` puts a model unless the program names a device
    /// (`tl run --device`).
    pub device: tl_core::Device,
    fns: HashMap<String, Rc<FnDef>>,
    rules: Vec<Rule>,
    tests: Vec<TestDef>,
    globals: Env,
    out: Box<dyn Write>,
    loaded: HashSet<PathBuf>,
    depth: usize,
    limits: Limits,
    steps: u64,
    eval_depth: usize,
    /// Recorded operations on tracked tensors; present once a program
    /// declares a learnable tensor.
    tape: Option<Tape>,
    /// Names declared `learnable`, in order.
    learnables: Vec<String>,
    /// The generator of the random initializers (`manual_seed`).
    init_rng: rand_chacha::ChaCha8Rng,
}

impl Interp {
    pub fn new(out: Box<dyn Write>) -> Interp {
        Interp {
            sources: SourceMap::default(),
            checker: Checker::new(),
            logic: LogicDb::new(),
            args: Vec::new(),
            device: tl_core::Device::Cpu,
            fns: HashMap::new(),
            rules: Vec::new(),
            tests: Vec::new(),
            globals: Env {
                scopes: vec![HashMap::new()],
            },
            out,
            loaded: HashSet::new(),
            depth: 0,
            limits: Limits::default(),
            steps: 0,
            eval_depth: 0,
            tape: None,
            learnables: Vec::new(),
            init_rng: rand::SeedableRng::seed_from_u64(0),
        }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.logic.max_tuples = limits.max_tuples;
    }

    /// Counts one statement or loop iteration against
    /// [`Limits::max_steps`].
    fn step(&mut self, span: Span) -> Result<()> {
        self.steps += 1;
        match self.limits.max_steps {
            Some(max) if self.steps > max => Err(LangError::Limit {
                span,
                message: format!("the program ran more than {max} steps"),
            }),
            _ => Ok(()),
        }
    }

    /// Reads and parses a file and, recursively, its imports (each file
    /// once; imported items come first).
    pub fn load_file(&mut self, path: &Path) -> Result<Program> {
        self.load_file_at(path, None)
    }

    fn load_file_at(&mut self, path: &Path, from: Option<Span>) -> Result<Program> {
        let text = std::fs::read_to_string(path).map_err(|e| LangError::Io {
            span: from,
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        self.loaded.insert(canon);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        self.load_source_in(&path.display().to_string(), &text, &dir)
    }

    /// Parses source text (imports resolved against `dir`).
    pub fn load_source_in(&mut self, name: &str, text: &str, dir: &Path) -> Result<Program> {
        let file = self.sources.add(name, text);
        let prog = crate::parser::parse(file, text)?;
        let mut items = Vec::new();
        for item in &prog.items {
            if let Item::Import { path, span } = item {
                let p = dir.join(path);
                let canon = p.canonicalize().unwrap_or_else(|_| p.clone());
                if self.loaded.contains(&canon) {
                    continue;
                }
                let sub = self.load_file_at(&p, Some(*span))?;
                items.extend(sub.items);
            }
        }
        items.extend(prog.items);
        Ok(Program { items })
    }

    /// Type- and shape-checks a program, then registers its functions,
    /// relations, facts, rules and tests (nothing runs).
    pub fn check(&mut self, prog: &mut Program) -> Result<()> {
        self.checker.check_program(prog)?;
        for item in &prog.items {
            match item {
                Item::Fn(f) => {
                    self.fns.insert(f.name.clone(), Rc::new(f.clone()));
                }
                Item::Relation(r) => {
                    self.logic
                        .declare(&r.name, r.args.iter().map(|(_, t)| t.clone()).collect());
                }
                Item::Test(t) => self.tests.push(t.clone()),
                _ => {}
            }
        }
        for item in &prog.items {
            match item {
                Item::Fact(a) => {
                    let rel = self.logic.rel_id(&a.name, a.name_span)?;
                    let args = a
                        .args
                        .iter()
                        .map(|e| match &e.kind {
                            ExprKind::Int(i) => ConstKey::Int(*i),
                            ExprKind::Var(s) | ExprKind::Str(s) => ConstKey::Sym(s.clone()),
                            _ => ConstKey::Sym(String::new()),
                        })
                        .collect();
                    self.logic.add_fact(rel, args, a.span)?;
                }
                Item::Rule(r) => {
                    self.logic.add_rule(r, &self.checker)?;
                    self.rules.push(r.clone());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The tensor form of the program: the equations its rules compile to
    /// and its tensor equations with their sums made explicit.
    pub fn explain(&self, prog: &Program) -> Result<String> {
        let mut s = String::new();
        if !self.rules.is_empty() {
            s.push_str("// rules as tensor equations (step(x) = 1 if x > 0 else 0)\n");
            s.push_str(&self.logic.explain(&self.rules, &self.checker));
        }
        let mut eqs = Vec::new();
        for item in &prog.items {
            match item {
                Item::Fn(f) => collect_eqs(&f.body.stmts, &mut eqs),
                Item::Test(t) => collect_eqs(&t.body.stmts, &mut eqs),
                Item::Stmt(st) => collect_eqs(std::slice::from_ref(st), &mut eqs),
                _ => {}
            }
        }
        if !eqs.is_empty() {
            s.push_str("// tensor equations (sum_{j} sums over j)\n");
            for eq in eqs {
                let (line, _) = self.sources.line_col(eq.target_span);
                s.push_str(&format!(
                    "{}    // line {line}\n",
                    einsum::explain_equation(eq)?
                ));
            }
        }
        Ok(s)
    }

    /// Runs the top-level statements in order, then `main()` if defined.
    pub fn run(&mut self, prog: &Program) -> Result<Option<Value>> {
        let mut env = std::mem::take(&mut self.globals);
        let mut last = None;
        let mut result = Ok(());
        for item in &prog.items {
            if let Item::Stmt(s) = item {
                last = None;
                if let StmtKind::Expr(e) = &s.kind {
                    match self.eval(&mut env, e) {
                        Ok(v) => last = Some(v),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                    continue;
                }
                match self.exec(&mut env, s) {
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        self.globals = env;
        result?;
        let has_main = prog
            .items
            .iter()
            .any(|i| matches!(i, Item::Fn(f) if f.name == "main" && f.params.is_empty()));
        if has_main {
            if let Some(f) = self.fns.get("main").cloned() {
                self.call_fn(&f, Vec::new(), f.name_span)?;
            }
        }
        let _ = self.out.flush();
        Ok(last)
    }

    /// Runs every `test` block registered so far, each in a fresh scope.
    pub fn run_tests(&mut self) -> Vec<(String, Result<()>)> {
        let tests = self.tests.clone();
        let mut out = Vec::new();
        for t in tests {
            let mut env = Env {
                scopes: vec![HashMap::new()],
            };
            let r = self.block(&mut env, &t.body).map(|_| ());
            out.push((t.name.clone(), r));
        }
        let _ = self.out.flush();
        out
    }

    pub fn write_out(&mut self, s: &str) {
        let _ = self.out.write_all(s.as_bytes());
        let _ = self.out.flush();
    }

    fn block(&mut self, env: &mut Env, b: &Block) -> Result<Flow> {
        env.scopes.push(HashMap::new());
        let mut r = Ok(Flow::Next);
        let mut i = 0;
        while let Some(s) = b.stmts.get(i) {
            let n = self.linear_group(&b.stmts[i..]);
            let step = if n > 1 {
                self.exec_linear_group(env, &b.stmts[i..i + n])
                    .map(|()| Flow::Next)
            } else {
                self.exec(env, s)
            };
            i += n.max(1);
            match step {
                Ok(Flow::Next) => {}
                other => {
                    r = other;
                    break;
                }
            }
        }
        env.scopes.pop();
        r
    }

    /// How many statements from the first of `stmts` are `let`s of
    /// `linear` over the same input variable that can run as one product
    /// (see [`linear_let`]): none of them reads a name an earlier one
    /// binds, and none rebinds the input. 0 or 1: run them one by one.
    /// Programs with learnable tensors run every statement on its own
    /// (their operations are recorded one by one).
    fn linear_group(&self, stmts: &[Stmt]) -> usize {
        if self.tape.is_some() || self.fns.contains_key("linear") {
            return 0;
        }
        let Some((first, x, _)) = stmts.first().and_then(linear_let) else {
            return 0;
        };
        let mut bound = vec![first];
        for s in stmts.iter().skip(1).take(MAX_FUSED_LINEAR - 1) {
            let Some((name, x2, reads)) = linear_let(s) else {
                break;
            };
            if x2 != x || bound.contains(&x) || reads.iter().any(|r| bound.contains(r)) {
                break;
            }
            bound.push(name);
        }
        bound.len()
    }

    /// Runs the `let` statements [`Interp::linear_group`] grouped: their
    /// arguments evaluated in order, the products together
    /// ([`builtins::linear_many`], the same bits as one `linear` each),
    /// then the names bound in order.
    fn exec_linear_group(&mut self, env: &mut Env, stmts: &[Stmt]) -> Result<()> {
        let mut calls = Vec::with_capacity(stmts.len());
        let mut failed = None;
        for s in stmts {
            match self.linear_args(env, s) {
                Ok(c) => calls.push(c),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            // As one by one: the statements before the failing one run
            // (and report their own errors) first.
            self.linears_one_by_one(env, &calls)?;
            return Err(e);
        }
        let fused = {
            let ws: Option<Vec<(&Tens, Option<&Tens>)>> = calls
                .iter()
                .map(|(_, _, _, v)| match v.as_slice() {
                    [_, (Value::Tensor(w), _)] => Some((&**w, None)),
                    [_, (Value::Tensor(w), _), (Value::Tensor(b), _)] => Some((&**w, Some(&**b))),
                    _ => None,
                })
                .collect();
            match (ws, calls.first()) {
                (Some(ws), Some((_, _, span, vals))) => match vals.first() {
                    Some((Value::Tensor(x), _)) => {
                        builtins::linear_many(x, &ws, *span, self.limits.max_elements)?
                    }
                    _ => None,
                },
                _ => None,
            }
        };
        match fused {
            Some(ys) => bind_linears(env, &calls, ys),
            None => self.linears_one_by_one(env, &calls),
        }
    }

    /// A grouped statement counted as a step, and its `linear`'s evaluated
    /// arguments.
    fn linear_args<'s>(&mut self, env: &mut Env, s: &'s Stmt) -> Result<LinearCall<'s>> {
        self.step(s.span)?;
        let StmtKind::Let {
            name, ty, value, ..
        } = &s.kind
        else {
            return Err(LangError::invalid(
                s.span,
                "a grouped `linear` is not a `let`",
            ));
        };
        let ExprKind::Call { args, .. } = &value.kind else {
            return Err(LangError::invalid(
                s.span,
                "a grouped `linear` is not a call",
            ));
        };
        let mut vals = Vec::with_capacity(args.len());
        for a in args {
            vals.push((self.eval(env, a)?, a.span));
        }
        Ok((name, ty, value.span, vals))
    }

    /// Runs the calls' `linear`s one at a time, then binds the results.
    fn linears_one_by_one(&mut self, env: &mut Env, calls: &[LinearCall<'_>]) -> Result<()> {
        let mut ys = Vec::with_capacity(calls.len());
        for (_, _, span, vals) in calls {
            let mut ctx = Ctx {
                out: &mut *self.out,
                args: &self.args,
                fixpoint_limit: &mut self.logic.limit,
                max_elements: self.limits.max_elements,
                device: self.device,
            };
            ys.push(builtins::call("linear", *span, vals, &mut ctx)?);
        }
        bind_linears(env, calls, ys)
    }

    fn exec(&mut self, env: &mut Env, s: &Stmt) -> Result<Flow> {
        self.step(s.span)?;
        match &s.kind {
            StmtKind::Let {
                name, ty, value, ..
            } => {
                let v = self.eval(env, value)?;
                let v = match ty {
                    Some(t) => convert(v, t, value.span)?,
                    None => v,
                };
                env.set_new(name, v);
            }
            StmtKind::Assign { target, value } => {
                let v = self.eval(env, value)?;
                match &target.kind {
                    ExprKind::Var(name) => {
                        let slot = env.get_mut(name).ok_or_else(|| LangError::Undefined {
                            span: target.span,
                            what: "variable",
                            name: name.clone(),
                        })?;
                        let v = match (&*slot, v) {
                            (Value::Float(_), Value::Int(i)) => Value::Float(i as f64),
                            (_, v) => v,
                        };
                        *slot = v;
                    }
                    ExprKind::Index(base, args) => {
                        let ExprKind::Var(name) = &base.kind else {
                            return Err(LangError::invalid(
                                target.span,
                                "only a variable's elements can be assigned",
                            ));
                        };
                        let idx = self.eval_index_args(env, args)?;
                        let slot = env.get_mut(name).ok_or_else(|| LangError::Undefined {
                            span: base.span,
                            what: "variable",
                            name: name.clone(),
                        })?;
                        let tracked = self
                            .tape
                            .as_ref()
                            .is_some_and(|tp| tp.id_of(slot).is_some() || tp.id_of(&v).is_some());
                        let Value::Tensor(t) = slot else {
                            return Err(LangError::ty(base.span, "a tensor", slot.type_name()));
                        };
                        let (_, offs) = region(&t.shape, &idx, args, target.span)?;
                        store(Rc::make_mut(t), &offs, &v, value.span)?;
                        if let (true, Some(tp)) = (tracked, self.tape.as_mut()) {
                            let op = Op::NoGrad("assigning elements of a tensor".into());
                            tp.record(slot.clone(), op, target.span);
                        }
                    }
                    _ => return Err(LangError::invalid(target.span, "cannot assign to this")),
                }
            }
            StmtKind::Equation(eq) => {
                let t = {
                    let lookup = |n: &str| env.get(n).cloned();
                    einsum::eval_equation(eq, &lookup, self.limits.max_equation_iterations)?
                };
                let mut v = Value::tensor(t);
                if let Some(tp) = self.tape.as_mut() {
                    let mut names = Vec::new();
                    rhs_names(&eq.rhs, &mut names);
                    let vals: Vec<(String, Value, Option<usize>)> = names
                        .into_iter()
                        .filter_map(|n| {
                            let val = env.get(&n)?.clone();
                            let id = tp.id_of(&val);
                            Some((n, val, id))
                        })
                        .collect();
                    if vals.iter().any(|x| x.2.is_some()) {
                        let op = Op::Einsum(Rc::new(eq.clone()), Rc::new(vals));
                        v = tp.record(v, op, eq.rhs.span);
                    }
                }
                match env.get_mut(&eq.target) {
                    Some(slot) => *slot = v,
                    None => env.set_new(&eq.target, v),
                }
            }
            StmtKind::Learnable {
                name,
                name_span,
                ty,
                init,
            } => {
                let t = self.init_learnable(env, name, ty, init)?;
                let t = Rc::new(t);
                self.tape.get_or_insert_with(Tape::new).leaf(&t, *name_span);
                if !self.learnables.contains(name) {
                    self.learnables.push(name.clone());
                }
                env.set_new(name, Value::Tensor(t));
            }
            StmtKind::Learn(lb) => self.run_learn(env, lb)?,
            StmtKind::Expr(e) => {
                self.eval(env, e)?;
            }
            StmtKind::If { cond, then, els } => {
                if self.eval_bool(env, cond)? {
                    return self.block(env, then);
                } else if let Some(e) = els {
                    return self.block(env, e);
                }
            }
            StmtKind::While { cond, body } => {
                while self.eval_bool(env, cond)? {
                    self.step(s.span)?;
                    if let Flow::Return(v) = self.block(env, body)? {
                        return Ok(Flow::Return(v));
                    }
                }
            }
            StmtKind::For {
                var,
                start,
                end,
                body,
                ..
            } => {
                let a = self.eval_int(env, start)?;
                let b = self.eval_int(env, end)?;
                for i in a..b {
                    self.step(s.span)?;
                    env.scopes
                        .push(HashMap::from([(var.clone(), Value::Int(i))]));
                    let r = self.block(env, body);
                    env.scopes.pop();
                    if let Flow::Return(v) = r? {
                        return Ok(Flow::Return(v));
                    }
                }
            }
            StmtKind::Return(v) => {
                let v = match v {
                    Some(e) => self.eval(env, e)?,
                    None => Value::Unit,
                };
                return Ok(Flow::Return(v));
            }
            StmtKind::Assert { cond, message } => {
                if !self.eval_bool(env, cond)? {
                    return Err(LangError::Assert {
                        span: cond.span,
                        message: message
                            .clone()
                            .unwrap_or_else(|| "condition is false".into()),
                    });
                }
            }
            StmtKind::Fact(a) => {
                let rel = self.logic.rel_id(&a.name, a.name_span)?;
                let mut args = Vec::new();
                for e in &a.args {
                    if let ExprKind::Var(v) = &e.kind {
                        if env.get(v).is_none() {
                            args.push(ConstKey::Sym(v.clone()));
                            continue;
                        }
                    }
                    args.push(match self.eval(env, e)? {
                        Value::Int(i) => ConstKey::Int(i),
                        Value::Str(s) => ConstKey::Sym(s.to_string()),
                        other => {
                            return Err(LangError::ty(
                                e.span,
                                "an int or string",
                                other.type_name(),
                            ))
                        }
                    });
                }
                self.logic.add_fact(rel, args, a.span)?;
            }
            StmtKind::Query(a) => {
                let (vars, rows) = self.logic.query(a, &self.checker)?;
                let mut text = String::new();
                let head: Vec<String> = a
                    .args
                    .iter()
                    .map(|e| match &e.kind {
                        ExprKind::Var(v) | ExprKind::Str(v) => v.clone(),
                        ExprKind::Int(i) => i.to_string(),
                        _ => "?".into(),
                    })
                    .collect();
                text.push_str(&format!("?- {}({}).\n", a.name, head.join(", ")));
                if vars.is_empty() {
                    text.push_str(if rows.is_empty() {
                        "false.\n"
                    } else {
                        "true.\n"
                    });
                } else {
                    for row in &rows {
                        let parts: Vec<String> = vars
                            .iter()
                            .zip(row)
                            .map(|(v, c)| format!("{v} = {c}"))
                            .collect();
                        text.push_str(&parts.join(", "));
                        text.push('\n');
                    }
                    text.push_str(&format!(
                        "({} answer{})\n",
                        rows.len(),
                        if rows.len() == 1 { "" } else { "s" }
                    ));
                }
                self.out
                    .write_all(text.as_bytes())
                    .map_err(|e| LangError::Io {
                        span: None,
                        path: "<stdout>".into(),
                        message: e.to_string(),
                    })?;
            }
        }
        Ok(Flow::Next)
    }

    fn eval_bool(&mut self, env: &mut Env, e: &Expr) -> Result<bool> {
        match self.eval(env, e)? {
            Value::Bool(b) => Ok(b),
            // A comparison of tracked scalars (rank-0 tensors).
            Value::Tensor(t) if t.shape.is_empty() && matches!(t.data, TData::Bool(_)) => {
                Ok(matches!(&t.data, TData::Bool(v) if v.first() == Some(&true)))
            }
            other => Err(LangError::ty(e.span, "bool", other.type_name())),
        }
    }

    fn eval_int(&mut self, env: &mut Env, e: &Expr) -> Result<i64> {
        match self.eval(env, e)? {
            Value::Int(i) => Ok(i),
            other => Err(LangError::ty(e.span, "int", other.type_name())),
        }
    }

    fn eval_index_args(&mut self, env: &mut Env, args: &[IndexArg]) -> Result<Vec<Idx>> {
        let mut out = Vec::new();
        for a in args {
            out.push(match a {
                IndexArg::At(e) => Idx::At(self.eval_int(env, e)?),
                IndexArg::Range(lo, hi) => Idx::Range(
                    match lo {
                        Some(e) => Some(self.eval_int(env, e)?),
                        None => None,
                    },
                    match hi {
                        Some(e) => Some(self.eval_int(env, e)?),
                        None => None,
                    },
                ),
            });
        }
        Ok(out)
    }

    fn eval(&mut self, env: &mut Env, e: &Expr) -> Result<Value> {
        if self.eval_depth >= MAX_EVAL_DEPTH {
            return Err(LangError::Limit {
                span: e.span,
                message: format!("expressions and calls nested deeper than {MAX_EVAL_DEPTH}"),
            });
        }
        self.eval_depth += 1;
        let r = self.eval_inner(env, e);
        self.eval_depth -= 1;
        r
    }

    fn eval_inner(&mut self, env: &mut Env, e: &Expr) -> Result<Value> {
        Ok(match &e.kind {
            ExprKind::Int(i) => Value::Int(*i),
            ExprKind::Float(f) => Value::Float(*f),
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::Str(s) => Value::Str(s.as_str().into()),
            ExprKind::Var(name) => env.get(name).cloned().ok_or_else(|| LangError::Undefined {
                span: e.span,
                what: "variable",
                name: name.clone(),
            })?,
            ExprKind::TensorLit(elems) => {
                let mut vals = Vec::with_capacity(elems.len());
                for el in elems {
                    vals.push((self.eval(env, el)?, el.span));
                }
                let tracked = self.any_tracked(&vals);
                let v = tensor_literal(vals, e.span)?;
                self.record_if(tracked, v, || Op::NoGrad("a tensor literal".into()), e.span)
            }
            ExprKind::Unary(op, x) => {
                let v = self.eval(env, x)?;
                match (op, v) {
                    (UnOp::Neg, Value::Int(i)) => Value::Int(
                        i.checked_neg()
                            .ok_or_else(|| LangError::invalid(e.span, "integer overflow"))?,
                    ),
                    (UnOp::Neg, Value::Float(f)) => Value::Float(-f),
                    (UnOp::Neg, Value::Tensor(t)) => {
                        let z = Value::tensor(Tens::f32(vec![], vec![0.0]));
                        let x = Value::Tensor(t);
                        let out = tensor_binary(BinOp::Sub, &z, &x, e.span, usize::MAX)?;
                        match self.tape.as_mut() {
                            Some(tp) if tp.id_of(&x).is_some() => {
                                let op =
                                    tp.input(&x).map_or_else(|| Op::NoGrad("-".into()), Op::Neg);
                                tp.record(out, op, e.span)
                            }
                            _ => out,
                        }
                    }
                    (UnOp::Not, Value::Bool(b)) => Value::Bool(!b),
                    (UnOp::Not, Value::Tensor(t)) => match &t.data {
                        TData::Bool(v) => Value::tensor(Tens {
                            shape: t.shape.clone(),
                            data: TData::Bool(v.iter().map(|b| !b).collect()),
                        }),
                        _ => {
                            return Err(LangError::ty(
                                x.span,
                                "bool tensor",
                                Value::Tensor(t.clone()).type_name(),
                            ))
                        }
                    },
                    (_, v) => return Err(LangError::ty(x.span, "a number or bool", v.type_name())),
                }
            }
            ExprKind::Binary(op, a, b) => {
                if matches!(op, BinOp::And | BinOp::Or) {
                    let l = self.eval_bool(env, a)?;
                    if (*op == BinOp::And && !l) || (*op == BinOp::Or && l) {
                        return Ok(Value::Bool(l));
                    }
                    return Ok(Value::Bool(self.eval_bool(env, b)?));
                }
                if let Some(v) = self.silu_mul(env, *op, a, b, e.span)? {
                    return Ok(v);
                }
                let l = self.eval(env, a)?;
                let r = self.eval(env, b)?;
                match self.tape.as_mut() {
                    Some(tp) if tp.id_of(&l).is_some() || tp.id_of(&r).is_some() => {
                        let bop = *op;
                        let op = match (bop, tp.input(&l), tp.input(&r)) {
                            (
                                BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div,
                                Some(x),
                                Some(y),
                            ) => Some(Op::Binary(bop, x, y)),
                            (BinOp::Rem, _, _) => Some(Op::NoGrad("%".into())),
                            // Comparisons are constants.
                            _ => None,
                        };
                        let out = binary(bop, l, r, e.span, b.span, self.limits.max_elements)?;
                        match (op, self.tape.as_mut()) {
                            (Some(op), Some(tp)) => tp.record(out, op, e.span),
                            _ => out,
                        }
                    }
                    _ => binary(*op, l, r, e.span, b.span, self.limits.max_elements)?,
                }
            }
            ExprKind::Juxt(_) => {
                return Err(LangError::invalid(
                    e.span,
                    "juxtaposed factors outside a tensor equation",
                ))
            }
            ExprKind::Call {
                name,
                name_span,
                args,
            } => {
                let mut vals = Vec::with_capacity(args.len());
                for a in args {
                    vals.push((self.eval(env, a)?, a.span));
                }
                if let Some(f) = self.fns.get(name).cloned() {
                    return self.call_fn(&f, vals, e.span);
                }
                match name.as_str() {
                    "grad" => return self.grad(&vals, e.span),
                    "save" => return self.save(env, &vals, e.span),
                    "manual_seed" => {
                        let seed = match vals.first() {
                            Some((Value::Int(i), _)) => *i as u64,
                            _ => 0,
                        };
                        self.init_rng = rand::SeedableRng::seed_from_u64(seed);
                        return Ok(Value::Unit);
                    }
                    "sigmoid" if vals.len() == 2 => {
                        // sigmoid(x, T) = sigmoid(x / T), recorded as the two
                        // operations it is.
                        let mut it = vals.into_iter();
                        let (x, xs) = it
                            .next()
                            .ok_or_else(|| LangError::invalid(e.span, "sigmoid needs x"))?;
                        let (t, ts) = it
                            .next()
                            .ok_or_else(|| LangError::invalid(e.span, "sigmoid needs T"))?;
                        let tracked = self.any_tracked(&[(x.clone(), xs), (t.clone(), ts)]);
                        let div = match self.tape.as_ref().filter(|_| tracked) {
                            Some(tp) => match (tp.input(&x), tp.input(&t)) {
                                (Some(a), Some(b)) => Some(Op::Binary(BinOp::Div, a, b)),
                                _ => None,
                            },
                            None => None,
                        };
                        let q = binary(BinOp::Div, x, t, e.span, ts, self.limits.max_elements)?;
                        let q = match (div, self.tape.as_mut()) {
                            (Some(op), Some(tp)) => tp.record(q, op, e.span),
                            _ => q,
                        };
                        let args = vec![(q, xs)];
                        let mut ctx = Ctx {
                            out: &mut *self.out,
                            args: &self.args,
                            fixpoint_limit: &mut self.logic.limit,
                            max_elements: self.limits.max_elements,
                            device: self.device,
                        };
                        let y = builtins::call("sigmoid", e.span, &args, &mut ctx)?;
                        return Ok(self.record_builtin("sigmoid", &args, y, e.span));
                    }
                    _ => {}
                }
                if builtins::lookup(name).is_none() {
                    return Err(LangError::Undefined {
                        span: *name_span,
                        what: "function",
                        name: name.clone(),
                    });
                }
                let mut ctx = Ctx {
                    out: &mut *self.out,
                    args: &self.args,
                    fixpoint_limit: &mut self.logic.limit,
                    max_elements: self.limits.max_elements,
                    device: self.device,
                };
                let y = builtins::call(name, e.span, &vals, &mut ctx)?;
                self.record_builtin(name, &vals, y, e.span)
            }
            ExprKind::Index(base, args) => {
                let b = self.eval(env, base)?;
                let idx = self.eval_index_args(env, args)?;
                if let Value::Node(m, path) = &b {
                    let [Idx::At(i)] = idx[..] else {
                        return Err(LangError::invalid(
                            e.span,
                            format!("`model.{path}[…]` takes one integer index"),
                        ));
                    };
                    return m.index(path, i, e.span);
                }
                let Value::Tensor(t) = b else {
                    return Err(LangError::ty(base.span, "a tensor", b.type_name()));
                };
                let (shape, offs) = region(&t.shape, &idx, args, e.span)?;
                let x = Value::Tensor(t);
                let Value::Tensor(t) = &x else {
                    return Err(LangError::ty(base.span, "a tensor", x.type_name()));
                };
                let out = gather(t, shape, &offs, e.span)?;
                match self.tape.as_mut() {
                    Some(tp) if tp.id_of(&x).is_some() => match tp.input(&x) {
                        Some(i) => tp.record(out, Op::Gather(i, Rc::new(offs)), e.span),
                        None => out,
                    },
                    _ => out,
                }
            }
            ExprKind::Field(base, field) => match self.eval(env, base)? {
                Value::Model(m) => m.field(None, field, e.span)?,
                Value::Node(m, path) => m.field(Some(&path), field, e.span)?,
                other => {
                    return Err(LangError::ty(
                        base.span,
                        format!("a model (to read `.{field}`)"),
                        other.type_name(),
                    ))
                }
            },
        })
    }

    /// `silu(g) * u` of f32 tensors of one shape, as the native forward's
    /// gated FFN computes it: one pass (`tl_core`'s `silu_mul`, the bits
    /// of `silu` then `*`) and one output instead of two. `None` when the
    /// expression is anything else, or a program records operations for
    /// gradients; `g` is evaluated before `u` either way.
    fn silu_mul(
        &mut self,
        env: &mut Env,
        op: BinOp,
        a: &Expr,
        b: &Expr,
        span: Span,
    ) -> Result<Option<Value>> {
        let ExprKind::Call { name, args, .. } = &a.kind else {
            return Ok(None);
        };
        if op != BinOp::Mul
            || name != "silu"
            || args.len() != 1
            || self.tape.is_some()
            || self.fns.contains_key("silu")
        {
            return Ok(None);
        }
        let Some(ga) = args.first() else {
            return Ok(None);
        };
        let g = self.eval(env, ga)?;
        let g = match g {
            Value::Tensor(t) if matches!(t.data, TData::F32(_)) => t,
            other => {
                // Not an f32 tensor: `silu` as the builtin does it, then `*`.
                let mut ctx = Ctx {
                    out: &mut *self.out,
                    args: &self.args,
                    fixpoint_limit: &mut self.logic.limit,
                    max_elements: self.limits.max_elements,
                    device: self.device,
                };
                let l = builtins::call("silu", a.span, &[(other, ga.span)], &mut ctx)?;
                let r = self.eval(env, b)?;
                return binary(op, l, r, span, b.span, self.limits.max_elements).map(Some);
            }
        };
        let r = self.eval(env, b)?;
        if let (TData::F32(gv), Value::Tensor(ut)) = (&g.data, &r) {
            if let (TData::F32(uv), true) = (&ut.data, ut.shape == g.shape) {
                let mut y = gv.clone();
                tl_core::cpu::kernels::silu_mul(&mut y, uv);
                return Ok(Some(Value::tensor(Tens::f32(g.shape.clone(), y))));
            }
        }
        let mut ctx = Ctx {
            out: &mut *self.out,
            args: &self.args,
            fixpoint_limit: &mut self.logic.limit,
            max_elements: self.limits.max_elements,
            device: self.device,
        };
        let l = builtins::call("silu", a.span, &[(Value::Tensor(g), ga.span)], &mut ctx)?;
        binary(op, l, r, span, b.span, self.limits.max_elements).map(Some)
    }

    fn call_fn(&mut self, f: &FnDef, args: Vec<(Value, Span)>, span: Span) -> Result<Value> {
        if args.len() != f.params.len() {
            return Err(LangError::Arity {
                span,
                name: f.name.clone(),
                expected: f.params.len().to_string(),
                got: args.len(),
            });
        }
        if self.depth >= MAX_CALL_DEPTH {
            return Err(LangError::invalid(
                span,
                format!("calls nested deeper than {MAX_CALL_DEPTH} (unbounded recursion?)"),
            ));
        }
        let mut bind: HashMap<String, usize> = HashMap::new();
        let mut scope = HashMap::new();
        for (p, (v, sp)) in f.params.iter().zip(args) {
            check_shape(&p.ty, &v, &mut bind, sp, &f.name)?;
            let v = match (&p.ty, v) {
                (TypeExpr::Float, Value::Int(i)) => Value::Float(i as f64),
                (_, v) => v,
            };
            scope.insert(p.name.clone(), v);
        }
        let mut env = Env {
            scopes: vec![scope],
        };
        self.depth += 1;
        let r = self.block(&mut env, &f.body);
        self.depth -= 1;
        let v = match r? {
            Flow::Return(v) => v,
            Flow::Next => Value::Unit,
        };
        if let Some(rt) = &f.ret {
            check_shape(rt, &v, &mut bind, span, &f.name)?;
            return match (rt, v) {
                (TypeExpr::Float, Value::Int(i)) => Ok(Value::Float(i as f64)),
                (_, v) => Ok(v),
            };
        }
        Ok(v)
    }
}

/// One statement of a `linear` group: its name, declared type, call span
/// and evaluated arguments.
type LinearCall<'s> = (&'s String, &'s Option<TypeExpr>, Span, Vec<(Value, Span)>);

/// Binds the grouped statements' names to their results, in order.
fn bind_linears(env: &mut Env, calls: &[LinearCall<'_>], ys: Vec<Value>) -> Result<()> {
    for ((name, ty, span, _), y) in calls.iter().zip(ys) {
        let y = match ty {
            Some(t) => convert(y, t, *span)?,
            None => y,
        };
        env.set_new(name, y);
    }
    Ok(())
}

/// Most `linear` statements run as one product (`tl_core`'s fused
/// dispatch takes up to four weights).
const MAX_FUSED_LINEAR: usize = 4;

/// `let NAME[: T] = linear(X, w[, b])` with `X` a variable and `w`, `b`
/// read without calls (variables, fields, indices, literals), so that
/// evaluating them has no effect: (NAME, X, the variables `w` and `b`
/// read).
fn linear_let(s: &Stmt) -> Option<(&str, &str, Vec<&str>)> {
    let StmtKind::Let { name, value, .. } = &s.kind else {
        return None;
    };
    let ExprKind::Call { name: f, args, .. } = &value.kind else {
        return None;
    };
    if f != "linear" || !(2..=3).contains(&args.len()) {
        return None;
    }
    let ExprKind::Var(x) = &args.first()?.kind else {
        return None;
    };
    let mut reads = Vec::new();
    for a in &args[1..] {
        if !pure_reads(a, &mut reads) {
            return None;
        }
    }
    Some((name, x, reads))
}

/// Whether `e` is variables, fields, indices and literals only; pushes the
/// variables it reads.
fn pure_reads<'a>(e: &'a Expr, out: &mut Vec<&'a str>) -> bool {
    match &e.kind {
        ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Bool(_) | ExprKind::Str(_) => true,
        ExprKind::Var(n) => {
            out.push(n);
            true
        }
        ExprKind::Field(b, _) => pure_reads(b, out),
        ExprKind::Index(b, idx) => {
            pure_reads(b, out)
                && idx.iter().all(|i| match i {
                    IndexArg::At(e) => pure_reads(e, out),
                    IndexArg::Range(..) => false,
                })
        }
        _ => false,
    }
}

/// The variables a tensor equation's right side reads.
fn rhs_names(e: &Expr, out: &mut Vec<String>) {
    match &e.kind {
        ExprKind::Var(n) if !out.contains(n) => out.push(n.clone()),
        ExprKind::Index(b, _) => rhs_names(b, out),
        ExprKind::Unary(_, a) => rhs_names(a, out),
        ExprKind::Binary(_, a, b) => {
            rhs_names(a, out);
            rhs_names(b, out);
        }
        ExprKind::Juxt(fs) => fs.iter().for_each(|f| rhs_names(f, out)),
        ExprKind::Call { args, .. } => args.iter().for_each(|a| rhs_names(a, out)),
        _ => {}
    }
}

/// Rows `rows` (along the first axis) of `t`, in that order.
fn take_rows(t: &Tens, rows: &[usize], span: Span) -> Result<Tens> {
    let inner: usize = t.shape.iter().skip(1).product();
    let mut shape = t.shape.clone();
    if let Some(d0) = shape.first_mut() {
        *d0 = rows.len();
    }
    fn pick<T: Copy>(v: &[T], rows: &[usize], inner: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(rows.len() * inner);
        for &r in rows {
            out.extend_from_slice(v.get(r * inner..(r + 1) * inner).unwrap_or(&[]));
        }
        out
    }
    Ok(match &t.data {
        TData::F32(v) => Tens::f32(shape, pick(v, rows, inner)),
        TData::I32(v) => Tens {
            shape,
            data: TData::I32(pick(v, rows, inner)),
        },
        TData::Bool(v) => Tens {
            shape,
            data: TData::Bool(pick(v, rows, inner)),
        },
        TData::Core(_) => Tens::f32(shape, pick(&t.to_f32(span)?, rows, inner)),
    })
}

/// PyTorch's fan-in and fan-out of a weight of this shape (`[out, in,
/// receptive field…]`; a vector counts its length for both).
fn fans(shape: &[usize]) -> (f64, f64) {
    match shape {
        [] => (1.0, 1.0),
        [n] => (*n as f64, *n as f64),
        [o, i, rest @ ..] => {
            let rf: usize = rest.iter().product();
            ((i * rf) as f64, (o * rf) as f64)
        }
    }
}

fn normal_sample(rng: &mut rand_chacha::ChaCha8Rng) -> f64 {
    use rand::Rng;
    // Box–Muller.
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl Interp {
    fn any_tracked(&self, vals: &[(Value, Span)]) -> bool {
        self.tape
            .as_ref()
            .is_some_and(|tp| vals.iter().any(|(v, _)| tp.id_of(v).is_some()))
    }

    fn record_if(&mut self, tracked: bool, v: Value, op: impl FnOnce() -> Op, span: Span) -> Value {
        match self.tape.as_mut() {
            Some(tp) if tracked => tp.record(v, op(), span),
            _ => v,
        }
    }

    /// Records a builtin call that read a tracked tensor.
    fn record_builtin(
        &mut self,
        name: &str,
        args: &[(Value, Span)],
        y: Value,
        span: Span,
    ) -> Value {
        if !self.any_tracked(args) {
            return y;
        }
        match self.tape.as_mut() {
            Some(tp) => {
                let op = tp.builtin_op(name, args);
                tp.record(y, op, span)
            }
            None => y,
        }
    }

    /// `grad(loss, x)`.
    fn grad(&mut self, vals: &[(Value, Span)], span: Span) -> Result<Value> {
        let [(loss, ls), (x, xs)] = vals else {
            return Err(LangError::Arity {
                span,
                name: "grad".into(),
                expected: "2".into(),
                got: vals.len(),
            });
        };
        let Value::Tensor(xt) = x else {
            return Err(LangError::ty(*xs, "an f32 tensor", x.type_name()));
        };
        let tape = self.tape.as_ref();
        let Some(xid) = tape.and_then(|tp| tp.id_of(x)) else {
            return Err(LangError::invalid(
                *xs,
                "`grad`: this tensor is neither learnable nor computed from a learnable tensor; declare it with `learnable`",
            ));
        };
        let n = match loss {
            Value::Tensor(t) => t.len(),
            Value::Float(_) | Value::Int(_) => 1,
            other => return Err(LangError::ty(*ls, "a scalar loss", other.type_name())),
        };
        if n != 1 {
            return Err(LangError::shape(
                *ls,
                format!("`grad` differentiates a scalar, found {}", loss.type_name()),
            ));
        }
        let zeros = || Value::tensor(Tens::f32(xt.shape.clone(), vec![0.0; xt.len()]));
        let (Some(tp), Some(lid)) = (tape, tape.and_then(|tp| tp.id_of(loss))) else {
            return Ok(zeros());
        };
        if lid < xid {
            return Ok(zeros());
        }
        let g = tp.backward(lid, &[xid], self.limits.max_equation_iterations)?;
        let g = g.into_iter().next().unwrap_or_default();
        Ok(Value::tensor(Tens::f32(xt.shape.clone(), g)))
    }

    /// The learnable tensors in scope, in declaration order.
    fn params_in(&self, env: &Env) -> Vec<(String, Rc<Tens>)> {
        self.learnables
            .iter()
            .filter_map(|n| match env.get(n) {
                Some(Value::Tensor(t)) => Some((n.clone(), t.clone())),
                _ => None,
            })
            .collect()
    }

    /// `save(path)`: the learnable tensors in scope, to safetensors.
    fn save(&mut self, env: &Env, vals: &[(Value, Span)], span: Span) -> Result<Value> {
        let Some((Value::Str(path), ps)) = vals.first() else {
            return Err(LangError::ty(span, "a file name", "nothing"));
        };
        let params = self.params_in(env);
        if params.is_empty() {
            return Err(LangError::invalid(
                span,
                "`save`: no learnable tensors in scope",
            ));
        }
        let mut bufs = Vec::new();
        for (name, t) in &params {
            let bytes: Vec<u8> = t
                .to_f32(span)?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            bufs.push((name.clone(), t.shape.clone(), bytes));
        }
        let mut views = Vec::new();
        for (name, shape, bytes) in &bufs {
            let v =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map_err(|e| LangError::invalid(span, format!("save: {e}")))?;
            views.push((name.clone(), v));
        }
        let out = safetensors::serialize(views, None)
            .map_err(|e| LangError::invalid(span, format!("save: {e}")))?;
        std::fs::write(&**path, out).map_err(|e| LangError::Io {
            span: Some(*ps),
            path: path.to_string(),
            message: e.to_string(),
        })?;
        Ok(Value::Unit)
    }

    /// The initial value of `learnable name: ty = init;`.
    fn init_learnable(
        &mut self,
        env: &mut Env,
        name: &str,
        ty: &TypeExpr,
        init: &Expr,
    ) -> Result<Tens> {
        let TypeExpr::Tensor(_, dims) = ty else {
            return Err(LangError::ty(
                init.span,
                "an f32 tensor type",
                "another type",
            ));
        };
        let mut shape = Vec::new();
        let mut known = true;
        for d in dims {
            match d {
                Dim::Lit(n) => shape.push(*n),
                Dim::Named(n) => match env.get(n) {
                    Some(Value::Int(i)) if *i >= 0 => shape.push(*i as usize),
                    _ => {
                        return Err(LangError::invalid(
                            init.span,
                            format!("dimension `{n}` must be an int ≥ 0"),
                        ))
                    }
                },
                Dim::Unknown => known = false,
            }
        }
        let total = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let n = match total {
            Some(t) if t <= self.limits.max_elements => t,
            _ => {
                return Err(LangError::Limit {
                    span: init.span,
                    message: format!("a learnable tensor of shape {shape:?} is too large"),
                })
            }
        };
        let num = |v: &Value| match v {
            Value::Int(i) => *i as f64,
            Value::Float(f) => *f,
            _ => 0.0,
        };
        let (fan_in, fan_out) = fans(&shape);
        let fill = |rng: &mut rand_chacha::ChaCha8Rng, kind: &str, a: f64, b: f64| -> Vec<f32> {
            use rand::Rng;
            (0..n)
                .map(|_| match kind {
                    "normal" => (a + b * normal_sample(rng)) as f32,
                    _ => rng.gen_range(a..=b) as f32,
                })
                .collect()
        };
        let (kind, args): (&str, Vec<Value>) = match &init.kind {
            ExprKind::Var(k) if matches!(k.as_str(), "zeros" | "ones" | "xavier" | "kaiming") => {
                (k.as_str(), Vec::new())
            }
            ExprKind::Call { name: k, args, .. }
                if matches!(
                    k.as_str(),
                    "normal" | "uniform" | "xavier" | "kaiming" | "load"
                ) =>
            {
                let mut vs = Vec::new();
                for a in args {
                    vs.push(self.eval(env, a)?);
                }
                (k.as_str(), vs)
            }
            _ => ("value", Vec::new()),
        };
        let data = match kind {
            "zeros" => vec![0.0; n],
            "ones" => vec![1.0; n],
            "normal" | "uniform" => {
                let (a, b) = (args.first().map_or(0.0, num), args.get(1).map_or(1.0, num));
                if kind == "uniform" && b < a {
                    return Err(LangError::invalid(
                        init.span,
                        "uniform(lo, hi) needs lo ≤ hi",
                    ));
                }
                if kind == "normal" && b < 0.0 {
                    return Err(LangError::invalid(
                        init.span,
                        "normal(mean, std) needs std ≥ 0",
                    ));
                }
                fill(&mut self.init_rng, kind, a, b)
            }
            "xavier" => {
                // xavier_uniform_ (gain 1).
                let a = (6.0 / (fan_in + fan_out)).sqrt();
                fill(&mut self.init_rng, "uniform", -a, a)
            }
            "kaiming" => {
                // kaiming_normal_ for ReLU: std = sqrt(2 / fan_in).
                fill(&mut self.init_rng, "normal", 0.0, (2.0 / fan_in).sqrt())
            }
            "load" => {
                let path = match args.first() {
                    Some(Value::Str(p)) => p.to_string(),
                    _ => String::new(),
                };
                let key = match args.get(1) {
                    Some(Value::Str(k)) => k.to_string(),
                    _ => name.to_string(),
                };
                let t = load_safetensor(&path, &key, init.span)?;
                check_declared(&t, dims, &shape, known, name, init.span)?;
                return Ok(t);
            }
            _ => {
                let v = self.eval(env, init)?;
                if let Some(c) = num_value(&v).filter(|_| !matches!(v, Value::Tensor(_))) {
                    if !known {
                        return Err(LangError::invalid(
                            init.span,
                            "a constant fill needs the tensor's whole shape",
                        ));
                    }
                    return Ok(Tens::f32(shape, vec![c as f32; n]));
                }
                let Value::Tensor(t) = v else {
                    return Err(LangError::ty(init.span, "a tensor", v.type_name()));
                };
                let t = Tens::f32(t.shape.clone(), t.to_f32(init.span)?);
                check_declared(&t, dims, &shape, known, name, init.span)?;
                return Ok(t);
            }
        };
        Ok(Tens::f32(shape, data))
    }

    /// Runs a `learn` block: minibatches, forward, backward, updates.
    fn run_learn(&mut self, env: &mut Env, lb: &LearnBlock) -> Result<()> {
        use rand::seq::SliceRandom;
        let params = self.params_in(env);
        if params.is_empty() {
            return Err(LangError::invalid(
                lb.span,
                "`learn`: no learnable tensors in scope (declare them with `learnable`)",
            ));
        }
        let int_of = |this: &mut Interp, env: &mut Env, key: &str, default: i64| -> Result<i64> {
            match lb.get(key).map(|s| &s.value) {
                Some(LearnValue::Expr(e)) => {
                    let v = this.eval_int(env, e)?;
                    if v < 0 {
                        return Err(LangError::invalid(e.span, format!("`{key}` must be ≥ 0")));
                    }
                    Ok(v)
                }
                _ => Ok(default),
            }
        };
        let epochs = int_of(self, env, "epochs", 1)? as u64;
        let seed = int_of(self, env, "seed", 0)? as u64;
        let log_every = int_of(self, env, "log_every", 0)? as u64;
        let batch_given = int_of(self, env, "batch_size", 0)? as usize;
        let shuffle = match lb.get("shuffle").map(|s| &s.value) {
            Some(LearnValue::Expr(e)) => self.eval_bool(env, e)?,
            _ => true,
        };
        let clip = match lb.get("clip_norm").map(|s| &s.value) {
            Some(LearnValue::Expr(e)) => Some(self.eval_float(env, e)? as f32),
            _ => None,
        };
        // Optimizer.
        let mut opt = crate::learn::Optimizer::new(
            crate::learn::Kind::Sgd {
                momentum: 0.0,
                dampening: 0.0,
                nesterov: false,
            },
            0.01,
        );
        if let Some(LearnValue::Choice { name, args, .. }) = lb.get("optimizer").map(|s| &s.value) {
            let mut kv: Vec<(&str, Value, Span)> = Vec::new();
            for (k, _, e) in args {
                kv.push((k.as_str(), self.eval(env, e)?, e.span));
            }
            let f = |k: &str, d: f64| -> f64 {
                kv.iter()
                    .find(|(n, _, _)| *n == k)
                    .map_or(d, |(_, v, _)| num_value(v).unwrap_or(d))
            };
            let kind = match name.as_str() {
                "adam" => crate::learn::Kind::Adam,
                "adamw" => crate::learn::Kind::AdamW,
                _ => crate::learn::Kind::Sgd {
                    momentum: f("momentum", 0.0) as f32,
                    dampening: f("dampening", 0.0) as f32,
                    nesterov: kv
                        .iter()
                        .any(|(n, v, _)| *n == "nesterov" && matches!(v, Value::Bool(true))),
                },
            };
            opt = crate::learn::Optimizer::new(
                kind,
                f("lr", if name == "sgd" { 0.01 } else { 0.001 }) as f32,
            );
            opt.eps = f("eps", 1e-8) as f32;
            opt.weight_decay = f("weight_decay", if name == "adamw" { 0.01 } else { 0.0 }) as f32;
            if let Some((_, v, sp)) = kv.iter().find(|(n, _, _)| *n == "betas") {
                let b = match v {
                    Value::Tensor(t) if t.len() == 2 => t.to_f32(*sp)?,
                    other => {
                        return Err(LangError::shape(
                            *sp,
                            format!(
                                "betas must be two numbers `[b1, b2]`, found {}",
                                other.type_name()
                            ),
                        ))
                    }
                };
                opt.betas = (b[0], b[1]);
            }
            if opt.lr.is_nan() || opt.lr < 0.0 {
                return Err(LangError::invalid(lb.span, "the learning rate must be ≥ 0"));
            }
        }
        let schedule = match lb.get("schedule").map(|s| &s.value) {
            Some(LearnValue::Choice { name, args, .. }) => {
                let mut kv: Vec<(&str, Value)> = Vec::new();
                for (k, _, e) in args {
                    kv.push((k.as_str(), self.eval(env, e)?));
                }
                let f = |k: &str, d: f64| -> f64 {
                    kv.iter()
                        .find(|(n, _)| *n == k)
                        .map_or(d, |(_, v)| num_value(v).unwrap_or(d))
                };
                match name.as_str() {
                    "cosine" => crate::learn::Schedule::Cosine {
                        warmup: f("warmup", 0.0).max(0.0) as u64,
                        min_lr: f("min_lr", 0.0) as f32,
                    },
                    "warmup" => crate::learn::Schedule::Warmup {
                        steps: f("steps", 0.0).max(0.0) as u64,
                    },
                    _ => crate::learn::Schedule::Constant,
                }
            }
            _ => crate::learn::Schedule::Constant,
        };
        // Data.
        let mut data = Vec::new();
        let mut n_rows: Option<(usize, Span)> = None;
        for src in &lb.sources {
            let v = self.eval(env, src)?;
            let Value::Tensor(t) = v else {
                return Err(LangError::ty(src.span, "a data tensor", v.type_name()));
            };
            let Some(&rows) = t.shape.first() else {
                return Err(LangError::shape(
                    src.span,
                    "a data tensor needs a first axis",
                ));
            };
            match n_rows {
                Some((m, _)) if m != rows => {
                    return Err(LangError::shape(
                        src.span,
                        format!("data tensors must have the same first dimension: {m} and {rows}"),
                    ))
                }
                _ => n_rows = Some((rows, src.span)),
            }
            data.push(t);
        }
        let n = n_rows.map_or(1, |(r, _)| r);
        if n == 0 {
            return Err(LangError::invalid(
                lb.span,
                "`learn`: the data tensors have no rows",
            ));
        }
        let batch = if batch_given == 0 {
            n
        } else {
            batch_given.min(n)
        };
        let steps_per_epoch = n.div_ceil(batch) as u64;
        let total = epochs * steps_per_epoch;
        let Some(LearnValue::Expr(loss_expr)) = lb.get("loss").map(|s| &s.value) else {
            return Err(LangError::invalid(lb.span, "`learn` needs `loss = …;`"));
        };
        let mut rng: rand_chacha::ChaCha8Rng = rand::SeedableRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..n).collect();
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let mut step = 0u64;
        for epoch in 0..epochs {
            if shuffle && !lb.data.is_empty() {
                order.shuffle(&mut rng);
            }
            let mut epoch_loss = 0.0f64;
            for b in 0..steps_per_epoch as usize {
                self.step(lb.span)?;
                let rows = &order[b * batch..((b + 1) * batch).min(n)];
                let mut scope = HashMap::new();
                for ((name, _), t) in lb.data.iter().zip(&data) {
                    scope.insert(name.clone(), Value::tensor(take_rows(t, rows, lb.span)?));
                }
                // A fresh tape with the parameters as its leaves (room for
                // as many nodes as the last step recorded).
                let mut tape = Tape::with_capacity(self.tape.as_ref().map_or(0, Tape::len));
                let mut ids = Vec::new();
                for name in &names {
                    if let Some(Value::Tensor(t)) = env.get(name) {
                        ids.push(tape.leaf(t, lb.span));
                    }
                }
                self.tape = Some(tape);
                env.scopes.push(scope);
                let r = self.eval(env, loss_expr);
                env.scopes.pop();
                let loss = r?;
                let (lval, lid) = match &loss {
                    Value::Float(f) => (*f, None),
                    Value::Int(i) => (*i as f64, None),
                    Value::Tensor(t) if t.len() == 1 => (
                        f64::from(t.to_f32(loss_expr.span)?.first().copied().unwrap_or(0.0)),
                        self.tape.as_ref().and_then(|tp| tp.id_of(&loss)),
                    ),
                    other => {
                        return Err(LangError::shape(
                            loss_expr.span,
                            format!("the loss must be a scalar, found {}", other.type_name()),
                        ))
                    }
                };
                if !lval.is_finite() {
                    return Err(LangError::invalid(
                        loss_expr.span,
                        format!(
                            "the loss is {lval} at epoch {}, step {} (learning rate too high, or log/division of 0?)",
                            epoch + 1,
                            b + 1
                        ),
                    ));
                }
                let Some(lid) = lid else {
                    return Err(LangError::invalid(
                        loss_expr.span,
                        "the loss does not depend on any learnable tensor",
                    ));
                };
                epoch_loss += lval;
                let mut grads = match self.tape.as_ref() {
                    Some(tp) => tp.backward(lid, &ids, self.limits.max_equation_iterations)?,
                    None => Vec::new(),
                };
                if grads.iter().flatten().any(|g| !g.is_finite()) {
                    return Err(LangError::invalid(
                        loss_expr.span,
                        format!(
                            "a gradient of the loss is not finite at epoch {}, step {}",
                            epoch + 1,
                            b + 1
                        ),
                    ));
                }
                if let Some(c) = clip {
                    crate::learn::clip_norm(&mut grads, c);
                }
                let lr = schedule.lr(opt.lr, step, total);
                let mut values: Vec<Vec<f32>> = Vec::new();
                let mut shapes = Vec::new();
                for name in &names {
                    if let Some(Value::Tensor(t)) = env.get(name) {
                        values.push(t.to_f32(lb.span)?);
                        shapes.push(t.shape.clone());
                    }
                }
                opt.step(&mut values, &grads, lr);
                grads.into_iter().for_each(crate::bufs::give);
                for ((name, v), shape) in names.iter().zip(values).zip(shapes) {
                    if let Some(slot) = env.get_mut(name) {
                        *slot = Value::tensor(Tens::f32(shape, v));
                    }
                }
                step += 1;
            }
            if log_every > 0 && (epoch + 1) % log_every == 0 {
                let mean = epoch_loss / steps_per_epoch.max(1) as f64;
                self.write_out(&format!("epoch {}: loss {mean:.6}\n", epoch + 1));
            }
        }
        // Afterwards the learned values are the leaves of a fresh tape.
        let mut tape = Tape::new();
        for name in &names {
            if let Some(Value::Tensor(t)) = env.get(name) {
                tape.leaf(t, lb.span);
            }
        }
        self.tape = Some(tape);
        Ok(())
    }

    fn eval_float(&mut self, env: &mut Env, e: &Expr) -> Result<f64> {
        let v = self.eval(env, e)?;
        num_value(&v).ok_or_else(|| LangError::ty(e.span, "a number", v.type_name()))
    }
}

fn num_value(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        Value::Tensor(t) if t.len() == 1 => t
            .to_f32(Span::default())
            .ok()
            .and_then(|x| x.first().map(|&y| f64::from(y))),
        _ => None,
    }
}

fn check_declared(
    t: &Tens,
    dims: &[Dim],
    shape: &[usize],
    known: bool,
    name: &str,
    span: Span,
) -> Result<()> {
    let ok = t.shape.len() == dims.len()
        && (!known || t.shape == shape)
        && dims.iter().zip(&t.shape).all(|(d, &n)| match d {
            Dim::Lit(m) => *m == n,
            _ => true,
        });
    if ok {
        Ok(())
    } else {
        Err(LangError::shape(
            span,
            format!(
                "`{name}` is declared {} but its initial value is {:?}",
                crate::types::dims_string(dims),
                t.shape
            ),
        ))
    }
}

/// Tensor `key` of a safetensors file, as f32.
fn load_safetensor(path: &str, key: &str, span: Span) -> Result<Tens> {
    let io = |m: String| LangError::Io {
        span: Some(span),
        path: path.to_string(),
        message: m,
    };
    let bytes = std::fs::read(path).map_err(|e| io(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(e.to_string()))?;
    let v = st
        .tensor(key)
        .map_err(|_| io(format!("no tensor named `{key}`")))?;
    let raw = v.data();
    let data: Vec<f32> = match v.dtype() {
        safetensors::Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(io(format!(
                "`{key}` is {other:?}; f32, f16 or bf16 expected"
            )))
        }
    };
    Ok(Tens::f32(v.shape().to_vec(), data))
}

fn collect_eqs<'a>(stmts: &'a [Stmt], out: &mut Vec<&'a Equation>) {
    for s in stmts {
        match &s.kind {
            StmtKind::Equation(eq) => out.push(eq),
            StmtKind::If { then, els, .. } => {
                collect_eqs(&then.stmts, out);
                if let Some(e) = els {
                    collect_eqs(&e.stmts, out);
                }
            }
            StmtKind::While { body, .. } | StmtKind::For { body, .. } => {
                collect_eqs(&body.stmts, out)
            }
            _ => {}
        }
    }
}

/// Runtime check of a value against a declared type, binding named dims.
fn check_shape(
    t: &TypeExpr,
    v: &Value,
    bind: &mut HashMap<String, usize>,
    span: Span,
    fname: &str,
) -> Result<()> {
    match (t, v) {
        (TypeExpr::Model, Value::Model(_)) | (TypeExpr::Cache, Value::Cache(_)) => return Ok(()),
        (TypeExpr::Model | TypeExpr::Cache, _) => {
            return Err(LangError::ty(
                span,
                format!(
                    "{} (argument of `{fname}`)",
                    crate::types::Type::from_expr(t)
                ),
                v.type_name(),
            ))
        }
        _ => {}
    }
    let TypeExpr::Tensor(_, dims) = t else {
        return Ok(());
    };
    let Value::Tensor(x) = v else {
        return Err(LangError::ty(span, "a tensor", v.type_name()));
    };
    let bad = || {
        LangError::shape(
            span,
            format!(
                "`{fname}` expects {}, found {:?}",
                crate::types::dims_string(dims),
                x.shape
            ),
        )
    };
    if dims.len() != x.shape.len() {
        return Err(bad());
    }
    for (d, &n) in dims.iter().zip(&x.shape) {
        match d {
            Dim::Lit(m) if *m != n => return Err(bad()),
            Dim::Named(name) => match bind.get(name) {
                Some(&m) if m != n => {
                    return Err(LangError::shape(
                        span,
                        format!("dimension `{name}` of `{fname}` is {m} from an earlier argument but {n} here"),
                    ))
                }
                _ => {
                    bind.insert(name.clone(), n);
                }
            },
            _ => {}
        }
    }
    Ok(())
}

/// A `let` with a declared type: widen ints, convert tensor dtypes, check
/// literal dims.
fn convert(v: Value, t: &TypeExpr, span: Span) -> Result<Value> {
    Ok(match (t, v) {
        (TypeExpr::Float, Value::Int(i)) => Value::Float(i as f64),
        (TypeExpr::Tensor(el, dims), Value::Tensor(x)) => {
            if dims.len() != x.shape.len()
                || dims
                    .iter()
                    .zip(&x.shape)
                    .any(|(d, &n)| matches!(d, Dim::Lit(m) if *m != n))
            {
                return Err(LangError::shape(
                    span,
                    format!(
                        "expected {}, found {:?}",
                        crate::types::dims_string(dims),
                        x.shape
                    ),
                ));
            }
            if *el != ElemType::Quant && x.elem() != *el {
                Value::tensor(x.cast(*el, span)?)
            } else {
                Value::Tensor(x)
            }
        }
        (_, v) => v,
    })
}

#[derive(Clone, Copy, Debug)]
enum Idx {
    At(i64),
    Range(Option<i64>, Option<i64>),
}

/// The shape and flat offsets of `shape[idx…]` (negative or too large
/// indices are errors).
fn region(
    shape: &[usize],
    idx: &[Idx],
    args: &[IndexArg],
    span: Span,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if idx.len() > shape.len() {
        return Err(LangError::shape(
            span,
            format!("{} indices into a tensor of shape {shape:?}", idx.len()),
        ));
    }
    let strides = {
        let mut s = vec![1usize; shape.len()];
        for k in (0..shape.len().saturating_sub(1)).rev() {
            s[k] = s[k + 1] * shape[k + 1];
        }
        s
    };
    let arg_span = |k: usize| match args.get(k) {
        Some(IndexArg::At(e)) => e.span,
        Some(IndexArg::Range(Some(e), _)) => e.span,
        _ => span,
    };
    // Per dim: (start, len, keep_dim)
    let mut ranges = Vec::new();
    for (k, &n) in shape.iter().enumerate() {
        match idx.get(k) {
            None => ranges.push((0usize, n, true)),
            Some(Idx::At(i)) => {
                if *i < 0 || *i as usize >= n {
                    return Err(LangError::Index {
                        span: arg_span(k),
                        index: *i,
                        len: n,
                    });
                }
                ranges.push((*i as usize, 1, false));
            }
            Some(Idx::Range(lo, hi)) => {
                let lo = lo.unwrap_or(0);
                let hi = hi.unwrap_or(n as i64);
                let hi_span = match args.get(k) {
                    Some(IndexArg::Range(_, Some(e))) => e.span,
                    _ => arg_span(k),
                };
                if lo < 0 || lo as usize > n {
                    return Err(LangError::Index {
                        span: arg_span(k),
                        index: lo,
                        len: n,
                    });
                }
                if hi < lo || hi as usize > n {
                    return Err(LangError::Index {
                        span: hi_span,
                        index: hi,
                        len: n,
                    });
                }
                ranges.push((lo as usize, (hi - lo) as usize, true));
            }
        }
    }
    let out_shape: Vec<usize> = ranges.iter().filter(|r| r.2).map(|r| r.1).collect();
    let mut offs = vec![0usize];
    for (k, &(start, len, _)) in ranges.iter().enumerate() {
        let mut next = Vec::with_capacity(offs.len() * len);
        for &o in &offs {
            for j in 0..len {
                next.push(o + (start + j) * strides[k]);
            }
        }
        offs = next;
    }
    Ok((out_shape, offs))
}

fn gather(t: &Tens, shape: Vec<usize>, offs: &[usize], span: Span) -> Result<Value> {
    let scalar = shape.is_empty();
    let data = match &t.data {
        TData::F32(v) => {
            let d: Vec<f32> = offs
                .iter()
                .map(|&o| v.get(o).copied().unwrap_or(0.0))
                .collect();
            if scalar {
                return Ok(Value::Float(f64::from(d.first().copied().unwrap_or(0.0))));
            }
            TData::F32(d)
        }
        TData::I32(v) => {
            let d: Vec<i32> = offs
                .iter()
                .map(|&o| v.get(o).copied().unwrap_or(0))
                .collect();
            if scalar {
                return Ok(Value::Int(i64::from(d.first().copied().unwrap_or(0))));
            }
            TData::I32(d)
        }
        TData::Bool(v) => {
            let d: Vec<bool> = offs
                .iter()
                .map(|&o| v.get(o).copied().unwrap_or(false))
                .collect();
            if scalar {
                return Ok(Value::Bool(d.first().copied().unwrap_or(false)));
            }
            TData::Bool(d)
        }
        TData::Core(_) => {
            let f = t.to_f32(span)?;
            let d: Vec<f32> = offs
                .iter()
                .map(|&o| f.get(o).copied().unwrap_or(0.0))
                .collect();
            if scalar {
                return Ok(Value::Float(f64::from(d.first().copied().unwrap_or(0.0))));
            }
            let elem = t.elem();
            return Ok(Value::tensor(Tens::f32(shape, d).cast(elem, span)?));
        }
    };
    Ok(Value::tensor(Tens { shape, data }))
}

fn store(t: &mut Tens, offs: &[usize], v: &Value, span: Span) -> Result<()> {
    let src: Vec<f64> = match v {
        Value::Int(i) => vec![*i as f64],
        Value::Float(f) => vec![*f],
        Value::Bool(b) => vec![f64::from(u8::from(*b))],
        Value::Tensor(x) => {
            if x.len() != offs.len() {
                return Err(LangError::shape(
                    span,
                    format!(
                        "assigning {:?} to a region of {} elements",
                        x.shape,
                        offs.len()
                    ),
                ));
            }
            x.to_f32(span)?.into_iter().map(f64::from).collect()
        }
        other => return Err(LangError::ty(span, "a number or tensor", other.type_name())),
    };
    let at = |k: usize| {
        if src.len() == 1 {
            src[0]
        } else {
            src.get(k).copied().unwrap_or(0.0)
        }
    };
    match &mut t.data {
        TData::F32(d) => {
            for (k, &o) in offs.iter().enumerate() {
                if let Some(x) = d.get_mut(o) {
                    *x = at(k) as f32;
                }
            }
        }
        TData::I32(d) => {
            for (k, &o) in offs.iter().enumerate() {
                if let Some(x) = d.get_mut(o) {
                    *x = at(k) as i32;
                }
            }
        }
        TData::Bool(d) => {
            for (k, &o) in offs.iter().enumerate() {
                if let Some(x) = d.get_mut(o) {
                    *x = at(k) != 0.0;
                }
            }
        }
        TData::Core(_) => {
            let elem = t.elem();
            let mut f = t.to_f32(span)?;
            for (k, &o) in offs.iter().enumerate() {
                if let Some(x) = f.get_mut(o) {
                    *x = at(k) as f32;
                }
            }
            *t = Tens::f32(t.shape.clone(), f).cast(elem, span)?;
        }
    }
    Ok(())
}

fn tensor_literal(vals: Vec<(Value, Span)>, span: Span) -> Result<Value> {
    let n = vals.len();
    let all_int = vals.iter().all(|(v, _)| matches!(v, Value::Int(_)));
    let all_bool = vals.iter().all(|(v, _)| matches!(v, Value::Bool(_)));
    if all_int {
        let mut d = Vec::with_capacity(n);
        for (v, s) in &vals {
            if let Value::Int(i) = v {
                d.push(
                    i32::try_from(*i)
                        .map_err(|_| LangError::invalid(*s, format!("{i} does not fit i32")))?,
                );
            }
        }
        return Ok(Value::tensor(Tens {
            shape: vec![n],
            data: TData::I32(d),
        }));
    }
    if all_bool {
        let d = vals
            .iter()
            .map(|(v, _)| matches!(v, Value::Bool(true)))
            .collect();
        return Ok(Value::tensor(Tens {
            shape: vec![n],
            data: TData::Bool(d),
        }));
    }
    let mut inner: Option<Vec<usize>> = None;
    let mut data = Vec::new();
    let mut all_i32 = true;
    for (v, s) in &vals {
        match v {
            Value::Int(i) => {
                check_row(&mut inner, &[], *s)?;
                data.push(*i as f32);
                all_i32 = false;
            }
            Value::Float(f) => {
                check_row(&mut inner, &[], *s)?;
                data.push(*f as f32);
                all_i32 = false;
            }
            Value::Tensor(t) => {
                check_row(&mut inner, &t.shape, *s)?;
                all_i32 &= t.elem() == ElemType::I32;
                data.extend(t.to_f32(*s)?);
            }
            other => return Err(LangError::ty(*s, "a number or tensor", other.type_name())),
        }
    }
    let mut shape = vec![n];
    shape.extend(inner.unwrap_or_default());
    let t = Tens::f32(shape, data);
    Ok(Value::tensor(if all_i32 {
        t.cast(ElemType::I32, span)?
    } else {
        t
    }))
}

fn check_row(inner: &mut Option<Vec<usize>>, shape: &[usize], span: Span) -> Result<()> {
    match inner {
        None => *inner = Some(shape.to_vec()),
        Some(s) if s == shape => {}
        Some(s) => {
            return Err(LangError::shape(
                span,
                format!("tensor literal rows differ: {s:?} and {shape:?}"),
            ))
        }
    }
    Ok(())
}

fn binary(
    op: BinOp,
    l: Value,
    r: Value,
    span: Span,
    rspan: Span,
    max_elements: usize,
) -> Result<Value> {
    use BinOp::*;
    let overflow = || LangError::invalid(span, "integer overflow");
    Ok(match (l, r) {
        (Value::Int(a), Value::Int(b)) => match op {
            Add => Value::Int(a.checked_add(b).ok_or_else(overflow)?),
            Sub => Value::Int(a.checked_sub(b).ok_or_else(overflow)?),
            Mul => Value::Int(a.checked_mul(b).ok_or_else(overflow)?),
            Div | Rem if b == 0 => return Err(LangError::DivisionByZero { span: rspan }),
            Div => Value::Int(a.checked_div(b).ok_or_else(overflow)?),
            Rem => Value::Int(a.checked_rem(b).ok_or_else(overflow)?),
            _ => Value::Bool(cmp(op, a.cmp(&b))),
        },
        (a @ (Value::Int(_) | Value::Float(_)), b @ (Value::Int(_) | Value::Float(_))) => {
            let x = num(&a);
            let y = num(&b);
            match op {
                Add => Value::Float(x + y),
                Sub => Value::Float(x - y),
                Mul => Value::Float(x * y),
                Div | Rem if y == 0.0 => return Err(LangError::DivisionByZero { span: rspan }),
                Div => Value::Float(x / y),
                Rem => Value::Float(x % y),
                _ => Value::Bool(match x.partial_cmp(&y) {
                    Some(o) => cmp(op, o),
                    None => op == Ne,
                }),
            }
        }
        (Value::Str(a), Value::Str(b)) => match op {
            Add => {
                if a.len() + b.len() > max_elements {
                    return Err(LangError::Limit {
                        span,
                        message: format!("a string of more than {max_elements} bytes"),
                    });
                }
                Value::Str(format!("{a}{b}").into())
            }
            Eq => Value::Bool(a == b),
            Ne => Value::Bool(a != b),
            _ => {
                return Err(LangError::ty(
                    span,
                    "operands that accept strings",
                    "string",
                ))
            }
        },
        (Value::Bool(a), Value::Bool(b)) => match op {
            Eq => Value::Bool(a == b),
            Ne => Value::Bool(a != b),
            _ => return Err(LangError::ty(span, "numbers", "bool")),
        },
        (l, r) => tensor_binary(op, &l, &r, span, max_elements)?,
    })
}

fn num(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::Float(f) => *f,
        _ => 0.0,
    }
}

fn cmp(op: BinOp, o: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        BinOp::Eq => o == Equal,
        BinOp::Ne => o != Equal,
        BinOp::Lt => o == Less,
        BinOp::Le => o != Greater,
        BinOp::Gt => o == Greater,
        BinOp::Ge => o != Less,
        _ => false,
    }
}

/// Elementwise op with numpy broadcasting; i32 op i32 stays i32.
fn tensor_binary(
    op: BinOp,
    l: &Value,
    r: &Value,
    span: Span,
    max_elements: usize,
) -> Result<Value> {
    let as_t = |v: &Value| -> Result<Rc<Tens>> {
        Ok(match v {
            Value::Tensor(t) => t.clone(),
            Value::Int(i) => Rc::new(Tens {
                shape: vec![],
                data: TData::I32(vec![*i as i32]),
            }),
            Value::Float(f) => Rc::new(Tens::f32(vec![], vec![*f as f32])),
            other => return Err(LangError::ty(span, "a number or tensor", other.type_name())),
        })
    };
    let (a, b) = (as_t(l)?, as_t(r)?);
    let n = a.shape.len().max(b.shape.len());
    let mut shape = Vec::with_capacity(n);
    for k in 0..n {
        let da = (k + a.shape.len()).checked_sub(n).map_or(1, |i| a.shape[i]);
        let db = (k + b.shape.len()).checked_sub(n).map_or(1, |i| b.shape[i]);
        shape.push(match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(LangError::shape(
                    span,
                    format!(
                        "`{}` of {:?} and {:?} (shapes must be equal or broadcast)",
                        op.symbol(),
                        a.shape,
                        b.shape
                    ),
                ))
            }
        });
    }
    let idx_of = |t: &Tens, flat: usize| -> usize {
        // Map an output position to the operand's, broadcasting size-1 dims.
        let mut rem = flat;
        let mut off = 0;
        let mut stride = 1;
        for k in (0..n).rev() {
            let i = rem % shape[k];
            rem /= shape[k];
            if let Some(tk) = (k + t.shape.len()).checked_sub(n) {
                let d = t.shape[tk];
                if d != 1 {
                    off += i * stride;
                }
                stride *= d;
            }
        }
        off
    };
    let total = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let total = match total {
        Some(t) if t <= max_elements => t,
        _ => {
            return Err(LangError::Limit {
                span,
                message: format!(
                    "`{}` of {:?} and {:?} would exceed {max_elements} elements",
                    op.symbol(),
                    a.shape,
                    b.shape
                ),
            })
        }
    };
    if let (TData::F32(x), TData::F32(y), BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div) =
        (&a.data, &b.data, op)
    {
        if a.shape == shape {
            if let Some(n) = crate::autodiff::trailing(&shape, &b.shape).filter(|&n| n > 0) {
                // Same-shape f32 arithmetic (residuals, gated products), or
                // `b` repeated over the leading axes of `a` (a bias, a
                // position table, a scalar): one pass, no index mapping,
                // no copies of the operands.
                if y.len() == n && x.len().is_multiple_of(n) {
                    let out = crate::einsum::repeat_op(op, x, y);
                    return Ok(Value::tensor(Tens::f32(shape, out)));
                }
            }
        }
    }
    let both_int = a.elem() == ElemType::I32 && b.elem() == ElemType::I32;
    let is_cmp = matches!(
        op,
        BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
    );
    let (x, y) = (a.to_f32(span)?, b.to_f32(span)?);
    if both_int && !is_cmp {
        let (xi, yi): (Vec<i64>, Vec<i64>) = (
            x.iter().map(|&v| v as i64).collect(),
            y.iter().map(|&v| v as i64).collect(),
        );
        let mut out = Vec::with_capacity(total);
        for f in 0..total {
            let (p, q) = (xi[idx_of(&a, f)], yi[idx_of(&b, f)]);
            out.push(match op {
                BinOp::Add => p + q,
                BinOp::Sub => p - q,
                BinOp::Mul => p * q,
                BinOp::Div | BinOp::Rem if q == 0 => {
                    return Err(LangError::DivisionByZero { span })
                }
                BinOp::Div => p / q,
                _ => p % q,
            } as i32);
        }
        return Ok(Value::tensor(Tens {
            shape,
            data: TData::I32(out),
        }));
    }
    if is_cmp {
        let mut out = Vec::with_capacity(total);
        for f in 0..total {
            let (p, q) = (x[idx_of(&a, f)], y[idx_of(&b, f)]);
            out.push(match p.partial_cmp(&q) {
                Some(o) => cmp(op, o),
                None => op == BinOp::Ne,
            });
        }
        return Ok(Value::tensor(Tens {
            shape,
            data: TData::Bool(out),
        }));
    }
    let mut out = Vec::with_capacity(total);
    for f in 0..total {
        let (p, q) = (x[idx_of(&a, f)], y[idx_of(&b, f)]);
        out.push(match op {
            BinOp::Add => p + q,
            BinOp::Sub => p - q,
            BinOp::Mul => p * q,
            BinOp::Div => p / q,
            _ => p % q,
        });
    }
    Ok(Value::tensor(Tens::f32(shape, out)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The group length [`Interp::linear_group`] gives each statement of
    /// `src` (top-level statements).
    fn groups(src: &str) -> Vec<usize> {
        let prog = crate::parse_str(src).unwrap();
        let stmts: Vec<Stmt> = prog
            .items
            .into_iter()
            .filter_map(|i| match i {
                Item::Stmt(s) => Some(s),
                _ => None,
            })
            .collect();
        let it = Interp::new(Box::new(std::io::sink()));
        (0..stmts.len())
            .map(|i| it.linear_group(&stmts[i..]))
            .collect()
    }

    #[test]
    fn linear_lets_over_one_input_group() {
        // Q, K, V of one input: one group of three, then the tails.
        let src = "let q = linear(h, b.q.weight, b.q.bias);\n\
                   let k = linear(h, b.k.weight, b.k.bias);\n\
                   let v = linear(h, m.blk[l].v.weight);\n\
                   let o = linear(a, w);\n";
        assert_eq!(groups(src), vec![3, 2, 1, 1]);
    }

    #[test]
    fn linear_lets_that_depend_on_each_other_do_not_group() {
        // The second reads what the first binds.
        assert_eq!(
            groups("let q = linear(h, w);\nlet k = linear(h, q);\n"),
            vec![1, 1]
        );
        // The first rebinds the input the second reads.
        assert_eq!(
            groups("let h = linear(h, w);\nlet k = linear(h, w2);\n"),
            vec![1, 1]
        );
        // ...but rebinding it last is fine: it is read before.
        assert_eq!(
            groups("let k = linear(h, w2);\nlet h = linear(h, w);\n"),
            vec![2, 1]
        );
        // Another input, a call among the arguments, a computed input.
        assert_eq!(
            groups("let q = linear(h, w);\nlet k = linear(x, w2);\n"),
            vec![1, 1]
        );
        assert_eq!(
            groups("let q = linear(h, w);\nlet k = linear(h, f(w2));\n"),
            vec![1, 0]
        );
        assert_eq!(
            groups("let q = linear(h + 1, w);\nlet k = linear(h, w2);\n"),
            vec![0, 1]
        );
        // At most four in one product.
        let five = "let a = linear(h, w);\n".repeat(5);
        assert_eq!(groups(&five), vec![4, 4, 3, 2, 1]);
    }
}
