//! GGML block formats: `#[repr(C)]` block structs mirroring `ggml-common.h`,
//! scalar dequantize and scalar quantize-from-f32 for each, and dispatch by
//! [`GgmlType`].
//!
//! Where things are:
//! - [`float`]: F32, F16, BF16 (one value per element, no block).
//! - [`legacy`]: the 32-value blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.
//! - [`k_quants`]: the 256-value super-blocks Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K.
//! - [`iq4`]: the non-linear 4-bit IQ4_NL (32 values) and IQ4_XS (256).
//! - [`iq3`], [`iq2`], [`iq1`]: the grid formats IQ3_XXS, IQ3_S, IQ2_XXS,
//!   IQ2_XS, IQ2_S, IQ1_S and IQ1_M (256 values), with their tables in
//!   [`iq_grids`].
//! - [`mxfp4`]: MXFP4 (32 E2M1 values under one E8M0 exponent: gpt-oss).
//! - [`ternary`]: the ternary TQ1_0 and TQ2_0 (256 values in {-1, 0, 1}
//!   times one scale).
//! - [`k_search`]: the scale searches of ggml-quants.c (`make_qx_quants`,
//!   `make_qkx2_quants`, `make_q3_quants`, `make_qkx3_quants`,
//!   `make_qp_quants`, `nearest_int`) that the K-quant quantizers share.
//! - [`weighted`]: the importance-matrix quantizers (`quantize_row_*_impl`),
//!   reached through [`quantize_weighted`].
//! - [`lowbit`]: a typed library API apart from the GGML formats: INT8/INT4/INT2
//!   (symmetric or asymmetric; per-tensor, per-channel or per-group scales)
//!   with packed codes, and OCP FP8 E4M3/E5M2 conversions and scaled tensors.
//!
//! The scalar code here is the reference: it follows ggml's
//! `dequantize_row_*` and `quantize_row_*_ref` operation by operation, so that
//! its output is bit-identical to ggml's (checked against gguf-py's numpy port
//! by `tests/quant_fixtures.rs`). SIMD kernels are to be held to it.
//!
//! Block bytes come straight from GGUF files, which only guarantee 1-byte
//! alignment, so each block is copied out with `bytemuck::pod_read_unaligned`
//! (a fixed-size copy onto the stack) rather than reinterpreting the slice.

pub mod dot;
pub mod float;
pub mod iq1;
pub mod iq2;
pub mod iq3;
pub mod iq4;
pub mod iq_grids;
mod iq_search;
pub mod k_quants;
pub mod k_search;
pub mod legacy;
pub mod lowbit;
pub mod mxfp4;
pub mod ternary;
pub mod weighted;

use tl_gguf::GgmlType;

use crate::error::{CoreError, Result};

// GGUF stores every field little-endian, and the block structs are read and
// written with the host's byte order.
#[cfg(target_endian = "big")]
compile_error!("the GGML block formats are little-endian; big-endian hosts are not supported");

/// Placeholder tensor name for errors raised without one; callers that know
/// the tensor use [`dequantize_named`].
pub const UNNAMED: &str = "<unnamed>";

/// A GGML block: `VALUES` elements stored in `size_of::<Self>()` bytes.
///
/// `dequantize` writes exactly `VALUES` floats and `quantize` reads exactly
/// `VALUES` floats; the dispatch below only ever hands them slices of that
/// length.
///
/// # Panics
///
/// Both panic (out-of-bounds index) if given fewer than `VALUES` floats.
pub trait Block: bytemuck::Pod {
    const TYPE: GgmlType;
    /// Elements per block (ggml's `blck_size`).
    const VALUES: usize;

    fn dequantize(&self, out: &mut [f32]);
    fn quantize(x: &[f32]) -> Self;
}

/// A GGML block this crate dequantizes but has no [`Block::quantize`] for:
/// the grid formats, whose ggml quantizers run on whole rows
/// ([`quantize_weighted`]).
pub trait Dequantize: bytemuck::Pod {
    const TYPE: GgmlType;
    /// Elements per block (ggml's `blck_size`).
    const VALUES: usize;

    fn dequantize(&self, out: &mut [f32]);
}

/// The grid formats: dequantized here, quantized by row only.
fn is_grid(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        IQ3_XXS | IQ3_S | IQ2_XXS | IQ2_XS | IQ2_S | IQ1_S | IQ1_M
    )
}

/// Types this crate can dequantize (and read in a model).
pub fn is_supported(ty: GgmlType) -> bool {
    is_quantize_supported(ty) || is_grid(ty)
}

/// Types [`quantize`] writes (with ggml's reference quantizer; for the
/// grid types IQ3_XXS, IQ3_S, IQ2_S and IQ1_M its row quantizer without
/// importance weights).
pub fn is_quantize_supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        IQ3_XXS
            | IQ3_S
            | IQ2_S
            | IQ1_M
            | F32
            | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q8_1
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | Q8_K
            | IQ4_NL
            | IQ4_XS
            | MXFP4
            | TQ1_0
            | TQ2_0
    )
}

/// Dequantizes `dst.len()` values of type `ty` from the raw bytes `src`
/// (exactly `ty.bytes_for(dst.len())` bytes).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    dequantize_named(ty, UNNAMED, src, dst)
}

/// [`dequantize`] for the tensor `name`, which errors then name.
pub fn dequantize_named(ty: GgmlType, name: &str, src: &[u8], dst: &mut [f32]) -> Result<()> {
    use GgmlType::*;
    if !is_supported(ty) {
        return Err(unsupported(ty, name));
    }
    check_sizes("dequantize", ty, name, dst.len(), src.len())?;
    match ty {
        F32 => float::dequantize_f32(src, dst),
        F16 => float::dequantize_f16(src, dst),
        BF16 => float::dequantize_bf16(src, dst),
        Q4_0 => dequantize_blocks::<legacy::BlockQ4_0>(src, dst),
        Q4_1 => dequantize_blocks::<legacy::BlockQ4_1>(src, dst),
        Q5_0 => dequantize_blocks::<legacy::BlockQ5_0>(src, dst),
        Q5_1 => dequantize_blocks::<legacy::BlockQ5_1>(src, dst),
        Q8_0 => dequantize_blocks::<legacy::BlockQ8_0>(src, dst),
        Q8_1 => dequantize_blocks::<legacy::BlockQ8_1>(src, dst),
        Q2_K => dequantize_blocks::<k_quants::BlockQ2K>(src, dst),
        Q3_K => dequantize_blocks::<k_quants::BlockQ3K>(src, dst),
        Q4_K => dequantize_blocks::<k_quants::BlockQ4K>(src, dst),
        Q5_K => dequantize_blocks::<k_quants::BlockQ5K>(src, dst),
        Q6_K => dequantize_blocks::<k_quants::BlockQ6K>(src, dst),
        Q8_K => dequantize_blocks::<k_quants::BlockQ8K>(src, dst),
        IQ4_NL => dequantize_blocks::<iq4::BlockIQ4NL>(src, dst),
        IQ4_XS => dequantize_blocks::<iq4::BlockIQ4XS>(src, dst),
        IQ3_XXS => dequantize_grid::<iq3::BlockIQ3XXS>(src, dst),
        IQ3_S => dequantize_grid::<iq3::BlockIQ3S>(src, dst),
        IQ2_XXS => dequantize_grid::<iq2::BlockIQ2XXS>(src, dst),
        IQ2_XS => dequantize_grid::<iq2::BlockIQ2XS>(src, dst),
        IQ2_S => dequantize_grid::<iq2::BlockIQ2S>(src, dst),
        IQ1_S => dequantize_grid::<iq1::BlockIQ1S>(src, dst),
        IQ1_M => dequantize_grid::<iq1::BlockIQ1M>(src, dst),
        MXFP4 => dequantize_blocks::<mxfp4::BlockMXFP4>(src, dst),
        TQ1_0 => dequantize_blocks::<ternary::BlockTQ1_0>(src, dst),
        TQ2_0 => dequantize_blocks::<ternary::BlockTQ2_0>(src, dst),
        _ => return Err(unsupported(ty, name)),
    }
    Ok(())
}

/// Quantizes `src` into `dst` (exactly `ty.bytes_for(src.len())` bytes) with
/// the scalar reference algorithm of ggml (`quantize_row_*_ref`). The grid
/// types IQ3_XXS, IQ3_S, IQ2_S and IQ1_M are quantized as one row without
/// importance weights (their `quantize_row_*_ref`; without weights each
/// super-block is quantized on its own, so the row length does not
/// matter); IQ2_XXS, IQ2_XS and IQ1_S need an importance matrix, which
/// only [`quantize_weighted`] takes, and are an error here.
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    use GgmlType::*;
    if requires_imatrix(ty) {
        return Err(CoreError::Invalid {
            op: "quantize",
            reason: format!("{ty} needs an importance matrix: use quantize_weighted"),
        });
    }
    if !is_quantize_supported(ty) {
        return Err(unsupported(ty, UNNAMED));
    }
    check_sizes("quantize", ty, UNNAMED, src.len(), dst.len())?;
    if has_grid_quantizer(ty) {
        return quantize_weighted(ty, src, src.len(), None, dst);
    }
    match ty {
        F32 => float::quantize_f32(src, dst),
        F16 => float::quantize_f16(src, dst),
        BF16 => float::quantize_bf16(src, dst),
        Q4_0 => quantize_blocks::<legacy::BlockQ4_0>(src, dst),
        Q4_1 => quantize_blocks::<legacy::BlockQ4_1>(src, dst),
        Q5_0 => quantize_blocks::<legacy::BlockQ5_0>(src, dst),
        Q5_1 => quantize_blocks::<legacy::BlockQ5_1>(src, dst),
        Q8_0 => quantize_blocks::<legacy::BlockQ8_0>(src, dst),
        Q8_1 => quantize_blocks::<legacy::BlockQ8_1>(src, dst),
        Q2_K => quantize_blocks::<k_quants::BlockQ2K>(src, dst),
        Q3_K => quantize_blocks::<k_quants::BlockQ3K>(src, dst),
        Q4_K => quantize_blocks::<k_quants::BlockQ4K>(src, dst),
        Q5_K => quantize_blocks::<k_quants::BlockQ5K>(src, dst),
        Q6_K => quantize_blocks::<k_quants::BlockQ6K>(src, dst),
        Q8_K => quantize_blocks::<k_quants::BlockQ8K>(src, dst),
        IQ4_NL => quantize_blocks::<iq4::BlockIQ4NL>(src, dst),
        IQ4_XS => quantize_blocks::<iq4::BlockIQ4XS>(src, dst),
        MXFP4 => quantize_blocks::<mxfp4::BlockMXFP4>(src, dst),
        TQ1_0 => quantize_blocks::<ternary::BlockTQ1_0>(src, dst),
        TQ2_0 => quantize_blocks::<ternary::BlockTQ2_0>(src, dst),
        _ => return Err(unsupported(ty, UNNAMED)),
    }
    Ok(())
}

/// Whether [`quantize_weighted`] quantizes to `ty`: the types
/// `ggml_quantize_chunk` makes that this crate has quantizers for.
pub fn is_weighted_supported(ty: GgmlType) -> bool {
    (is_quantize_supported(ty) && !matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K))
        || has_grid_quantizer(ty)
}

/// The grid formats [`quantize_weighted`] quantizes to.
fn has_grid_quantizer(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        IQ3_XXS | IQ3_S | IQ2_XXS | IQ2_XS | IQ2_S | IQ1_S | IQ1_M
    )
}

/// ggml `ggml_quantize_requires_imatrix`: the types whose quantizers need an
/// importance matrix (IQ2_XXS, IQ2_XS, IQ1_S).
pub fn requires_imatrix(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::IQ2_XXS | GgmlType::IQ2_XS | GgmlType::IQ1_S)
}

/// ggml `ggml_quantize_chunk` (from the first row): quantizes the rows of
/// `n_per_row` values in `src` into `dst` (exactly
/// `ty.bytes_for(src.len())` bytes), with the importance matrix `imatrix`
/// (one weight per column, `n_per_row` of them) when given.
///
/// As in ggml, with an importance matrix Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K to
/// Q6_K, IQ4_NL and IQ4_XS run the weighted `quantize_row_*_impl` quantizers ([`weighted`]);
/// F32, F16, BF16, Q8_0, MXFP4, TQ1_0 and TQ2_0 ignore it; without one every type runs its
/// reference quantizer, as [`quantize`] does. The same `imatrix` applies to
/// every row (for a 3-D expert tensor, call this once per expert with that
/// expert's slice).
pub fn quantize_weighted(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    dst: &mut [u8],
) -> Result<()> {
    use GgmlType::*;
    const OP: &str = "quantize_weighted";
    if !is_weighted_supported(ty) {
        return Err(unsupported(ty, UNNAMED));
    }
    check_sizes(OP, ty, UNNAMED, src.len(), dst.len())?;
    if src.is_empty() {
        return Ok(());
    }
    if n_per_row == 0
        || !src.len().is_multiple_of(n_per_row)
        || !n_per_row.is_multiple_of(ty.block_size())
    {
        return Err(CoreError::Invalid {
            op: OP,
            reason: format!(
                "{} values are not whole rows of {n_per_row} values in whole {ty} blocks of {}",
                src.len(),
                ty.block_size()
            ),
        });
    }
    if imatrix.is_none() && requires_imatrix(ty) {
        return Err(CoreError::Invalid {
            op: OP,
            reason: format!("{ty} needs an importance matrix"),
        });
    }
    if has_grid_quantizer(ty) {
        if let Some(qw) = imatrix {
            if qw.len() != n_per_row {
                return Err(CoreError::SizeMismatch {
                    op: OP,
                    what: format!(
                        "the importance matrix has {} weights for rows of {n_per_row} values",
                        qw.len()
                    ),
                });
            }
        }
        let row_bytes = dst.len() / (src.len() / n_per_row);
        for (x, y) in src
            .chunks_exact(n_per_row)
            .zip(dst.chunks_exact_mut(row_bytes))
        {
            match ty {
                IQ3_XXS => grid_row(x, y, imatrix, iq3::quantize_row_iq3_xxs),
                IQ3_S => grid_row(x, y, imatrix, iq3::quantize_row_iq3_s),
                IQ2_S => grid_row(x, y, imatrix, iq2::quantize_row_iq2_s),
                IQ1_M => grid_row(x, y, imatrix, iq1::quantize_row_iq1_m),
                IQ2_XXS | IQ2_XS | IQ1_S => {
                    // Checked above: these have an importance matrix.
                    let Some(qw) = imatrix else {
                        return Err(unsupported(ty, UNNAMED));
                    };
                    match ty {
                        IQ2_XXS => weighted_row(x, y, qw, iq2::quantize_row_iq2_xxs),
                        IQ2_XS => weighted_row(x, y, qw, iq2::quantize_row_iq2_xs),
                        _ => weighted_row(x, y, qw, iq1::quantize_row_iq1_s),
                    }
                }
                _ => return Err(unsupported(ty, UNNAMED)),
            }
        }
        return Ok(());
    }
    let Some(qw) =
        imatrix.filter(|_| !matches!(ty, F32 | F16 | BF16 | Q8_0 | MXFP4 | TQ1_0 | TQ2_0))
    else {
        return quantize(ty, src, dst);
    };
    if qw.len() != n_per_row {
        return Err(CoreError::SizeMismatch {
            op: OP,
            what: format!(
                "the importance matrix has {} weights for rows of {n_per_row} values",
                qw.len()
            ),
        });
    }
    let row_bytes = dst.len() / (src.len() / n_per_row);
    for (x, y) in src
        .chunks_exact(n_per_row)
        .zip(dst.chunks_exact_mut(row_bytes))
    {
        match ty {
            Q4_0 => weighted_row(x, y, qw, weighted::quantize_row_q4_0),
            Q4_1 => weighted_row(x, y, qw, weighted::quantize_row_q4_1),
            Q5_0 => weighted_row(x, y, qw, weighted::quantize_row_q5_0),
            Q5_1 => weighted_row(x, y, qw, weighted::quantize_row_q5_1),
            Q2_K => weighted_row(x, y, qw, weighted::quantize_row_q2_k),
            Q3_K => weighted_row(x, y, qw, weighted::quantize_row_q3_k),
            Q4_K => weighted_row(x, y, qw, weighted::quantize_row_q4_k),
            Q5_K => weighted_row(x, y, qw, weighted::quantize_row_q5_k),
            Q6_K => weighted_row(x, y, qw, weighted::quantize_row_q6_k),
            IQ4_NL => weighted_row(x, y, qw, iq4::quantize_row_iq4_nl),
            IQ4_XS => weighted_row(x, y, qw, iq4::quantize_row_iq4_xs),
            _ => return Err(unsupported(ty, UNNAMED)),
        }
    }
    Ok(())
}

/// Runs a grid row quantizer (importance weights optional) on one row's
/// blocks, built aside and copied into the byte row.
fn grid_row<B: bytemuck::Pod>(
    x: &[f32],
    y: &mut [u8],
    qw: Option<&[f32]>,
    f: fn(&[f32], &mut [B], Option<&[f32]>),
) {
    let size = std::mem::size_of::<B>();
    let mut blocks = vec![B::zeroed(); y.len() / size];
    f(x, &mut blocks, qw);
    for (bytes, b) in y.chunks_exact_mut(size).zip(&blocks) {
        bytes.copy_from_slice(bytemuck::bytes_of(b));
    }
}

/// Runs a weighted row quantizer on one row's blocks, built aside and copied
/// into the byte row (which need not be aligned for `B`).
fn weighted_row<B: bytemuck::Pod>(
    x: &[f32],
    y: &mut [u8],
    qw: &[f32],
    f: fn(&[f32], &mut [B], &[f32]),
) {
    let size = std::mem::size_of::<B>();
    let mut blocks = vec![B::zeroed(); y.len() / size];
    f(x, &mut blocks, qw);
    for (bytes, b) in y.chunks_exact_mut(size).zip(&blocks) {
        bytes.copy_from_slice(bytemuck::bytes_of(b));
    }
}

fn unsupported(ty: GgmlType, name: &str) -> CoreError {
    CoreError::UnsupportedType {
        ty,
        tensor: name.to_owned(),
    }
}

/// Checks that `n_values` elements of `ty` are whole blocks stored in exactly
/// `n_bytes` bytes.
fn check_sizes(
    op: &'static str,
    ty: GgmlType,
    name: &str,
    n_values: usize,
    n_bytes: usize,
) -> Result<()> {
    let expected = u64::try_from(n_values)
        .ok()
        .and_then(|n| ty.bytes_for(n))
        .ok_or(CoreError::PartialBlock {
            op,
            ty,
            len: n_values,
            block: ty.block_size(),
        })?;
    if u64::try_from(n_bytes).ok() != Some(expected) {
        return Err(CoreError::SizeMismatch {
            op,
            what: format!(
                "tensor {name}: {n_values} values of {ty} take {expected} bytes, got {n_bytes}"
            ),
        });
    }
    Ok(())
}

/// Runs `B::dequantize` over whole blocks; the caller has checked that `src`
/// holds exactly `dst.len() / B::VALUES` blocks.
fn dequantize_blocks<B: Block>(src: &[u8], dst: &mut [f32]) {
    let size = std::mem::size_of::<B>();
    for (bytes, out) in src.chunks_exact(size).zip(dst.chunks_exact_mut(B::VALUES)) {
        let block: B = bytemuck::pod_read_unaligned(bytes);
        block.dequantize(out);
    }
}

/// Runs `B::dequantize` of a grid format over whole blocks; the caller has
/// checked the sizes.
fn dequantize_grid<B: Dequantize>(src: &[u8], dst: &mut [f32]) {
    let size = std::mem::size_of::<B>();
    for (bytes, out) in src.chunks_exact(size).zip(dst.chunks_exact_mut(B::VALUES)) {
        let block: B = bytemuck::pod_read_unaligned(bytes);
        block.dequantize(out);
    }
}

/// Runs `B::quantize` over whole blocks; the caller has checked the sizes.
fn quantize_blocks<B: Block>(src: &[f32], dst: &mut [u8]) {
    let size = std::mem::size_of::<B>();
    for (x, bytes) in src.chunks_exact(B::VALUES).zip(dst.chunks_exact_mut(size)) {
        let block = B::quantize(x);
        bytes.copy_from_slice(bytemuck::bytes_of(&block));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_tl_gguf() {
        fn check<B: Block>() {
            assert_eq!(std::mem::size_of::<B>(), B::TYPE.type_size(), "{}", B::TYPE);
            assert_eq!(B::VALUES, B::TYPE.block_size(), "{}", B::TYPE);
        }
        check::<legacy::BlockQ4_0>();
        check::<legacy::BlockQ4_1>();
        check::<legacy::BlockQ5_0>();
        check::<legacy::BlockQ5_1>();
        check::<legacy::BlockQ8_0>();
        check::<legacy::BlockQ8_1>();
        check::<k_quants::BlockQ2K>();
        check::<k_quants::BlockQ3K>();
        check::<k_quants::BlockQ4K>();
        check::<k_quants::BlockQ5K>();
        check::<k_quants::BlockQ6K>();
        check::<k_quants::BlockQ8K>();
        check::<iq4::BlockIQ4NL>();
        check::<iq4::BlockIQ4XS>();
        fn check_grid<B: Dequantize>() {
            assert_eq!(std::mem::size_of::<B>(), B::TYPE.type_size(), "{}", B::TYPE);
            assert_eq!(B::VALUES, B::TYPE.block_size(), "{}", B::TYPE);
        }
        check_grid::<iq3::BlockIQ3XXS>();
        check_grid::<iq3::BlockIQ3S>();
        check_grid::<iq2::BlockIQ2XXS>();
        check_grid::<iq2::BlockIQ2XS>();
        check_grid::<iq2::BlockIQ2S>();
        check_grid::<iq1::BlockIQ1S>();
        check_grid::<iq1::BlockIQ1M>();
        check::<mxfp4::BlockMXFP4>();
        check::<ternary::BlockTQ1_0>();
        check::<ternary::BlockTQ2_0>();
    }

    #[test]
    fn unsupported_types_are_named_errors() {
        for ty in tl_gguf::types::ALL_TYPES {
            if is_supported(ty) {
                continue;
            }
            let n = ty.block_size();
            let bytes = vec![0u8; ty.type_size()];
            let mut out = vec![0f32; n];
            let err = dequantize_named(ty, "blk.0.attn_q.weight", &bytes, &mut out)
                .err()
                .map(|e| e.to_string());
            assert_eq!(
                err.as_deref(),
                Some(
                    format!("unsupported tensor type {ty} in tensor blk.0.attn_q.weight").as_str()
                )
            );
            let err = dequantize(ty, &bytes, &mut out)
                .err()
                .map(|e| e.to_string());
            assert_eq!(
                err,
                Some(format!("unsupported tensor type {ty} in tensor {UNNAMED}"))
            );
            let mut q = vec![0u8; ty.type_size()];
            assert!(matches!(
                quantize(ty, &out, &mut q),
                Err(CoreError::UnsupportedType { .. })
            ));
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        for ty in tl_gguf::types::ALL_TYPES
            .into_iter()
            .filter(|&t| is_supported(t))
        {
            let n = ty.block_size() * 2;
            let size = ty.type_size() * 2;
            let mut out = vec![0f32; n];
            // One byte short, one byte long, nothing at all.
            for len in [size - 1, size + 1, 0] {
                let bytes = vec![0u8; len];
                assert!(
                    matches!(
                        dequantize(ty, &bytes, &mut out),
                        Err(CoreError::SizeMismatch { .. })
                    ),
                    "{ty} {len}"
                );
                let mut q = vec![0u8; len];
                let want_size_error = is_quantize_supported(ty);
                assert_eq!(
                    matches!(
                        quantize(ty, &out, &mut q),
                        Err(CoreError::SizeMismatch { .. })
                    ),
                    want_size_error,
                    "{ty} {len}"
                );
            }
            if ty.block_size() > 1 {
                // A partial block is rejected before the byte count is looked at.
                let mut short = vec![0f32; n - 1];
                let bytes = vec![0u8; size];
                assert!(matches!(
                    dequantize(ty, &bytes, &mut short),
                    Err(CoreError::PartialBlock { .. })
                ));
                let mut q = vec![0u8; size];
                assert_eq!(
                    matches!(
                        quantize(ty, &short, &mut q),
                        Err(CoreError::PartialBlock { .. })
                    ),
                    is_quantize_supported(ty)
                );
            }
            let bytes = vec![0u8; size];
            assert!(dequantize(ty, &bytes, &mut out).is_ok(), "{ty}");
            let err = dequantize_named(ty, "tok_embd", &bytes[1..], &mut out)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("tok_embd"), "{err}");
        }
    }

    #[test]
    fn empty_buffers_are_fine() {
        for ty in tl_gguf::types::ALL_TYPES
            .into_iter()
            .filter(|&t| is_supported(t))
        {
            assert!(dequantize(ty, &[], &mut []).is_ok());
            assert_eq!(
                quantize(ty, &[], &mut []).is_ok(),
                is_quantize_supported(ty)
            );
        }
    }

    #[test]
    fn plain_quantize_of_the_grid_types_is_the_unweighted_row_quantizer() {
        use GgmlType::*;
        let x: Vec<f32> = (0..1024)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        for ty in [IQ3_XXS, IQ3_S, IQ2_S, IQ1_M] {
            let n = ty.bytes_for(1024).unwrap() as usize;
            let mut plain = vec![0u8; n];
            quantize(ty, &x, &mut plain).unwrap();
            // Rows of any length give the same bytes without weights.
            for row in [256, 512, 1024] {
                let mut rows = vec![0u8; n];
                quantize_weighted(ty, &x, row, None, &mut rows).unwrap();
                assert_eq!(plain, rows, "{ty} rows of {row}");
            }
            let mut back = vec![0f32; 1024];
            dequantize(ty, &plain, &mut back).unwrap();
            assert!(back.iter().any(|&v| v != 0.0), "{ty}");
        }
        for ty in [IQ2_XXS, IQ2_XS, IQ1_S] {
            let mut q = vec![0u8; ty.bytes_for(256).unwrap() as usize];
            let err = quantize(ty, &x[..256], &mut q).unwrap_err().to_string();
            assert!(err.contains("needs an importance matrix"), "{err}");
        }
    }

    #[test]
    fn misaligned_source_reads_the_same() {
        // Block data in a GGUF file may start at any byte; copy a block to an
        // odd offset and check the result does not change.
        let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q8_K,
            GgmlType::Q8_0,
            GgmlType::F16,
        ] {
            let size = ty.type_size() * 256 / ty.block_size();
            let mut q = vec![0u8; size];
            assert!(quantize(ty, &x, &mut q).is_ok());
            let mut a = vec![0f32; 256];
            assert!(dequantize(ty, &q, &mut a).is_ok());
            let mut shifted = vec![0u8; size + 1];
            shifted[1..].copy_from_slice(&q);
            let mut b = vec![0f32; 256];
            assert!(dequantize(ty, &shifted[1..], &mut b).is_ok());
            assert_eq!(a, b, "{ty}");
        }
    }
}
