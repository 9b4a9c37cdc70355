//! GGML block formats: `#[repr(C)]` block structs mirroring `ggml-common.h`,
//! scalar dequantize and scalar quantize-from-f32 for each, and dispatch by
//! [`GgmlType`].

use tl_gguf::GgmlType;

use crate::error::{CoreError, Result};

/// Types this crate can dequantize and quantize.
pub fn is_supported(ty: GgmlType) -> bool {
    let _ = ty;
    false
}

/// Dequantizes `dst.len()` values of type `ty` from the raw bytes `src`
/// (exactly `ty.bytes_for(dst.len())` bytes).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let _ = (src, dst);
    Err(CoreError::UnsupportedType {
        ty,
        tensor: "<dequantize>".into(),
    })
}

/// Quantizes `src` into `dst` (exactly `ty.bytes_for(src.len())` bytes) with
/// the scalar reference algorithm of ggml (`quantize_row_*_ref`).
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    let _ = (src, dst);
    Err(CoreError::UnsupportedType {
        ty,
        tensor: "<quantize>".into(),
    })
}
