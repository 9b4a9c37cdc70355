//! Source files, spans and diagnostics rendered as
//! `file:line:col: error: message`, the source line and a caret under the
//! span. Hand-written: the format is a dozen lines and a crate such as
//! ariadne would pull in colour and unicode-width handling we do not need.

use std::fmt::Write as _;

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: u32,
    pub lo: u32,
    pub hi: u32,
}

impl Span {
    pub fn new(file: u32, lo: usize, hi: usize) -> Span {
        Span {
            file,
            lo: lo as u32,
            hi: hi as u32,
        }
    }

    /// The smallest span covering both (same file assumed).
    pub fn to(self, other: Span) -> Span {
        Span {
            file: self.file,
            lo: self.lo.min(other.lo),
            hi: self.hi.max(other.hi),
        }
    }
}

/// One loaded source file.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// All files of a program, indexed by [`Span::file`].
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    pub files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> u32 {
        self.files.push(SourceFile {
            name: name.into(),
            text: text.into(),
        });
        (self.files.len() - 1) as u32
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, span: Span) -> (usize, usize) {
        let Some(f) = self.files.get(span.file as usize) else {
            return (0, 0);
        };
        let lo = (span.lo as usize).min(f.text.len());
        let before = f.text.get(..lo).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |p| p + 1);
        let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        (line, col)
    }

    /// `file:line:col: error: message`, the line, and a caret line.
    pub fn render(&self, span: Option<Span>, message: &str) -> String {
        let Some(span) = span else {
            return format!("error: {message}\n");
        };
        let Some(f) = self.files.get(span.file as usize) else {
            return format!("error: {message}\n");
        };
        let (line, col) = self.line_col(span);
        let mut out = format!("{}:{line}:{col}: error: {message}\n", f.name);
        let text = f.text.lines().nth(line - 1).unwrap_or("");
        let gutter = format!("{line}");
        let _ = writeln!(out, "{:w$} |", "", w = gutter.len());
        let _ = writeln!(out, "{gutter} | {text}");
        // Caret width: the span's characters on this line, at least one.
        let lo = span.lo as usize;
        let hi = (span.hi as usize).max(lo);
        let on_line = f
            .text
            .get(lo..hi.min(f.text.len()))
            .unwrap_or("")
            .split('\n')
            .next()
            .unwrap_or("")
            .chars()
            .count()
            .max(1);
        let pad: String = text
            .chars()
            .take(col - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let _ = writeln!(
            out,
            "{:w$} | {pad}{}",
            "",
            "^".repeat(on_line),
            w = gutter.len()
        );
        out
    }
}
