//! Weights in device memory: each GGML block type split into the aligned
//! component arrays the kernels read (layouts in tl-cuda's `kernels.cu`),
//! Q/K/V and gate/up concatenated row-wise when they share a type.

use half::f16;
use tl_cuda::{raw_arg, Arg, DevBuf, Gpu};
use tl_gguf::GgmlType;

use super::cuda_err;
use crate::error::{ModelError, Result};
use crate::weights::Weight;

/// The device kernels' weight layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    F16,
    Q8_0,
    Q4_0,
    Q5_0,
    Q4K,
    Q6K,
    Q4_1,
    Q5_1,
    Q5K,
    Q2K,
    Q3K,
}

impl Kind {
    pub(super) fn of(ty: GgmlType) -> Kind {
        match ty {
            GgmlType::Q8_0 => Kind::Q8_0,
            GgmlType::Q4_0 => Kind::Q4_0,
            GgmlType::Q5_0 => Kind::Q5_0,
            GgmlType::Q4_K => Kind::Q4K,
            GgmlType::Q6_K => Kind::Q6K,
            GgmlType::Q4_1 => Kind::Q4_1,
            GgmlType::Q5_1 => Kind::Q5_1,
            GgmlType::Q5_K => Kind::Q5K,
            GgmlType::Q2_K => Kind::Q2K,
            GgmlType::Q3_K => Kind::Q3K,
            _ => Kind::F16,
        }
    }

    pub(super) fn suffix(self) -> &'static str {
        match self {
            Kind::F16 => "f16",
            Kind::Q8_0 => "q8_0",
            Kind::Q4_0 => "q4_0",
            Kind::Q5_0 => "q5_0",
            Kind::Q4K => "q4_k",
            Kind::Q6K => "q6_k",
            Kind::Q4_1 => "q4_1",
            Kind::Q5_1 => "q5_1",
            Kind::Q5K => "q5_k",
            Kind::Q2K => "q2_k",
            Kind::Q3K => "q3_k",
        }
    }

    /// Whether the tensor-core product (`mmq_*`) takes this kind; the
    /// others run the 8-row GEMVs at every decode batch size.
    pub(super) fn has_mmq(self) -> bool {
        !matches!(self, Kind::F16 | Kind::Q2K | Kind::Q3K)
    }

    /// Quantized units of a row of `k` values that one lane of a GEMV
    /// takes at a time (`units_per_row` of kernels.cu); f16 rows are read
    /// 8 values a lane.
    pub(super) fn units(self, k: usize) -> usize {
        match self {
            Kind::Q2K | Kind::Q3K => k / 64,
            Kind::Q4K | Kind::Q5K => k / 32,
            Kind::F16 => k / 8,
            _ => k / 16,
        }
    }
}

/// A weight's component arrays on the host, before upload (see the layouts
/// in `kernels.cu`).
pub(super) struct HostParts {
    pub(super) kind: Kind,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) parts: [Vec<u8>; 4],
}

/// Splits GGML blocks into the device layout of their kind.
pub(super) fn repack(w: &Weight, bytes: &[u8]) -> Result<HostParts> {
    let kind = Kind::of(w.ty);
    let (rows, cols) = (w.rows, w.cols);
    let mut parts: [Vec<u8>; 4] = Default::default();
    let bad = |what: &str| ModelError::Device(format!("tensor '{}': {what}", w.name));
    let blocks = |bs: usize| -> Result<std::slice::ChunksExact<'_, u8>> {
        if !bytes.len().is_multiple_of(bs) {
            return Err(bad("data is not a whole number of blocks"));
        }
        Ok(bytes.chunks_exact(bs))
    };
    match kind {
        Kind::Q8_0 => {
            for b in blocks(34)? {
                parts[1].extend_from_slice(&b[..2]);
                parts[0].extend_from_slice(&b[2..34]);
            }
        }
        Kind::Q4_0 => {
            for b in blocks(18)? {
                parts[1].extend_from_slice(&b[..2]);
                parts[0].extend_from_slice(&b[2..18]);
            }
        }
        Kind::Q5_0 => {
            for b in blocks(22)? {
                parts[1].extend_from_slice(&b[..2]);
                parts[2].extend_from_slice(&b[2..6]);
                parts[0].extend_from_slice(&b[6..22]);
            }
        }
        Kind::Q4_1 => {
            for b in blocks(20)? {
                parts[1].extend_from_slice(&b[..2]);
                parts[3].extend_from_slice(&b[2..4]);
                parts[0].extend_from_slice(&b[4..20]);
            }
        }
        Kind::Q5_1 => {
            for b in blocks(24)? {
                parts[1].extend_from_slice(&b[..2]);
                parts[3].extend_from_slice(&b[2..4]);
                parts[2].extend_from_slice(&b[4..8]);
                parts[0].extend_from_slice(&b[8..24]);
            }
        }
        Kind::Q4K | Kind::Q5K => parts[0].extend_from_slice(bytes),
        // ggml block_q2_K: scales[16] | qs[64] | d | dmin.
        Kind::Q2K => {
            for b in blocks(84)? {
                parts[3].extend_from_slice(&b[..16]);
                parts[0].extend_from_slice(&b[16..80]);
                parts[1].extend_from_slice(&b[80..84]);
            }
        }
        // ggml block_q3_K: hmask[32] | qs[64] | scales[12] | d.
        Kind::Q3K => {
            for b in blocks(110)? {
                parts[2].extend_from_slice(&b[..32]);
                parts[0].extend_from_slice(&b[32..96]);
                parts[3].extend_from_slice(&b[96..108]);
                parts[1].extend_from_slice(&b[108..110]);
            }
        }
        Kind::Q6K => {
            for b in blocks(210)? {
                parts[0].extend_from_slice(&b[..128]);
                parts[2].extend_from_slice(&b[128..192]);
                parts[3].extend_from_slice(&b[192..208]);
                parts[1].extend_from_slice(&b[208..210]);
            }
        }
        Kind::F16 => {
            let mut row = vec![0.0f32; cols];
            let rb = bytes.len() / rows.max(1);
            parts[0].reserve(rows * cols * 2);
            for r in 0..rows {
                tl_core::quant::dequantize_named(
                    w.ty,
                    &w.name,
                    &bytes[r * rb..(r + 1) * rb],
                    &mut row,
                )
                .map_err(|e| ModelError::Core {
                    tensor: w.name.clone(),
                    err: e,
                })?;
                for v in &row {
                    parts[0].extend_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
        }
    }
    Ok(HostParts {
        kind,
        rows,
        cols,
        parts,
    })
}

/// A weight matrix in device memory.
pub(super) struct DevMat {
    pub(super) kind: Kind,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) bufs: Vec<DevBuf>,
    pub(super) ptrs: [u64; 4],
    /// Bytes of each component array (rows in order, equal bytes a row).
    pub(super) part_bytes: [usize; 4],
}

impl DevMat {
    pub(super) fn upload(gpu: &Gpu, hp: HostParts, name: &str) -> Result<DevMat> {
        let mut bufs = Vec::new();
        let mut ptrs = [0u64; 4];
        let mut part_bytes = [0usize; 4];
        for (i, p) in hp.parts.iter().enumerate() {
            if p.is_empty() {
                continue;
            }
            let b = gpu.upload(p, name).map_err(cuda_err)?;
            ptrs[i] = b.ptr;
            part_bytes[i] = p.len();
            bufs.push(b);
        }
        Ok(DevMat {
            kind: hp.kind,
            n: hp.rows,
            k: hp.cols,
            bufs,
            ptrs,
            part_bytes,
        })
    }

    /// Rows `first .. first + rows` as a matrix of their own, borrowing
    /// this one's memory (e.g. one expert of a stacked set): `None` where a
    /// component array's rows are not of equal bytes or a row range would
    /// start off 16-byte alignment (the kernels' vector loads).
    pub(super) fn rows_view(&self, first: usize, rows: usize) -> Option<DevMat> {
        if self.n == 0 || first + rows > self.n {
            return None;
        }
        let mut ptrs = [0u64; 4];
        let mut part_bytes = [0usize; 4];
        for i in 0..4 {
            if self.part_bytes[i] == 0 {
                continue;
            }
            if !self.part_bytes[i].is_multiple_of(self.n) {
                return None;
            }
            let row = self.part_bytes[i] / self.n;
            let p = self.ptrs[i] + (first * row) as u64;
            if !p.is_multiple_of(16) {
                return None;
            }
            ptrs[i] = p;
            part_bytes[i] = rows * row;
        }
        Some(DevMat {
            kind: self.kind,
            n: rows,
            k: self.k,
            bufs: Vec::new(),
            ptrs,
            part_bytes,
        })
    }

    pub(super) fn bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.bytes).sum()
    }

    pub(super) fn arg(&self) -> Arg {
        raw_arg(&self.ptrs)
    }
}

/// Weights applied to one input, their outputs side by side: one matrix
/// when the parts share a type (rows concatenated), else one per part.
pub(super) struct DevMats {
    pub(super) mats: Vec<DevMat>,
}

impl DevMats {
    pub(super) fn upload(gpu: &Gpu, ws: &[&Weight], file: &tl_gguf::GgufFile) -> Result<DevMats> {
        let name = ws
            .iter()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>()
            .join("+");
        let hps = ws
            .iter()
            .map(|w| repack(w, w.bytes(file)))
            .collect::<Result<Vec<_>>>()?;
        let same = hps
            .iter()
            .all(|h| h.kind == hps[0].kind && h.cols == hps[0].cols);
        if same {
            let mut it = hps.into_iter();
            let mut acc = it
                .next()
                .ok_or_else(|| ModelError::Device("no weights".into()))?;
            for h in it {
                acc.rows += h.rows;
                for (a, p) in acc.parts.iter_mut().zip(h.parts) {
                    a.extend_from_slice(&p);
                }
            }
            return Ok(DevMats {
                mats: vec![DevMat::upload(gpu, acc, &name)?],
            });
        }
        let mats = hps
            .into_iter()
            .zip(ws)
            .map(|(h, w)| DevMat::upload(gpu, h, &w.name))
            .collect::<Result<Vec<_>>>()?;
        Ok(DevMats { mats })
    }

    pub(super) fn n(&self) -> usize {
        self.mats.iter().map(|m| m.n).sum()
    }
}

pub(super) fn upload_f32(gpu: &Gpu, v: &[f32], what: &str) -> Result<DevBuf> {
    gpu.upload(bytemuck_f32(v), what).map_err(cuda_err)
}

pub(super) fn upload_opt(gpu: &Gpu, v: &Option<Vec<f32>>, what: &str) -> Result<Option<DevBuf>> {
    v.as_ref().map(|v| upload_f32(gpu, v, what)).transpose()
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte view of it is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}
