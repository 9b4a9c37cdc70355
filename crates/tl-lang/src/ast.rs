//! The syntax tree. Every node carries the span it was parsed from.

use crate::diag::Span;

#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    Lit(usize),
    Named(String),
    /// `?`: known only when the program runs.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    BF16,
    I32,
    Bool,
    /// Quantized weights in a GGML block format (`q[n, k]`).
    Quant,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TypeExpr {
    Int,
    Float,
    Bool,
    Str,
    Tensor(ElemType, Vec<Dim>),
    /// `model`: a loaded model (`load_model`).
    Model,
    /// `kv_cache`: a paged KV cache (`kv_cache`).
    Cache,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum IndexArg {
    At(Expr),
    /// `a..b`, `..b`, `a..`, `..`
    Range(Option<Expr>, Option<Expr>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Var(String),
    /// `[a, b, c]`, nested for higher ranks.
    TensorLit(Vec<Expr>),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// Juxtaposed factors `W[i, j] X[j]`: a product inside a tensor equation.
    Juxt(Vec<Expr>),
    Call {
        name: String,
        name_span: Span,
        args: Vec<Expr>,
    },
    Index(Box<Expr>, Vec<IndexArg>),
    Field(Box<Expr>, String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

/// A tensor equation `Y[i, k] = W[i, j] X[j, k]` (the checker turns an
/// assignment into one when the left side's indices are unbound names).
#[derive(Clone, Debug, PartialEq)]
pub struct Equation {
    pub target: String,
    pub target_span: Span,
    pub indices: Vec<(String, Span)>,
    pub rhs: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StmtKind {
    Let {
        name: String,
        name_span: Span,
        ty: Option<TypeExpr>,
        value: Expr,
    },
    Assign {
        target: Expr,
        value: Expr,
    },
    Equation(Equation),
    Expr(Expr),
    If {
        cond: Expr,
        then: Block,
        els: Option<Block>,
    },
    While {
        cond: Expr,
        body: Block,
    },
    For {
        var: String,
        var_span: Span,
        start: Expr,
        end: Expr,
        body: Block,
    },
    Return(Option<Expr>),
    Assert {
        cond: Expr,
        message: Option<String>,
    },
    /// `fact R(a, b);` inside code: arguments are expressions.
    Fact(Atom),
    /// `?- R(a, X).`
    Query(Atom),
    /// `learnable w: f32[4, 3] = xavier;`
    Learnable {
        name: String,
        name_span: Span,
        ty: TypeExpr,
        init: Expr,
    },
    /// `learn { loss = …; optimizer = adam(lr = 0.01); epochs = 10; }`
    Learn(LearnBlock),
}

/// The settings of a `learn` block.
#[derive(Clone, Debug, PartialEq)]
pub struct LearnBlock {
    /// `data xb, yb in X, Y;`: names bound to minibatches (rows along the
    /// first axis) of the data tensors.
    pub data: Vec<(String, Span)>,
    pub sources: Vec<Expr>,
    /// `key = value;` in the order written.
    pub settings: Vec<LearnSetting>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LearnSetting {
    pub key: String,
    pub key_span: Span,
    pub value: LearnValue,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LearnValue {
    Expr(Expr),
    /// `adam(lr = 0.01, betas = [0.9, 0.999])`, `cosine(warmup = 10)`,
    /// `constant`: a named choice with named arguments.
    Choice {
        name: String,
        name_span: Span,
        args: Vec<(String, Span, Expr)>,
    },
}

impl LearnBlock {
    pub fn get(&self, key: &str) -> Option<&LearnSetting> {
        self.settings.iter().find(|s| s.key == key)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub span: Span,
    pub ty: TypeExpr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FnDef {
    pub name: String,
    pub name_span: Span,
    pub params: Vec<Param>,
    pub ret: Option<TypeExpr>,
    pub body: Block,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RelDecl {
    pub name: String,
    pub span: Span,
    /// (argument name, domain type name)
    pub args: Vec<(String, String)>,
}

/// `R(t1, …, tn)`. In facts, rules and queries the arguments are
/// variables, constants (identifiers, integers, strings) or `_`; in a
/// `fact` statement they are expressions.
#[derive(Clone, Debug, PartialEq)]
pub struct Atom {
    pub name: String,
    pub name_span: Span,
    pub args: Vec<Expr>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub head: Atom,
    pub body: Vec<Atom>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TestDef {
    pub name: String,
    pub body: Block,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Import {
        path: String,
        span: Span,
    },
    Fn(FnDef),
    Relation(RelDecl),
    Fact(Atom),
    Rule(Rule),
    Test(TestDef),
    /// Top-level statements (queries included) run in order by `tl run`.
    Stmt(Stmt),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Program {
    pub items: Vec<Item>,
}
