//! Name resolution and type/shape checking of a whole program before any
//! of it runs. The checker also decides which assignments are tensor
//! equations (rewriting them to [`StmtKind::Equation`]) so the runtime
//! never has to guess.

use std::collections::{HashMap, HashSet};

use crate::ast::*;
use crate::builtins;
use crate::diag::Span;
use crate::error::{LangError, Result};
use crate::logic::{is_logic_var_name, ConstKey};
use crate::types::{broadcast, dims_agree, dims_string, Type};

#[derive(Clone, Debug)]
pub struct FnSig {
    pub params: Vec<Type>,
    pub ret: Type,
}

#[derive(Clone, Debug)]
pub struct RelInfo {
    pub domains: Vec<String>,
}

/// What the checker knows about the program so far; kept between REPL
/// inputs.
#[derive(Default)]
pub struct Checker {
    pub fns: HashMap<String, FnSig>,
    pub relations: HashMap<String, RelInfo>,
    /// Constants seen in facts, per domain: decides whether a lowercase
    /// identifier in a rule is a constant or a variable.
    pub constants: HashMap<String, HashSet<ConstKey>>,
    globals: HashMap<String, Type>,
    scopes: Vec<HashMap<String, Type>>,
    ret: Option<Type>,
    in_fn: bool,
}

impl Checker {
    pub fn new() -> Checker {
        Checker::default()
    }

    /// Checks `prog` (appended to what was checked before) and rewrites
    /// its tensor equations.
    pub fn check_program(&mut self, prog: &mut Program) -> Result<()> {
        // Pass 1: declarations, so order of items does not matter.
        for item in &prog.items {
            match item {
                Item::Fn(f) => {
                    if builtins::lookup(&f.name).is_some() {
                        return Err(LangError::invalid(
                            f.name_span,
                            format!("`{}` is a builtin and cannot be redefined", f.name),
                        ));
                    }
                    let sig = FnSig {
                        params: f.params.iter().map(|p| Type::from_expr(&p.ty)).collect(),
                        ret: f.ret.as_ref().map_or(Type::Unit, Type::from_expr),
                    };
                    self.fns.insert(f.name.clone(), sig);
                }
                Item::Relation(r) => {
                    // Join indexes key argument positions by a 64-bit mask.
                    if r.args.len() > 64 {
                        return Err(LangError::invalid(
                            r.span,
                            format!(
                                "`{}` has {} arguments; relations have at most 64",
                                r.name,
                                r.args.len()
                            ),
                        ));
                    }
                    let info = RelInfo {
                        domains: r.args.iter().map(|(_, t)| t.clone()).collect(),
                    };
                    self.relations.insert(r.name.clone(), info);
                }
                _ => {}
            }
        }
        for item in &prog.items {
            if let Item::Fact(a) = item {
                {
                    let info = self.relation(a)?;
                    for (arg, dom) in a.args.iter().zip(&info.domains) {
                        let key = match &arg.kind {
                            ExprKind::Var(s) => ConstKey::Sym(s.clone()),
                            ExprKind::Str(s) => ConstKey::Sym(s.clone()),
                            ExprKind::Int(i) => ConstKey::Int(*i),
                            _ => return Err(LangError::invalid(
                                arg.span,
                                "a fact's arguments must be constants (names, integers or strings)",
                            )),
                        };
                        self.constants.entry(dom.clone()).or_default().insert(key);
                    }
                }
            }
        }
        // Pass 2: bodies, in order.
        for item in &mut prog.items {
            match item {
                Item::Import { .. } | Item::Relation(_) | Item::Fact(_) => {}
                Item::Fn(f) => self.check_fn(f)?,
                Item::Rule(_) => {}
                Item::Test(t) => {
                    self.in_fn = false;
                    self.ret = None;
                    self.scopes = vec![HashMap::new()];
                    self.block(&mut t.body)?;
                }
                Item::Stmt(s) => {
                    self.in_fn = false;
                    self.ret = None;
                    let mut scopes = vec![std::mem::take(&mut self.globals)];
                    std::mem::swap(&mut self.scopes, &mut scopes);
                    let r = self.stmt(s);
                    std::mem::swap(&mut self.scopes, &mut scopes);
                    self.globals = scopes.pop().unwrap_or_default();
                    r?;
                }
            }
        }
        // Pass 3: rules, once every fact statement has named its constants.
        for item in &prog.items {
            if let Item::Rule(r) = item {
                self.check_rule(r)?;
            }
        }
        Ok(())
    }

    /// The type of a top-level expression statement (for the REPL).
    pub fn global_type(&self, name: &str) -> Option<&Type> {
        self.globals.get(name)
    }

    fn relation(&self, a: &Atom) -> Result<RelInfo> {
        let info = self
            .relations
            .get(&a.name)
            .ok_or_else(|| LangError::Undefined {
                span: a.name_span,
                what: "relation",
                name: a.name.clone(),
            })?;
        if info.domains.len() != a.args.len() {
            return Err(LangError::Arity {
                span: a.span,
                name: a.name.clone(),
                expected: info.domains.len().to_string(),
                got: a.args.len(),
            });
        }
        Ok(info.clone())
    }

    /// Whether identifier `name` at a position of domain `dom` is a logic
    /// variable (else a constant).
    pub fn is_var(&self, name: &str, dom: &str) -> bool {
        is_logic_var_name(name)
            || !self
                .constants
                .get(dom)
                .is_some_and(|c| c.contains(&ConstKey::Sym(name.to_string())))
    }

    fn check_terms(&self, a: &Atom, vars: &mut HashMap<String, String>) -> Result<()> {
        let info = self.relation(a)?;
        for (arg, dom) in a.args.iter().zip(&info.domains) {
            match &arg.kind {
                ExprKind::Var(v) if v == "_" => {}
                ExprKind::Var(v) if self.is_var(v, dom) => {
                    if let Some(prev) = vars.get(v) {
                        if prev != dom {
                            return Err(LangError::ty(
                                arg.span,
                                format!("`{v}` of domain {prev}"),
                                format!("a use at a {dom} position"),
                            ));
                        }
                    } else {
                        vars.insert(v.clone(), dom.clone());
                    }
                }
                ExprKind::Var(_) | ExprKind::Int(_) | ExprKind::Str(_) => {}
                _ => {
                    return Err(LangError::invalid(
                        arg.span,
                        "arguments of a rule or query must be variables or constants",
                    ))
                }
            }
        }
        Ok(())
    }

    fn check_rule(&mut self, r: &Rule) -> Result<()> {
        let mut body_vars = HashMap::new();
        for a in &r.body {
            self.check_terms(a, &mut body_vars)?;
        }
        let mut head_vars = body_vars.clone();
        self.check_terms(&r.head, &mut head_vars)?;
        let info = self.relation(&r.head)?;
        for (arg, dom) in r.head.args.iter().zip(&info.domains) {
            if let ExprKind::Var(v) = &arg.kind {
                if v == "_" {
                    return Err(LangError::invalid(
                        arg.span,
                        "`_` cannot appear in the head of a rule",
                    ));
                }
                if self.is_var(v, dom) && !body_vars.contains_key(v) {
                    return Err(LangError::invalid(
                        arg.span,
                        format!("variable `{v}` in the head of a rule must appear in its body"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_fn(&mut self, f: &mut FnDef) -> Result<()> {
        self.in_fn = true;
        let ret = f.ret.as_ref().map_or(Type::Unit, Type::from_expr);
        self.ret = Some(ret.clone());
        let mut scope = HashMap::new();
        for p in &f.params {
            if scope
                .insert(p.name.clone(), Type::from_expr(&p.ty))
                .is_some()
            {
                return Err(LangError::invalid(
                    p.span,
                    format!("parameter `{}` appears twice", p.name),
                ));
            }
        }
        self.scopes = vec![scope];
        let returns = self.block(&mut f.body)?;
        if ret != Type::Unit && !returns {
            return Err(LangError::invalid(
                f.name_span,
                format!("`{}` must end with a `return` of {ret}", f.name),
            ));
        }
        self.in_fn = false;
        Ok(())
    }

    fn lookup(&self, name: &str) -> Option<&Type> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    fn declare(&mut self, name: &str, t: Type) {
        if let Some(s) = self.scopes.last_mut() {
            s.insert(name.to_string(), t);
        }
    }

    /// Checks a block in a new scope; true if it always returns.
    fn block(&mut self, b: &mut Block) -> Result<bool> {
        self.scopes.push(HashMap::new());
        let mut returns = false;
        let mut r = Ok(());
        for s in &mut b.stmts {
            match self.stmt(s) {
                Ok(ret) => returns |= ret,
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
        }
        self.scopes.pop();
        r.map(|()| returns)
    }

    /// Checks one statement; true if it always returns.
    fn stmt(&mut self, s: &mut Stmt) -> Result<bool> {
        let span = s.span;
        match &mut s.kind {
            StmtKind::Let {
                name,
                name_span,
                ty,
                value,
            } => {
                let vt = self.expr(value)?;
                let t = match ty {
                    Some(te) => {
                        let declared = Type::from_expr(te);
                        self.assignable(&declared, &vt, value.span)?;
                        refine(&declared, &vt)
                    }
                    None => vt,
                };
                if t == Type::Unit {
                    return Err(LangError::ty(*name_span, "a value", "()"));
                }
                self.declare(name, t);
            }
            StmtKind::Assign { target, value } => {
                if let Some(eq) = self.as_equation(target, value) {
                    s.kind = StmtKind::Equation(eq);
                    return self.stmt(s);
                }
                let vt = self.expr(value)?;
                match &target.kind {
                    ExprKind::Var(name) => {
                        let Some(t) = self.lookup(name).cloned() else {
                            return Err(LangError::Undefined {
                                span: target.span,
                                what: "variable",
                                name: name.clone(),
                            });
                        };
                        self.assignable(&t, &vt, value.span)?;
                    }
                    ExprKind::Index(base, _) => {
                        if !matches!(base.kind, ExprKind::Var(_)) {
                            return Err(LangError::invalid(
                                target.span,
                                "only a variable's elements can be assigned",
                            ));
                        }
                        let et = self.expr(target)?;
                        self.assignable(&et, &vt, value.span)?;
                    }
                    _ => {
                        return Err(LangError::invalid(
                            target.span,
                            "the left side of `=` must be a variable or an indexed variable",
                        ))
                    }
                }
            }
            StmtKind::Equation(eq) => {
                let t = self.equation(eq)?;
                if self.lookup(&eq.target).is_none() {
                    self.declare(&eq.target, t);
                } else {
                    for sc in self.scopes.iter_mut().rev() {
                        if let Some(slot) = sc.get_mut(&eq.target) {
                            *slot = t;
                            break;
                        }
                    }
                }
            }
            StmtKind::Expr(e) => {
                self.expr(e)?;
            }
            StmtKind::If { cond, then, els } => {
                self.expect_bool(cond)?;
                let a = self.block(then)?;
                let b = match els {
                    Some(e) => self.block(e)?,
                    None => false,
                };
                return Ok(a && b);
            }
            StmtKind::While { cond, body } => {
                self.expect_bool(cond)?;
                self.block(body)?;
            }
            StmtKind::For {
                var,
                start,
                end,
                body,
                ..
            } => {
                for e in [&mut *start, &mut *end] {
                    let t = self.expr(e)?;
                    if !matches!(t, Type::Int | Type::Any) {
                        return Err(LangError::ty(e.span, "int", t));
                    }
                }
                self.scopes.push(HashMap::from([(var.clone(), Type::Int)]));
                let r = self.block(body);
                self.scopes.pop();
                r?;
            }
            StmtKind::Return(v) => {
                if !self.in_fn {
                    return Err(LangError::invalid(span, "`return` outside a function"));
                }
                let vt = match v {
                    Some(e) => self.expr(e)?,
                    None => Type::Unit,
                };
                let ret = self.ret.clone().unwrap_or(Type::Unit);
                let at = v.as_ref().map_or(span, |e| e.span);
                if ret == Type::Unit && vt != Type::Unit {
                    return Err(LangError::ty(
                        at,
                        "no value (the function has no result type)",
                        vt,
                    ));
                }
                self.assignable(&ret, &vt, at)?;
                return Ok(true);
            }
            StmtKind::Assert { cond, .. } => self.expect_bool(cond)?,
            StmtKind::Fact(a) => {
                let info = self.relation(a)?;
                for (arg, dom) in a.args.iter_mut().zip(&info.domains) {
                    if let ExprKind::Var(v) = &arg.kind {
                        if self.lookup(v).is_none() {
                            // Not a variable in scope: a symbol constant.
                            self.constants
                                .entry(dom.clone())
                                .or_default()
                                .insert(ConstKey::Sym(v.clone()));
                            continue;
                        }
                    }
                    let t = self.expr(arg)?;
                    if !matches!(t, Type::Int | Type::Str | Type::Any) {
                        return Err(LangError::ty(arg.span, "an int or string constant", t));
                    }
                }
            }
            StmtKind::Query(a) => {
                self.check_terms(a, &mut HashMap::new())?;
            }
            StmtKind::Learnable {
                name,
                name_span,
                ty,
                init,
            } => {
                let t = self.learnable(name_span, ty, init)?;
                self.declare(name, t);
            }
            StmtKind::Learn(lb) => self.learn(lb)?,
        }
        Ok(false)
    }

    /// `learnable NAME: f32[dims] = INIT;`: the declared type (named dims
    /// are int variables in scope, known when the declaration runs).
    fn learnable(&mut self, name_span: &Span, ty: &TypeExpr, init: &mut Expr) -> Result<Type> {
        let TypeExpr::Tensor(ElemType::F32, dims) = ty else {
            return Err(LangError::ty(
                *name_span,
                "an f32 tensor type for a learnable tensor (`f32[4, 3]`)",
                Type::from_expr(ty),
            ));
        };
        let mut out = Vec::new();
        for d in dims {
            out.push(match d {
                Dim::Lit(n) => Dim::Lit(*n),
                Dim::Named(n) => match self.lookup(n) {
                    Some(Type::Int | Type::Any) => Dim::Unknown,
                    _ => {
                        return Err(LangError::invalid(
                            *name_span,
                            format!("dimension `{n}` of a learnable tensor must be an int variable in scope or a number"),
                        ))
                    }
                },
                Dim::Unknown => Dim::Unknown,
            });
        }
        let declared = Type::tensor(ElemType::F32, out);
        let init_span = init.span;
        match &mut init.kind {
            ExprKind::Var(n) if matches!(n.as_str(), "zeros" | "ones" | "xavier" | "kaiming") => {}
            ExprKind::Call { name, args, .. }
                if matches!(
                    name.as_str(),
                    "normal" | "uniform" | "xavier" | "kaiming" | "load"
                ) =>
            {
                let want: &[Type] = match name.as_str() {
                    "normal" | "uniform" => &[Type::Float, Type::Float],
                    "load" => &[Type::Str, Type::Str],
                    _ => &[],
                };
                let min = if name == "load" { 1 } else { want.len() };
                if args.len() < min || args.len() > want.len() {
                    return Err(LangError::Arity {
                        span: init_span,
                        name: name.clone(),
                        expected: if min == want.len() {
                            min.to_string()
                        } else {
                            format!("{min} to {}", want.len())
                        },
                        got: args.len(),
                    });
                }
                for (a, w) in args.iter_mut().zip(want) {
                    let t = self.expr(a)?;
                    let ok = match w {
                        Type::Float => t.is_numeric_scalar(),
                        other => t == *other || t == Type::Any,
                    };
                    if !ok {
                        return Err(LangError::ty(a.span, w, t));
                    }
                }
            }
            _ => {
                let t = self.expr(init)?;
                if t.is_numeric_scalar() {
                    // A constant fill (`learnable t: f32[] = 0.5;`).
                    return Ok(declared);
                }
                if !matches!(t, Type::Tensor(..) | Type::Any) {
                    return Err(LangError::ty(
                        init_span,
                        "an initializer (zeros, ones, normal(mean, std), uniform(lo, hi), xavier, kaiming, load(path)) or a tensor",
                        t,
                    ));
                }
                self.assignable(&declared, &t, init_span)?;
            }
        }
        let needs_shape = match &init.kind {
            ExprKind::Var(_) => true,
            ExprKind::Call { name, .. } => {
                matches!(name.as_str(), "normal" | "uniform" | "xavier" | "kaiming")
            }
            _ => false,
        };
        if needs_shape && dims.contains(&Dim::Unknown) {
            return Err(LangError::invalid(
                *name_span,
                "an initializer needs the tensor's whole shape; `?` dims are allowed only with `load` or a tensor value",
            ));
        }
        Ok(declared)
    }

    fn learn(&mut self, lb: &mut LearnBlock) -> Result<()> {
        if lb.data.len() != lb.sources.len() {
            return Err(LangError::invalid(
                lb.span,
                format!(
                    "`data` names {} minibatches for {} tensors",
                    lb.data.len(),
                    lb.sources.len()
                ),
            ));
        }
        let mut batch_types = Vec::new();
        let mut first: Option<(Dim, Span)> = None;
        for src in lb.sources.iter_mut() {
            let t = self.expr(src)?;
            let bt = match &t {
                Type::Tensor(e, Some(d)) if !d.is_empty() => {
                    let d0 = d[0].clone();
                    if let Some((prev, _)) = &first {
                        if !dims_agree(prev, &d0) {
                            return Err(LangError::shape(
                                src.span,
                                format!("data tensors must have the same first dimension (the examples): {prev} and {d0}"),
                            ));
                        }
                    } else {
                        first = Some((d0, src.span));
                    }
                    let mut nd = d.clone();
                    nd[0] = Dim::Unknown;
                    Type::tensor(*e, nd)
                }
                Type::Tensor(_, Some(_)) => {
                    return Err(LangError::shape(
                        src.span,
                        "a data tensor needs a first axis to batch over, found a rank-0 tensor",
                    ))
                }
                Type::Tensor(e, None) => Type::Tensor(*e, None),
                Type::Any => Type::Any,
                other => return Err(LangError::ty(src.span, "a data tensor", other)),
            };
            batch_types.push(bt);
        }
        self.scopes.push(HashMap::new());
        for ((n, _), t) in lb.data.iter().zip(batch_types) {
            self.declare(n, t);
        }
        let r = self.learn_settings(lb);
        self.scopes.pop();
        r
    }

    fn learn_settings(&mut self, lb: &mut LearnBlock) -> Result<()> {
        if lb.get("loss").is_none() {
            return Err(LangError::invalid(
                lb.span,
                "`learn` needs the objective to minimize: `loss = …;` (a scalar)",
            ));
        }
        let number = |t: &Type| matches!(t, Type::Int | Type::Float | Type::Any);
        for st in lb.settings.iter_mut() {
            match (st.key.as_str(), &mut st.value) {
                ("loss", LearnValue::Expr(e)) => {
                    let t = self.expr(e)?;
                    match &t {
                        Type::Float | Type::Any | Type::Tensor(ElemType::F32, None) => {}
                        Type::Tensor(ElemType::F32, Some(d)) if d.is_empty() => {}
                        Type::Tensor(ElemType::F32, Some(_)) => {
                            return Err(LangError::shape(
                                e.span,
                                format!("the loss must be a scalar (a float or f32[]), found {t}; reduce it, e.g. with mean(…)"),
                            ))
                        }
                        _ => return Err(LangError::ty(e.span, "a scalar loss (float or f32[])", t)),
                    }
                }
                (k @ ("epochs" | "batch_size" | "seed" | "log_every"), LearnValue::Expr(e)) => {
                    let t = self.expr(e)?;
                    if !matches!(t, Type::Int | Type::Any) {
                        return Err(LangError::ty(e.span, format!("an int (`{k}`)"), t));
                    }
                }
                ("clip_norm", LearnValue::Expr(e)) => {
                    let t = self.expr(e)?;
                    if !number(&t) {
                        return Err(LangError::ty(e.span, "a number (`clip_norm`)", t));
                    }
                }
                ("shuffle", LearnValue::Expr(e)) => {
                    let t = self.expr(e)?;
                    if !matches!(t, Type::Bool | Type::Any) {
                        return Err(LangError::ty(e.span, "a bool (`shuffle`)", t));
                    }
                }
                (
                    k @ ("optimizer" | "schedule"),
                    LearnValue::Choice {
                        name,
                        name_span,
                        args,
                    },
                ) => {
                    let allowed: &[&str] = match (k, name.as_str()) {
                        ("optimizer", "sgd") => {
                            &["lr", "momentum", "dampening", "nesterov", "weight_decay"]
                        }
                        ("optimizer", "adam" | "adamw") => &["lr", "betas", "eps", "weight_decay"],
                        ("schedule", "constant") => &[],
                        ("schedule", "cosine") => &["warmup", "min_lr"],
                        ("schedule", "warmup") => &["steps"],
                        ("optimizer", _) => {
                            return Err(LangError::invalid(
                                *name_span,
                                format!("unknown optimizer `{name}` (sgd, adam, adamw)"),
                            ))
                        }
                        _ => {
                            return Err(LangError::invalid(
                                *name_span,
                                format!("unknown schedule `{name}` (constant, cosine, warmup)"),
                            ))
                        }
                    };
                    for (an, asp, e) in args.iter_mut() {
                        if !allowed.contains(&an.as_str()) {
                            return Err(LangError::invalid(
                                *asp,
                                format!(
                                    "`{name}` has no argument `{an}` (it takes {})",
                                    if allowed.is_empty() {
                                        "none".to_string()
                                    } else {
                                        allowed.join(", ")
                                    }
                                ),
                            ));
                        }
                        let t = self.expr(e)?;
                        let ok = match an.as_str() {
                            "betas" => matches!(
                                &t,
                                Type::Any | Type::Tensor(ElemType::F32, None)
                            ) || matches!(&t, Type::Tensor(ElemType::F32, Some(d)) if d.len() == 1 && dims_agree(&d[0], &Dim::Lit(2))),
                            "nesterov" => matches!(t, Type::Bool | Type::Any),
                            "warmup" | "steps" => matches!(t, Type::Int | Type::Any),
                            _ => number(&t),
                        };
                        if !ok {
                            let want = match an.as_str() {
                                "betas" => "f32[2] (`[0.9, 0.999]`)",
                                "nesterov" => "bool",
                                "warmup" | "steps" => "int",
                                _ => "a number",
                            };
                            return Err(LangError::ty(e.span, want, t));
                        }
                    }
                }
                (k @ ("optimizer" | "schedule"), LearnValue::Expr(e)) => {
                    return Err(LangError::invalid(e.span, format!("`{k}` takes a name")))
                }
                (other, _) => {
                    return Err(LangError::invalid(
                        st.key_span,
                        format!("unknown setting `{other}` of `learn` (loss, optimizer, schedule, epochs, batch_size, clip_norm, seed, shuffle, log_every, data)"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// `X[i, j] = …` is a tensor equation when every index on the left is
    /// a plain name that is not a variable in scope.
    fn as_equation(&self, target: &Expr, value: &Expr) -> Option<Equation> {
        let ExprKind::Index(base, args) = &target.kind else {
            return None;
        };
        let ExprKind::Var(name) = &base.kind else {
            return None;
        };
        let mut indices = Vec::new();
        for a in args {
            match a {
                IndexArg::At(Expr {
                    kind: ExprKind::Var(v),
                    span,
                }) if self.lookup(v).is_none() => indices.push((v.clone(), *span)),
                _ => return None,
            }
        }
        Some(Equation {
            target: name.clone(),
            target_span: base.span,
            indices,
            rhs: value.clone(),
        })
    }

    fn equation(&mut self, eq: &Equation) -> Result<Type> {
        let mut seen = HashSet::new();
        for (i, sp) in &eq.indices {
            if !seen.insert(i.clone()) {
                return Err(LangError::invalid(
                    *sp,
                    format!("index `{i}` appears twice on the left side"),
                ));
            }
        }
        let mut dims: HashMap<String, (Dim, Span)> = HashMap::new();
        self.eq_expr(&eq.rhs, &mut dims)?;
        let mut out = Vec::new();
        for (i, sp) in &eq.indices {
            let Some((d, _)) = dims.get(i) else {
                return Err(LangError::invalid(
                    *sp,
                    format!("index `{i}` on the left does not appear on the right"),
                ));
            };
            out.push(d.clone());
        }
        Ok(Type::tensor(ElemType::F32, out))
    }

    fn eq_expr(&mut self, e: &Expr, dims: &mut HashMap<String, (Dim, Span)>) -> Result<()> {
        match &e.kind {
            ExprKind::Int(_) | ExprKind::Float(_) => Ok(()),
            ExprKind::Var(name) => match self.lookup(name) {
                Some(Type::Int | Type::Float | Type::Any) => Ok(()),
                Some(Type::Tensor(_, Some(d))) if d.is_empty() => Ok(()),
                Some(t) => Err(LangError::invalid(
                    e.span,
                    format!("`{name}` ({t}) needs indices in a tensor equation"),
                )),
                None => Err(LangError::Undefined {
                    span: e.span,
                    what: "variable",
                    name: name.clone(),
                }),
            },
            ExprKind::Index(base, args) => {
                let ExprKind::Var(name) = &base.kind else {
                    return Err(LangError::invalid(
                        base.span,
                        "a tensor equation indexes variables only",
                    ));
                };
                let t = self
                    .lookup(name)
                    .cloned()
                    .ok_or_else(|| LangError::Undefined {
                        span: base.span,
                        what: "variable",
                        name: name.clone(),
                    })?;
                let tdims = match &t {
                    Type::Tensor(ElemType::Quant, _) => {
                        return Err(LangError::ty(
                            base.span,
                            "an f32, f16, bf16, i32 or bool tensor",
                            t,
                        ))
                    }
                    Type::Tensor(_, d) => d.clone(),
                    Type::Any => None,
                    other => return Err(LangError::ty(base.span, "a tensor", other)),
                };
                if let Some(d) = &tdims {
                    if d.len() != args.len() {
                        return Err(LangError::shape(
                            e.span,
                            format!(
                                "`{name}` has rank {} ({}) but is indexed with {} indices",
                                d.len(),
                                dims_string(d),
                                args.len()
                            ),
                        ));
                    }
                }
                for (k, a) in args.iter().enumerate() {
                    let IndexArg::At(Expr {
                        kind: ExprKind::Var(v),
                        span,
                    }) = a
                    else {
                        return Err(LangError::invalid(
                            e.span,
                            "indices in a tensor equation must be index names",
                        ));
                    };
                    if self.lookup(v).is_some() {
                        return Err(LangError::invalid(
                            *span,
                            format!("index `{v}` is also a variable in scope; use another name"),
                        ));
                    }
                    let d = tdims
                        .as_ref()
                        .and_then(|d| d.get(k).cloned())
                        .unwrap_or(Dim::Unknown);
                    match dims.get(v) {
                        Some((prev, _)) if !dims_agree(prev, &d) => {
                            return Err(LangError::shape(
                                *span,
                                format!(
                                    "index `{v}` has size {prev} elsewhere but {d} in dimension {k} of `{name}`"
                                ),
                            ))
                        }
                        Some((Dim::Unknown, _)) | None => {
                            dims.insert(v.clone(), (d, *span));
                        }
                        Some(_) => {}
                    }
                }
                Ok(())
            }
            ExprKind::Unary(UnOp::Neg, x) => self.eq_expr(x, dims),
            ExprKind::Binary(BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div, a, b) => {
                self.eq_expr(a, dims)?;
                self.eq_expr(b, dims)
            }
            ExprKind::Juxt(fs) => {
                for f in fs {
                    self.eq_expr(f, dims)?;
                }
                Ok(())
            }
            ExprKind::Call {
                name,
                name_span,
                args,
            } => {
                if crate::einsum::scalar_fn(name).is_none() {
                    return Err(LangError::invalid(
                        *name_span,
                        format!("`{name}` cannot be used inside a tensor equation (only elementwise functions such as relu, exp, sigmoid can)"),
                    ));
                }
                let max = if name == "sigmoid" { 2 } else { 1 };
                if args.is_empty() || args.len() > max {
                    return Err(LangError::Arity {
                        span: e.span,
                        name: name.clone(),
                        expected: if max == 2 { "1 or 2" } else { "1" }.into(),
                        got: args.len(),
                    });
                }
                for a in args {
                    self.eq_expr(a, dims)?;
                }
                Ok(())
            }
            _ => Err(LangError::invalid(
                e.span,
                "this expression cannot appear in a tensor equation",
            )),
        }
    }

    fn expect_bool(&mut self, e: &mut Expr) -> Result<()> {
        let t = self.expr(e)?;
        if !matches!(t, Type::Bool | Type::Any) {
            return Err(LangError::ty(e.span, "bool", t));
        }
        Ok(())
    }

    /// Whether a value of type `found` may be stored where `want` is
    /// declared (ints widen to floats; tensor dtypes convert; shapes must
    /// agree).
    fn assignable(&self, want: &Type, found: &Type, span: Span) -> Result<()> {
        let ok = match (want, found) {
            (_, Type::Any) | (Type::Any, _) => true,
            (Type::Float, Type::Int) => true,
            (Type::Tensor(we, wd), Type::Tensor(fe, fd)) => {
                let elem_ok = *we == *fe
                    || (*we != ElemType::Bool && *fe != ElemType::Bool && *fe != ElemType::Quant);
                if !elem_ok {
                    return Err(LangError::ty(span, want, found));
                }
                if let (Some(wd), Some(fd)) = (wd, fd) {
                    if wd.len() != fd.len() || wd.iter().zip(fd).any(|(a, b)| !dims_agree(a, b)) {
                        return Err(LangError::shape(
                            span,
                            format!("expected {want}, found {found}"),
                        ));
                    }
                }
                true
            }
            (a, b) => a == b,
        };
        if ok {
            Ok(())
        } else {
            Err(LangError::ty(span, want, found))
        }
    }

    pub fn expr(&mut self, e: &mut Expr) -> Result<Type> {
        let span = e.span;
        Ok(match &mut e.kind {
            ExprKind::Int(_) => Type::Int,
            ExprKind::Float(_) => Type::Float,
            ExprKind::Bool(_) => Type::Bool,
            ExprKind::Str(_) => Type::Str,
            ExprKind::Var(name) => match self.lookup(name) {
                Some(t) => t.clone(),
                None => {
                    let what = if self.fns.contains_key(name.as_str()) {
                        return Err(LangError::invalid(
                            span,
                            format!("`{name}` is a function; call it with `{name}(…)`"),
                        ));
                    } else {
                        "variable"
                    };
                    return Err(LangError::Undefined {
                        span,
                        what,
                        name: name.clone(),
                    });
                }
            },
            ExprKind::TensorLit(elems) => {
                if elems.is_empty() {
                    return Err(LangError::invalid(span, "an empty tensor literal has no shape; use zeros(0)"));
                }
                let mut first: Option<Type> = None;
                for el in elems.iter_mut() {
                    let t = self.expr(el)?;
                    let t = match t {
                        Type::Int | Type::Float | Type::Bool | Type::Tensor(..) => t,
                        other => return Err(LangError::ty(el.span, "a number, bool or tensor", other)),
                    };
                    first = Some(match first {
                        None => t,
                        Some(prev) => lit_join(&prev, &t).ok_or_else(|| {
                            LangError::shape(
                                el.span,
                                format!("tensor literal rows differ: {prev} and {t}"),
                            )
                        })?,
                    });
                }
                let n = elems.len();
                match first {
                    Some(Type::Int) => Type::tensor(ElemType::I32, vec![Dim::Lit(n)]),
                    Some(Type::Float) => Type::tensor(ElemType::F32, vec![Dim::Lit(n)]),
                    Some(Type::Bool) => Type::tensor(ElemType::Bool, vec![Dim::Lit(n)]),
                    Some(Type::Tensor(el, Some(d))) => {
                        let mut dims = vec![Dim::Lit(n)];
                        dims.extend(d);
                        Type::tensor(el, dims)
                    }
                    _ => Type::Tensor(ElemType::F32, None),
                }
            }
            ExprKind::Unary(op, x) => {
                let t = self.expr(x)?;
                match (op, &t) {
                    (UnOp::Neg, Type::Int | Type::Float | Type::Any) => t,
                    (UnOp::Neg, Type::Tensor(el, _)) if *el != ElemType::Bool && *el != ElemType::Quant => t,
                    (UnOp::Not, Type::Bool | Type::Any) => t,
                    (UnOp::Not, Type::Tensor(ElemType::Bool, _)) => t,
                    (UnOp::Neg, _) => return Err(LangError::ty(x.span, "a number or numeric tensor", t)),
                    (UnOp::Not, _) => return Err(LangError::ty(x.span, "bool", t)),
                }
            }
            ExprKind::Binary(op, a, b) => {
                let op = *op;
                let ta = self.expr(a)?;
                let tb = self.expr(b)?;
                if matches!(op, BinOp::Div | BinOp::Rem)
                    && ta.is_numeric_scalar()
                    && matches!(b.kind, ExprKind::Int(0))
                    || matches!(b.kind, ExprKind::Float(f) if f == 0.0) && matches!(op, BinOp::Div | BinOp::Rem) && ta.is_numeric_scalar()
                {
                    return Err(LangError::DivisionByZero { span: b.span });
                }
                binary_type(op, &ta, &tb, span, a.span, b.span)?
            }
            ExprKind::Juxt(fs) => {
                return Err(LangError::invalid(
                    fs.get(1).map_or(span, |f| f.span),
                    "factors written side by side are a product only on the right side of a tensor equation `Y[i] = …`; use `*` here",
                ))
            }
            ExprKind::Call { name, name_span, args } => {
                let mut tys = Vec::with_capacity(args.len());
                for a in args.iter_mut() {
                    tys.push((self.expr(a)?, a.span));
                }
                if let Some(sig) = self.fns.get(name.as_str()).cloned() {
                    return call_type(name, &sig, &tys, span);
                }
                if builtins::lookup(name).is_some() {
                    return builtins::check(name, *name_span, span, &tys, args);
                }
                return Err(LangError::Undefined {
                    span: *name_span,
                    what: "function",
                    name: name.clone(),
                });
            }
            ExprKind::Index(base, args) => {
                let bt = self.expr(base)?;
                let mut idx_types = Vec::new();
                for a in args.iter_mut() {
                    match a {
                        IndexArg::At(x) => idx_types.push((true, Some((self.expr(x)?, x.span)), None)),
                        IndexArg::Range(lo, hi) => {
                            let l = match lo { Some(x) => Some((self.expr(x)?, x.span)), None => None };
                            let h = match hi { Some(x) => Some((self.expr(x)?, x.span)), None => None };
                            idx_types.push((false, l, h));
                        }
                    }
                }
                for (_, l, h) in &idx_types {
                    for (t, sp) in l.iter().chain(h.iter()) {
                        if !matches!(t, Type::Int | Type::Any) {
                            return Err(LangError::ty(*sp, "an int index", t));
                        }
                    }
                }
                let (el, dims) = match &bt {
                    Type::Tensor(ElemType::Quant, _) => {
                        return Err(LangError::ty(base.span, "a tensor that is not quantized", &bt))
                    }
                    Type::Tensor(el, d) => (*el, d.clone()),
                    Type::Any => return Ok(Type::Any),
                    other => return Err(LangError::ty(base.span, "a tensor", other)),
                };
                let Some(dims) = dims else {
                    return Ok(Type::Tensor(el, None));
                };
                if args.len() > dims.len() {
                    return Err(LangError::shape(
                        span,
                        format!("{} indices into a tensor of rank {} ({bt})", args.len(), dims.len()),
                    ));
                }
                let mut out = Vec::new();
                for (k, a) in args.iter().enumerate() {
                    let d = dims.get(k).cloned().unwrap_or(Dim::Unknown);
                    match a {
                        IndexArg::At(x) => {
                            if let (ExprKind::Int(i), Dim::Lit(n)) = (&x.kind, &d) {
                                if *i < 0 || *i as usize >= *n {
                                    return Err(LangError::Index { span: x.span, index: *i, len: *n });
                                }
                            }
                        }
                        IndexArg::Range(lo, hi) => {
                            let lit = |x: &Option<Expr>| match x.as_ref().map(|e| &e.kind) {
                                Some(ExprKind::Int(i)) => Some(*i),
                                _ => None,
                            };
                            let l = if lo.is_none() { Some(0) } else { lit(lo) };
                            let h = match (&hi, &d) {
                                (None, Dim::Lit(n)) => Some(*n as i64),
                                _ => lit(hi),
                            };
                            if let (Some(h), Dim::Lit(n)) = (h, &d) {
                                if h < 0 || h as usize > *n {
                                    return Err(LangError::Index { span: hi.as_ref().map_or(span, |e| e.span), index: h, len: *n });
                                }
                            }
                            out.push(match (l, h) {
                                (Some(l), Some(h)) if h >= l => Dim::Lit((h - l) as usize),
                                (Some(0), None) if hi.is_none() => d.clone(),
                                _ => Dim::Unknown,
                            });
                        }
                    }
                }
                out.extend(dims.iter().skip(args.len()).cloned());
                if out.is_empty() {
                    Type::elem_scalar(el)
                } else {
                    Type::tensor(el, out)
                }
            }
            ExprKind::Field(base, field) => {
                let bt = self.expr(base)?;
                // Which GGUF tensors a model has is known only once it is
                // open: fields of a model are checked when they are read.
                match bt {
                    Type::Model | Type::Any => Type::Any,
                    other => return Err(LangError::ty(base.span, format!("a model (to read `.{field}`)"), other)),
                }
            }
        })
    }
}

/// The type of the literal `[a, b]` row-wise join.
fn lit_join(a: &Type, b: &Type) -> Option<Type> {
    match (a, b) {
        (Type::Int, Type::Int) => Some(Type::Int),
        (Type::Int | Type::Float, Type::Int | Type::Float) => Some(Type::Float),
        (Type::Bool, Type::Bool) => Some(Type::Bool),
        (Type::Tensor(ea, da), Type::Tensor(eb, db)) => {
            let el = match (ea, eb) {
                (x, y) if x == y => *x,
                (ElemType::I32 | ElemType::F32, ElemType::I32 | ElemType::F32) => ElemType::F32,
                _ => return None,
            };
            match (da, db) {
                (Some(x), Some(y)) => {
                    if x.len() != y.len() || x.iter().zip(y).any(|(p, q)| !dims_agree(p, q)) {
                        None
                    } else {
                        Some(Type::tensor(el, x.clone()))
                    }
                }
                _ => Some(Type::Tensor(el, None)),
            }
        }
        _ => None,
    }
}

/// A declared type with the checker's more precise knowledge filled in.
fn refine(declared: &Type, found: &Type) -> Type {
    match (declared, found) {
        (Type::Tensor(e, Some(d)), Type::Tensor(_, Some(f))) if d.len() == f.len() => Type::tensor(
            *e,
            d.iter()
                .zip(f)
                .map(|(a, b)| match a {
                    Dim::Unknown => b.clone(),
                    _ => a.clone(),
                })
                .collect(),
        ),
        _ => declared.clone(),
    }
}

fn binary_type(op: BinOp, ta: &Type, tb: &Type, span: Span, sa: Span, sb: Span) -> Result<Type> {
    use BinOp::*;
    let arith = matches!(op, Add | Sub | Mul | Div | Rem);
    let cmp = matches!(op, Eq | Ne | Lt | Le | Gt | Ge);
    match (ta, tb) {
        (Type::Any, _) | (_, Type::Any) => Ok(if cmp { Type::Bool } else { Type::Any }),
        (Type::Int, Type::Int) if arith => Ok(Type::Int),
        (Type::Int | Type::Float, Type::Int | Type::Float) if arith => Ok(Type::Float),
        (Type::Int | Type::Float, Type::Int | Type::Float) if cmp => Ok(Type::Bool),
        (Type::Str, Type::Str) if op == Add => Ok(Type::Str),
        (Type::Str, Type::Str) if matches!(op, Eq | Ne) => Ok(Type::Bool),
        (Type::Bool, Type::Bool) if matches!(op, And | Or | Eq | Ne) => Ok(Type::Bool),
        (Type::Tensor(..), _) | (_, Type::Tensor(..)) if arith || cmp => {
            let side = |t: &Type, sp: Span| -> Result<(Option<ElemType>, Option<Vec<Dim>>)> {
                match t {
                    Type::Int | Type::Float => Ok((None, Some(vec![]))),
                    Type::Tensor(ElemType::Bool | ElemType::Quant, _) => {
                        Err(LangError::ty(sp, "a numeric tensor", t))
                    }
                    Type::Tensor(e, d) => Ok((Some(*e), d.clone())),
                    other => Err(LangError::ty(sp, "a number or tensor", other)),
                }
            };
            let (ea, da) = side(ta, sa)?;
            let (eb, db) = side(tb, sb)?;
            let dims = match (da, db) {
                (Some(x), Some(y)) => Some(broadcast(&x, &y).ok_or_else(|| {
                    LangError::shape(
                        span,
                        format!(
                            "`{}` of {} and {} (shapes must be equal or broadcast)",
                            op.symbol(),
                            ta,
                            tb
                        ),
                    )
                })?),
                _ => None,
            };
            let el = if cmp {
                ElemType::Bool
            } else {
                match (ea, eb) {
                    (Some(ElemType::I32), Some(ElemType::I32)) => ElemType::I32,
                    (Some(ElemType::I32), None) if matches!(tb, Type::Int) => ElemType::I32,
                    (None, Some(ElemType::I32)) if matches!(ta, Type::Int) => ElemType::I32,
                    _ => ElemType::F32,
                }
            };
            Ok(Type::Tensor(el, dims))
        }
        _ => Err(LangError::Type {
            span,
            expected: format!("operands that `{}` accepts", op.symbol()),
            found: format!("{ta} and {tb}"),
        }),
    }
}

/// Checks a call against a signature, unifying named dims across the
/// arguments, and gives the result type with those names filled in.
fn call_type(name: &str, sig: &FnSig, args: &[(Type, Span)], span: Span) -> Result<Type> {
    if sig.params.len() != args.len() {
        return Err(LangError::Arity {
            span,
            name: name.to_string(),
            expected: sig.params.len().to_string(),
            got: args.len(),
        });
    }
    let mut bind: HashMap<String, Dim> = HashMap::new();
    for (k, (want, (found, sp))) in sig.params.iter().zip(args).enumerate() {
        match (want, found) {
            (_, Type::Any) => {}
            (Type::Float, Type::Int) => {}
            (Type::Tensor(we, wd), Type::Tensor(fe, fd)) => {
                let elem_ok = we == fe
                    || (*we == ElemType::Quant && *fe != ElemType::Bool && *fe != ElemType::I32);
                if !elem_ok {
                    return Err(LangError::ty(*sp, want, found));
                }
                let (Some(wd), Some(fd)) = (wd, fd) else {
                    continue;
                };
                if wd.len() != fd.len() {
                    return Err(LangError::shape(
                        *sp,
                        format!(
                            "argument {} of `{name}` must have rank {} ({want}), found {found}",
                            k + 1,
                            wd.len()
                        ),
                    ));
                }
                for (w, f) in wd.iter().zip(fd) {
                    let bad = || {
                        LangError::shape(
                            *sp,
                            format!(
                                "argument {} of `{name}`: expected {want}, found {found}",
                                k + 1
                            ),
                        )
                    };
                    match w {
                        Dim::Unknown => {}
                        Dim::Lit(_) => {
                            if !dims_agree(w, f) {
                                return Err(bad());
                            }
                        }
                        Dim::Named(n) => match bind.get(n) {
                            Some(prev) => {
                                if !dims_agree(prev, f) {
                                    return Err(LangError::shape(
                                        *sp,
                                        format!(
                                            "dimension `{n}` of `{name}` is {prev} from an earlier argument but {f} in argument {} ({found})",
                                            k + 1
                                        ),
                                    ));
                                }
                                if matches!(prev, Dim::Unknown) {
                                    bind.insert(n.clone(), f.clone());
                                }
                            }
                            None => {
                                bind.insert(n.clone(), f.clone());
                            }
                        },
                    }
                }
            }
            (w, f) if w == f => {}
            (w, f) => return Err(LangError::ty(*sp, w, f)),
        }
    }
    Ok(match &sig.ret {
        Type::Tensor(e, Some(d)) => Type::tensor(
            *e,
            d.iter()
                .map(|x| match x {
                    Dim::Named(n) => bind.get(n).cloned().unwrap_or(Dim::Unknown),
                    other => other.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn global(src: &str, name: &str) -> Type {
        let mut prog = crate::parser::parse(0, src).unwrap();
        let mut c = Checker::new();
        c.check_program(&mut prog).unwrap();
        c.global_type(name).unwrap().clone()
    }

    #[test]
    fn named_dims_flow_through_calls() {
        let src = "fn f(a: f32[n, d], b: f32[d]) -> f32[n] { Y[i] = a[i, j] b[j]; return Y; }\n\
                   let y = f(zeros(5, 3), zeros(3));";
        assert_eq!(
            global(src, "y"),
            Type::tensor(ElemType::F32, vec![Dim::Lit(5)])
        );
    }

    #[test]
    fn inferred_types() {
        assert_eq!(
            global("let x = [[1, 2], [3, 4]];", "x"),
            Type::tensor(ElemType::I32, vec![Dim::Lit(2), Dim::Lit(2)])
        );
        assert_eq!(
            global("let x = [1.0, 2.0] * 3;", "x"),
            Type::tensor(ElemType::F32, vec![Dim::Lit(2)])
        );
        assert_eq!(
            global("let x = zeros(2, 3)[0, 1..3];", "x"),
            Type::tensor(ElemType::F32, vec![Dim::Lit(2)])
        );
        assert_eq!(global("let x = argmax(zeros(4));", "x"), Type::Int);
        assert_eq!(
            global("let a = zeros(2, 3);\nY[j, i] = a[i, j];", "Y"),
            Type::tensor(ElemType::F32, vec![Dim::Lit(3), Dim::Lit(2)])
        );
        assert_eq!(
            global("let x: f16[2] = [1.0, 2.0];", "x"),
            Type::tensor(ElemType::F16, vec![Dim::Lit(2)])
        );
    }

    #[test]
    fn assignment_with_bound_index_is_not_an_equation() {
        let mut prog =
            crate::parser::parse(0, "let t = zeros(3);\nlet i = 1;\nt[i] = 2.0;").unwrap();
        Checker::new().check_program(&mut prog).unwrap();
        let Item::Stmt(s) = &prog.items[2] else {
            panic!()
        };
        assert!(matches!(s.kind, StmtKind::Assign { .. }));
    }
}
