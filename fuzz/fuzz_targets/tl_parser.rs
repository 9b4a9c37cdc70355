//! Fuzzes the TensorLogic front end: any text must lex and parse to a
//! program or a syntax error, and a program that parses must check or give
//! a diagnostic (which must render) — never panic, hang or overflow the
//! stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match tl_lang::parse_str(src) {
        Ok(_) => {
            let _ = tl_lang::check_source("fuzz.tl", src);
        }
        Err(e) => {
            let mut sources = tl_lang::SourceMap::default();
            sources.add("fuzz.tl", src);
            let _ = e.render(&sources);
        }
    }
});
