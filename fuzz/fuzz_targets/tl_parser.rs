//! Fuzzes the TensorLogic front end: any text must lex and parse to a
//! program or a syntax error, a program that parses must check or give a
//! diagnostic (which must render), and a program that checks must run or
//! give a diagnostic — never panic, hang or overflow the stack. Runs are
//! bounded by small [`tl_lang::Limits`] so a generated `while true {}`
//! ends with a diagnostic instead of a timeout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tl_lang::{Interp, Limits, SourceMap};

fn run(src: String) {
    let mut it = Interp::new(Box::new(std::io::sink()));
    it.set_limits(Limits {
        max_steps: Some(20_000),
        max_elements: 1 << 16,
        max_equation_iterations: 1 << 18,
        max_tuples: 100_000,
    });
    let r = it
        .load_source_in("fuzz.tl", &src, std::path::Path::new("/nonexistent"))
        .and_then(|mut p| it.check(&mut p).map(|()| p))
        .and_then(|p| it.run(&p));
    if let Err(e) = r {
        let _ = e.render(&it.sources);
    }
    let _ = it.run_tests();
}

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match tl_lang::parse_str(src) {
        Ok(_) => {
            // The interpreter recurses per nested expression; the `tl`
            // binary gives it a 256 MiB stack, and so does this.
            let src = src.to_string();
            let h = std::thread::Builder::new()
                .stack_size(256 << 20)
                .spawn(move || run(src))
                .expect("spawn");
            if h.join().is_err() {
                panic!("the interpreter panicked");
            }
        }
        Err(e) => {
            let mut sources = SourceMap::default();
            sources.add("fuzz.tl", src);
            let _ = e.render(&sources);
        }
    }
});
