//! The crate's one error type. Every variant that comes from a program
//! carries the span it is about, so [`LangError::render`] can show
//! `file:line:col`, the source line and a caret.

use crate::diag::{SourceMap, Span};

#[derive(Debug, thiserror::Error)]
pub enum LangError {
    #[error("{message}")]
    Syntax { span: Span, message: String },
    #[error("undefined {what} `{name}`")]
    Undefined {
        span: Span,
        what: &'static str,
        name: String,
    },
    #[error("`{name}` takes {expected} argument{}, got {got}", if *.expected == "1" { "" } else { "s" })]
    Arity {
        span: Span,
        name: String,
        expected: String,
        got: usize,
    },
    #[error("type mismatch: expected {expected}, found {found}")]
    Type {
        span: Span,
        expected: String,
        found: String,
    },
    #[error("shape mismatch: {message}")]
    Shape { span: Span, message: String },
    #[error("index {index} out of range for dimension of size {len}")]
    Index { span: Span, index: i64, len: usize },
    #[error("division by zero")]
    DivisionByZero { span: Span },
    #[error("rules for `{relation}` did not reach a fixpoint within {limit} iterations")]
    Fixpoint {
        span: Span,
        relation: String,
        limit: usize,
    },
    #[error("`{name}` is not yet implemented ({reason})")]
    NotImplemented {
        span: Span,
        name: String,
        reason: &'static str,
    },
    #[error("resource limit: {message}")]
    Limit { span: Span, message: String },
    #[error("assertion failed: {message}")]
    Assert { span: Span, message: String },
    #[error("{message}")]
    Invalid { span: Span, message: String },
    #[error("{op}: {source}")]
    Kernel {
        span: Span,
        op: &'static str,
        #[source]
        source: tl_core::CoreError,
    },
    #[error("{op}: {source}")]
    Model {
        span: Span,
        op: &'static str,
        /// Boxed: a model error is large and rare; every other result
        /// stays small.
        #[source]
        source: Box<tl_model::ModelError>,
    },
    #[error("cannot read {path}: {message}")]
    Io {
        span: Option<Span>,
        path: String,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, LangError>;

impl LangError {
    pub fn span(&self) -> Option<Span> {
        use LangError::*;
        match self {
            Syntax { span, .. }
            | Undefined { span, .. }
            | Arity { span, .. }
            | Type { span, .. }
            | Shape { span, .. }
            | Index { span, .. }
            | DivisionByZero { span }
            | Fixpoint { span, .. }
            | NotImplemented { span, .. }
            | Assert { span, .. }
            | Limit { span, .. }
            | Invalid { span, .. }
            | Kernel { span, .. }
            | Model { span, .. } => Some(*span),
            Io { span, .. } => *span,
        }
    }

    /// The diagnostic as the CLI prints it.
    pub fn render(&self, sources: &SourceMap) -> String {
        sources.render(self.span(), &self.to_string())
    }

    pub(crate) fn syntax(span: Span, message: impl Into<String>) -> LangError {
        LangError::Syntax {
            span,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(span: Span, message: impl Into<String>) -> LangError {
        LangError::Invalid {
            span,
            message: message.into(),
        }
    }

    pub(crate) fn shape(span: Span, message: impl Into<String>) -> LangError {
        LangError::Shape {
            span,
            message: message.into(),
        }
    }

    pub(crate) fn ty(span: Span, expected: impl ToString, found: impl ToString) -> LangError {
        LangError::Type {
            span,
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}
