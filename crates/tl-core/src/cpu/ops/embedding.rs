//! Token embedding lookup: rows of a (possibly quantized) table.

use crate::cpu::ops::weights::decode_row;
use crate::error::{CoreError, Result};
use crate::layout::Layout;
use crate::storage::CpuStorage;

/// `out[t] = table[ids[t]]` as f32; only the requested rows are decoded.
pub(crate) fn embedding(
    op: &'static str,
    (table, tl): (&CpuStorage, &Layout),
    ids: &[i32],
    out: &mut [f32],
) -> Result<()> {
    // Validates that rows are contiguous (and whole blocks, by construction).
    tl.rows(op)?;
    let (vocab, d) = (tl.dims()[0], tl.dims()[1]);
    if d == 0 {
        return Ok(());
    }
    for (&id, o_row) in ids.iter().zip(out.chunks_exact_mut(d)) {
        let row =
            usize::try_from(id)
                .ok()
                .filter(|&r| r < vocab)
                .ok_or(CoreError::IndexOutOfRange {
                    op,
                    what: "token id",
                    index: i64::from(id),
                    len: vocab,
                })?;
        decode_row(op, table, tl.offset() + row * tl.strides()[0], o_row)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use half::f16;
    use tl_gguf::{GgmlType, GgufFile, GgufWriter};

    use crate::backend::Backend;
    use crate::cpu::ops::test_util::{assert_close, q8_0_block, t};
    use crate::cpu::CpuBackend;
    use crate::error::{CoreError, Result};
    use crate::tensor::Tensor;

    const B: CpuBackend = CpuBackend;

    fn ids(v: &[i32]) -> Result<Tensor> {
        Tensor::from_vec_i32(v.to_vec(), &[v.len()])
    }

    #[test]
    fn gathers_rows() -> Result<()> {
        let table = t(&[0., 1., 10., 11., 20., 21.], &[3, 2])?;
        let out = B.embedding(&table, &ids(&[2, 0, 2])?)?;
        assert_eq!(out.dims(), &[3, 2]);
        assert_close(&out.to_vec_f32()?, &[20., 21., 0., 1., 20., 21.], 0.0)?;
        let h: Vec<f16> = [0., 1., 10., 11.]
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let table = Tensor::from_elements(h, &[2, 2])?;
        assert_close(
            &B.embedding(&table, &ids(&[1])?)?.to_vec_f32()?,
            &[10., 11.],
            0.0,
        )
    }

    #[test]
    fn out_of_range_ids_are_errors() -> Result<()> {
        let table = t(&[0., 1., 10., 11.], &[2, 2])?;
        for bad in [2, -1] {
            let e = B.embedding(&table, &ids(&[0, bad])?).err();
            assert!(matches!(
                e,
                Some(CoreError::IndexOutOfRange { index, len: 2, .. }) if index == i64::from(bad)
            ));
        }
        assert!(B.embedding(&table, &t(&[0.], &[1])?).is_err());
        Ok(())
    }

    fn q8_table() -> Vec<u8> {
        // Row 0: 0.25 * [0, 1, …, 31]; row 1: all -3 (d = 1.5, q = -2).
        let mut q0 = [0i8; 32];
        for (i, q) in q0.iter_mut().enumerate() {
            *q = i as i8;
        }
        let mut bytes = q8_0_block(0.25, &q0);
        bytes.extend(q8_0_block(1.5, &[-2; 32]));
        bytes
    }

    #[test]

    fn quantized_rows() -> Result<()> {
        let table = Tensor::from_quantized(GgmlType::Q8_0, q8_table(), &[2, 32])?;
        let out = B.embedding(&table, &ids(&[1, 0])?)?.to_vec_f32()?;
        let mut want = vec![-3.0; 32];
        want.extend((0..32).map(|i| i as f32 * 0.25));
        assert_close(&out, &want, 0.0)
    }

    #[test]

    fn quantized_rows_from_a_gguf_file() -> Result<()> {
        let mut w = GgufWriter::new();
        // GGML dims are innermost first: 2 rows of 32.
        w.add_tensor("token_embd.weight", vec![32, 2], GgmlType::Q8_0, q8_table())
            .map_err(gguf_err)?;
        let file = GgufFile::from_bytes(w.to_bytes().map_err(gguf_err)?).map_err(gguf_err)?;
        let info = file
            .tensor("token_embd.weight")
            .ok_or_else(|| gguf_err("missing"))?;
        let table = Tensor::from_gguf(&file, info)?;
        let out = B.embedding(&table, &ids(&[1])?)?.to_vec_f32()?;
        assert_close(&out, &[-3.0; 32], 0.0)
    }

    fn gguf_err(e: impl std::fmt::Display) -> CoreError {
        CoreError::Invalid {
            op: "test gguf",
            reason: e.to_string(),
        }
    }
}
