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
use super::iq4::{add_lanes, dot_avx2, dot_vnni, unpack};
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
    let t = KVALUES_MXFP4.map(|v| v as u8);
    let v = u128::from_le_bytes(t);
    let lo = v as i64;
    let hi = (v >> 64) as i64;
    _mm256_broadcastsi128_si256(_mm_set_epi64x(hi, lo))
}

macro_rules! mxfp4_kernel {
    ($feat:literal, $dot:ident, $name:ident, $body:ident) => {
        /// MXFP4 against Q8_0, `R` activation rows.
        ///
        /// # Safety
        ///
        /// The CPU runs the instruction set; the arguments passed
        /// `check_kernel_args`, and `out.len() >= R`.
        #[target_feature(enable = $feat)]
        unsafe fn $body<const R: usize>(
            k: usize,
            w: &[u8],
            acts: &Acts<'_>,
            row0: usize,
            out: &mut [f32],
        ) {
            let nb = k / 32;
            let table = levels();
            let wp = w.as_ptr();
            let mut sumf = [0f32; R];
            let mut ib = 0;
            while ib < nb {
                let n = (nb - ib).min(8);
                let mut wv = [_mm256_setzero_si256(); 8];
                let mut dw = [0f32; 8];
                for j in 0..n {
                    let b = wp.add((ib + j) * MX_BYTES);
                    dw[j] = e8m0_to_f32_half(*b);
                    wv[j] = unpack(b.add(1), table);
                }
                for r in 0..R {
                    let ap = acts.bytes.as_ptr().add((row0 + r) * acts.row_bytes);
                    let mut p = [_mm256_setzero_si256(); 8];
                    let mut d = [0f32; 8];
                    for j in 0..n {
                        let a = ap.add((ib + j) * Q8_0_BYTES);
                        d[j] = f16_at(a) * dw[j];
                        p[j] = $dot(wv[j], _mm256_loadu_si256(a.add(2) as *const __m256i));
                    }
                    add_lanes(&mut sumf[r], _mm256_loadu_ps(d.as_ptr()), reduce8(&p), n);
                }
                ib += 8;
            }
            out[..R].copy_from_slice(&sumf);
        }

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
