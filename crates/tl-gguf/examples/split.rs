//! Writes a GGUF file as N parts laid out as llama.cpp's `gguf-split`
//! writes them (`GgufWriter::into_split`), next to each other as
//! `PREFIX-00001-of-0000N.gguf`, …
//!
//!     cargo run --release -p tl-gguf --example split -- IN.gguf PREFIX N

use std::path::PathBuf;

use tl_gguf::reader::split_path;
use tl_gguf::{GgufFile, GgufWriter};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, prefix, n] = args.as_slice() else {
        eprintln!("usage: split IN.gguf PREFIX N");
        std::process::exit(2);
    };
    let Ok(parts) = n.parse::<u16>() else {
        eprintln!("N must be a part count, got '{n}'");
        std::process::exit(2);
    };
    let run = || -> tl_gguf::Result<()> {
        let file = GgufFile::open(input)?;
        let first = PathBuf::from(format!("{prefix}-00001-of-{parts:05}.gguf"));
        for (i, w) in GgufWriter::from_file(&file)
            .into_split(parts)?
            .iter()
            .enumerate()
        {
            let path = split_path(&first, i as u64, u64::from(parts)).unwrap_or_default();
            w.write_file(&path)?;
            println!("{}", path.display());
        }
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
