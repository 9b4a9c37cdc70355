//! MXFP4 against Q8_0, AVX2 and AVX-512 VNNI: the IQ4_NL kernel shape of
//! `iq4` with the doubled E2M1 levels as the lookup table and the E8M0
//! exponent as the weight scale. Each block's integer sum is exact; eight
//! sums are scaled in one vector and added to the row's sum lane by lane in
//! block order, the float operations of ggml's generic
//! `ggml_vec_dot_mxfp4_q8_0`, so these kernels give the reference's bits.
//!
//! Pointer arithmetic stays inside the lengths checked by
//! `check_kernel_args` (weights: one whole row; activations: rows
//! `row0..row0 + R` of `row_bytes` each).

use std::arch::x86_64::*;

use tl_gguf::GgmlType;

use super::avx2::reduce8;
use super::f16_at;
use super::iq4::{add_lanes, dot_avx2, dot_vnni, nl32_kernel, table_of, unpack};
use crate::quant::dot::{Acts, Kernel};
use crate::quant::mxfp4::{e8m0_to_f32_half, KVALUES_MXFP4};

pub(super) fn install_avx2(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::MXFP4, mx_avx2);
}

pub(super) fn install_avx512(set: &mut dyn FnMut(GgmlType, Kernel)) {
    set(GgmlType::MXFP4, mx_vnni);
}

/// Bytes of one MXFP4 block and one Q8_0 block.
const MX_BYTES: usize = 17;
const Q8_0_BYTES: usize = 34;

/// The level table in both 128-bit lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn levels() -> __m256i {
    table_of(KVALUES_MXFP4)
}

/// The E8M0 scale of the block at `b`, halved (the table holds doubled
/// levels).
///
/// # Safety
///
/// `b` points at a block.
#[inline]
unsafe fn mx_scale(b: *const u8) -> f32 {
    e8m0_to_f32_half(*b)
}

macro_rules! mxfp4_kernel {
    ($feat:literal, $dot:ident, $name:ident, $body:ident) => {
        nl32_kernel!("MXFP4", $feat, $dot, $body, MX_BYTES, 1, mx_scale, levels());
        k_entry!($name, $body);
    };
}

mxfp4_kernel!("avx2,fma,f16c", dot_avx2, mx_avx2, mx_avx2_rows);
mxfp4_kernel!(
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dot_vnni,
    mx_vnni,
    mx_vnni_rows
);
