//! Reading one row of a weight in any dtype as f32: the single place where
//! matmul and embedding meet the storage formats.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::storage::CpuStorage;
use crate::tensor::block_row;

/// Decodes `dst.len()` elements starting at element offset `row` of `s`
/// into `dst`. Block formats go through `quant::dequantize`; `row` and the
/// length are whole blocks for every valid block-format layout.
pub(crate) fn decode_row(
    op: &'static str,
    s: &CpuStorage,
    row: usize,
    dst: &mut [f32],
) -> Result<()> {
    let len = dst.len();
    let range = row..row.saturating_add(len);
    let out_of_bounds = || CoreError::SizeMismatch {
        op,
        what: format!(
            "row {range:?} outside storage of {} elements",
            s.elem_count()
        ),
    };
    match s.dtype() {
        DType::F32 => {
            let src = s.as_slice::<f32>().and_then(|v| v.get(range.clone()));
            dst.copy_from_slice(src.ok_or_else(out_of_bounds)?);
        }
        DType::F16 => {
            let src = s.as_slice::<f16>().and_then(|v| v.get(range.clone()));
            src.ok_or_else(out_of_bounds)?.convert_to_f32_slice(dst);
        }
        DType::BF16 => {
            let src = s.as_slice::<bf16>().and_then(|v| v.get(range.clone()));
            src.ok_or_else(out_of_bounds)?.convert_to_f32_slice(dst);
        }
        DType::Quantized(ty) => {
            crate::quant::dequantize(ty.ggml_type(), block_row(op, s, ty, row, len)?, dst)?;
        }
        dtype @ DType::I32 => return Err(CoreError::UnsupportedDType { op, dtype }),
    }
    Ok(())
}

/// Row `row..row + len` of a weight as f32: f32 weights are borrowed in
/// place, other dtypes decoded into `scratch` (at least `len` long).
pub(crate) fn weight_row<'a>(
    op: &'static str,
    s: &'a CpuStorage,
    row: usize,
    len: usize,
    scratch: &'a mut [f32],
) -> Result<&'a [f32]> {
    if let Some(v) = s.as_slice::<f32>() {
        return v
            .get(row..row.saturating_add(len))
            .ok_or_else(|| CoreError::SizeMismatch {
                op,
                what: format!("row at {row} outside storage of {} elements", v.len()),
            });
    }
    let have = scratch.len();
    let dst = scratch
        .get_mut(..len)
        .ok_or_else(|| CoreError::SizeMismatch {
            op,
            what: format!("scratch of {have} for a row of {len}"),
        })?;
    decode_row(op, s, row, dst)?;
    Ok(dst)
}
