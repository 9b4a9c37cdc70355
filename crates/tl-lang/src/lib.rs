//! The TensorLogic language: tensor equations, logic rules and programs
//! in `.tl` files, checked before they run and executed on tl-core's
//! kernels.
//!
//! Pipeline: [`lexer`] → [`parser`] (AST with spans, [`ast`]) →
//! [`check`] (names, types, shapes; decides which assignments are tensor
//! equations) → [`interp`] (the runtime), with [`einsum`] for tensor
//! equations, [`logic`] for relations and rules, [`builtins`] for the
//! builtin table. Errors are [`LangError`]s rendered by [`diag`].
//! The language reference is docs/LANGUAGE.md.

pub mod ast;
pub mod autodiff;
pub mod bufs;
pub mod builtins;
pub mod check;
pub mod diag;
pub mod einsum;
pub mod error;
pub mod gemm;
pub mod interp;
pub mod learn;
pub mod lexer;
pub mod logic;
pub mod model;
pub mod parser;
pub mod types;
pub mod value;
pub mod vmath;

pub use diag::{SourceMap, Span};

/// Bounds on what one run may use, so that no program — however wrong —
/// hangs or exhausts memory instead of getting a diagnostic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Statements and loop iterations one run may execute (`None`: no
    /// bound; `tl run` sets none, the fuzzer a small one).
    pub max_steps: Option<u64>,
    /// Elements of any one tensor built at run time (and characters of
    /// any one string).
    pub max_elements: usize,
    /// Iterations of one tensor equation's loop nest.
    pub max_equation_iterations: u128,
    /// Tuples all relations may hold together.
    pub max_tuples: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_steps: None,
            // 1 GiB of f32: a typo in a dimension is an error, not an
            // out-of-memory kill.
            max_elements: 1 << 28,
            max_equation_iterations: 1 << 34,
            max_tuples: 50_000_000,
        }
    }
}
pub use error::{LangError, Result};
pub use interp::Interp;
pub use value::Value;

/// Parses one source text (file index 0); what the fuzz target drives.
pub fn parse_str(src: &str) -> Result<ast::Program> {
    parser::parse(0, src)
}

/// Parses and checks a source text without running it; on error, the
/// rendered diagnostic.
pub fn check_source(name: &str, src: &str) -> std::result::Result<(), String> {
    let mut it = Interp::new(Box::new(std::io::sink()));
    let dir = std::path::Path::new(name)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let r = it
        .load_source_in(name, src, &dir)
        .and_then(|mut p| it.check(&mut p));
    r.map_err(|e| e.render(&it.sources))
}

/// Parses, checks and runs a source text, returning what it printed; on
/// error, what it printed so far and the rendered diagnostic.
pub fn run_source(name: &str, src: &str) -> std::result::Result<String, (String, String)> {
    let buf = SharedBuf::default();
    let mut it = Interp::new(Box::new(buf.clone()));
    let dir = std::path::Path::new(name)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let r = it
        .load_source_in(name, src, &dir)
        .and_then(|mut p| it.check(&mut p).map(|()| p))
        .and_then(|p| it.run(&p));
    match r {
        Ok(_) => Ok(buf.text()),
        Err(e) => Err((buf.text(), e.render(&it.sources))),
    }
}

/// An output buffer that can be read after the interpreter wrote to it.
#[derive(Clone, Default)]
pub struct SharedBuf(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl SharedBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.borrow()).into_owned()
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
