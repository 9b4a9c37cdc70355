//! Shared helpers for the tests that need the real model files.

use std::path::PathBuf;

/// The path of a model file; fails the test (never skips) when it is missing.
pub fn model_path(file: &str) -> PathBuf {
    tl_gguf::cached_model(file).unwrap_or_else(|e| panic!("{e}"))
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A fixture's array of strings.
pub fn strs(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|t| t.as_str().unwrap_or_else(|| panic!("not a string: {t}")))
        .collect()
}
