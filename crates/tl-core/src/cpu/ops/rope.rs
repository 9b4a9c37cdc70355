//! Rotary position embedding (RoFormer, arXiv:2104.09864) in ggml's two
//! layouts, with ggml's numerics (`ggml_rope_cache_init` and `rope_yarn`
//! in ggml-cpu `ops.cpp`, YaRN extrapolation off): the angle of pair `i`
//! is built by repeated f32 multiplication, `θ_i = pos · base^(-2/n_rot)^i`,
//! divided by the pair's frequency factor and scaled by `freq_scale`.

use crate::backend::RopeConfig;
use crate::cpu::buffers::with_scratch;
use crate::cpu::kernels::{rope_cache, rope_rotate as rotate};
use crate::error::Result;
use crate::layout::Layout;

/// Calls `f(r, off, cache)` for each head row `r` of
/// `x [n_tokens, n_heads, head_dim]` (storage offset `off`) with that
/// token's sin/cos table, built once per token and shared by its heads.
fn for_each_head(
    op: &'static str,
    xl: &Layout,
    positions: &[i32],
    freq_factors: Option<&[f32]>,
    cfg: &RopeConfig,
    mut f: impl FnMut(usize, usize, &[f32]),
) -> Result<()> {
    let (rows, _) = xl.rows(op)?;
    let n_heads = xl.dims()[1];
    with_scratch(op, cfg.n_rot, |cache| {
        for (r, off) in rows.enumerate() {
            // No rows exist when n_heads is 0, so the modulo is safe.
            if r % n_heads == 0 {
                rope_cache(
                    positions[r / n_heads] as f32,
                    cfg.base,
                    cfg.freq_scale,
                    freq_factors,
                    cache,
                );
            }
            f(r, off, cache);
        }
        Ok(())
    })
}

pub(crate) fn rope_inplace(
    op: &'static str,
    (x, xl): (&mut [f32], &Layout),
    positions: &[i32],
    freq_factors: Option<&[f32]>,
    cfg: &RopeConfig,
) -> Result<()> {
    let d = xl.shape().last_dim();
    for_each_head(op, xl, positions, freq_factors, cfg, |_, off, cache| {
        rotate(&mut x[off..off + d], cache, cfg.mode);
    })
}

pub(crate) fn rope_into(
    op: &'static str,
    (x, xl): (&[f32], &Layout),
    positions: &[i32],
    freq_factors: Option<&[f32]>,
    cfg: &RopeConfig,
    out: &mut [f32],
) -> Result<()> {
    let d = xl.shape().last_dim();
    for_each_head(op, xl, positions, freq_factors, cfg, |r, off, cache| {
        let o_row = &mut out[r * d..(r + 1) * d];
        o_row.copy_from_slice(&x[off..off + d]);
        rotate(o_row, cache, cfg.mode);
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::backend::{Backend, RopeConfig, RopeMode};
    use crate::cpu::ops::test_util::{assert_close, t};
    use crate::cpu::CpuBackend;
    use crate::error::Result;
    use crate::tensor::Tensor;

    const B: CpuBackend = CpuBackend;

    fn pos(p: &[i32]) -> Result<Tensor> {
        Tensor::from_vec_i32(p.to_vec(), &[p.len()])
    }

    #[test]
    fn position_zero_is_identity() -> Result<()> {
        let v = [1., 2., 3., 4., 5., 6., 7., 8.];
        let x = t(&v, &[1, 2, 4])?;
        for mode in [RopeMode::Normal, RopeMode::Neox] {
            let cfg = RopeConfig::new(mode, 4, 10000.0);
            assert_close(&B.rope(&x, &pos(&[0])?, None, &cfg)?.to_vec_f32()?, &v, 0.0)?;
        }
        Ok(())
    }

    #[test]
    fn position_one_turns_the_first_pair_by_one_radian() -> Result<()> {
        let (c, s) = (1f32.cos(), 1f32.sin());
        let x = t(&[1., 0., 0., 1.], &[2, 1, 2])?;
        let cfg = RopeConfig::new(RopeMode::Normal, 2, 10000.0);
        let got = B.rope(&x, &pos(&[1, 1])?, None, &cfg)?.to_vec_f32()?;
        // (1, 0) → (cos 1, sin 1); (0, 1) → (-sin 1, cos 1).
        assert_close(&got, &[c, s, -s, c], 1e-6)
    }

    #[test]
    fn normal_and_neox_pair_different_dims() -> Result<()> {
        // head_dim 4, base 100: pair 0 turns by pos, pair 1 by pos / 10.
        let x = t(&[1., 2., 3., 4.], &[1, 1, 4])?;
        let p = pos(&[2])?;
        let (c0, s0) = (2f32.cos(), 2f32.sin());
        let (c1, s1) = (0.2f32.cos(), 0.2f32.sin());
        let normal = B.rope(&x, &p, None, &RopeConfig::new(RopeMode::Normal, 4, 100.0))?;
        assert_close(
            &normal.to_vec_f32()?,
            &[
                c0 - 2. * s0,
                s0 + 2. * c0,
                3. * c1 - 4. * s1,
                3. * s1 + 4. * c1,
            ],
            1e-6,
        )?;
        let neox = B.rope(&x, &p, None, &RopeConfig::new(RopeMode::Neox, 4, 100.0))?;
        // Pairs (x0, x2) by pos and (x1, x3) by pos / 10.
        assert_close(
            &neox.to_vec_f32()?,
            &[
                c0 - 3. * s0,
                2. * c1 - 4. * s1,
                s0 + 3. * c0,
                2. * s1 + 4. * c1,
            ],
            1e-6,
        )
    }

    #[test]
    fn partial_rotation_and_freq_factors() -> Result<()> {
        // n_rot 2 of head_dim 4: the last two dims pass through.
        let x = t(&[1., 0., 5., 6.], &[1, 1, 4])?;
        let cfg = RopeConfig::new(RopeMode::Neox, 2, 10000.0);
        let got = B.rope(&x, &pos(&[3])?, None, &cfg)?.to_vec_f32()?;
        assert_close(&got, &[3f32.cos(), 3f32.sin(), 5., 6.], 1e-6)?;
        // A frequency factor of 2 halves the angle.
        let ff = t(&[2.], &[1])?;
        let got = B.rope(&x, &pos(&[3])?, Some(&ff), &cfg)?.to_vec_f32()?;
        assert_close(&got, &[1.5f32.cos(), 1.5f32.sin(), 5., 6.], 1e-6)
    }

    #[test]
    fn in_place_matches_into_and_heads_share_a_position() -> Result<()> {
        let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
        let x = Tensor::from_vec(v.clone(), &[2, 3, 4])?;
        let p = pos(&[5, 9])?;
        let cfg = RopeConfig::new(RopeMode::Normal, 4, 500.0);
        let want = B.rope(&x, &p, None, &cfg)?.to_vec_f32()?;
        let mut y = Tensor::from_vec(v.clone(), &[2, 3, 4])?;
        B.rope_inplace(&mut y, &p, None, &cfg)?;
        assert_close(&y.to_vec_f32()?, &want, 0.0)?;
        // Head 1 of token 0 rotated alone gives the same values.
        let one = Tensor::from_vec(v[4..8].to_vec(), &[1, 1, 4])?;
        let got = B.rope(&one, &pos(&[5])?, None, &cfg)?.to_vec_f32()?;
        assert_close(&got, &want[4..8], 0.0)
    }

    #[test]
    fn rope_errors() -> Result<()> {
        let x = t(&[0.; 8], &[2, 1, 4])?;
        let cfg = RopeConfig::new(RopeMode::Normal, 4, 1e4);
        assert!(B.rope(&x, &pos(&[0])?, None, &cfg).is_err());
        let odd = RopeConfig::new(RopeMode::Normal, 3, 1e4);
        assert!(B.rope(&x, &pos(&[0, 1])?, None, &odd).is_err());
        let wide = RopeConfig::new(RopeMode::Normal, 6, 1e4);
        assert!(B.rope(&x, &pos(&[0, 1])?, None, &wide).is_err());
        let short_ff = t(&[1.], &[1])?;
        assert!(B.rope(&x, &pos(&[0, 1])?, Some(&short_ff), &cfg).is_err());
        assert!(B
            .rope(&x.reshape(&[2, 4])?, &pos(&[0, 1])?, None, &cfg)
            .is_err());
        Ok(())
    }

    proptest! {
        /// RoPE's defining property: q·k after rotation depends only on the
        /// distance between the positions.
        #[test]
        fn scores_depend_on_relative_position(
            q in prop::collection::vec(-1.0f32..1.0, 8),
            k in prop::collection::vec(-1.0f32..1.0, 8),
            m in 0i32..50,
            n in 0i32..50,
            shift in 0i32..50,
            neox in any::<bool>(),
        ) {
            let mode = if neox { RopeMode::Neox } else { RopeMode::Normal };
            let cfg = RopeConfig::new(mode, 8, 10000.0);
            let score = |pq: i32, pk: i32| -> Result<f32> {
                let qr = B.rope(&Tensor::from_vec(q.clone(), &[1, 1, 8])?, &pos(&[pq])?, None, &cfg)?;
                let kr = B.rope(&Tensor::from_vec(k.clone(), &[1, 1, 8])?, &pos(&[pk])?, None, &cfg)?;
                Ok(qr.to_vec_f32()?.iter().zip(kr.to_vec_f32()?).map(|(a, b)| a * b).sum())
            };
            let (a, b) = (score(m, n)?, score(m + shift, n + shift)?);
            prop_assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }
}
