#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::PathBuf;

/// Real model files live outside the repo; CI fetches them first. Missing
/// files fail the test with the command that fetches them.
pub fn model_path(name: &str) -> PathBuf {
    let dir = std::env::var("TL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let cache = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("tensorlogic").join("models")
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run `python3 scripts/fetch_models.py`",
        p.display()
    );
    p
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
