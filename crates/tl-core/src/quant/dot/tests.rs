//! The SIMD kernels held to the scalar references, and the references held
//! to the dequantized dot product.
//!
//! # The tolerance
//!
//! The kernels form each block's (or super-block's) integer sum exactly and
//! then add the same real-valued float terms `t` (a block's `d_w * d_a *
//! sumi`, a min term `m * s`, ...) in another order than the reference:
//! one SIMD lane per block, then a horizontal sum. Any order of recursive
//! summation of `n` terms is within `(n - 1) * u * sum|t|` of the exact sum
//! (`u` = 2^-24, Higham, *Accuracy and Stability of Numerical Algorithms*,
//! eq. 4.4), and each term's own two roundings (the scale product and the
//! product with `sumi`, in whichever association) add `2u|t|`. So two
//! orders differ by at most `2 (n + 2) u sum|t|`, and the tests use
//! `2 (n + 4) u M` with `M >= sum|t|` computed from the dequantized values:
//! `M = sum_i (|W_i| + 2 |min_i|) |A_i|`, where `min_i` is the largest min
//! term a value can carry (|m| for Q4_1/Q5_1, `|dmin| * max_level_of_m`
//! for the K-quants), which covers both halves of `d*sc*q - dmin*m`. `n` is
//! a bound on the terms: `k / 16 + 16` for the block types, `k` for F32/F16/
//! BF16 (the reference sums every product in f64; the kernels in f32 lanes).
//!
//! The integer parts are checked separately, with no tolerance at all: with
//! unit scales and small quants every float term is an integer below 2^24,
//! every float operation is exact in either order, and kernel and reference
//! must agree bit for bit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use half::f16;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tl_gguf::GgmlType;

use super::*;
use crate::quant::{dequantize, quantize};

const ALL: [GgmlType; 25] = {
    use GgmlType::*;
    [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS,
        IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M, MXFP4, TQ1_0, TQ2_0,
    ]
};

/// The grid types.
const GRID: [GgmlType; 7] = {
    use GgmlType::*;
    [IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M]
};

/// Byte offset of IQ1_M's four u16 scales, whose top nibbles hold the f16
/// super-block scale.
const IQ1M_SCALES: usize = 48;

/// Offsets of the f16 scale fields in one block of `ty`, and the largest
/// level of its min (0 if none) for the magnitude bound.
fn f16_fields(ty: GgmlType) -> (&'static [usize], f32) {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL | IQ4_XS | IQ3_XXS | IQ3_S | IQ2_XXS | IQ2_XS | IQ2_S
        | IQ1_S => (&[0], 0.0),
        TQ1_0 => (&[52], 0.0),
        TQ2_0 => (&[64], 0.0),
        Q4_1 | Q5_1 => (&[0, 2], 1.0),
        Q2_K => (&[80, 82], 15.0),
        Q3_K => (&[108], 0.0),
        Q4_K | Q5_K => (&[0, 2], 63.0),
        Q6_K => (&[208], 0.0),
        _ => (&[], 0.0),
    }
}

/// A weight row of `k` values of `ty`: random level bytes with finite f16
/// scales of either sign, or (`unit`) scales of 1 and mins of 1.
fn weight_row(ty: GgmlType, k: usize, rng: &mut ChaCha8Rng, unit: bool) -> Vec<u8> {
    use GgmlType::*;
    match ty {
        F32 | F16 | BF16 => {
            let x: Vec<f32> = (0..k)
                .map(|_| {
                    if unit {
                        f32::from(rng.gen_range(-8i8..=8))
                    } else {
                        rng.gen_range(-2.0f32..2.0)
                    }
                })
                .collect();
            let mut out = vec![0u8; row_bytes(ty, k).unwrap()];
            quantize(ty, &x, &mut out).unwrap();
            out
        }
        _ => {
            let mut out: Vec<u8> = (0..row_bytes(ty, k).unwrap()).map(|_| rng.gen()).collect();
            let (fields, _) = f16_fields(ty);
            for block in out.chunks_exact_mut(ty.type_size()) {
                for &at in fields {
                    let v = if unit {
                        1.0
                    } else {
                        rng.gen_range(-0.05f32..0.05)
                    };
                    block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
                if ty == IQ1_M {
                    let v = if unit {
                        1.0
                    } else {
                        rng.gen_range(-0.05f32..0.05)
                    };
                    let bits = f16::from_f32(v).to_bits();
                    for j in 0..4 {
                        let at = IQ1M_SCALES + 2 * j;
                        let sc = u16::from_le_bytes([block[at], block[at + 1]]);
                        let sc = (sc & 0x0FFF) | (((bits >> (4 * j)) & 0xF) << 12);
                        block[at..at + 2].copy_from_slice(&sc.to_le_bytes());
                    }
                }
                if ty == MXFP4 {
                    // The E8M0 exponent: 2^0, or 2^-10..2^-2.
                    block[0] = if unit { 128 } else { rng.gen_range(118..=126) };
                }
            }
            out
        }
    }
}

/// An activation row for `ty_w`: `x` quantized by [`quantize_activations`],
/// or (`unit`) hand-made blocks with scale 1 and quants in -1..=1.
fn act_row(ty_w: GgmlType, k: usize, rng: &mut ChaCha8Rng, unit: bool) -> Vec<u8> {
    let act_ty = vec_dot_type(ty_w);
    let mut out = vec![0u8; row_bytes(act_ty, k).unwrap()];
    if !unit || matches!(act_ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        let scale = rng.gen_range(0.01f32..10.0);
        let x: Vec<f32> = (0..k)
            .map(|_| {
                if unit {
                    f32::from(rng.gen_range(-8i8..=8))
                } else {
                    rng.gen_range(-scale..scale)
                }
            })
            .collect();
        quantize_activations(ty_w, &x, &mut out).unwrap();
        return out;
    }
    let size = act_ty.type_size();
    for block in out.chunks_exact_mut(size) {
        let q: Vec<i8> = (0..act_ty.block_size())
            .map(|_| rng.gen_range(-1i8..=1))
            .collect();
        let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
        match act_ty {
            GgmlType::Q8_0 => {
                block[..2].copy_from_slice(&f16::ONE.to_le_bytes());
                block[2..].copy_from_slice(bytemuck::cast_slice(&q));
            }
            GgmlType::Q8_1 => {
                block[..2].copy_from_slice(&f16::ONE.to_le_bytes());
                block[2..4].copy_from_slice(&f16::from_f32(sum as f32).to_le_bytes());
                block[4..].copy_from_slice(bytemuck::cast_slice(&q));
            }
            _ => {
                block[..4].copy_from_slice(&1.0f32.to_le_bytes());
                block[4..260].copy_from_slice(bytemuck::cast_slice(&q));
                for (j, c) in q.chunks_exact(16).enumerate() {
                    let s: i16 = c.iter().map(|&v| i16::from(v)).sum();
                    block[260 + 2 * j..262 + 2 * j].copy_from_slice(&s.to_le_bytes());
                }
            }
        }
    }
    out
}

/// The tolerance of the module docs for one weight row and one activation
/// row.
fn bound(ty_w: GgmlType, k: usize, w: &[u8], a: &[u8]) -> f64 {
    let act_ty = vec_dot_type(ty_w);
    let mut wd = vec![0f32; k];
    let mut ad = vec![0f32; k];
    dequantize(ty_w, w, &mut wd).unwrap();
    dequantize(act_ty, a, &mut ad).unwrap();
    let (fields, max_min) = f16_fields(ty_w);
    let per_block = ty_w.block_size();
    let mut m = 0f64;
    for i in 0..k {
        let mut min = 0f64;
        if max_min > 0.0 {
            let block = &w[(i / per_block) * ty_w.type_size()..];
            let at = fields[1];
            let v = f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
            min = f64::from(v.abs() * max_min);
        }
        m += (f64::from(wd[i].abs()) + 2.0 * min) * f64::from(ad[i].abs());
    }
    let n = if ty_w.block_size() == 1 {
        k
    } else {
        k / 16 + 16
    };
    2.0 * (n as f64 + 4.0) * f64::from(f32::EPSILON / 2.0) * m + 1e-30
}

/// Every row of `acts` dotted with `w` by one kernel call of `table`.
fn kernel_rows(table: &Table, ty_w: GgmlType, k: usize, w: &[u8], acts: &[Vec<u8>]) -> Vec<f32> {
    let act_ty = vec_dot_type(ty_w);
    let bytes: Vec<u8> = acts.concat();
    let ab = row_bytes(act_ty, k).unwrap();
    let legacy = matches!(act_ty, GgmlType::Q8_0 | GgmlType::Q8_1);
    let nb = if legacy { k / 32 } else { 0 };
    let n = nb * acts.len();
    let (mut d, mut s, mut sums) = (vec![0f32; n], vec![0f32; n], vec![0i32; n]);
    prepare_extras(act_ty, &bytes, &mut d, &mut s, &mut sums);
    let a = Acts {
        bytes: &bytes,
        row_bytes: ab,
        nb,
        d: &d,
        s: &s,
        sums: &sums,
    };
    check_kernel_args(ty_w, k, w, &a, 0, acts.len()).unwrap();
    let mut out = vec![0f32; acts.len()];
    let kernel = table.kernel(ty_w).unwrap();
    // SAFETY: checked above; the table is of a level this CPU runs.
    unsafe { kernel(k, w, &a, 0, &mut out) };
    out
}

fn tables() -> Vec<Table> {
    SimdLevel::available()
        .into_iter()
        .filter(|&l| l > SimdLevel::Scalar)
        .map(Table::for_level)
        .collect()
}

/// Values per row for a test case: `blocks` blocks of the type, or for the
/// float types a length that is no multiple of the vector width.
fn k_for(ty: GgmlType, blocks: usize) -> usize {
    if ty.block_size() == 1 {
        blocks * 7 + 3
    } else {
        blocks * ty.block_size()
    }
}

fn check_against_reference(ty: GgmlType, blocks: usize, rows: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let k = k_for(ty, blocks);
    let w = weight_row(ty, k, &mut rng, false);
    let acts: Vec<Vec<u8>> = (0..rows).map(|_| act_row(ty, k, &mut rng, false)).collect();
    for table in tables() {
        let got = kernel_rows(&table, ty, k, &w, &acts);
        for (r, a) in acts.iter().enumerate() {
            let want = vec_dot_ref(ty, k, &w, a);
            let tol = bound(ty, k, &w, a);
            let diff = (f64::from(got[r]) - f64::from(want)).abs();
            assert!(
                diff <= tol,
                "{ty} {:?} k={k} row {r}: kernel {} vs reference {want}, |diff| {diff:e} > {tol:e}",
                table.level,
                got[r]
            );
            // One row at a time gives the same bits as inside a tile.
            let single = kernel_rows(&table, ty, k, &w, std::slice::from_ref(a));
            assert_eq!(
                single[0].to_bits(),
                got[r].to_bits(),
                "{ty} {:?} tile",
                table.level
            );
        }
    }
}

fn check_exact(ty: GgmlType, blocks: usize, rows: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let k = k_for(ty, blocks);
    let w = weight_row(ty, k, &mut rng, true);
    let acts: Vec<Vec<u8>> = (0..rows).map(|_| act_row(ty, k, &mut rng, true)).collect();
    for table in tables() {
        let got = kernel_rows(&table, ty, k, &w, &acts);
        for (r, a) in acts.iter().enumerate() {
            let want = vec_dot_ref(ty, k, &w, a);
            assert_eq!(
                got[r].to_bits(),
                want.to_bits(),
                "{ty} {:?} k={k} row {r}: {} vs {want}",
                table.level,
                got[r]
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn legacy_kernels_match_reference(
        t in 0usize..5, blocks in 1usize..40, rows in 1usize..=MAX_TILE, seed: u64
    ) {
        use GgmlType::*;
        let ty = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0][t];
        check_against_reference(ty, blocks, rows, seed);
    }

    #[test]
    fn k_quant_kernels_match_reference(
        t in 0usize..5, blocks in 1usize..12, rows in 1usize..=MAX_TILE, seed: u64
    ) {
        use GgmlType::*;
        let ty = [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K][t];
        check_against_reference(ty, blocks, rows, seed);
    }

    #[test]
    fn float_kernels_match_reference(
        t in 0usize..3, blocks in 0usize..200, rows in 1usize..=MAX_TILE, seed: u64
    ) {
        use GgmlType::*;
        let ty = [F32, F16, BF16][t];
        check_against_reference(ty, blocks, rows, seed);
    }

    #[test]
    fn integer_sums_are_exact(
        t in 0usize..ALL.len(), blocks in 1usize..5, rows in 1usize..=MAX_TILE, seed: u64
    ) {
        check_exact(ALL[t], blocks, rows, seed);
    }

    #[test]
    fn simd_activation_quantization_is_bytewise_scalar(
        t in 0usize..3, blocks in 1usize..6, scale in -30i32..30, seed: u64
    ) {
        use GgmlType::*;
        let ty_w = [Q4_0, Q4_1, Q4_K][t];
        let act_ty = vec_dot_type(ty_w);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let k = blocks * act_ty.block_size();
        let s = 2f32.powi(scale);
        let mut x: Vec<f32> = (0..k).map(|_| rng.gen_range(-s..s)).collect();
        // Ties of magnitude with either sign, and exact zeros.
        x[0] = -s;
        if k > 40 {
            x[40] = s;
            x[1] = 0.0;
        }
        let n = row_bytes(act_ty, k).unwrap();
        let mut scalar = vec![0u8; n];
        quantize_q8(SimdLevel::Scalar, act_ty, &x, &mut scalar);
        for level in SimdLevel::available() {
            let mut got = vec![0u8; n];
            quantize_q8(level, act_ty, &x, &mut got);
            prop_assert_eq!(&got, &scalar, "{:?}", level);
        }
        if act_ty == Q8_K {
            let mut reference = vec![0u8; n];
            quantize(Q8_K, &x, &mut reference).unwrap();
            prop_assert_eq!(&scalar, &reference);
        }
    }
}

#[test]
fn one_block_and_many_blocks() {
    for (i, ty) in ALL.into_iter().enumerate() {
        for blocks in [1, 8, 9, 64, 152] {
            check_against_reference(ty, blocks, 1, i as u64 * 1000 + blocks as u64);
        }
    }
}

#[test]
fn all_zero_activations_give_zero() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for ty in ALL {
        let k = k_for(ty, 3);
        let w = weight_row(ty, k, &mut rng, false);
        let mut a = vec![0u8; row_bytes(vec_dot_type(ty), k).unwrap()];
        quantize_activations(ty, &vec![0.0; k], &mut a).unwrap();
        assert_eq!(vec_dot(ty, k, &w, &a), 0.0, "{ty}");
        assert_eq!(vec_dot_ref(ty, k, &w, &a), 0.0, "{ty}");
    }
}

#[test]
fn reference_is_the_dequantized_dot() {
    // The integer formulation is an exact rewrite of sum(W_i * A_i) over
    // the dequantized values, up to float rounding.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for ty in ALL {
        let k = k_for(ty, 6);
        let w = weight_row(ty, k, &mut rng, false);
        let a = act_row(ty, k, &mut rng, false);
        let mut wd = vec![0f32; k];
        let mut ad = vec![0f32; k];
        dequantize(ty, &w, &mut wd).unwrap();
        dequantize(vec_dot_type(ty), &a, &mut ad).unwrap();
        let mut exact: f64 = wd
            .iter()
            .zip(&ad)
            .map(|(&x, &y)| f64::from(x) * f64::from(y))
            .sum();
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            // Q8_1's `s` is the f16-rounded `d * sum(q)`, not the sum of
            // the dequantized values: use it as ggml does.
            exact = 0.0;
            for (b, (wb, ab)) in w
                .chunks_exact(ty.type_size())
                .zip(a.chunks_exact(36))
                .enumerate()
            {
                let m = f64::from(f16::from_le_bytes([wb[2], wb[3]]).to_f32());
                let s = f64::from(f16::from_le_bytes([ab[2], ab[3]]).to_f32());
                let d = f64::from(f16::from_le_bytes([wb[0], wb[1]]).to_f32());
                for i in 0..32 {
                    let level = (f64::from(wd[32 * b + i]) - m) / d;
                    exact += d * level.round() * f64::from(ad[32 * b + i]);
                }
                exact += m * s;
            }
        }
        let got = f64::from(vec_dot_ref(ty, k, &w, &a));
        let tol = bound(ty, k, &w, &a);
        assert!(
            (got - exact).abs() <= tol,
            "{ty}: {got} vs {exact} (tol {tol:e})"
        );
    }
}

#[test]
fn x86_q8_0_rounds_halves_to_even_unlike_the_reference() {
    // amax = 127 gives id = 1 on both paths, so 2.5 lands on a tie: ggml's
    // x86 path rounds it to 2, quantize_row_q8_0_ref (roundf) to 3.
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -3.5;
    let simd = q8_0_block_x86(&x);
    assert_eq!(simd.qs[1], 2);
    assert_eq!(simd.qs[2], -4);
    let mut reference = [0u8; 34];
    quantize(GgmlType::Q8_0, &x, &mut reference).unwrap();
    assert_eq!(reference[2 + 1] as i8, 3);
    assert_eq!(reference[2 + 2] as i8, -4);
}

#[test]
fn bad_arguments_are_nan_or_errors() {
    let w = vec![0u8; 34];
    let a = vec![0u8; 34];
    assert!(vec_dot(GgmlType::Q8_0, 32, &w, &a).is_finite());
    assert!(vec_dot(GgmlType::Q8_0, 64, &w, &a).is_nan());
    assert!(vec_dot(GgmlType::Q8_0, 33, &w, &a).is_nan());
    assert!(vec_dot(GgmlType::IQ2_XXS, 256, &w, &a).is_nan());
    assert!(vec_dot_ref(GgmlType::Q8_0, 32, &w[..33], &a).is_nan());
    let mut out = vec![0u8; 34];
    assert!(quantize_activations(GgmlType::Q8_0, &[0.0; 31], &mut out).is_err());
    assert!(quantize_activations(GgmlType::Q8_0, &[0.0; 32], &mut out[..33]).is_err());
    assert!(quantize_activations(GgmlType::IQ2_XXS, &[0.0; 256], &mut out).is_err());
    assert!(quantize_activations(GgmlType::Q8_0, &[0.0; 32], &mut out).is_ok());
}

#[test]
fn vec_dot_types_are_ggml_s() {
    use GgmlType::*;
    for (w, a) in [
        (F32, F32),
        (F16, F16),
        (BF16, BF16),
        (Q4_0, Q8_0),
        (Q5_0, Q8_0),
        (Q8_0, Q8_0),
        (Q4_1, Q8_1),
        (Q5_1, Q8_1),
        (Q2_K, Q8_K),
        (Q3_K, Q8_K),
        (Q4_K, Q8_K),
        (Q5_K, Q8_K),
        (Q6_K, Q8_K),
        (IQ4_NL, Q8_0),
        (IQ4_XS, Q8_K),
        (IQ3_XXS, Q8_K),
        (IQ3_S, Q8_K),
        (IQ2_XXS, Q8_K),
        (IQ2_XS, Q8_K),
        (IQ2_S, Q8_K),
        (IQ1_S, Q8_K),
        (IQ1_M, Q8_K),
        (MXFP4, Q8_0),
        (TQ1_0, Q8_K),
        (TQ2_0, Q8_K),
    ] {
        assert_eq!(vec_dot_type(w), a, "{w}");
        assert!(supports_dot(w));
    }
}

/// The reference numerics' kernels give the generic kernels' bits, for
/// every type, on random (not exactly summable) data, 1..=8 rows at a time.
#[test]
fn reference_kernels_are_the_generic_kernels_bit_for_bit() {
    let table = Table::for_reference(SimdLevel::detect());
    for ty in ALL {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for blocks in [1usize, 3, 28] {
            let k = k_for(ty, blocks);
            let w = weight_row(ty, k, &mut rng, false);
            for rows in [1usize, 3, MAX_TILE] {
                let acts: Vec<Vec<u8>> =
                    (0..rows).map(|_| act_row(ty, k, &mut rng, false)).collect();
                let got = kernel_rows(&table, ty, k, &w, &acts);
                for (r, a) in acts.iter().enumerate() {
                    let want = vec_dot_ref(ty, k, &w, a);
                    assert_eq!(
                        got[r].to_bits(),
                        want.to_bits(),
                        "{ty} k={k} rows={rows} row {r}"
                    );
                }
            }
        }
    }
}

/// The IQ4, grid, MXFP4 and ternary kernels of every level keep the generic float order:
/// they give the reference's bits on random data, 1..=8 rows at a time, and
/// the reference is the dequantize-then-dot to within the rounding bound.
#[test]
fn iq_kernels_give_the_reference_bits() {
    use GgmlType::*;
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    for ty in [IQ4_NL, IQ4_XS, MXFP4, TQ1_0, TQ2_0]
        .into_iter()
        .chain(GRID)
    {
        for blocks in [1usize, 7, 9, 17] {
            let k = k_for(ty, blocks);
            let w = weight_row(ty, k, &mut rng, false);
            let acts: Vec<Vec<u8>> = (0..MAX_TILE)
                .map(|_| act_row(ty, k, &mut rng, false))
                .collect();
            let mut levels = tables();
            levels.push(Table::for_level(SimdLevel::Scalar));
            for table in &levels {
                for rows in 1..=MAX_TILE {
                    let got = kernel_rows(table, ty, k, &w, &acts[..rows]);
                    for (r, a) in acts[..rows].iter().enumerate() {
                        let want = vec_dot_ref(ty, k, &w, a);
                        assert_eq!(
                            got[r].to_bits(),
                            want.to_bits(),
                            "{ty} {:?} k={k} rows={rows} row {r}",
                            table.level
                        );
                    }
                }
            }
            let mut wd = vec![0f32; k];
            let mut ad = vec![0f32; k];
            dequantize(ty, &w, &mut wd).unwrap();
            dequantize(vec_dot_type(ty), &acts[0], &mut ad).unwrap();
            let exact: f64 = wd
                .iter()
                .zip(&ad)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let want = f64::from(vec_dot_ref(ty, k, &w, &acts[0]));
            let tol = bound(ty, k, &w, &acts[0]);
            assert!(
                (want - exact).abs() <= tol,
                "{ty} k={k}: {want} vs {exact}, tol {tol:e}"
            );
        }
    }
}
