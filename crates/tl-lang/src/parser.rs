//! Recursive-descent parser from tokens to [`crate::ast`].
//!
//! Precedence, loosest first: `||`, `&&`, comparisons, `+ -`,
//! `* / %` and juxtaposition (`W[i, j] X[j]`), unary `- !`, postfix
//! (calls, indexing, fields).

use crate::ast::*;
use crate::diag::Span;
use crate::error::{LangError, Result};
use crate::lexer::{lex, Tok, Token};

/// Deeper nesting than this is refused: the parser, the checker and the
/// runtime recurse once per level of the tree, and a hostile input must
/// not overflow the stack. Each operator of a chain `a + b + …` counts as
/// a level, since it nests the tree as deeply as parentheses do.
const MAX_DEPTH: usize = 256;

pub fn parse(file: u32, src: &str) -> Result<Program> {
    let toks = lex(file, src)?;
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let mut items = Vec::new();
    while !p.at(&Tok::Eof) {
        items.push(p.item()?);
    }
    Ok(Program { items })
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.peek_at(0)
    }

    fn peek_at(&self, k: usize) -> &Tok {
        self.toks
            .get(self.pos + k)
            .or_else(|| self.toks.last())
            .map_or(&Tok::Eof, |t| &t.tok)
    }

    fn span(&self) -> Span {
        self.toks
            .get(self.pos)
            .or_else(|| self.toks.last())
            .map_or_else(Span::default, |t| t.span)
    }

    fn prev_span(&self) -> Span {
        self.toks
            .get(self.pos.saturating_sub(1))
            .map_or_else(Span::default, |t| t.span)
    }

    fn at(&self, t: &Tok) -> bool {
        self.peek() == t
    }

    fn bump(&mut self) -> Token {
        let t = self.toks.get(self.pos).cloned().unwrap_or(Token {
            tok: Tok::Eof,
            span: self.span(),
        });
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.at(t) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, t: &Tok, what: &str) -> Result<Span> {
        if self.at(t) {
            Ok(self.bump().span)
        } else {
            Err(self.unexpected(what))
        }
    }

    fn unexpected(&self, what: &str) -> LangError {
        LangError::syntax(
            self.span(),
            format!("expected {what}, found {}", self.peek().describe()),
        )
    }

    fn ident(&mut self, what: &str) -> Result<(String, Span)> {
        match self.peek().clone() {
            Tok::Ident(s) => {
                let sp = self.bump().span;
                Ok((s, sp))
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(LangError::syntax(self.span(), "nesting is too deep"));
        }
        Ok(())
    }

    fn item(&mut self) -> Result<Item> {
        let start = self.span();
        match self.peek() {
            Tok::Import => {
                self.bump();
                let path = match self.peek().clone() {
                    Tok::Str(s) => {
                        self.bump();
                        s
                    }
                    _ => return Err(self.unexpected("a quoted file name after `import`")),
                };
                self.eat(&Tok::Semi);
                Ok(Item::Import {
                    path,
                    span: start.to(self.prev_span()),
                })
            }
            Tok::Fn => self.fn_def().map(Item::Fn),
            Tok::Relation => self.relation().map(Item::Relation),
            Tok::Test => {
                self.bump();
                let name = match self.peek().clone() {
                    Tok::Str(s) => {
                        self.bump();
                        s
                    }
                    _ => return Err(self.unexpected("a quoted test name")),
                };
                let body = self.block()?;
                Ok(Item::Test(TestDef {
                    name,
                    span: start.to(body.span),
                    body,
                }))
            }
            Tok::Ident(_) if self.peek_at(1) == &Tok::LParen => {
                // A fact `R(a, b).` or a rule `R(x) :- …` — or else a call
                // statement `f(x);`: parse an atom and look at what follows.
                let (save, depth) = (self.pos, self.depth);
                if let Ok(atom) = self.atom() {
                    if self.eat(&Tok::Dot) {
                        return Ok(Item::Fact(atom));
                    }
                    if self.eat(&Tok::ColonDash) {
                        let mut body = vec![self.atom()?];
                        while self.eat(&Tok::Comma) {
                            body.push(self.atom()?);
                        }
                        self.expect(&Tok::Dot, "`.` at the end of the rule")?;
                        return Ok(Item::Rule(Rule {
                            head: atom,
                            body,
                            span: start.to(self.prev_span()),
                        }));
                    }
                }
                self.pos = save;
                self.depth = depth;
                self.stmt().map(Item::Stmt)
            }
            _ => self.stmt().map(Item::Stmt),
        }
    }

    fn atom(&mut self) -> Result<Atom> {
        let (name, name_span) = self.ident("a relation name")?;
        self.expect(&Tok::LParen, "`(`")?;
        let mut args = Vec::new();
        if !self.at(&Tok::RParen) {
            loop {
                args.push(self.expr()?);
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }
        self.expect(&Tok::RParen, "`)`")?;
        Ok(Atom {
            name,
            name_span,
            args,
            span: name_span.to(self.prev_span()),
        })
    }

    fn relation(&mut self) -> Result<RelDecl> {
        let start = self.bump().span;
        let (name, _) = self.ident("a relation name")?;
        self.expect(&Tok::LParen, "`(`")?;
        let mut args = Vec::new();
        loop {
            let (a, _) = self.ident("an argument name")?;
            self.expect(&Tok::Colon, "`:` and a domain type")?;
            let (t, _) = self.ident("a domain type name")?;
            args.push((a, t));
            if !self.eat(&Tok::Comma) {
                break;
            }
        }
        self.expect(&Tok::RParen, "`)`")?;
        let span = start.to(self.prev_span());
        if !self.eat(&Tok::Dot) {
            self.eat(&Tok::Semi);
        }
        Ok(RelDecl { name, span, args })
    }

    fn fn_def(&mut self) -> Result<FnDef> {
        let start = self.bump().span;
        let (name, name_span) = self.ident("a function name")?;
        self.expect(&Tok::LParen, "`(`")?;
        let mut params = Vec::new();
        if !self.at(&Tok::RParen) {
            loop {
                let (pname, span) = self.ident("a parameter name")?;
                self.expect(&Tok::Colon, "`:` and the parameter's type")?;
                let ty = self.type_expr()?;
                params.push(Param {
                    name: pname,
                    span,
                    ty,
                });
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }
        self.expect(&Tok::RParen, "`)`")?;
        let ret = if self.eat(&Tok::Arrow) {
            Some(self.type_expr()?)
        } else {
            None
        };
        let body = self.block()?;
        Ok(FnDef {
            name,
            name_span,
            params,
            ret,
            span: start.to(body.span),
            body,
        })
    }

    fn type_expr(&mut self) -> Result<TypeExpr> {
        let (name, span) = match self.peek().clone() {
            Tok::Ident(s) => (s, self.bump().span),
            _ => return Err(self.unexpected("a type")),
        };
        let elem = match name.as_str() {
            "f32" => ElemType::F32,
            "f16" => ElemType::F16,
            "bf16" => ElemType::BF16,
            "i32" => ElemType::I32,
            "bool" => ElemType::Bool,
            "q" => ElemType::Quant,
            "int" => return Ok(TypeExpr::Int),
            "float" => return Ok(TypeExpr::Float),
            "string" => return Ok(TypeExpr::Str),
            "model" => return Ok(TypeExpr::Model),
            "kv_cache" => return Ok(TypeExpr::Cache),
            _ => return Err(LangError::syntax(span, format!("unknown type `{name}`"))),
        };
        if !self.eat(&Tok::LBracket) {
            return Ok(match elem {
                ElemType::F32 | ElemType::F16 | ElemType::BF16 => TypeExpr::Float,
                ElemType::I32 => TypeExpr::Int,
                ElemType::Bool => TypeExpr::Bool,
                ElemType::Quant => {
                    return Err(LangError::syntax(
                        span,
                        "`q` needs a shape, as in `q[n, k]`",
                    ))
                }
            });
        }
        let mut dims = Vec::new();
        if !self.at(&Tok::RBracket) {
            loop {
                dims.push(match self.peek().clone() {
                    Tok::Int(n) if n >= 0 => {
                        self.bump();
                        Dim::Lit(n as usize)
                    }
                    Tok::Ident(s) => {
                        self.bump();
                        Dim::Named(s)
                    }
                    Tok::Question => {
                        self.bump();
                        Dim::Unknown
                    }
                    _ => return Err(self.unexpected("a dimension (a name, a number or `?`)")),
                });
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }
        self.expect(&Tok::RBracket, "`]`")?;
        Ok(TypeExpr::Tensor(elem, dims))
    }

    fn block(&mut self) -> Result<Block> {
        self.enter()?;
        let start = self.expect(&Tok::LBrace, "`{`")?;
        let mut stmts = Vec::new();
        while !self.at(&Tok::RBrace) {
            if self.at(&Tok::Eof) {
                return Err(self.unexpected("`}`"));
            }
            stmts.push(self.stmt()?);
        }
        self.bump();
        self.depth -= 1;
        Ok(Block {
            stmts,
            span: start.to(self.prev_span()),
        })
    }

    fn stmt(&mut self) -> Result<Stmt> {
        let start = self.span();
        let kind = match self.peek() {
            Tok::Let => {
                self.bump();
                let (name, name_span) = self.ident("a variable name")?;
                let ty = if self.eat(&Tok::Colon) {
                    Some(self.type_expr()?)
                } else {
                    None
                };
                self.expect(&Tok::Assign, "`=`")?;
                let value = self.expr()?;
                self.expect(&Tok::Semi, "`;`")?;
                StmtKind::Let {
                    name,
                    name_span,
                    ty,
                    value,
                }
            }
            Tok::If => return self.if_stmt(),
            // `learnable` and `learn` are keywords only where a declaration
            // or a block starts, so older programs may still use the names.
            Tok::Ident(k) if k == "learnable" && matches!(self.peek_at(1), Tok::Ident(_)) => {
                self.bump();
                let (name, name_span) = self.ident("a variable name")?;
                self.expect(&Tok::Colon, "`:` and the tensor's type")?;
                let ty = self.type_expr()?;
                self.expect(&Tok::Assign, "`=` and an initializer")?;
                let init = self.expr()?;
                self.expect(&Tok::Semi, "`;`")?;
                StmtKind::Learnable {
                    name,
                    name_span,
                    ty,
                    init,
                }
            }
            Tok::Ident(k) if k == "learn" && self.peek_at(1) == &Tok::LBrace => {
                StmtKind::Learn(self.learn_block()?)
            }
            Tok::While => {
                self.bump();
                let cond = self.expr()?;
                let body = self.block()?;
                StmtKind::While { cond, body }
            }
            Tok::For => {
                self.bump();
                let (var, var_span) = self.ident("a loop variable")?;
                self.expect(&Tok::In, "`in`")?;
                let start = self.expr()?;
                self.expect(&Tok::DotDot, "`..` (loops run over `start..end`)")?;
                let end = self.expr()?;
                let body = self.block()?;
                StmtKind::For {
                    var,
                    var_span,
                    start,
                    end,
                    body,
                }
            }
            Tok::Return => {
                self.bump();
                let value = if self.at(&Tok::Semi) {
                    None
                } else {
                    Some(self.expr()?)
                };
                self.expect(&Tok::Semi, "`;`")?;
                StmtKind::Return(value)
            }
            Tok::Assert => {
                self.bump();
                let cond = self.expr()?;
                let message = if self.eat(&Tok::Comma) {
                    match self.peek().clone() {
                        Tok::Str(s) => {
                            self.bump();
                            Some(s)
                        }
                        _ => return Err(self.unexpected("a message string")),
                    }
                } else {
                    None
                };
                self.expect(&Tok::Semi, "`;`")?;
                StmtKind::Assert { cond, message }
            }
            Tok::Fact => {
                self.bump();
                let atom = self.atom()?;
                if !self.eat(&Tok::Dot) {
                    self.expect(&Tok::Semi, "`;`")?;
                }
                StmtKind::Fact(atom)
            }
            Tok::QueryDash => {
                self.bump();
                let atom = self.atom()?;
                if !self.eat(&Tok::Dot) {
                    self.expect(&Tok::Semi, "`.`")?;
                }
                StmtKind::Query(atom)
            }
            _ => {
                let e = self.expr()?;
                if self.eat(&Tok::Assign) {
                    let value = self.expr()?;
                    self.expect(&Tok::Semi, "`;`")?;
                    StmtKind::Assign { target: e, value }
                } else {
                    self.expect(&Tok::Semi, "`;`")?;
                    StmtKind::Expr(e)
                }
            }
        };
        Ok(Stmt {
            kind,
            span: start.to(self.prev_span()),
        })
    }

    fn learn_block(&mut self) -> Result<LearnBlock> {
        let start = self.bump().span;
        self.enter()?;
        self.expect(&Tok::LBrace, "`{`")?;
        let mut lb = LearnBlock {
            data: Vec::new(),
            sources: Vec::new(),
            settings: Vec::new(),
            span: start,
        };
        while !self.eat(&Tok::RBrace) {
            let (key, key_span) = self.ident("a setting of `learn` (`loss = …;`)")?;
            if key == "data" && matches!(self.peek(), Tok::Ident(_)) {
                if !lb.data.is_empty() {
                    return Err(LangError::syntax(key_span, "`data` is given twice"));
                }
                loop {
                    lb.data.push(self.ident("a name for a minibatch")?);
                    if !self.eat(&Tok::Comma) {
                        break;
                    }
                }
                self.expect(&Tok::In, "`in` and the data tensors")?;
                loop {
                    lb.sources.push(self.expr()?);
                    if !self.eat(&Tok::Comma) {
                        break;
                    }
                }
                self.expect(&Tok::Semi, "`;`")?;
                continue;
            }
            const KEYS: &[&str] = &[
                "loss",
                "optimizer",
                "schedule",
                "epochs",
                "batch_size",
                "clip_norm",
                "seed",
                "shuffle",
                "log_every",
            ];
            if !KEYS.contains(&key.as_str()) {
                return Err(LangError::syntax(
                    key_span,
                    format!(
                        "unknown setting `{key}` of `learn` (data, {})",
                        KEYS.join(", ")
                    ),
                ));
            }
            if lb.get(&key).is_some() {
                return Err(LangError::syntax(
                    key_span,
                    format!("`{key}` is given twice"),
                ));
            }
            self.expect(&Tok::Assign, "`=`")?;
            let value = if key == "optimizer" || key == "schedule" {
                let (name, name_span) = self.ident(&format!("the name of the {key}"))?;
                let mut args = Vec::new();
                if self.eat(&Tok::LParen) {
                    while !self.eat(&Tok::RParen) {
                        let (an, asp) = self.ident("an argument name (`lr = 0.01`)")?;
                        self.expect(&Tok::Assign, "`=`")?;
                        let e = self.expr()?;
                        args.push((an, asp, e));
                        if !self.eat(&Tok::Comma) {
                            self.expect(&Tok::RParen, "`)`")?;
                            break;
                        }
                    }
                }
                LearnValue::Choice {
                    name,
                    name_span,
                    args,
                }
            } else {
                LearnValue::Expr(self.expr()?)
            };
            self.expect(&Tok::Semi, "`;`")?;
            lb.settings.push(LearnSetting {
                key,
                key_span,
                value,
            });
        }
        self.depth -= 1;
        lb.span = start.to(self.prev_span());
        Ok(lb)
    }

    fn if_stmt(&mut self) -> Result<Stmt> {
        self.enter()?;
        let start = self.bump().span;
        let cond = self.expr()?;
        let then = self.block()?;
        let els = if self.eat(&Tok::Else) {
            if self.at(&Tok::If) {
                let inner = self.if_stmt()?;
                Some(Block {
                    span: inner.span,
                    stmts: vec![inner],
                })
            } else {
                Some(self.block()?)
            }
        } else {
            None
        };
        self.depth -= 1;
        Ok(Stmt {
            kind: StmtKind::If { cond, then, els },
            span: start.to(self.prev_span()),
        })
    }

    pub fn expr(&mut self) -> Result<Expr> {
        self.enter()?;
        let e = self.binary(0);
        self.depth -= 1;
        e
    }

    fn binary(&mut self, level: usize) -> Result<Expr> {
        const LEVELS: [&[(Tok, BinOp)]; 5] = [
            &[(Tok::OrOr, BinOp::Or)],
            &[(Tok::AndAnd, BinOp::And)],
            &[
                (Tok::EqEq, BinOp::Eq),
                (Tok::NotEq, BinOp::Ne),
                (Tok::Lt, BinOp::Lt),
                (Tok::Le, BinOp::Le),
                (Tok::Gt, BinOp::Gt),
                (Tok::Ge, BinOp::Ge),
            ],
            &[(Tok::Plus, BinOp::Add), (Tok::Minus, BinOp::Sub)],
            &[
                (Tok::Star, BinOp::Mul),
                (Tok::Slash, BinOp::Div),
                (Tok::Percent, BinOp::Rem),
            ],
        ];
        let Some(ops) = LEVELS.get(level) else {
            return self.juxt();
        };
        let mut lhs = self.binary(level + 1)?;
        let depth = self.depth;
        while let Some(op) = ops.iter().find(|(t, _)| t == self.peek()).map(|(_, o)| *o) {
            self.bump();
            self.enter()?;
            let rhs = self.binary(level + 1)?;
            let span = lhs.span.to(rhs.span);
            lhs = Expr {
                kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
                span,
            };
        }
        self.depth = depth;
        Ok(lhs)
    }

    /// Factors written side by side: `W[i, j] X[j]`. Only an identifier or
    /// `(` can start a juxtaposed factor, so `a - b` stays a subtraction.
    fn juxt(&mut self) -> Result<Expr> {
        let first = self.unary()?;
        if !matches!(self.peek(), Tok::Ident(_) | Tok::LParen) {
            return Ok(first);
        }
        let mut factors = vec![first];
        while matches!(self.peek(), Tok::Ident(_) | Tok::LParen) {
            factors.push(self.unary()?);
        }
        let span = factors
            .iter()
            .map(|f| f.span)
            .reduce(Span::to)
            .unwrap_or_default();
        Ok(Expr {
            kind: ExprKind::Juxt(factors),
            span,
        })
    }

    fn unary(&mut self) -> Result<Expr> {
        let start = self.span();
        let op = match self.peek() {
            Tok::Minus => UnOp::Neg,
            Tok::Bang => UnOp::Not,
            _ => return self.postfix(),
        };
        self.bump();
        self.enter()?;
        let inner = self.unary()?;
        self.depth -= 1;
        Ok(Expr {
            span: start.to(inner.span),
            kind: ExprKind::Unary(op, Box::new(inner)),
        })
    }

    fn postfix(&mut self) -> Result<Expr> {
        let mut e = self.primary()?;
        loop {
            if self.at(&Tok::LBracket) {
                self.bump();
                let mut args = Vec::new();
                if !self.at(&Tok::RBracket) {
                    loop {
                        args.push(self.index_arg()?);
                        if !self.eat(&Tok::Comma) {
                            break;
                        }
                    }
                }
                self.expect(&Tok::RBracket, "`]`")?;
                e = Expr {
                    span: e.span.to(self.prev_span()),
                    kind: ExprKind::Index(Box::new(e), args),
                };
            } else if self.at(&Tok::Dot) && matches!(self.peek_at(1), Tok::Ident(_)) {
                self.bump();
                let (field, fspan) = self.ident("a field name")?;
                e = Expr {
                    span: e.span.to(fspan),
                    kind: ExprKind::Field(Box::new(e), field),
                };
            } else {
                return Ok(e);
            }
        }
    }

    fn index_arg(&mut self) -> Result<IndexArg> {
        if self.eat(&Tok::DotDot) {
            let hi = if matches!(self.peek(), Tok::Comma | Tok::RBracket) {
                None
            } else {
                Some(self.binary(3)?)
            };
            return Ok(IndexArg::Range(None, hi));
        }
        // Index positions sit below comparisons so `a..b` parses.
        let lo = self.binary(3)?;
        if self.eat(&Tok::DotDot) {
            let hi = if matches!(self.peek(), Tok::Comma | Tok::RBracket) {
                None
            } else {
                Some(self.binary(3)?)
            };
            return Ok(IndexArg::Range(Some(lo), hi));
        }
        Ok(IndexArg::At(lo))
    }

    fn primary(&mut self) -> Result<Expr> {
        let t = self.bump();
        let span = t.span;
        let kind = match t.tok {
            Tok::Int(i) => ExprKind::Int(i),
            Tok::Float(f) => ExprKind::Float(f),
            Tok::Str(s) => ExprKind::Str(s),
            Tok::True => ExprKind::Bool(true),
            Tok::False => ExprKind::Bool(false),
            Tok::Ident(name) => {
                if self.at(&Tok::LParen) {
                    self.bump();
                    let mut args = Vec::new();
                    if !self.at(&Tok::RParen) {
                        loop {
                            args.push(self.expr()?);
                            if !self.eat(&Tok::Comma) {
                                break;
                            }
                        }
                    }
                    self.expect(&Tok::RParen, "`)`")?;
                    return Ok(Expr {
                        kind: ExprKind::Call {
                            name,
                            name_span: span,
                            args,
                        },
                        span: span.to(self.prev_span()),
                    });
                }
                ExprKind::Var(name)
            }
            Tok::LParen => {
                let e = self.expr()?;
                self.expect(&Tok::RParen, "`)`")?;
                return Ok(Expr {
                    kind: e.kind,
                    span: span.to(self.prev_span()),
                });
            }
            Tok::LBracket => {
                let mut elems = Vec::new();
                if !self.at(&Tok::RBracket) {
                    loop {
                        elems.push(self.expr()?);
                        if !self.eat(&Tok::Comma) {
                            break;
                        }
                    }
                }
                self.expect(&Tok::RBracket, "`]`")?;
                return Ok(Expr {
                    kind: ExprKind::TensorLit(elems),
                    span: span.to(self.prev_span()),
                });
            }
            other => {
                self.pos -= 1;
                return Err(LangError::syntax(
                    span,
                    format!("expected an expression, found {}", other.describe()),
                ));
            }
        };
        Ok(Expr { kind, span })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn one_stmt(src: &str) -> StmtKind {
        let p = parse(0, src).unwrap();
        match p.items.into_iter().next() {
            Some(Item::Stmt(s)) => s.kind,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn precedence_and_juxtaposition() {
        let StmtKind::Assign { value, .. } = one_stmt("Y[i] = W[i, j] X[j] + b[i] * 2;") else {
            panic!()
        };
        let ExprKind::Binary(BinOp::Add, l, r) = value.kind else {
            panic!("{value:?}")
        };
        assert!(matches!(l.kind, ExprKind::Juxt(ref f) if f.len() == 2));
        assert!(matches!(r.kind, ExprKind::Binary(BinOp::Mul, _, _)));
        // `a - b` is a subtraction, not `a` times `-b`.
        let StmtKind::Expr(e) = one_stmt("a - b;") else {
            panic!()
        };
        assert!(matches!(e.kind, ExprKind::Binary(BinOp::Sub, _, _)));
    }

    #[test]
    fn items_facts_rules_queries() {
        let p = parse(
            0,
            "relation P(x: T, y: T)\nP(a, b).\nQ(x) :- P(x, _).\n?- Q(X).\nprint(1);\n",
        )
        .unwrap();
        assert!(matches!(p.items[0], Item::Relation(_)));
        assert!(matches!(p.items[1], Item::Fact(_)));
        assert!(matches!(&p.items[2], Item::Rule(r) if r.body.len() == 1));
        assert!(matches!(
            &p.items[3],
            Item::Stmt(Stmt {
                kind: StmtKind::Query(_),
                ..
            })
        ));
        assert!(matches!(
            &p.items[4],
            Item::Stmt(Stmt {
                kind: StmtKind::Expr(_),
                ..
            })
        ));
    }

    #[test]
    fn types_and_ranges() {
        let p = parse(
            0,
            "fn f(x: f32[n, 4, ?], w: q[d, d]) -> i32[n] { return x[0, 1..2, ..]; }",
        )
        .unwrap();
        let Item::Fn(f) = &p.items[0] else { panic!() };
        assert_eq!(
            f.params[0].ty,
            TypeExpr::Tensor(
                ElemType::F32,
                vec![Dim::Named("n".into()), Dim::Lit(4), Dim::Unknown]
            )
        );
        assert_eq!(
            f.params[1].ty,
            TypeExpr::Tensor(ElemType::Quant, vec![Dim::Named("d".into()); 2])
        );
        let StmtKind::Return(Some(e)) = &f.body.stmts[0].kind else {
            panic!()
        };
        let ExprKind::Index(_, args) = &e.kind else {
            panic!()
        };
        assert!(matches!(args[1], IndexArg::Range(Some(_), Some(_))));
        assert!(matches!(args[2], IndexArg::Range(None, None)));
    }

    #[test]
    fn long_chains_are_bounded() {
        let ok = format!("let x = {}1;", "1 + ".repeat(200));
        assert!(parse(0, &ok).is_ok());
        let deep = format!("let x = {}1;", "1 + ".repeat(100_000));
        let e = parse(0, &deep).unwrap_err();
        assert!(e.to_string().contains("too deep"));
    }
}
