//! Quantized dot products, the inner loop of every matmul.
//!
//! As in ggml-cpu, a matmul against a quantized weight first quantizes the
//! f32 activations once to the weight type's [`vec_dot_type`] (Q8_0 for
//! Q4_0/Q5_0/Q8_0/IQ4_NL/MXFP4, Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants, IQ4_XS,
//! the grid formats IQ3_XXS to IQ1_M and the ternary TQ1_0/TQ2_0, the weight's
//! own type for F32/F16/BF16), then takes integer dot products block by
//! block and scales each block's integer sum by the two block scales.
//!
//! Where things are:
//! - [`scalar`]: the reference of each dot product, a port of ggml's
//!   `ggml_vec_dot_*_generic`, integer sums and float order included.
//! - `x86`: the AVX2 (+FMA, F16C) and AVX-512 (BW, VL, VNNI) kernels. They
//!   form every block's integer sum exactly and only reorder the float
//!   accumulation *across* blocks (one SIMD lane per block), so they agree
//!   with the reference to a few ulps of the sum of the terms' magnitudes;
//!   `tests` holds them to that bound.
//! - [`quantize_activations`]: the activation side (ggml `from_float` of the
//!   vec-dot type).
//!
//! The kernel set is picked once per process from the CPU's features (run
//! time detection, never compile-time flags) and cached in a table of
//! function pointers.

pub mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use std::sync::OnceLock;

use half::f16;
use tl_gguf::GgmlType;

use crate::error::{CoreError, Result};
use crate::quant::k_quants::BlockQ8K;
use crate::quant::legacy::{BlockQ8_0, BlockQ8_1};
use crate::quant::{float, Block};

/// The type ggml quantizes activations to before a dot with weights of type
/// `ty` (ggml-cpu `type_traits_cpu[ty].vec_dot_type`). Types without a dot
/// product here map to themselves; see [`supports_dot`].
pub fn vec_dot_type(ty: GgmlType) -> GgmlType {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL | MXFP4 => Q8_0,
        Q4_1 | Q5_1 => Q8_1,
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS | IQ3_XXS | IQ3_S | IQ2_XXS | IQ2_XS | IQ2_S
        | IQ1_S | IQ1_M | TQ1_0 | TQ2_0 => Q8_K,
        other => other,
    }
}

/// Weight types [`vec_dot`] and [`crate::matmul::matmul`] handle.
pub fn supports_dot(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | IQ4_NL
            | IQ4_XS
            | IQ3_XXS
            | IQ3_S
            | IQ2_XXS
            | IQ2_XS
            | IQ2_S
            | IQ1_S
            | IQ1_M
            | MXFP4
            | TQ1_0
            | TQ2_0
    )
}

/// Bytes of one row of `k` values of type `ty`, if `k` is whole blocks.
pub fn row_bytes(ty: GgmlType, k: usize) -> Option<usize> {
    let bytes = ty.bytes_for(u64::try_from(k).ok()?)?;
    usize::try_from(bytes).ok()
}

/// The instruction sets the kernels can be built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// The scalar references only.
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`/`vpdpwssd`), plus AVX2/FMA/F16C.
    Avx512Vnni,
}

impl SimdLevel {
    /// The best level this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            if avx512 {
                return SimdLevel::Avx512Vnni;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    }

    /// The levels this CPU runs, lowest first.
    pub fn available() -> Vec<SimdLevel> {
        let best = Self::detect();
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni]
            .into_iter()
            .filter(|&l| l <= best)
            .collect()
    }
}

/// The level the process uses: the detected one, or a lower one named by
/// the environment variable `TL_SIMD` (`scalar`, `avx2`, `avx512`), which
/// benchmarks use to compare paths. A level the CPU lacks is never chosen.
pub fn simd_level() -> SimdLevel {
    table().level
}

/// Activation rows in their vec-dot type, with the per-block extras the
/// SIMD kernels of the 32-value types read as contiguous arrays: the block
/// scale `d` (and Q8_1's `s`) widened to f32, and the sum of each block's
/// quants (for the `level - offset` weights, whose offset times that sum is
/// subtracted from the integer dot).
#[derive(Clone, Copy)]
pub(crate) struct Acts<'a> {
    /// `rows` rows of `row_bytes` bytes.
    pub bytes: &'a [u8],
    pub row_bytes: usize,
    /// 32-value blocks per row; `d`, `s`, `sums` hold `nb` entries per row
    /// (empty for the other activation types).
    pub nb: usize,
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sums: &'a [i32],
}

impl Acts<'_> {
    /// The bytes of row `i` (empty past the end).
    pub(crate) fn row(&self, i: usize) -> &[u8] {
        let start = i * self.row_bytes;
        self.bytes.get(start..start + self.row_bytes).unwrap_or(&[])
    }
}

/// Fills the per-block arrays of [`Acts`] for `rows` rows of Q8_0 or Q8_1
/// activations (`bytes`); other types have none.
pub(crate) fn prepare_extras(
    act_ty: GgmlType,
    bytes: &[u8],
    d: &mut [f32],
    s: &mut [f32],
    sums: &mut [i32],
) {
    let (size, qs_at, s_at) = match act_ty {
        GgmlType::Q8_0 => (std::mem::size_of::<BlockQ8_0>(), 2, None),
        GgmlType::Q8_1 => (std::mem::size_of::<BlockQ8_1>(), 4, Some(2)),
        _ => return,
    };
    for (i, b) in bytes.chunks_exact(size).enumerate() {
        d[i] = f16::from_le_bytes([b[0], b[1]]).to_f32();
        if let Some(at) = s_at {
            s[i] = f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        }
        sums[i] = b[qs_at..qs_at + 32]
            .iter()
            .map(|&q| i32::from(q as i8))
            .sum();
    }
}

/// A kernel: `out[t]` = dot of the weight row `w` (`k` values) with
/// activation row `row0 + t`, for `out.len()` rows (1..=[`MAX_TILE`]).
///
/// # Safety
///
/// The caller has checked, as [`check_kernel_args`] does, that `w` holds a
/// whole row, that `acts` holds rows `row0..row0 + out.len()` with their
/// extras, and that the CPU runs the kernel's instruction set (the table
/// only holds kernels of the detected level).
pub(crate) type Kernel =
    unsafe fn(k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]);

/// Most activation rows one kernel call takes: each weight block is loaded
/// and unpacked once for all of them.
pub(crate) const MAX_TILE: usize = 8;

/// The kernel per weight type for one level.
pub(crate) struct Table {
    pub level: SimdLevel,
    kernels: [Kernel; N_DOT_TYPES],
}

const N_DOT_TYPES: usize = 25;

fn slot(ty: GgmlType) -> Option<usize> {
    use GgmlType::*;
    Some(match ty {
        F32 => 0,
        F16 => 1,
        BF16 => 2,
        Q4_0 => 3,
        Q4_1 => 4,
        Q5_0 => 5,
        Q5_1 => 6,
        Q8_0 => 7,
        Q2_K => 8,
        Q3_K => 9,
        Q4_K => 10,
        Q5_K => 11,
        Q6_K => 12,
        IQ4_NL => 13,
        IQ4_XS => 14,
        IQ3_XXS => 15,
        IQ3_S => 16,
        IQ2_XXS => 17,
        IQ2_XS => 18,
        IQ2_S => 19,
        IQ1_S => 20,
        IQ1_M => 21,
        MXFP4 => 22,
        TQ1_0 => 23,
        TQ2_0 => 24,
        _ => return None,
    })
}

impl Table {
    /// The kernels of `level`, which the caller has checked the CPU runs.
    pub(crate) fn for_level(level: SimdLevel) -> Table {
        let mut kernels: [Kernel; N_DOT_TYPES] = [
            scalar_kernel::<0>,
            scalar_kernel::<1>,
            scalar_kernel::<2>,
            scalar_kernel::<3>,
            scalar_kernel::<4>,
            scalar_kernel::<5>,
            scalar_kernel::<6>,
            scalar_kernel::<7>,
            scalar_kernel::<8>,
            scalar_kernel::<9>,
            scalar_kernel::<10>,
            scalar_kernel::<11>,
            scalar_kernel::<12>,
            scalar_kernel::<13>,
            scalar_kernel::<14>,
            scalar_kernel::<15>,
            scalar_kernel::<16>,
            scalar_kernel::<17>,
            scalar_kernel::<18>,
            scalar_kernel::<19>,
            scalar_kernel::<20>,
            scalar_kernel::<21>,
            scalar_kernel::<22>,
            scalar_kernel::<23>,
            scalar_kernel::<24>,
        ];
        #[cfg(target_arch = "x86_64")]
        x86::install(level, &mut |ty, k| {
            if let Some(i) = slot(ty) {
                kernels[i] = k;
            }
        });
        Table { level, kernels }
    }

    /// The reference numerics' kernels: ggml's generic ones, in their
    /// float order, some with their exact integer sums on SIMD (`detected`
    /// is the CPU's level). The table says `Scalar`, so no packed or panel
    /// path (with its own float order) is taken.
    pub(crate) fn for_reference(detected: SimdLevel) -> Table {
        let mut t = Table::for_level(SimdLevel::Scalar);
        #[cfg(target_arch = "x86_64")]
        x86::install_reference(detected, &mut |ty, k| {
            if let Some(i) = slot(ty) {
                t.kernels[i] = k;
            }
        });
        let _ = detected;
        t
    }

    pub(crate) fn kernel(&self, ty: GgmlType) -> Option<Kernel> {
        slot(ty).map(|i| self.kernels[i])
    }
}

/// The process-wide kernel table.
pub(crate) fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let best = SimdLevel::detect();
        if crate::numerics::reference() {
            return Table::for_reference(best);
        }
        let wanted = match std::env::var("TL_SIMD").ok().as_deref() {
            Some("scalar") => SimdLevel::Scalar,
            Some("avx2") => SimdLevel::Avx2,
            _ => best,
        };
        Table::for_level(wanted.min(best))
    })
}

const SCALAR_TYPES: [GgmlType; N_DOT_TYPES] = {
    use GgmlType::*;
    [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS,
        IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M, MXFP4, TQ1_0, TQ2_0,
    ]
};

/// The scalar reference as a [`Kernel`]: one row at a time.
///
/// # Safety
///
/// None needed beyond the slice bounds, which are checked.
unsafe fn scalar_kernel<const S: usize>(
    k: usize,
    w: &[u8],
    acts: &Acts<'_>,
    row0: usize,
    out: &mut [f32],
) {
    let ty = SCALAR_TYPES[S];
    for (t, o) in out.iter_mut().enumerate() {
        *o = vec_dot_ref(ty, k, w, acts.row(row0 + t));
    }
}

/// The scalar reference dot product of ggml for weights of type `ty_w`:
/// `k` values of the weight row `w_row` against `k` activations already in
/// `vec_dot_type(ty_w)` (`act_row`). Returns NaN if the type has no dot
/// product or a row is shorter than `k` values (extra bytes are ignored).
pub fn vec_dot_ref(ty_w: GgmlType, k: usize, w_row: &[u8], act_row: &[u8]) -> f32 {
    use GgmlType::*;
    let (Some(wb), Some(ab)) = (row_bytes(ty_w, k), row_bytes(vec_dot_type(ty_w), k)) else {
        return f32::NAN;
    };
    let (Some(w), Some(a)) = (w_row.get(..wb), act_row.get(..ab)) else {
        return f32::NAN;
    };
    match ty_w {
        F32 => scalar::dot_f32(w, a),
        F16 => scalar::dot_f16(w, a),
        BF16 => scalar::dot_bf16(w, a),
        Q4_0 => scalar::dot_q4_0(w, a),
        Q4_1 => scalar::dot_q4_1(w, a),
        Q5_0 => scalar::dot_q5_0(w, a),
        Q5_1 => scalar::dot_q5_1(w, a),
        Q8_0 => scalar::dot_q8_0(w, a),
        Q2_K => scalar::dot_q2_k(w, a),
        Q3_K => scalar::dot_q3_k(w, a),
        Q4_K => scalar::dot_q4_k(w, a),
        Q5_K => scalar::dot_q5_k(w, a),
        Q6_K => scalar::dot_q6_k(w, a),
        IQ4_NL => scalar::dot_iq4_nl(w, a),
        IQ4_XS => scalar::dot_iq4_xs(w, a),
        IQ3_XXS => scalar::dot_iq3_xxs(w, a),
        IQ3_S => scalar::dot_iq3_s(w, a),
        IQ2_XXS => scalar::dot_iq2_xxs(w, a),
        IQ2_XS => scalar::dot_iq2_xs(w, a),
        IQ2_S => scalar::dot_iq2_s(w, a),
        IQ1_S => scalar::dot_iq1_s(w, a),
        IQ1_M => scalar::dot_iq1_m(w, a),
        MXFP4 => crate::quant::mxfp4::dot_mxfp4_q8_0(w, a),
        TQ1_0 => crate::quant::ternary::dot_tq1_0_q8_k(w, a),
        TQ2_0 => crate::quant::ternary::dot_tq2_0_q8_k(w, a),
        _ => f32::NAN,
    }
}

/// Checks what [`Kernel`] relies on; `Err` names the first thing wrong.
pub(crate) fn check_kernel_args(
    ty_w: GgmlType,
    k: usize,
    w: &[u8],
    acts: &Acts<'_>,
    row0: usize,
    tile: usize,
) -> Result<()> {
    let bad = |what: String| CoreError::SizeMismatch {
        op: "vec_dot",
        what,
    };
    let wb = row_bytes(ty_w, k).ok_or(CoreError::PartialBlock {
        op: "vec_dot",
        ty: ty_w,
        len: k,
        block: ty_w.block_size(),
    })?;
    let act_ty = vec_dot_type(ty_w);
    let ab = row_bytes(act_ty, k).ok_or(CoreError::PartialBlock {
        op: "vec_dot",
        ty: act_ty,
        len: k,
        block: act_ty.block_size(),
    })?;
    if w.len() < wb {
        return Err(bad(format!(
            "weight row of {k} {ty_w} values needs {wb} bytes, got {}",
            w.len()
        )));
    }
    if tile == 0 || tile > MAX_TILE {
        return Err(bad(format!("tile of {tile} rows")));
    }
    let end = row0 + tile;
    if acts.row_bytes != ab || acts.bytes.len() < end * ab {
        return Err(bad(format!(
            "activation rows {row0}..{end} of {ab} bytes, got {} bytes of rows of {}",
            acts.bytes.len(),
            acts.row_bytes
        )));
    }
    if matches!(act_ty, GgmlType::Q8_0 | GgmlType::Q8_1) {
        let nb = k / 32;
        let need = end * nb;
        let s_ok = act_ty != GgmlType::Q8_1 || acts.s.len() >= need;
        if acts.nb != nb || acts.d.len() < need || acts.sums.len() < need || !s_ok {
            return Err(bad(format!(
                "per-block extras for {end} rows of {nb} blocks"
            )));
        }
    }
    Ok(())
}

/// The dot product of ggml for weights of type `ty_w`: `k` values of the
/// weight row `w_row` against `k` activations already quantized to
/// `vec_dot_type(ty_w)` by [`quantize_activations`], with the fastest
/// kernel of this CPU. Returns NaN if the type has no dot product or a row
/// is shorter than `k` values.
///
/// The SIMD kernels assume what [`quantize_activations`] guarantees: 8-bit
/// activation quants lie in -127..=127 (as ggml assumes too; -128 can
/// overflow the AVX2 sign trick).
pub fn vec_dot(ty_w: GgmlType, k: usize, w_row: &[u8], act_row: &[u8]) -> f32 {
    vec_dot_with(table(), ty_w, k, w_row, act_row)
}

pub(crate) fn vec_dot_with(
    table: &Table,
    ty_w: GgmlType,
    k: usize,
    w_row: &[u8],
    act_row: &[u8],
) -> f32 {
    let act_ty = vec_dot_type(ty_w);
    let (Some(kernel), Some(ab)) = (table.kernel(ty_w), row_bytes(act_ty, k)) else {
        return f32::NAN;
    };
    let Some(bytes) = act_row.get(..ab) else {
        return f32::NAN;
    };
    let legacy = matches!(act_ty, GgmlType::Q8_0 | GgmlType::Q8_1);
    let nb = if legacy { k / 32 } else { 0 };
    let (mut d, mut s, mut sums) = (vec![0f32; nb], vec![0f32; nb], vec![0i32; nb]);
    prepare_extras(act_ty, bytes, &mut d, &mut s, &mut sums);
    let acts = Acts {
        bytes,
        row_bytes: ab,
        nb,
        d: &d,
        s: &s,
        sums: &sums,
    };
    if check_kernel_args(ty_w, k, w_row, &acts, 0, 1).is_err() {
        return f32::NAN;
    }
    let mut out = [0f32; 1];
    // SAFETY: the arguments were just checked, and the table holds only
    // kernels of an instruction set the CPU was detected to run.
    unsafe { kernel(k, w_row, &acts, 0, &mut out) };
    out[0]
}

/// Quantizes one row of activations `x` to `vec_dot_type(ty_w)` into `out`
/// (exactly `row_bytes(vec_dot_type(ty_w), x.len())` bytes).
///
/// Q8_0 and Q8_1 follow ggml's x86 `quantize_row_q8_0`/`quantize_row_q8_1`
/// (`ggml-cpu/arch/x86/quants.c`), the code llama.cpp runs on AVX/AVX2
/// machines, not `quantize_row_q8_0_ref`: the two differ in the bytes they
/// produce. The x86 code scales by `127 / amax` where the reference
/// multiplies by `1 / (amax / 127)`, and rounds halves to even
/// (`_mm256_round_ps`) where the reference rounds them away from zero
/// (`roundf`). Under [`crate::numerics::Numerics::Reference`] Q8_0 and Q8_1
/// are the reference quantizers instead (what llama.cpp's portable code
/// runs). Q8_K is `quantize_row_q8_K_ref`, which every ggml build uses.
/// F32/F16/BF16 are plain conversions (round to nearest even).
pub fn quantize_activations(ty_w: GgmlType, x: &[f32], out: &mut [u8]) -> Result<()> {
    use GgmlType::*;
    if !supports_dot(ty_w) {
        return Err(CoreError::UnsupportedType {
            ty: ty_w,
            tensor: crate::quant::UNNAMED.to_owned(),
        });
    }
    let act_ty = vec_dot_type(ty_w);
    let need = row_bytes(act_ty, x.len()).ok_or(CoreError::PartialBlock {
        op: "quantize_activations",
        ty: act_ty,
        len: x.len(),
        block: act_ty.block_size(),
    })?;
    if out.len() != need {
        return Err(CoreError::SizeMismatch {
            op: "quantize_activations",
            what: format!(
                "{} values of {act_ty} take {need} bytes, got {}",
                x.len(),
                out.len()
            ),
        });
    }
    match act_ty {
        F32 => float::quantize_f32(x, out),
        F16 => float::quantize_f16(x, out),
        BF16 => float::quantize_bf16(x, out),
        Q8_0 | Q8_1 | Q8_K => quantize_q8(table().level, act_ty, x, out),
        _ => {
            return Err(CoreError::UnsupportedType {
                ty: act_ty,
                tensor: crate::quant::UNNAMED.to_owned(),
            })
        }
    }
    Ok(())
}

/// Q8_0/Q8_1/Q8_K rows with the kernels of `level`; every level writes the
/// same bytes. The reference numerics' table is of level `Scalar`, whose
/// Q8_0/Q8_1 are then ggml's reference quantizers instead of its x86 ones.
pub(crate) fn quantize_q8(level: SimdLevel, act_ty: GgmlType, x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: `level` never exceeds the detected one, so AVX2, FMA and
        // F16C are present; the sizes were checked by the caller.
        unsafe { x86::quantize_q8_avx2(act_ty, x, out) };
        return;
    }
    let _ = level;
    let reference = crate::numerics::reference();
    match act_ty {
        GgmlType::Q8_0 => {
            let block: fn(&[f32]) -> BlockQ8_0 = if reference {
                BlockQ8_0::quantize
            } else {
                q8_0_block_x86
            };
            for (x, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
                o.copy_from_slice(bytemuck::bytes_of(&block(x)));
            }
        }
        GgmlType::Q8_1 => {
            let block: fn(&[f32]) -> BlockQ8_1 = if reference {
                BlockQ8_1::quantize
            } else {
                q8_1_block_x86
            };
            for (x, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(36)) {
                o.copy_from_slice(bytemuck::bytes_of(&block(x)));
            }
        }
        _ => {
            for (x, o) in x.chunks_exact(256).zip(out.chunks_exact_mut(292)) {
                o.copy_from_slice(bytemuck::bytes_of(&BlockQ8K::quantize(x)));
            }
        }
    }
}

/// Scale, inverse scale and the 32 quants of ggml's x86 `quantize_row_q8_0`
/// for one block (see [`quantize_activations`]).
fn q8_x86(x: &[f32]) -> (f32, [i8; 32]) {
    // `_mm256_max_ps` over |x|; NaN inputs are not given a meaning here.
    let amax = x[..32].iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; 32];
    for (q, &v) in qs.iter_mut().zip(x) {
        // `_mm256_round_ps(_MM_ROUND_NEAREST)` then the saturating packs.
        *q = (v * id).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    (d, qs)
}

/// One Q8_0 block as ggml's x86 `quantize_row_q8_0` writes it.
pub fn q8_0_block_x86(x: &[f32]) -> BlockQ8_0 {
    let (d, qs) = q8_x86(x);
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// One Q8_1 block as ggml's x86 `quantize_row_q8_1` writes it: `s` is the
/// f32 `d` times the integer sum of the quants.
pub fn q8_1_block_x86(x: &[f32]) -> BlockQ8_1 {
    let (d, qs) = q8_x86(x);
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    BlockQ8_1 {
        d: f16::from_f32(d),
        s: f16::from_f32(d * sum as f32),
        qs,
    }
}
