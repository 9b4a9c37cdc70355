//! AVX-512 (F, BW, VL, VNNI) kernels.

use tl_gguf::GgmlType;

use crate::quant::dot::Kernel;

pub(super) fn install(_set: &mut dyn FnMut(GgmlType, Kernel)) {}
