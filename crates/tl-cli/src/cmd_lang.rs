//! `tl run`, `tl check`, `tl test`, `tl repl`: the TensorLogic language.
//! Diagnostics go to stderr as `file:line:col: error: …` with the source
//! line and a caret, and the process exits with status 1.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use tl_lang::{Interp, LangError, Value};

/// The tree-walking interpreter recurses per nested expression and call;
/// a big stack keeps deep (but bounded) programs from overflowing.
const STACK_BYTES: usize = 256 << 20;

#[derive(Args)]
pub struct RunArgs {
    /// Worker threads of the kernels (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// The `.tl` program.
    pub file: PathBuf,
    /// Arguments for the program (`nargs()`, `arg(i)`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

#[derive(Args)]
pub struct CheckArgs {
    /// The `.tl` program.
    pub file: PathBuf,
    /// Print the tensor equations the rules compile to and the program's
    /// tensor equations with their sums made explicit.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Args)]
pub struct TestArgs {
    /// A `.tl` file or a folder searched for them (default: the current folder).
    pub path: Option<PathBuf>,
}

#[derive(Args)]
pub struct ReplArgs {}

fn on_big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let h = std::thread::Builder::new()
        .name("tl-lang".into())
        .stack_size(STACK_BYTES)
        .spawn(f)?;
    h.join()
        .map_err(|_| anyhow::anyhow!("the interpreter thread panicked"))
}

fn fail(it: &Interp, e: &LangError) -> ! {
    let _ = std::io::stdout().flush();
    eprint!("{}", e.render(&it.sources));
    std::process::exit(1);
}

pub fn run(a: &RunArgs) -> Result<()> {
    crate::cmd_generate::init_threads(a.threads)?;
    let file = a.file.clone();
    let args = a.args.clone();
    let device = crate::device();
    on_big_stack(move || {
        let mut it = Interp::new(Box::new(std::io::stdout()));
        it.args = args;
        it.device = device;
        let r = it
            .load_file(&file)
            .and_then(|mut p| it.check(&mut p).map(|()| p))
            .and_then(|p| it.run(&p));
        if let Err(e) = r {
            fail(&it, &e);
        }
    })
}

pub fn check(a: &CheckArgs) -> Result<()> {
    let file = a.file.clone();
    let explain = a.explain;
    on_big_stack(move || {
        let mut it = Interp::new(Box::new(std::io::sink()));
        let r = it
            .load_file(&file)
            .and_then(|mut p| it.check(&mut p).map(|()| p))
            .and_then(|p| {
                if explain {
                    it.explain(&p).map(Some)
                } else {
                    Ok(None)
                }
            });
        match r {
            Ok(Some(text)) => print!("{text}"),
            Ok(None) => println!("{}: ok", file.display()),
            Err(e) => fail(&it, &e),
        }
    })
}

fn find_tl(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if p.is_dir() {
            find_tl(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "tl") {
            out.push(p);
        }
    }
    Ok(())
}

pub fn test(a: &TestArgs) -> Result<()> {
    let root = a.path.clone().unwrap_or_else(|| PathBuf::from("."));
    let mut files = Vec::new();
    find_tl(&root, &mut files)?;
    let (passed, failed) = on_big_stack(move || {
        let (mut passed, mut failed) = (0usize, 0usize);
        for f in files {
            let mut it = Interp::new(Box::new(std::io::stdout()));
            let r = it.load_file(&f).and_then(|mut p| it.check(&mut p));
            if let Err(e) = r {
                println!("{}: FAILED to check", f.display());
                eprint!("{}", e.render(&it.sources));
                failed += 1;
                continue;
            }
            for (name, r) in it.run_tests() {
                match r {
                    Ok(()) => {
                        println!("test {} :: {name} ... ok", f.display());
                        passed += 1;
                    }
                    Err(e) => {
                        println!("test {} :: {name} ... FAILED", f.display());
                        eprint!("{}", e.render(&it.sources));
                        failed += 1;
                    }
                }
            }
        }
        (passed, failed)
    })?;
    println!("test result: {passed} passed; {failed} failed");
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    Ok(())
}

/// A syntax error at the end of the input: the entry is not finished.
fn incomplete(e: &LangError, src: &str) -> bool {
    matches!(e, LangError::Syntax { span, .. } if span.lo as usize >= src.trim_end().len())
}

pub fn repl(_a: &ReplArgs) -> Result<()> {
    on_big_stack(|| {
        let mut it = Interp::new(Box::new(std::io::stdout()));
        let stdin = std::io::stdin();
        let mut buf = String::new();
        let mut n = 0;
        println!(
            "TensorLogic REPL: statements, fn, relation, facts, rules, ?- queries; Ctrl-D quits."
        );
        loop {
            print!("{}", if buf.is_empty() { "tl> " } else { "... " });
            let _ = std::io::stdout().flush();
            let mut line = String::new();
            match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            buf.push_str(&line);
            if buf.trim().is_empty() {
                buf.clear();
                continue;
            }
            n += 1;
            let dir = std::env::current_dir().unwrap_or_default();
            let parsed = it.load_source_in(&format!("<repl:{n}>"), &buf, &dir);
            let mut prog = match parsed {
                Ok(p) => p,
                Err(e) if incomplete(&e, &buf) => continue,
                Err(e) => {
                    eprint!("{}", e.render(&it.sources));
                    buf.clear();
                    continue;
                }
            };
            buf.clear();
            let r = it.check(&mut prog).and_then(|()| it.run(&prog));
            match r {
                Ok(Some(v)) if !matches!(v, Value::Unit) => println!("{v}"),
                Ok(_) => {}
                Err(e) => eprint!("{}", e.render(&it.sources)),
            }
        }
        println!();
    })
}
