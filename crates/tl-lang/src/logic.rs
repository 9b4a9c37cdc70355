//! Relations, facts, Datalog rules and their fixpoint.
//!
//! Semantics: a relation `R(x: A, y: B)` is a 0/1 tensor `R[x, y]` over
//! the constants of domains `A` and `B`. A rule
//! `H(x, z) :- P(x, y), Q(y, z).` is the tensor equation
//! `H[x, z] = step(H[x, z] + P[x, y] Q[y, z])`: the join is an einsum over
//! the shared variable `y`, the projection sums it out and `step` (1 where
//! the sum is > 0) thresholds the count back to truth values. All rules of
//! a program are iterated together until no tensor changes.
//!
//! Evaluation: the dense tensors of a 10,000-node graph would hold 10⁸
//! cells, so the tensors are kept sparse — the set of their 1-cells, one
//! tuple of constant ids each — and the einsum is computed the way a
//! sparse einsum is: nested index lookups over the nonzeros (a hash join).
//! Semi-naive iteration (each round joins only against the tuples new in
//! the previous round, Bancilhon & Ramakrishnan 1986) yields exactly the
//! cells the dense iteration would turn on, round by round.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use crate::ast::{Atom, ExprKind, Rule};
use crate::diag::Span;
use crate::error::{LangError, Result};

/// Default limit on fixpoint rounds (`fixpoint_limit(n)` changes it).
pub const DEFAULT_FIXPOINT_LIMIT: usize = 100_000;

/// A constant of a domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConstKey {
    Sym(String),
    Int(i64),
}

impl std::fmt::Display for ConstKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConstKey::Sym(s) => write!(f, "{s}"),
            ConstKey::Int(i) => write!(f, "{i}"),
        }
    }
}

/// Uppercase or `_`-initial identifiers are always logic variables; other
/// identifiers are constants when the domain has such a constant.
pub fn is_logic_var_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase() || c == '_')
}

/// The constants of one domain type, interned to dense ids (the tensor
/// index along that axis).
#[derive(Default, Debug)]
pub struct Domain {
    pub consts: Vec<ConstKey>,
    ids: HashMap<ConstKey, u32>,
}

impl Domain {
    pub fn intern(&mut self, k: ConstKey) -> u32 {
        if let Some(&id) = self.ids.get(&k) {
            return id;
        }
        let id = self.consts.len() as u32;
        self.consts.push(k.clone());
        self.ids.insert(k, id);
        id
    }

    pub fn get(&self, k: &ConstKey) -> Option<u32> {
        self.ids.get(k).copied()
    }
}

type Tuple = Vec<u32>;

/// The 1-cells of a relation's tensor, append-only so a round's new
/// tuples are a suffix, with hash indexes on the bound argument positions
/// that joins ask for (kept up to date as tuples arrive).
#[derive(Debug)]
pub struct Relation {
    pub name: String,
    pub domains: Vec<String>,
    pub tuples: Vec<Tuple>,
    set: HashSet<Tuple>,
    indexes: HashMap<u64, HashMap<Tuple, Vec<usize>>>,
}

impl Relation {
    fn insert(&mut self, t: Tuple) -> bool {
        if self.set.contains(&t) {
            return false;
        }
        let id = self.tuples.len();
        for (mask, idx) in self.indexes.iter_mut() {
            idx.entry(project(&t, *mask)).or_default().push(id);
        }
        self.set.insert(t.clone());
        self.tuples.push(t);
        true
    }

    fn index(&mut self, mask: u64) -> &HashMap<Tuple, Vec<usize>> {
        let tuples = &self.tuples;
        self.indexes.entry(mask).or_insert_with(|| {
            let mut m: HashMap<Tuple, Vec<usize>> = HashMap::new();
            for (i, t) in tuples.iter().enumerate() {
                m.entry(project(t, mask)).or_default().push(i);
            }
            m
        })
    }
}

fn project(t: &[u32], mask: u64) -> Tuple {
    t.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, &v)| v)
        .collect()
}

/// An argument of a compiled atom.
#[derive(Clone, Debug, PartialEq)]
pub enum Term {
    Var(usize),
    Const(u32),
    Any,
}

#[derive(Clone, Debug)]
struct CAtom {
    rel: usize,
    terms: Vec<Term>,
}

#[derive(Clone, Debug)]
struct CRule {
    head: CAtom,
    body: Vec<CAtom>,
    nvars: usize,
    span: Span,
}

#[derive(Default, Debug)]
pub struct LogicDb {
    pub domains: HashMap<String, Domain>,
    pub relations: Vec<Relation>,
    by_name: HashMap<String, usize>,
    rules: Vec<CRule>,
    /// Whether facts or rules changed since the last fixpoint.
    dirty: bool,
    pub limit: usize,
    /// [`crate::Limits::max_tuples`]
    pub max_tuples: usize,
    total_tuples: usize,
}

/// Decides variable or constant for an identifier in a rule or query
/// (see [`is_logic_var_name`]); constants of facts seen by the checker.
pub trait ConstOracle {
    fn is_var(&self, name: &str, domain: &str) -> bool;
}

impl LogicDb {
    pub fn new() -> LogicDb {
        LogicDb {
            limit: DEFAULT_FIXPOINT_LIMIT,
            max_tuples: crate::Limits::default().max_tuples,
            ..LogicDb::default()
        }
    }

    pub fn declare(&mut self, name: &str, domains: Vec<String>) {
        if self.by_name.contains_key(name) {
            return;
        }
        for d in &domains {
            self.domains.entry(d.clone()).or_default();
        }
        self.by_name.insert(name.to_string(), self.relations.len());
        self.relations.push(Relation {
            name: name.to_string(),
            domains,
            tuples: Vec::new(),
            set: HashSet::new(),
            indexes: HashMap::new(),
        });
    }

    pub fn rel_id(&self, name: &str, span: Span) -> Result<usize> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| LangError::Undefined {
                span,
                what: "relation",
                name: name.to_string(),
            })
    }

    /// Adds a fact given as constants (`span`: where, for a limit error).
    pub fn add_fact(&mut self, rel: usize, args: Vec<ConstKey>, span: Span) -> Result<()> {
        let Some(r) = self.relations.get(rel) else {
            return Ok(());
        };
        let doms = r.domains.clone();
        let mut t = Vec::with_capacity(args.len());
        for (k, d) in args.into_iter().zip(&doms) {
            t.push(self.domains.entry(d.clone()).or_default().intern(k));
        }
        if let Some(r) = self.relations.get_mut(rel) {
            if r.insert(t) {
                self.dirty = true;
                self.total_tuples += 1;
                if self.total_tuples > self.max_tuples {
                    return Err(self.too_many(span));
                }
            }
        }
        Ok(())
    }

    fn compile_atom(
        &mut self,
        a: &Atom,
        vars: &mut Vec<String>,
        oracle: &dyn ConstOracle,
    ) -> Result<CAtom> {
        let rel = self.rel_id(&a.name, a.name_span)?;
        let doms = self
            .relations
            .get(rel)
            .map(|r| r.domains.clone())
            .unwrap_or_default();
        let mut terms = Vec::new();
        for (arg, d) in a.args.iter().zip(&doms) {
            let key = match &arg.kind {
                ExprKind::Var(v) if v == "_" => {
                    terms.push(Term::Any);
                    continue;
                }
                ExprKind::Var(v) if oracle.is_var(v, d) => {
                    let id = match vars.iter().position(|x| x == v) {
                        Some(i) => i,
                        None => {
                            vars.push(v.clone());
                            vars.len() - 1
                        }
                    };
                    terms.push(Term::Var(id));
                    continue;
                }
                ExprKind::Var(v) | ExprKind::Str(v) => ConstKey::Sym(v.clone()),
                ExprKind::Int(i) => ConstKey::Int(*i),
                _ => {
                    return Err(LangError::invalid(
                        arg.span,
                        "arguments of a rule or query must be variables or constants",
                    ))
                }
            };
            terms.push(Term::Const(
                self.domains.entry(d.clone()).or_default().intern(key),
            ));
        }
        Ok(CAtom { rel, terms })
    }

    pub fn add_rule(&mut self, r: &Rule, oracle: &dyn ConstOracle) -> Result<()> {
        let mut vars = Vec::new();
        let mut body = Vec::new();
        for a in &r.body {
            body.push(self.compile_atom(a, &mut vars, oracle)?);
        }
        let head = self.compile_atom(&r.head, &mut vars, oracle)?;
        self.rules.push(CRule {
            head,
            body,
            nvars: vars.len(),
            span: r.span,
        });
        self.dirty = true;
        Ok(())
    }

    /// Runs all rules to their fixpoint (semi-naive).
    pub fn fixpoint(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        // Round 0 treats every existing tuple as new.
        let mut delta_start: Vec<usize> = vec![0; self.relations.len()];
        let mut round = 0;
        loop {
            let ends: Vec<usize> = self.relations.iter().map(|r| r.tuples.len()).collect();
            let mut new: Vec<(usize, Tuple)> = Vec::new();
            for ri in 0..self.rules.len() {
                let rule = self.rules[ri].clone();
                for (pos, atom) in rule.body.iter().enumerate() {
                    let (lo, hi) = (delta_start[atom.rel], ends[atom.rel]);
                    if lo >= hi {
                        continue;
                    }
                    // Derivations that use a new tuple at `pos`; atoms
                    // before `pos` join only old tuples, so none is found
                    // twice in a round.
                    let mut binding: Vec<Option<u32>> = vec![None; rule.nvars];
                    for ti in lo..hi {
                        let t = self.relations[atom.rel].tuples[ti].clone();
                        binding.iter_mut().for_each(|b| *b = None);
                        if bind(&atom.terms, &t, &mut binding) {
                            self.join(&rule, pos, 0, &mut binding, &delta_start, &ends, &mut new);
                        }
                    }
                }
            }
            if new.len() > self.max_tuples {
                let span = self.rules.first().map_or(Span::default(), |r| r.span);
                return Err(self.too_many(span));
            }
            let mut changed = false;
            delta_start.clone_from(&ends);
            for (rel, t) in new {
                if let Some(r) = self.relations.get_mut(rel) {
                    if r.insert(t) {
                        changed = true;
                        self.total_tuples += 1;
                    }
                }
            }
            if self.total_tuples > self.max_tuples {
                let span = self.rules.first().map_or(Span::default(), |r| r.span);
                return Err(self.too_many(span));
            }
            if !changed {
                break;
            }
            round += 1;
            if round >= self.limit {
                let rule = self.rules.first();
                let (span, name) = rule.map_or((Span::default(), String::new()), |r| {
                    (
                        r.span,
                        self.relations
                            .get(r.head.rel)
                            .map_or(String::new(), |x| x.name.clone()),
                    )
                });
                // Report the relation that was still growing.
                // Report a recursive rule of a relation still growing.
                let growing_rel = |r: &&CRule| {
                    self.relations
                        .get(r.head.rel)
                        .is_some_and(|x| x.tuples.len() > delta_start[r.head.rel])
                };
                let growing = self
                    .rules
                    .iter()
                    .filter(growing_rel)
                    .find(|r| r.body.iter().any(|b| b.rel == r.head.rel))
                    .or_else(|| self.rules.iter().find(growing_rel))
                    .map(|r| {
                        (
                            r.span,
                            self.relations
                                .get(r.head.rel)
                                .map_or(String::new(), |x| x.name.clone()),
                        )
                    })
                    .unwrap_or((span, name));
                return Err(LangError::Fixpoint {
                    span: growing.0,
                    relation: growing.1,
                    limit: self.limit,
                });
            }
        }
        self.dirty = false;
        Ok(())
    }

    fn too_many(&self, span: Span) -> LangError {
        LangError::Limit {
            span,
            message: format!("relations hold more than {} tuples", self.max_tuples),
        }
    }

    /// Extends `binding` through the body atoms other than `skip`
    /// (`skip` is the one bound from the delta), in order.
    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        rule: &CRule,
        skip: usize,
        at: usize,
        binding: &mut Vec<Option<u32>>,
        delta_start: &[usize],
        ends: &[usize],
        out: &mut Vec<(usize, Tuple)>,
    ) {
        if at == rule.body.len() {
            let mut t = Vec::with_capacity(rule.head.terms.len());
            for term in &rule.head.terms {
                match term {
                    Term::Var(v) => match binding.get(*v).copied().flatten() {
                        Some(x) => t.push(x),
                        None => return,
                    },
                    Term::Const(c) => t.push(*c),
                    Term::Any => return,
                }
            }
            // Past the limit the round fails anyway; stop collecting.
            if out.len() <= self.max_tuples {
                out.push((rule.head.rel, t));
            }
            return;
        }
        if at == skip {
            self.join(rule, skip, at + 1, binding, delta_start, ends, out);
            return;
        }
        let atom = &rule.body[at];
        // Atoms before the delta atom see only tuples older than this
        // round's delta; atoms after it see all tuples up to the snapshot.
        let limit = if at < skip {
            delta_start[atom.rel]
        } else {
            ends[atom.rel]
        };
        let mut mask = 0u64;
        let mut key = Vec::new();
        for (i, term) in atom.terms.iter().enumerate() {
            let v = match term {
                Term::Const(c) => Some(*c),
                Term::Var(v) => binding.get(*v).copied().flatten(),
                Term::Any => None,
            };
            if let Some(v) = v {
                mask |= 1 << i;
                key.push(v);
            }
        }
        let ids: Vec<usize> = self.relations[atom.rel]
            .index(mask)
            .get(&key)
            .map(|v| v.iter().copied().filter(|&i| i < limit).collect())
            .unwrap_or_default();
        for ti in ids {
            let t = self.relations[atom.rel].tuples[ti].clone();
            let saved = binding.clone();
            if bind(&atom.terms, &t, binding) {
                self.join(rule, skip, at + 1, binding, delta_start, ends, out);
            }
            *binding = saved;
        }
    }

    /// Answers to a query atom: one row of constants per distinct binding
    /// of its variables (in order of first appearance).
    pub fn query(
        &mut self,
        a: &Atom,
        oracle: &dyn ConstOracle,
    ) -> Result<(Vec<String>, Vec<Vec<String>>)> {
        self.fixpoint()?;
        let mut vars = Vec::new();
        let atom = self.compile_atom(a, &mut vars, oracle)?;
        let rel = &self.relations[atom.rel];
        let mut rows: Vec<Vec<u32>> = Vec::new();
        let mut seen = HashSet::new();
        let mut binding = vec![None; vars.len()];
        for t in &rel.tuples {
            binding.iter_mut().for_each(|b| *b = None);
            if bind(&atom.terms, t, &mut binding) {
                let row: Vec<u32> = binding.iter().map(|b| b.unwrap_or(0)).collect();
                if seen.insert(row.clone()) {
                    rows.push(row);
                }
            }
        }
        // Domains of the variables, to print constants.
        let mut var_dom = vec![String::new(); vars.len()];
        for (term, d) in atom.terms.iter().zip(&rel.domains) {
            if let Term::Var(v) = term {
                if let Some(slot) = var_dom.get_mut(*v) {
                    *slot = d.clone();
                }
            }
        }
        let mut out: Vec<Vec<String>> = rows
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&var_dom)
                    .map(|(&id, d)| {
                        self.domains
                            .get(d)
                            .and_then(|dom| dom.consts.get(id as usize))
                            .map_or_else(|| "?".into(), |c| c.to_string())
                    })
                    .collect()
            })
            .collect();
        out.sort_by(|a, b| natural_cmp(a, b));
        Ok((vars, out))
    }

    /// The tensor equations the rules compile to, one per head relation.
    pub fn explain(&self, rules: &[Rule], oracle: &dyn ConstOracle) -> String {
        let mut s = String::new();
        let mut heads: Vec<&str> = Vec::new();
        for r in rules {
            if !heads.contains(&r.head.name.as_str()) {
                heads.push(&r.head.name);
            }
        }
        let _ = writeln!(s, "// domains");
        let mut names: Vec<&String> = self.domains.keys().collect();
        names.sort();
        for d in names {
            let n = self.domains.get(d).map_or(0, |x| x.consts.len());
            let _ = writeln!(s, "//   {d}: {n} constants");
        }
        for r in &self.relations {
            let _ = writeln!(
                s,
                "// {}[{}] : 0/1 tensor over {}",
                r.name,
                (0..r.domains.len())
                    .map(|i| format!("a{i}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.domains.join(" x ")
            );
        }
        for h in heads {
            let mut terms = Vec::new();
            let mut canon: Vec<String> = Vec::new();
            for r in rules.iter().filter(|r| r.head.name == h) {
                if canon.is_empty() {
                    // The first rule's head variables name the axes.
                    for (p, a) in r.head.args.iter().enumerate() {
                        let n = match &a.kind {
                            ExprKind::Var(v) if !canon.contains(v) && is_logic_var_like(v) => {
                                v.clone()
                            }
                            _ => format!("a{p}"),
                        };
                        canon.push(n);
                    }
                }
                terms.push(rule_equation(r, &canon, oracle, self));
            }
            let head_idx = canon.join(", ");
            let _ = writeln!(
                s,
                "{h}[{head_idx}] = step({h}[{head_idx}] + {})",
                terms.join(" + ")
            );
        }
        s
    }
}

/// `H(x, z) :- P(x, y), Q(y, z)` → the term `P[x, y] Q[y, z]` (`y`,
/// absent from the head, is summed). Head variables are renamed to the
/// index names `canon` shared by all rules of the head (other variables
/// that would clash get a `'`); head constants become one-hot factors.
fn rule_equation(r: &Rule, canon: &[String], oracle: &dyn ConstOracle, db: &LogicDb) -> String {
    let doms = db
        .by_name
        .get(&r.head.name)
        .and_then(|&i| db.relations.get(i))
        .map(|x| x.domains.clone())
        .unwrap_or_default();
    let mut rename: HashMap<String, String> = HashMap::new();
    let mut factors: Vec<String> = Vec::new();
    for ((a, d), c) in r.head.args.iter().zip(&doms).zip(canon) {
        match &a.kind {
            ExprKind::Var(v) if oracle.is_var(v, d) => {
                if let Some(prev) = rename.get(v) {
                    // `H(x, x)`: both axes are the same variable.
                    factors.push(format!("eq[{prev}, {c}]"));
                } else {
                    rename.insert(v.clone(), c.clone());
                }
            }
            other => {
                let k = match other {
                    ExprKind::Var(v) | ExprKind::Str(v) => v.clone(),
                    ExprKind::Int(i) => i.to_string(),
                    _ => "?".into(),
                };
                factors.push(format!("onehot_{k}[{c}]"));
            }
        }
    }
    let mapped: HashSet<String> = rename.values().cloned().collect();
    let mut name = |v: &str| -> String {
        if let Some(n) = rename.get(v) {
            return n.clone();
        }
        let mut n = v.to_string();
        while mapped.contains(&n) {
            n.push('\'');
        }
        rename.insert(v.to_string(), n.clone());
        n
    };
    let mut body = Vec::new();
    for a in &r.body {
        let bdoms = db
            .by_name
            .get(&a.name)
            .and_then(|&i| db.relations.get(i))
            .map(|x| x.domains.clone())
            .unwrap_or_default();
        let args: Vec<String> = a
            .args
            .iter()
            .zip(&bdoms)
            .map(|(e, d)| match &e.kind {
                ExprKind::Var(v) if v != "_" && oracle.is_var(v, d) => name(v),
                ExprKind::Var(v) => v.clone(),
                ExprKind::Int(i) => i.to_string(),
                ExprKind::Str(s) => format!("{s:?}"),
                _ => "?".into(),
            })
            .collect();
        body.push(format!("{}[{}]", a.name, args.join(", ")));
    }
    body.extend(factors);
    body.join(" ")
}

/// A name that can serve as an index name in `--explain` output.
fn is_logic_var_like(v: &str) -> bool {
    v != "_" && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn bind(terms: &[Term], t: &[u32], binding: &mut [Option<u32>]) -> bool {
    for (term, &v) in terms.iter().zip(t) {
        match term {
            Term::Const(c) => {
                if *c != v {
                    return false;
                }
            }
            Term::Var(i) => match binding.get_mut(*i) {
                Some(slot @ None) => *slot = Some(v),
                Some(Some(b)) => {
                    if *b != v {
                        return false;
                    }
                }
                None => return false,
            },
            Term::Any => {}
        }
    }
    true
}

/// Orders answers numerically where both sides are integers.
fn natural_cmp(a: &[String], b: &[String]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<i64>(), y.parse::<i64>()) {
            (Ok(p), Ok(q)) => p.cmp(&q),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}
