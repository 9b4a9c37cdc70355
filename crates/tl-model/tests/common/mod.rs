#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::PathBuf;

/// Real model files live outside the repo; CI fetches them first. Missing
/// files fail the test with the command that fetches them.
pub fn model_path(name: &str) -> PathBuf {
    tl_gguf::cached_model(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).expect("fixture is JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}
