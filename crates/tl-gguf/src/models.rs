//! Where the real model files of the tests and benchmarks are cached
//! (`scripts/fetch_models.py` fills it).

use std::path::PathBuf;

/// `$TL_MODEL_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/tensorlogic/models`.
pub fn model_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TL_MODEL_DIR") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("tensorlogic")
        .join("models")
}

/// The path of the cached model file `name`, or an error that says how to
/// fetch it.
pub fn cached_model(name: &str) -> Result<PathBuf, String> {
    let p = model_cache_dir().join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "model file {} is missing: run `python3 scripts/fetch_models.py` (or set TL_MODEL_DIR)",
            p.display()
        ))
    }
}
