//! Shared helpers for the tests that need the real model files.

use std::path::PathBuf;

/// `$TL_MODEL_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/tensorlogic/models`.
pub fn model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TL_MODEL_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("tensorlogic").join("models")
}

/// The path of a model file; fails the test (never skips) when it is missing.
pub fn model_path(file: &str) -> PathBuf {
    let p = model_dir().join(file);
    assert!(
        p.is_file(),
        "model file {} is missing: run `python3 scripts/fetch_models.py` (or set TL_MODEL_DIR)",
        p.display()
    );
    p
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
