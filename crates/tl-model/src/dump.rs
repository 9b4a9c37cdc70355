//! Intermediate tensors of the forward pass written to files, for locating
//! where tl's numbers part from a reference implementation's, op by op.
//!
//! Off unless `TL_DUMP_TENSORS=DIR` is set when the first forward runs; then
//! every forward writes each named intermediate (rows of the step's tokens,
//! row-major f32, native endianness) to `DIR/NAME-LAYER.bin`, the names
//! following llama.cpp's graph (`attn_norm`, `Qcur`, `kqv_out`, `l_out`, …)
//! so `scripts/compare_tensors.py` can pair them with llama.cpp's. A later
//! forward overwrites the files of an earlier one. A file that cannot be
//! written is reported on stderr once per name and otherwise ignored: the
//! dump never changes what the forward computes or returns.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("TL_DUMP_TENSORS").map(PathBuf::from))
        .as_ref()
}

/// Whether dumping is on (one load of an initialized cell per call).
#[inline]
pub(crate) fn enabled() -> bool {
    dir().is_some()
}

/// Writes `data` as `NAME-LAYER.bin` (or `NAME.bin` without a layer).
#[cold]
pub(crate) fn write(name: &str, layer: Option<usize>, data: &[f32]) {
    let Some(d) = dir() else { return };
    let file = match layer {
        Some(l) => d.join(format!("{name}-{l}.bin")),
        None => d.join(format!("{name}.bin")),
    };
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_ne_bytes());
    }
    let r = std::fs::create_dir_all(d)
        .and_then(|()| std::fs::File::create(&file))
        .and_then(|mut f| f.write_all(&bytes));
    if let Err(e) = r {
        eprintln!("tl: TL_DUMP_TENSORS: cannot write {}: {e}", file.display());
    }
}
