//! Which arithmetic the CPU kernels follow, chosen once per process.
//!
//! - [`Numerics::Fast`] (the default): the SIMD kernels. Their integer block
//!   sums are ggml's exactly, but they add the scaled block terms in their
//!   own order (several lanes, then a tree), so results differ from any
//!   llama.cpp build in the last bits of each product, as llama.cpp's own
//!   builds and batch shapes differ from each other.
//! - [`Numerics::Reference`]: the arithmetic of llama.cpp's portable CPU
//!   code (ggml-cpu compiled for the x86-64 baseline, no AVX and no FMA) bit
//!   for bit: activations quantized by `quantize_row_q8_0_ref`, every dot
//!   product by ggml's generic kernels in their order, attention dots and
//!   weighted sums in f64 as `ggml_vec_dot_f16` does, the softmax and SiLU
//!   with ggml's vector `expf` in four-lane groups. Much slower (no SIMD in
//!   the matmuls), for proving agreement and for reproducing the reference.
//!
//! The mode is fixed by the first call of [`numerics`]: from
//! `TL_NUMERICS=reference` in the environment, or from [`set_numerics`]
//! called before any kernel ran.

use std::sync::OnceLock;

/// See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numerics {
    Fast,
    Reference,
}

impl std::str::FromStr for Numerics {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Numerics::Fast),
            "reference" => Ok(Numerics::Reference),
            other => Err(format!(
                "unknown numerics {other:?}: expected \"fast\" or \"reference\""
            )),
        }
    }
}

static MODE: OnceLock<Numerics> = OnceLock::new();

/// The process's numerics (fixed from here on).
pub fn numerics() -> Numerics {
    *MODE.get_or_init(|| match std::env::var("TL_NUMERICS") {
        Err(_) => Numerics::Fast,
        Ok(v) => v.parse().unwrap_or_else(|e: String| {
            eprintln!("tl: TL_NUMERICS: {e}; using fast");
            Numerics::Fast
        }),
    })
}

/// Whether the process runs [`Numerics::Reference`].
#[inline]
pub fn reference() -> bool {
    numerics() == Numerics::Reference
}

/// Fixes the numerics before any kernel runs. Returns the mode in force
/// when it was fixed already to another one.
pub fn set_numerics(mode: Numerics) -> Result<(), Numerics> {
    let now = *MODE.get_or_init(|| mode);
    if now == mode {
        Ok(())
    } else {
        Err(now)
    }
}
