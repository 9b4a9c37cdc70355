//! Single operations on the model's GPU for programs in the language: a
//! `.tl` program whose model is on CUDA multiplies by the model's weights
//! and attends over its KV cache here, with the kernels the forward uses
//! (the quantized GEMVs and tensor-core products, cuBLAS for more than
//! `GEMV_ROWS` rows; the paged K/V write of `qkv_rope_store` and the
//! `attention_*` kernels). A program's values live on the host, so each
//! call uploads its input and reads its result back.
//!
//! Weights are uploaded on first use, repacked as the forward's are, and
//! kept per mapped byte range for the model's lifetime; scratch buffers
//! grow to the largest call seen.

use std::collections::HashMap;

use tl_cuda::{raw_arg, Arg, DevBuf, Gpu};
use tl_gguf::GgmlType;

use super::exec::{
    attn_suffix, grid1, kv_type_code, matmul_on, AttnArgs, MatScratch, RopeArgs, GEMV_ROWS,
};
use super::weights::{repack, DevMat, Kind};
use super::{cuda_err, CudaModel, DeviceKv};
use crate::error::{ModelError, Result};
use crate::weights::Weight;

/// The weights and scratch buffers of program operations on one GPU.
#[derive(Default)]
pub(crate) struct OpsState {
    /// Uploaded weights by the (address, length) of their mapped bytes.
    mats: HashMap<(usize, usize), DevMat>,
    bufs: HashMap<&'static str, DevBuf>,
}

impl OpsState {
    /// A scratch buffer of at least `bytes` bytes (at least 16), reused
    /// while large enough.
    fn buf(&mut self, gpu: &Gpu, name: &'static str, bytes: usize) -> Result<u64> {
        let bytes = bytes.max(16);
        if let Some(b) = self.bufs.get(name) {
            if b.bytes >= bytes {
                return Ok(b.ptr);
            }
        }
        let b = gpu.alloc(bytes, name).map_err(cuda_err)?;
        let p = b.ptr;
        self.bufs.insert(name, b);
        Ok(p)
    }
}

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: f32 and i32 slices: no padding, any byte view is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// `len` f32 values from device memory at `p`.
pub(super) fn read_f32(gpu: &Gpu, p: u64, len: usize) -> Result<Vec<f32>> {
    let mut v = vec![0.0f32; len];
    // SAFETY: f32 slice viewed as bytes for the copy.
    let dst = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, len * 4) };
    gpu.dtoh(dst, p).map_err(cuda_err)?;
    Ok(v)
}

/// What [`CudaModel::op_attention`] needs of a layer's attention.
pub(crate) struct OpAttn<'a> {
    pub layer: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Score scale (applied to the queries).
    pub scale: f32,
    /// Sliding window in positions, 0 for none.
    pub window: usize,
    /// Position of the first token.
    pub pos: usize,
    /// The sequence's block table (block ids, 16 positions each).
    pub table: &'a [u32],
}

impl CudaModel {
    fn ops(&self) -> Result<std::sync::MutexGuard<'_, OpsState>> {
        self.ops
            .lock()
            .map_err(|_| ModelError::Device("program operations: a previous call panicked".into()))
    }

    /// `y[m, n] = x[m, k] · Wᵀ` for a weight of the model given by its
    /// mapped bytes (`ty`, `n` rows of `k`), on the GPU.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn op_linear(
        &self,
        name: &str,
        ty: GgmlType,
        n: usize,
        k: usize,
        bytes: &[u8],
        x: &[f32],
        m: usize,
    ) -> Result<Vec<f32>> {
        if x.len() != m * k {
            return Err(ModelError::Device(format!(
                "linear: {} input values for {m} rows of {k}",
                x.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(vec![0.0; m * n]);
        }
        let gpu = &*self.gpu;
        let mut st = self.ops()?;
        let key = (bytes.as_ptr() as usize, bytes.len());
        if let std::collections::hash_map::Entry::Vacant(e) = st.mats.entry(key) {
            let w = Weight::standalone(name, ty, n, k, bytes.len());
            e.insert(DevMat::upload(gpu, repack(&w, bytes)?, name)?);
        }
        let kind = st.mats.get(&key).map_or(Kind::F16, |w| w.kind);
        let small = m <= GEMV_ROWS;
        let quantized = small && kind != Kind::F16;
        if quantized && !k.is_multiple_of(32) {
            return Err(ModelError::Device(format!(
                "linear '{name}': rows of {k} values are not whole 32-value blocks"
            )));
        }
        let xb = st.buf(gpu, "program x", m * k * 4)?;
        let out = st.buf(gpu, "program y", m * n * 4)?;
        let sc = MatScratch {
            xq: if quantized {
                st.buf(gpu, "program xq", m * k)?
            } else {
                0
            },
            xd: if quantized {
                st.buf(gpu, "program xd", m * k / 32 * 4)?
            } else {
                0
            },
            xh: if small {
                0
            } else {
                st.buf(gpu, "program xh", m * k * 2)?
            },
            wh: if small || kind == Kind::F16 {
                0
            } else {
                st.buf(gpu, "program wh", n * k * 2)?
            },
            part: 0,
            cnt: 0,
        };
        gpu.htod(xb, bytes_of(x)).map_err(cuda_err)?;
        if quantized {
            gpu.launch(
                "quant_q8",
                grid1(m * k, 256),
                256,
                0,
                &[
                    Arg::Ptr(xb),
                    Arg::Ptr(sc.xq),
                    Arg::Ptr(sc.xd),
                    Arg::I64((m * k) as i64),
                ],
            )
            .map_err(cuda_err)?;
        }
        let mmq_min = self.mmq_min.load(std::sync::atomic::Ordering::Relaxed);
        let w = st
            .mats
            .get(&key)
            .ok_or_else(|| ModelError::Device(format!("linear '{name}': weight not uploaded")))?;
        matmul_on(
            gpu,
            mmq_min,
            super::exec::mmqs_rows(),
            sc,
            &[w],
            xb,
            m,
            out,
            n,
        )?;
        read_f32(gpu, out, m * n)
    }

    /// Writes K and V of `t` tokens at positions `a.pos..` into the
    /// device cache `kv` (rotated as its type wants), then attends each
    /// token's query heads causally over its positions; `q`, `k`, `v` are
    /// `[t, heads · head_dim]` rows as a program computed them (RoPE
    /// already applied). Returns `[t, n_heads · head_dim]`.
    pub(crate) fn op_attention(
        &self,
        kv: &DeviceKv,
        a: &OpAttn<'_>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
    ) -> Result<Vec<f32>> {
        let hd = a.head_dim;
        if !matches!(hd, 64 | 128 | 256) {
            return Err(ModelError::Device(format!(
                "attention kernel: head dim {hd} (64, 128 or 256 supported)"
            )));
        }
        let (qd, kvd) = (a.n_heads * hd, a.n_kv_heads * hd);
        if q.len() != t * qd || k.len() != t * kvd || v.len() != t * kvd {
            return Err(ModelError::Device(format!(
                "attention: q, k, v of {t} tokens need {qd}, {kvd}, {kvd} values per token"
            )));
        }
        let end = a.pos + t;
        if a.table.len() * crate::kv::BLOCK_SIZE < end {
            return Err(ModelError::Kv(format!(
                "attention: block table covers {} positions, the call needs {end}",
                a.table.len() * crate::kv::BLOCK_SIZE
            )));
        }
        if t == 0 {
            return Ok(Vec::new());
        }
        let gpu = &*self.gpu;
        let mut st = self.ops()?;
        // One row per token as the forward's QKV product leaves it.
        let row = qd + 2 * kvd;
        let mut qkv = Vec::with_capacity(t * row);
        for i in 0..t {
            qkv.extend_from_slice(&q[i * qd..(i + 1) * qd]);
            qkv.extend_from_slice(&k[i * kvd..(i + 1) * kvd]);
            qkv.extend_from_slice(&v[i * kvd..(i + 1) * kvd]);
        }
        // Token metadata: positions, cache slots, sequence (0), the table.
        let mut meta: Vec<i32> = Vec::with_capacity(3 * t + a.table.len());
        meta.extend((0..t).map(|i| (a.pos + i) as i32));
        for i in 0..t {
            let p = a.pos + i;
            let block = a.table[p / crate::kv::BLOCK_SIZE] as usize;
            meta.push((block * crate::kv::BLOCK_SIZE + p % crate::kv::BLOCK_SIZE) as i32);
        }
        meta.extend(std::iter::repeat_n(0, t));
        meta.extend(a.table.iter().map(|&b| b as i32));
        let qkv_b = st.buf(gpu, "program qkv", qkv.len() * 4)?;
        let meta_b = st.buf(gpu, "program meta", meta.len() * 4)?;
        let q_b = st.buf(gpu, "program q", t * qd * 4)?;
        let out_b = st.buf(gpu, "program attention", t * qd * 4)?;
        gpu.htod(qkv_b, bytes_of(&qkv)).map_err(cuda_err)?;
        gpu.htod(meta_b, bytes_of(&meta)).map_err(cuda_err)?;
        let at = |i: usize| meta_b + (i * 4) as u64;
        let (k_rot, v_rot) = crate::kv::rotations(kv.ty, hd);
        // RoPE off (n_rot 0: the program rotated), no biases or norms: the
        // kernel only rotates for a quantized cache and stores.
        let ra = RopeArgs {
            n_heads: a.n_heads as i32,
            n_kv_heads: a.n_kv_heads as i32,
            hd: hd as i32,
            n_rot: 0,
            neox: 0,
            base: 10_000.0,
            eps: 0.0,
            q_scale: 1.0,
            kv_type: kv_type_code(kv.ty),
            k_rot: k_rot as i32,
            v_rot: v_rot as i32,
            yarn: 0,
            freq_scale: 1.0,
            ext_factor: 0.0,
            mscale: 1.0,
            corr_lo: 0.0,
            corr_hi: 0.0,
            temp_scale: 0.0,
            temp_floor: 1,
        };
        let off = (a.layer * kv.layer_bytes) as u64;
        let soff = (a.layer * kv.layer_scale_bytes) as u64;
        let ks = kv.ks.as_ref().map_or(0, |b| b.ptr.wrapping_add(soff));
        let vs = kv.vs.as_ref().map_or(0, |b| b.ptr.wrapping_add(soff));
        gpu.launch(
            "qkv_rope_store",
            (t as u32, (a.n_heads + a.n_kv_heads) as u32, 1),
            (hd / 2) as u32,
            ((2 * hd + 32) * 4) as u32,
            &[
                Arg::Ptr(qkv_b),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(at(0)),
                Arg::Ptr(at(t)),
                Arg::Ptr(kv.k.ptr + off),
                Arg::Ptr(kv.v.ptr + off),
                Arg::Ptr(ks),
                Arg::Ptr(vs),
                Arg::Ptr(q_b),
                raw_arg(&ra),
            ],
        )
        .map_err(cuda_err)?;
        // Unsplit (chunk 0): one block per (head, token) pair, which then
        // writes its output directly (no partial states to merge).
        let aa = AttnArgs {
            n_heads: a.n_heads as i32,
            n_kv_heads: a.n_kv_heads as i32,
            max_blocks: a.table.len() as i32,
            window: a.window as i32,
            scale: a.scale,
            chunk: 0,
            v_rot: v_rot as i32,
            softcap: 0.0,
            sinks: 0,
        };
        let threads = 256usize;
        let groups = threads / 32 * (32 / (hd / 8));
        let smem = ((2 * groups + groups * hd) * 4) as u32;
        let suffix = attn_suffix(kv.ty);
        gpu.launch(
            &format!("attention_{hd}{suffix}"),
            (a.n_heads as u32, t as u32, 1),
            threads as u32,
            smem,
            &[
                Arg::Ptr(q_b),
                Arg::Ptr(kv.k.ptr + off),
                Arg::Ptr(kv.v.ptr + off),
                Arg::Ptr(ks),
                Arg::Ptr(vs),
                Arg::Ptr(at(0)),
                Arg::Ptr(at(2 * t)),
                Arg::Ptr(at(3 * t)),
                Arg::Ptr(out_b),
                raw_arg(&aa),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
            ],
        )
        .map_err(cuda_err)?;
        read_f32(gpu, out_b, t * qd)
    }
}
