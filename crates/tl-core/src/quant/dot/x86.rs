//! x86-64 kernels: AVX2 (+FMA, F16C) in [`avx2`], AVX-512 (F, BW, VL,
//! VNNI) in [`avx512`]. Every kernel here is `unsafe` to call for one reason
//! only: the CPU must run its instruction set. The table in the parent
//! module holds them only after `is_x86_feature_detected!` said so.
//!
//! The 32-value ("legacy") weight types share one kernel shape, written once
//! by [`legacy_kernel!`] and instantiated per instruction set:
//!
//! - weights are unpacked to unsigned levels `u` with `value = u - offset`
//!   (Q4_0: 8, Q5_0: 16, Q8_0 under VNNI: 128 after flipping the sign bit);
//! - `u8 x i8` products are summed per block (`vpmaddubsw` + `vpmaddwd`, or
//!   VNNI `vpdpbusd`), and `offset * sum(activation quants)` is taken off,
//!   which is ggml's trick in `ggml_vec_dot_q4_0_q8_0` turned from a sign
//!   flip into a subtraction so that VNNI's unsigned-by-signed product fits;
//! - eight blocks are done at a time and their eight partial-sum vectors
//!   are reduced to one vector of eight exact block sums (a transpose by
//!   `vphaddd`), which is converted to f32 and scaled by the eight products
//!   `d_w * d_a`. The float accumulation runs one lane per block, the only
//!   reordering relative to ggml's generic code;
//! - several activation rows share each unpacked weight group (the tile).
//!
//! The activation quants must lie in -127..=127 (what
//! [`super::quantize_activations`] produces and ggml assumes).

use tl_gguf::GgmlType;

use super::{Kernel, SimdLevel};

/// A kernel entry `$name` that runs `$body::<R>` for the call's 1..=8
/// rows (the row count a const generic, so each tile size is its own
/// unrolled loop). Defined before the kernel modules, which all use it.
macro_rules! k_entry {
    ($name:ident, $body:ident) => {
        /// Kernel entry; see [`Kernel`] for the contract.
        unsafe fn $name(k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]) {
            match out.len() {
                1 => $body::<1>(k, w, acts, row0, out),
                2 => $body::<2>(k, w, acts, row0, out),
                3 => $body::<3>(k, w, acts, row0, out),
                4 => $body::<4>(k, w, acts, row0, out),
                5 => $body::<5>(k, w, acts, row0, out),
                6 => $body::<6>(k, w, acts, row0, out),
                7 => $body::<7>(k, w, acts, row0, out),
                _ => $body::<8>(k, w, acts, row0, out),
            }
        }
    };
}

/// [`k_entry!`] for kernels that also take a type tag `$t` (one body
/// shared by several block types): an entry `$name` per (name, tag) pair.
macro_rules! k_tag_entries {
    ($body:ident, $($name:ident = $t:expr),*) => {
        $(
            /// Kernel entry; see [`Kernel`] for the contract.
            unsafe fn $name(k: usize, w: &[u8], acts: &Acts<'_>, row0: usize, out: &mut [f32]) {
                match out.len() {
                    1 => $body::<{ $t }, 1>(k, w, acts, row0, out),
                    2 => $body::<{ $t }, 2>(k, w, acts, row0, out),
                    3 => $body::<{ $t }, 3>(k, w, acts, row0, out),
                    4 => $body::<{ $t }, 4>(k, w, acts, row0, out),
                    5 => $body::<{ $t }, 5>(k, w, acts, row0, out),
                    6 => $body::<{ $t }, 6>(k, w, acts, row0, out),
                    7 => $body::<{ $t }, 7>(k, w, acts, row0, out),
                    _ => $body::<{ $t }, 8>(k, w, acts, row0, out),
                }
            }
        )*
    };
}

mod avx2;
mod avx512;
pub(crate) mod gemm;
mod iq4;
mod iq_grid;
mod mxfp4;
pub(crate) mod repack;
pub(crate) mod repack_k;
mod ternary;

/// Fills the table with the kernels of `level` (which the CPU runs).
pub(crate) fn install(level: SimdLevel, set: &mut dyn FnMut(GgmlType, Kernel)) {
    if level >= SimdLevel::Avx2 {
        avx2::install(set);
        iq4::install_avx2(set);
        iq_grid::install_avx2(set);
        mxfp4::install_avx2(set);
        ternary::install_avx2(set);
    }
    if level >= SimdLevel::Avx512Vnni {
        avx512::install(set);
        iq4::install_avx512(set);
        iq_grid::install_avx512(set);
        mxfp4::install_avx512(set);
        ternary::install_avx512(set);
    }
}

/// AVX2 versions of ggml's x86 `quantize_row_q8_0`/`quantize_row_q8_1` and
/// of `quantize_row_q8_K_ref`, byte for byte.
///
/// # Safety
///
/// The CPU runs AVX2, FMA and F16C; `x` is whole blocks of `act_ty` and
/// `out` holds exactly their bytes.
pub(crate) unsafe fn quantize_q8_avx2(act_ty: GgmlType, x: &[f32], out: &mut [u8]) {
    match act_ty {
        GgmlType::Q8_0 => avx2::quantize_q8_0(x, out),
        GgmlType::Q8_1 => avx2::quantize_q8_1(x, out),
        _ => avx2::quantize_q8_k(x, out),
    }
}

/// Replaces the kernels that have a reference-numerics version (ggml's
/// generic float order, SIMD integer sums) when the CPU runs AVX2.
pub(crate) fn install_reference(level: SimdLevel, set: &mut dyn FnMut(GgmlType, Kernel)) {
    if level >= SimdLevel::Avx2 {
        avx2::install_reference(set);
        // The IQ4, grid, MXFP4 and ternary kernels keep the generic float
        // order (see `iq4`, `iq_grid`, `mxfp4`, `ternary`).
        iq4::install_avx2(set);
        iq_grid::install_avx2(set);
        mxfp4::install_avx2(set);
        ternary::install_avx2(set);
    }
}

/// Bytes per weight block of kind tag `t`.
pub(crate) const fn kind_bytes(t: u8) -> usize {
    kind::w_bytes(t)
}

/// The legacy weight kinds, as const-generic tags.
pub(super) mod kind {
    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q5_0: u8 = 2;
    pub const Q5_1: u8 = 3;
    pub const Q8_0: u8 = 4;

    /// Bytes per weight block.
    pub const fn w_bytes(t: u8) -> usize {
        match t {
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            _ => 34,
        }
    }

    /// Q4_1/Q5_1: `value = d * u + m`, dotted with Q8_1 (`+ m * s`).
    pub const fn has_min(t: u8) -> bool {
        matches!(t, Q4_1 | Q5_1)
    }

    /// Bytes per activation block (Q8_1 or Q8_0) and where its quants start.
    pub const fn act_bytes(t: u8) -> usize {
        if has_min(t) {
            36
        } else {
            34
        }
    }

    pub const fn act_qs(t: u8) -> usize {
        if has_min(t) {
            4
        } else {
            2
        }
    }
}

/// Runs `$f::<T, R>` with `R` = the tile height `out.len()` (1..=8).
macro_rules! tile_dispatch {
    ($f:ident, $t:expr, $k:expr, $w:expr, $acts:expr, $row0:expr, $out:expr) => {
        match $out.len() {
            1 => $f::<{ $t }, 1>($k, $w, $acts, $row0, $out),
            2 => $f::<{ $t }, 2>($k, $w, $acts, $row0, $out),
            3 => $f::<{ $t }, 3>($k, $w, $acts, $row0, $out),
            4 => $f::<{ $t }, 4>($k, $w, $acts, $row0, $out),
            5 => $f::<{ $t }, 5>($k, $w, $acts, $row0, $out),
            6 => $f::<{ $t }, 6>($k, $w, $acts, $row0, $out),
            7 => $f::<{ $t }, 7>($k, $w, $acts, $row0, $out),
            _ => $f::<{ $t }, 8>($k, $w, $acts, $row0, $out),
        }
    };
}
pub(super) use tile_dispatch;

/// `$call!(R)` for the literal `R` equal to `$rr` (1..=8), for
/// kernels that take the number of activation rows as a const generic.
macro_rules! by_rows {
    ($rr:expr, $call:ident) => {
        match $rr {
            8 => $call!(8),
            7 => $call!(7),
            6 => $call!(6),
            5 => $call!(5),
            4 => $call!(4),
            3 => $call!(3),
            2 => $call!(2),
            _ => $call!(1),
        }
    };
}
pub(super) use by_rows;

/// The legacy kernel body (see the module docs), for the instruction set
/// `$feat`. The module that invokes it provides, for weight kind `T`:
/// `unpack::<T>(block) -> __m256i` (unsigned levels, or for `OFFSET_SHIFT
/// == None` under AVX2's Q8_0 the signed quants), `block_dot::<T>(w, a)`
/// (eight i32 partial sums of one block), `offset_shift::<T>()` (log2 of the
/// offset, if any), `f16xn`, `reduce8`, `reduce4`, `loadn_f32`, `loadn_i32`,
/// `hsum_i32`, `hsum_ps`.
macro_rules! legacy_kernel {
    ($feat:literal) => {
        /// One weight row of legacy kind `T` against `R` activation rows.
        ///
        /// # Safety
        ///
        /// The CPU runs `$feat`; the arguments passed `check_kernel_args`
        /// (whole weight row, rows `row0..row0 + R` with their extras), and
        /// `out.len() >= R`.
        #[target_feature(enable = $feat)]
        unsafe fn legacy<const T: u8, const R: usize>(
            k: usize,
            w: &[u8],
            acts: &Acts<'_>,
            row0: usize,
            out: &mut [f32],
        ) {
            use $crate::quant::dot::x86::{kind, ActRow};
            let nb = k / 32;
            // Row pointers into the activations and their per-block arrays;
            // all in bounds by the checked contract.
            let mut rows = [ActRow::EMPTY; R];
            for r in 0..R {
                rows[r] = ActRow::new(acts, row0 + r);
            }
            let mut acc = [_mm256_setzero_ps(); R];
            let mut accm = [_mm256_setzero_ps(); R];
            let mut b0 = 0;
            while b0 + 8 <= nb {
                legacy_group::<T, R, 8, false>(
                    w.as_ptr(),
                    b0,
                    &rows,
                    &mut acc,
                    &mut accm,
                    &mut [0.0; R],
                );
                b0 += 8;
            }
            if b0 + 4 <= nb {
                legacy_group::<T, R, 4, false>(
                    w.as_ptr(),
                    b0,
                    &rows,
                    &mut acc,
                    &mut accm,
                    &mut [0.0; R],
                );
                b0 += 4;
            }
            // At most three blocks left (none for k a multiple of 128): each
            // block sum reduced on its own, still exact.
            let mut tail = [0f32; R];
            let (wb, ab, aq) = (kind::w_bytes(T), kind::act_bytes(T), kind::act_qs(T));
            for b in b0..nb {
                let wblk = w.as_ptr().add(b * wb);
                let wq = unpack::<T>(wblk);
                for r in 0..R {
                    let row = &rows[r];
                    let av = _mm256_loadu_si256(row.bytes.add(b * ab + aq) as *const __m256i);
                    let mut sumi = hsum_i32(block_dot::<T>(wq, av));
                    if let Some(sh) = offset_shift::<T>() {
                        sumi -= *row.sums.add(b) << sh;
                    }
                    tail[r] += (f16_at(wblk) * *row.d.add(b)) * sumi as f32;
                    if kind::has_min(T) {
                        tail[r] += f16_at(wblk.add(2)) * *row.s.add(b);
                    }
                }
            }
            for r in 0..R {
                out[r] = hsum_ps(_mm256_add_ps(acc[r], accm[r])) + tail[r];
            }
        }

        /// Blocks `b0..b0 + N` (N = 8 or 4) of one weight row against `R`
        /// activation rows: N exact block sums per row, scaled and
        /// accumulated one lane per block into `acc`/`accm` (lanes past N
        /// get zero scales). With `SEQ` (the reference numerics' order), the
        /// N terms of each row are formed in lanes instead and added to
        /// `seq` one by one in block order, and the weight stream is
        /// prefetched (that kernel reads it once, in decode).
        ///
        /// # Safety
        ///
        /// As for `legacy`, with blocks `b0..b0 + N` inside the row.
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn legacy_group<const T: u8, const R: usize, const N: usize, const SEQ: bool>(
            w: *const u8,
            b0: usize,
            rows: &[$crate::quant::dot::x86::ActRow; R],
            acc: &mut [__m256; R],
            accm: &mut [__m256; R],
            seq: &mut [f32; R],
        ) {
            use $crate::quant::dot::x86::kind;
            let wb = kind::w_bytes(T);
            let ab = kind::act_bytes(T);
            let aq = kind::act_qs(T);
            let wblk = w.add(b0 * wb);
            if SEQ {
                // Eight groups ahead, past the row's end into the next rows'.
                $crate::quant::dot::x86::prefetch(wblk.add(8 * 8 * wb), N * wb);
            }
            let mut wq = [_mm256_setzero_si256(); 8];
            for j in 0..N {
                wq[j] = unpack::<T>(wblk.add(j * wb));
            }
            let dw = f16xn::<N>(wblk, wb);
            let mw = if kind::has_min(T) {
                f16xn::<N>(wblk.add(2), wb)
            } else {
                _mm256_setzero_ps()
            };
            for r in 0..R {
                let row = &rows[r];
                let a = row.bytes.add(b0 * ab + aq);
                let mut p = [_mm256_setzero_si256(); 8];
                for j in 0..N {
                    let av = _mm256_loadu_si256(a.add(j * ab) as *const __m256i);
                    p[j] = block_dot::<T>(wq[j], av);
                }
                let mut s = if N == 8 { reduce8(&p) } else { reduce4(&p) };
                if let Some(sh) = offset_shift::<T>() {
                    let sums = loadn_i32::<N>(row.sums.add(b0));
                    s = _mm256_sub_epi32(s, _mm256_sll_epi32(sums, _mm_cvtsi32_si128(sh)));
                }
                let da = loadn_f32::<N>(row.d.add(b0));
                if SEQ {
                    let mut t = _mm256_mul_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(s));
                    if kind::has_min(T) {
                        t = _mm256_add_ps(t, _mm256_mul_ps(mw, loadn_f32::<N>(row.s.add(b0))));
                    }
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), t);
                    for &x in &lanes[..N] {
                        seq[r] += x;
                    }
                    continue;
                }
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(s), acc[r]);
                if kind::has_min(T) {
                    accm[r] = _mm256_fmadd_ps(mw, loadn_f32::<N>(row.s.add(b0)), accm[r]);
                }
            }
        }
    };
}
pub(super) use legacy_kernel;

/// Where one activation row and its per-block arrays start.
#[derive(Clone, Copy)]
pub(super) struct ActRow {
    pub bytes: *const u8,
    pub d: *const f32,
    pub s: *const f32,
    pub sums: *const i32,
}

impl ActRow {
    pub const EMPTY: ActRow = ActRow {
        bytes: std::ptr::null(),
        d: std::ptr::null(),
        s: std::ptr::null(),
        sums: std::ptr::null(),
    };

    /// Row `i` of `acts`. Pointers past the arrays are never formed: an
    /// empty extra array (other activation types) gives its base pointer.
    pub fn new(acts: &super::Acts<'_>, i: usize) -> ActRow {
        let at = |len: usize| (i * acts.nb).min(len);
        ActRow {
            bytes: acts.bytes[(i * acts.row_bytes).min(acts.bytes.len())..].as_ptr(),
            d: acts.d[at(acts.d.len())..].as_ptr(),
            s: acts.s[at(acts.s.len())..].as_ptr(),
            sums: acts.sums[at(acts.sums.len())..].as_ptr(),
        }
    }
}

/// Scales and mins of a Q4_K/Q5_K block by ggml's `utmp` word shuffle
/// (`ggml_vec_dot_q4_K_q8_K`): the same values as
/// [`crate::quant::k_quants::get_scale_min_k4`] for j = 0..8, in a few
/// integer operations instead of eight branchy extractions.
#[inline(always)]
pub(super) fn k4_utmp(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let u3 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mins_lo = u1 & KMASK1;
    let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let scales_lo = u0 & KMASK1;
    let join = |a: u32, b: u32| (u64::from(a) | (u64::from(b) << 32)).to_le_bytes();
    (join(scales_lo, scales_hi), join(mins_lo, u3))
}

/// An f16 at `p` (any alignment) as f32.
///
/// # Safety
///
/// `p` points at two readable bytes.
/// Asks for the `bytes` bytes at `at` (rounded to whole 64-byte lines):
/// a hint, dropped past the end of a weight, never faulted. The kernels
/// stream a weight once per call and the hardware prefetcher alone falls
/// behind once several activation rows make each step slower, so they ask
/// for data a step or two ahead while they compute.
#[inline(always)]
pub(super) fn prefetch(at: *const u8, bytes: usize) {
    let p = at as *const i8;
    for l in 0..bytes.div_ceil(64) {
        // SAFETY: a prefetch hint reads nothing and never faults, whatever
        // the address; `wrapping_add` keeps the pointer arithmetic defined.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(64 * l),
            )
        };
    }
}

#[inline(always)]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    half::f16::from_bits(std::ptr::read_unaligned(p as *const u16)).to_f32()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    #[test]
    fn utmp_shuffle_is_get_scale_min_k4() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let s: [u8; 12] = rng.gen();
            assert_eq!(
                super::k4_utmp(&s),
                crate::quant::dot::scalar::k4_scales_mins(&s)
            );
        }
    }
}
