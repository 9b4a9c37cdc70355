//! The CUDA executor of the forward stages (see `forward.rs`): weights,
//! activations and the paged KV cache in device memory, the kernels of
//! `tl-cuda/src/kernels.cu`, and one CUDA-graph replay per decode step.
//!
//! Weights are uploaded once, repacked per block type so that every load
//! is aligned (layouts in `kernels.cu`); Q/K/V and gate/up of the same type
//! are concatenated row-wise into one matrix, so each is one product.
//! Products of up to 8 rows (decode) run as quantized GEMVs on 8-bit
//! activations (dp4a); larger ones (prefill) dequantize the weight to f16
//! and run cuBLAS on tensor cores. Types without a quantized kernel here
//! (F32, BF16, Q2_K, Q3_K) are converted to f16 at load.
//!
//! Only the step's token metadata goes up (one copy) and only the requested
//! logits rows, or just the greedy token ids, come back.

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use tl_cuda::{raw_arg, Arg, DevBuf, Gpu, Graph};
use tl_gguf::GgmlType;

use crate::attention::AttnParams;
use crate::config::{Arch, FfnAct, RopeLayout};
use crate::error::{ModelError, Result};
use crate::forward::{Exec, Plan, Probe};
use crate::kv::{KvCache, BLOCK_SIZE};
use crate::model::{ForwardState, Model, SeqBatch};
use crate::weights::Weight;

fn cuda_err(e: tl_cuda::CudaError) -> ModelError {
    ModelError::Device(e.to_string())
}

/// The device kernels' weight layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F16,
    Q8_0,
    Q4_0,
    Q5_0,
    Q4K,
    Q6K,
    Q4_1,
    Q5_1,
    Q5K,
}

impl Kind {
    fn of(ty: GgmlType) -> Kind {
        match ty {
            GgmlType::Q8_0 => Kind::Q8_0,
            GgmlType::Q4_0 => Kind::Q4_0,
            GgmlType::Q5_0 => Kind::Q5_0,
            GgmlType::Q4_K => Kind::Q4K,
            GgmlType::Q6_K => Kind::Q6K,
            GgmlType::Q4_1 => Kind::Q4_1,
            GgmlType::Q5_1 => Kind::Q5_1,
            GgmlType::Q5_K => Kind::Q5K,
            _ => Kind::F16,
        }
    }

    fn suffix(self) -> &'static str {
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
        }
    }
}

/// A weight's component arrays on the host, before upload (see the layouts
/// in `kernels.cu`).
struct HostParts {
    kind: Kind,
    rows: usize,
    cols: usize,
    parts: [Vec<u8>; 4],
}

/// Splits GGML blocks into the device layout of their kind.
fn repack(w: &Weight, bytes: &[u8]) -> Result<HostParts> {
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
struct DevMat {
    kind: Kind,
    n: usize,
    k: usize,
    bufs: Vec<DevBuf>,
    ptrs: [u64; 4],
}

impl DevMat {
    fn upload(gpu: &Gpu, hp: HostParts, name: &str) -> Result<DevMat> {
        let mut bufs = Vec::new();
        let mut ptrs = [0u64; 4];
        for (i, p) in hp.parts.iter().enumerate() {
            if p.is_empty() {
                continue;
            }
            let b = gpu.upload(p, name).map_err(cuda_err)?;
            ptrs[i] = b.ptr;
            bufs.push(b);
        }
        Ok(DevMat {
            kind: hp.kind,
            n: hp.rows,
            k: hp.cols,
            bufs,
            ptrs,
        })
    }

    fn bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.bytes).sum()
    }

    fn arg(&self) -> Arg {
        raw_arg(&self.ptrs)
    }
}

/// Weights applied to one input, their outputs side by side: one matrix
/// when the parts share a type (rows concatenated), else one per part.
struct DevMats {
    mats: Vec<DevMat>,
}

impl DevMats {
    fn upload(gpu: &Gpu, ws: &[&Weight], file: &tl_gguf::GgufFile) -> Result<DevMats> {
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

    fn n(&self) -> usize {
        self.mats.iter().map(|m| m.n).sum()
    }
}

fn upload_f32(gpu: &Gpu, v: &[f32], what: &str) -> Result<DevBuf> {
    gpu.upload(bytemuck_f32(v), what).map_err(cuda_err)
}

fn upload_opt(gpu: &Gpu, v: &Option<Vec<f32>>, what: &str) -> Result<Option<DevBuf>> {
    v.as_ref().map(|v| upload_f32(gpu, v, what)).transpose()
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte view of it is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

struct DevLayer {
    attn_norm: DevBuf,
    ffn_norm: DevBuf,
    bq: Option<DevBuf>,
    bk: Option<DevBuf>,
    bv: Option<DevBuf>,
    q_norm: Option<DevBuf>,
    k_norm: Option<DevBuf>,
    post_attn_norm: Option<DevBuf>,
    post_ffn_norm: Option<DevBuf>,
    qkv: DevMats,
    wo: DevMat,
    gate_up: DevMats,
    down: DevMat,
}

/// The model's weights on one GPU.
pub(crate) struct CudaModel {
    gpu: Arc<Gpu>,
    embd: DevMat,
    output: Option<DevMat>,
    output_norm: DevBuf,
    layers: Vec<DevLayer>,
    weight_bytes: usize,
    /// Elements of the largest matrix (the f16 scratch of prefill products).
    max_mat: usize,
}

/// The paged K and V pools of every layer in device memory, laid out as the
/// host cache: per layer `[block][kv_head][slot][dim]` f16.
pub(crate) struct DeviceKv {
    k: DevBuf,
    v: DevBuf,
    layer_bytes: usize,
}

fn ptr(b: &Option<DevBuf>) -> u64 {
    b.as_ref().map_or(0, |b| b.ptr)
}

impl CudaModel {
    pub fn upload(m: &Model, ordinal: usize) -> Result<CudaModel> {
        let gpu = Gpu::new(ordinal).map_err(cuda_err)?;
        let file = &m.file;
        // Fail before allocating when the weights can't fit.
        let need: usize = file.tensors.iter().map(|t| t.size as usize).sum();
        let (free, total) = gpu.mem_info().map_err(cuda_err)?;
        if need > free {
            return Err(ModelError::Device(format!(
                "the model's weights need {need} bytes ({:.2} GiB), {free} bytes ({:.2} GiB) of {total} are free on {}",
                need as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64,
                gpu.name
            )));
        }
        let w = &m.weights;
        let mut layers = Vec::with_capacity(w.layers.len());
        let mut max_mat = 0usize;
        for (lw, lv) in w.layers.iter().zip(&m.vecs) {
            let l = DevLayer {
                attn_norm: upload_f32(&gpu, &lv.attn_norm, "attn_norm")?,
                ffn_norm: upload_f32(&gpu, &lv.ffn_norm, "ffn_norm")?,
                bq: upload_opt(&gpu, &lv.bq, "bq")?,
                bk: upload_opt(&gpu, &lv.bk, "bk")?,
                bv: upload_opt(&gpu, &lv.bv, "bv")?,
                q_norm: upload_opt(&gpu, &lv.q_norm, "q_norm")?,
                k_norm: upload_opt(&gpu, &lv.k_norm, "k_norm")?,
                post_attn_norm: upload_opt(&gpu, &lv.post_attn_norm, "post_attn_norm")?,
                post_ffn_norm: upload_opt(&gpu, &lv.post_ffn_norm, "post_ffn_norm")?,
                qkv: DevMats::upload(&gpu, &[&lw.wq, &lw.wk, &lw.wv], file)?,
                wo: DevMat::upload(&gpu, repack(&lw.wo, lw.wo.bytes(file))?, &lw.wo.name)?,
                gate_up: DevMats::upload(&gpu, &[&lw.gate, &lw.up], file)?,
                down: DevMat::upload(&gpu, repack(&lw.down, lw.down.bytes(file))?, &lw.down.name)?,
            };
            for mm in l
                .qkv
                .mats
                .iter()
                .chain(&l.gate_up.mats)
                .chain([&l.wo, &l.down])
            {
                max_mat = max_mat.max(mm.n * mm.k);
            }
            layers.push(l);
        }
        let embd = DevMat::upload(
            &gpu,
            repack(&w.token_embd, w.token_embd.bytes(file))?,
            &w.token_embd.name,
        )?;
        let output = match &w.output {
            Some(o) => Some(DevMat::upload(&gpu, repack(o, o.bytes(file))?, &o.name)?),
            None => None,
        };
        let output_norm = upload_f32(&gpu, &m.output_norm, "output_norm")?;
        let mut weight_bytes = embd.bytes() + output.as_ref().map_or(0, DevMat::bytes);
        for l in &layers {
            weight_bytes += l
                .qkv
                .mats
                .iter()
                .chain(&l.gate_up.mats)
                .map(DevMat::bytes)
                .sum::<usize>();
            weight_bytes += l.wo.bytes() + l.down.bytes();
        }
        Ok(CudaModel {
            gpu,
            embd,
            output,
            output_norm,
            layers,
            weight_bytes,
            max_mat,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.gpu.ordinal
    }

    pub fn profile_report(&self) -> Vec<(&'static str, f64, usize)> {
        self.gpu.profile_report()
    }

    pub fn summary(&self) -> String {
        let (free, total) = self.gpu.mem_info().unwrap_or((0, self.gpu.total_mem));
        format!(
            "cuda:{} {} (sm_{}{}, {} SMs), {:.1} GiB memory, weights {:.1} MiB, {:.1} GiB free",
            self.gpu.ordinal,
            self.gpu.name,
            self.gpu.arch.0,
            self.gpu.arch.1,
            self.gpu.sm_count,
            total as f64 / (1u64 << 30) as f64,
            self.weight_bytes as f64 / (1u64 << 20) as f64,
            free as f64 / (1u64 << 30) as f64,
        )
    }

    pub fn alloc_kv(
        &self,
        n_layers: usize,
        n_kv: usize,
        hd: usize,
        n_blocks: usize,
    ) -> Result<DeviceKv> {
        let layer_bytes = n_blocks * n_kv * BLOCK_SIZE * hd * 2;
        let total = layer_bytes * n_layers;
        let k = self
            .gpu
            .alloc_zeroed(total, "KV cache (K)")
            .map_err(cuda_err)?;
        let v = self
            .gpu
            .alloc_zeroed(total, "KV cache (V)")
            .map_err(cuda_err)?;
        Ok(DeviceKv { k, v, layer_bytes })
    }

    pub fn forward(
        &self,
        m: &Model,
        cache: &mut KvCache,
        batch: &[SeqBatch],
        plan: &Plan,
        st: &mut ForwardState,
        greedy: bool,
    ) -> Result<()> {
        let gpu = &*self.gpu;
        gpu.bind().map_err(cuda_err)?;
        let kv = cache.device.as_ref().ok_or_else(|| {
            ModelError::Kv("the model is on a GPU but this KV cache is in host memory".into())
        })?;
        let c = &m.config;
        let n = plan.n_tokens();
        let n_out = plan.out_rows.len();
        let stride = batch
            .iter()
            .map(|s| s.kv.blocks.len())
            .max()
            .unwrap_or(1)
            .next_power_of_two();
        let cs = st.cuda.get_or_insert_with(CudaState::default);
        cs.ensure(gpu, m, self, n, n_out.max(1), batch.len() * stride)?;
        // Step metadata, one upload: ids | pos | slots | seq | out_rows | tables.
        let h = &mut cs.host_meta;
        h.clear();
        for &(si, pos) in &plan.meta {
            h.push(batch[si].tokens[pos - batch[si].pos] as i32);
        }
        for &(_, pos) in &plan.meta {
            h.push(pos as i32);
        }
        for &(si, pos) in &plan.meta {
            let (b, s) = batch[si]
                .kv
                .slot(pos)
                .ok_or_else(|| ModelError::Kv(format!("no block for position {pos}")))?;
            if b as usize >= cache.n_blocks {
                return Err(ModelError::Kv(format!(
                    "block {b} outside the cache of {}",
                    cache.n_blocks
                )));
            }
            h.push((b as usize * BLOCK_SIZE + s) as i32);
        }
        for &(si, _) in &plan.meta {
            h.push(si as i32);
        }
        for &r in &plan.out_rows {
            h.push(r as i32);
        }
        for s in batch {
            for i in 0..stride {
                h.push(s.kv.blocks.get(i).map_or(0, |&b| b as i32));
            }
        }
        let lay = MetaLayout::new(n, n_out, batch.len() * stride);
        if h.len() * 4 > cs.meta.as_ref().map_or(0, |b| b.bytes) {
            cs.meta = Some(
                gpu.alloc(h.len() * 4 * 2, "step metadata")
                    .map_err(cuda_err)?,
            );
            cs.graphs.clear();
        }
        let meta_ptr = cs.meta.as_ref().map_or(0, |b| b.ptr);
        // SAFETY: i32 slice viewed as bytes.
        let hb = unsafe { std::slice::from_raw_parts(h.as_ptr() as *const u8, h.len() * 4) };
        gpu.htod(meta_ptr, hb).map_err(cuda_err)?;

        let decode = n == batch.len()
            && n <= 8
            && graphs_enabled()
            && !crate::dump::enabled()
            && !profiling();
        let key = GraphKey {
            n,
            n_out,
            stride,
            greedy,
            kv: kv.k.ptr,
        };
        let mut ex = CudaExec {
            gpu,
            cm: self,
            m,
            kv,
            cs,
            n,
            n_out,
            stride,
            meta: meta_ptr,
            lay,
            greedy,
            pending_ffn: None,
        };
        if decode {
            if let Some(g) = ex.cs.graphs.get(&key) {
                gpu.replay(g).map_err(cuda_err)?;
            } else {
                gpu.begin_capture().map_err(cuda_err)?;
                let r = crate::forward::run(c, &mut ex).and_then(|_| ex.finish());
                let g = gpu.end_capture().map_err(cuda_err);
                r?;
                let g = g?;
                gpu.replay(&g).map_err(cuda_err)?;
                ex.cs.graphs.insert(key, g);
            }
        } else {
            crate::forward::run(c, &mut ex)?;
            ex.finish()?;
            if profiling() {
                gpu.profile_flush().map_err(cuda_err)?;
            }
        }
        // Read back what the caller asked for.
        let cs = st
            .cuda
            .as_mut()
            .ok_or_else(|| ModelError::Device("lost state".into()))?;
        if greedy {
            let mut ids = vec![0u8; n_out * 4];
            gpu.dtoh(&mut ids, cs.ids_ptr()).map_err(cuda_err)?;
            cs.last_ids = ids
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            st.last_logits = 0;
        } else {
            let len = n_out * c.vocab;
            if st.logits.len() < len {
                st.logits.resize(len, 0.0);
            }
            // SAFETY: f32 slice viewed as bytes for the copy.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(st.logits.as_mut_ptr() as *mut u8, len * 4)
            };
            gpu.dtoh(dst, cs.logits_ptr()).map_err(cuda_err)?;
            st.last_logits = len;
        }
        Ok(())
    }
}

/// `TL_CUDA_PROFILE=1`: time every stage with events (graphs off).
pub(crate) fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TL_CUDA_PROFILE").is_ok_and(|v| v == "1"))
}

fn graphs_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TL_CUDA_GRAPHS").map_or(true, |v| v != "0"))
}

/// Offsets (in i32s) of the metadata arrays in the step's upload.
#[derive(Clone, Copy)]
struct MetaLayout {
    ids: usize,
    pos: usize,
    slots: usize,
    seq: usize,
    out_rows: usize,
    tables: usize,
}

impl MetaLayout {
    fn new(n: usize, n_out: usize, _tables: usize) -> Self {
        MetaLayout {
            ids: 0,
            pos: n,
            slots: 2 * n,
            seq: 3 * n,
            out_rows: 4 * n,
            tables: 4 * n + n_out,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    n: usize,
    n_out: usize,
    stride: usize,
    greedy: bool,
    kv: u64,
}

/// Device buffers of the forward, sized for the largest step seen.
#[derive(Default)]
pub(crate) struct CudaState {
    cap_tokens: usize,
    cap_out: usize,
    x: Option<DevBuf>,
    xn: Option<DevBuf>,
    qkv: Option<DevBuf>,
    q: Option<DevBuf>,
    att: Option<DevBuf>,
    o: Option<DevBuf>,
    gu: Option<DevBuf>,
    act: Option<DevBuf>,
    hidden: Option<DevBuf>,
    logits: Option<DevBuf>,
    ids: Option<DevBuf>,
    xq: Option<DevBuf>,
    xd: Option<DevBuf>,
    xh: Option<DevBuf>,
    wh: Option<DevBuf>,
    meta: Option<DevBuf>,
    host_meta: Vec<i32>,
    last_ids: Vec<u32>,
    graphs: HashMap<GraphKey, Graph>,
}

impl CudaState {
    fn ensure(
        &mut self,
        gpu: &Gpu,
        m: &Model,
        cm: &CudaModel,
        n: usize,
        n_out: usize,
        _tables: usize,
    ) -> Result<()> {
        let c = &m.config;
        if n > self.cap_tokens {
            let n = n.next_power_of_two().max(8);
            let (d, qd, kvd, f) = (c.d_model, c.q_dim(), c.kv_dim(), c.ffn);
            let maxk = d.max(qd).max(f);
            let a = |bytes: usize, what: &str| gpu.alloc(bytes, what).map(Some).map_err(cuda_err);
            self.x = a(n * d * 4, "activations x")?;
            self.xn = a(n * d * 4, "activations xn")?;
            self.qkv = a(n * (qd + 2 * kvd) * 4, "activations qkv")?;
            self.q = a(n * qd * 4, "activations q")?;
            self.att = a(n * qd * 4, "activations att")?;
            self.o = a(n * d * 4, "activations o")?;
            self.gu = a(n * 2 * f * 4, "activations gate/up")?;
            self.act = a(n * f * 4, "activations act")?;
            self.xq = a(n * maxk, "quantized activations")?;
            self.xd = a(n * maxk / 32 * 4, "activation scales")?;
            self.xh = a(n * maxk * 2, "f16 activations")?;
            if n > 8 && self.wh.is_none() {
                self.wh = a(cm.max_mat.max(1) * 2, "f16 weight scratch")?;
            }
            self.cap_tokens = n;
            self.graphs.clear();
        }
        if n_out > self.cap_out {
            let n_out = n_out.next_power_of_two().max(8);
            let a = |bytes: usize, what: &str| gpu.alloc(bytes, what).map(Some).map_err(cuda_err);
            self.hidden = a(n_out * c.d_model * 4, "final hidden")?;
            self.logits = a(n_out * c.vocab * 4, "logits")?;
            self.ids = a(n_out * 4, "token ids")?;
            // The LM head's f16 scratch for more than 8 rows.
            if n_out > 8 {
                let lm = c.vocab * c.d_model;
                if self.wh.as_ref().map_or(0, |b| b.bytes) < lm * 2 {
                    self.wh = a(lm.max(cm.max_mat) * 2, "f16 weight scratch")?;
                }
            }
            self.cap_out = n_out;
            self.graphs.clear();
        }
        if n > 8 && self.wh.as_ref().map_or(0, |b| b.bytes) < cm.max_mat * 2 {
            self.wh = gpu
                .alloc(cm.max_mat * 2, "f16 weight scratch")
                .map(Some)
                .map_err(cuda_err)?;
        }
        Ok(())
    }

    fn logits_ptr(&self) -> u64 {
        ptr(&self.logits)
    }

    fn ids_ptr(&self) -> u64 {
        ptr(&self.ids)
    }

    /// The greedy ids of the last forward.
    pub fn greedy_ids(&self) -> Vec<u32> {
        self.last_ids.clone()
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RopeArgs {
    n_heads: i32,
    n_kv_heads: i32,
    hd: i32,
    n_rot: i32,
    neox: i32,
    base: f32,
    eps: f32,
    q_scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct AttnArgs {
    n_heads: i32,
    n_kv_heads: i32,
    max_blocks: i32,
    window: i32,
    scale: f32,
}

struct CudaExec<'a> {
    gpu: &'a Gpu,
    cm: &'a CudaModel,
    m: &'a Model,
    kv: &'a DeviceKv,
    cs: &'a mut CudaState,
    n: usize,
    n_out: usize,
    stride: usize,
    meta: u64,
    lay: MetaLayout,
    greedy: bool,
    /// A layer whose FFN residual add is left to the next norm kernel.
    pending_ffn: Option<usize>,
}

fn grid1(n: usize, per: usize) -> (u32, u32, u32) {
    (n.div_ceil(per) as u32, 1, 1)
}

impl CudaExec<'_> {
    fn l(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.gpu
            .launch(name, grid, block, smem, args)
            .map_err(cuda_err)
    }

    fn meta_at(&self, off: usize) -> u64 {
        self.meta + (off * 4) as u64
    }

    /// `out[m, ..] (row stride ldo) = x[m, K] · Wᵀ` for each matrix of
    /// `mats`, their outputs side by side. `prequant`: the kernel that
    /// wrote `x` also left it quantized to 8 bits in the activation buffers.
    fn matmul(
        &self,
        mats: &[&DevMat],
        x: u64,
        m: usize,
        out: u64,
        ldo: usize,
        prequant: bool,
    ) -> Result<()> {
        let k = mats[0].k;
        let mut col = 0usize;
        let small = m <= 8;
        let needs_q = mats.iter().any(|w| w.kind != Kind::F16);
        let (xq, xd, xh, wh) = (
            ptr(&self.cs.xq),
            ptr(&self.cs.xd),
            ptr(&self.cs.xh),
            ptr(&self.cs.wh),
        );
        if small && needs_q && !prequant {
            let nb = m * k / 32;
            self.l(
                "quantize_q8",
                grid1(nb * 32, 256),
                256,
                0,
                &[Arg::Ptr(x), Arg::Ptr(xq), Arg::Ptr(xd), Arg::I64(nb as i64)],
            )?;
        }
        if !small {
            let n = m * k;
            self.l(
                "to_f16",
                grid1(n, 256),
                256,
                0,
                &[Arg::Ptr(x), Arg::Ptr(xh), Arg::I64(n as i64)],
            )?;
        }
        for w in mats {
            let o = out + (col * 4) as u64;
            if small {
                let grid = grid1(w.n, 4);
                if w.kind == Kind::F16 {
                    self.l(
                        &format!("gemv_f16_{m}"),
                        grid,
                        128,
                        0,
                        &[
                            w.arg(),
                            Arg::Ptr(x),
                            Arg::Ptr(o),
                            Arg::I32(w.n as i32),
                            Arg::I32(k as i32),
                            Arg::I32(ldo as i32),
                        ],
                    )?;
                } else {
                    self.l(
                        &format!("gemv_{}_{m}", w.kind.suffix()),
                        grid,
                        128,
                        0,
                        &[
                            w.arg(),
                            Arg::Ptr(xq),
                            Arg::Ptr(xd),
                            Arg::Ptr(o),
                            Arg::I32(w.n as i32),
                            Arg::I32(k as i32),
                            Arg::I32(ldo as i32),
                        ],
                    )?;
                }
            } else {
                let wp = if w.kind == Kind::F16 {
                    w.ptrs[0]
                } else {
                    let nb = w.n * w.k / 32;
                    self.l(
                        &format!("dequant_f16_{}", w.kind.suffix()),
                        grid1(nb, 256),
                        256,
                        0,
                        &[
                            w.arg(),
                            Arg::Ptr(wh),
                            Arg::I32(w.n as i32),
                            Arg::I32(w.k as i32),
                        ],
                    )?;
                    wh
                };
                self.gpu
                    .gemm_f16_nt(m, w.n, k, xh, wp, o, ldo)
                    .map_err(cuda_err)?;
            }
            col += w.n;
        }
        Ok(())
    }

    /// The 8-bit activation buffers as kernel arguments when this step's
    /// products take quantized activations (≤ 8 rows), else null pointers.
    fn q8_args(&self) -> [Arg; 2] {
        if self.n <= 8 {
            [Arg::Ptr(ptr(&self.cs.xq)), Arg::Ptr(ptr(&self.cs.xd))]
        } else {
            [Arg::Ptr(0), Arg::Ptr(0)]
        }
    }

    /// Charges the GPU time from here to the next mark to `label`.
    fn mark(&self, label: &'static str) -> Result<()> {
        if profiling() {
            self.gpu.mark(label).map_err(cuda_err)?;
        }
        Ok(())
    }

    fn norm_threads(d: usize) -> u32 {
        (d.div_ceil(32) * 32).clamp(32, 1024) as u32
    }

    /// `x += post_ffn_norm?(o)` of layer `il`.
    fn flush_residual(&self, il: usize) -> Result<()> {
        let c = &self.m.config;
        let l = &self.cm.layers[il];
        self.l(
            "add_norm",
            (self.n as u32, 1, 1),
            Self::norm_threads(c.d_model),
            0,
            &[
                Arg::Ptr(ptr(&self.cs.x)),
                Arg::Ptr(ptr(&self.cs.o)),
                Arg::Ptr(ptr(&l.post_ffn_norm)),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.rms_eps),
                Arg::Ptr(0),
                Arg::Ptr(0),
            ],
        )
    }

    /// Everything after the stages: the greedy argmax.
    fn finish(&mut self) -> Result<()> {
        self.mark("argmax")?;
        let r = self.finish_argmax();
        self.mark("end")?;
        r
    }

    fn finish_argmax(&mut self) -> Result<()> {
        if self.greedy {
            let v = self.m.config.vocab;
            self.l(
                "argmax_rows",
                (self.n_out as u32, 1, 1),
                1024,
                0,
                &[
                    Arg::Ptr(ptr(&self.cs.logits)),
                    Arg::I32(v as i32),
                    Arg::Ptr(ptr(&self.cs.ids)),
                ],
            )?;
        }
        Ok(())
    }

    fn read(&self, p: u64, len: usize) -> Result<Vec<f32>> {
        let mut v = vec![0.0f32; len];
        // SAFETY: f32 slice viewed as bytes for the copy.
        let dst = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, len * 4) };
        self.gpu.dtoh(dst, p).map_err(cuda_err)?;
        Ok(v)
    }
}

impl Exec for CudaExec<'_> {
    fn embed(&mut self) -> Result<()> {
        self.mark("embed")?;
        let c = &self.m.config;
        let e = &self.cm.embd;
        self.l(
            &format!("embed_{}", e.kind.suffix()),
            (self.n as u32, 1, 1),
            64,
            0,
            &[
                e.arg(),
                Arg::Ptr(self.meta_at(self.lay.ids)),
                Arg::Ptr(ptr(&self.cs.x)),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.embed_scale),
            ],
        )
    }

    fn attn_norm(&mut self, il: usize) -> Result<()> {
        self.mark("norm (+residual, q8)")?;
        let c = &self.m.config;
        let [q0, q1] = self.q8_args();
        let norm = self.cm.layers[il].attn_norm.ptr;
        if let Some(pl) = self.pending_ffn.take() {
            // The previous layer's FFN residual, fused with this norm.
            let pw = ptr(&self.cm.layers[pl].post_ffn_norm);
            return self.l(
                "add_norm",
                (self.n as u32, 1, 1),
                Self::norm_threads(c.d_model),
                0,
                &[
                    Arg::Ptr(ptr(&self.cs.x)),
                    Arg::Ptr(ptr(&self.cs.o)),
                    Arg::Ptr(pw),
                    Arg::Ptr(norm),
                    Arg::Ptr(ptr(&self.cs.xn)),
                    Arg::I32(c.d_model as i32),
                    Arg::F32(c.rms_eps),
                    q0,
                    q1,
                ],
            );
        }
        self.l(
            "rms_norm",
            (self.n as u32, 1, 1),
            Self::norm_threads(c.d_model),
            0,
            &[
                Arg::Ptr(ptr(&self.cs.x)),
                Arg::Ptr(norm),
                Arg::Ptr(ptr(&self.cs.xn)),
                Arg::Ptr(0),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.rms_eps),
                q0,
                q1,
            ],
        )
    }

    fn qkv(&mut self, il: usize) -> Result<()> {
        self.mark("matmul qkv")?;
        let mats: Vec<&DevMat> = self.cm.layers[il].qkv.mats.iter().collect();
        let ld = self.cm.layers[il].qkv.n();
        self.matmul(&mats, ptr(&self.cs.xn), self.n, ptr(&self.cs.qkv), ld, true)
    }

    fn rope_store_kv(&mut self, il: usize) -> Result<()> {
        self.mark("rope + kv store")?;
        let c = &self.m.config;
        let l = &self.cm.layers[il];
        let hd = c.head_dim;
        let args = RopeArgs {
            n_heads: c.n_heads as i32,
            n_kv_heads: c.n_kv_heads as i32,
            hd: hd as i32,
            n_rot: c.rope_dims as i32,
            neox: i32::from(c.rope_layout == RopeLayout::Neox),
            base: c.rope_base_for(il),
            eps: c.rms_eps,
            q_scale: if c.arch == Arch::Gemma3 {
                c.attn_scale
            } else {
                1.0
            },
        };
        let off = (il * self.kv.layer_bytes) as u64;
        self.l(
            "qkv_rope_store",
            (self.n as u32, (c.n_heads + c.n_kv_heads) as u32, 1),
            (hd / 2) as u32,
            ((hd + 32) * 4) as u32,
            &[
                Arg::Ptr(ptr(&self.cs.qkv)),
                Arg::Ptr(ptr(&l.bq)),
                Arg::Ptr(ptr(&l.bk)),
                Arg::Ptr(ptr(&l.bv)),
                Arg::Ptr(ptr(&l.q_norm)),
                Arg::Ptr(ptr(&l.k_norm)),
                Arg::Ptr(self.meta_at(self.lay.pos)),
                Arg::Ptr(self.meta_at(self.lay.slots)),
                Arg::Ptr(self.kv.k.ptr + off),
                Arg::Ptr(self.kv.v.ptr + off),
                Arg::Ptr(ptr(&self.cs.q)),
                raw_arg(&args),
            ],
        )
    }

    fn attention(&mut self, il: usize) -> Result<()> {
        self.mark("attention")?;
        let c = &self.m.config;
        let p = AttnParams::for_layer(c, il);
        let hd = c.head_dim;
        if !matches!(hd, 64 | 128 | 256) {
            return Err(ModelError::Device(format!(
                "attention kernel: head dim {hd} (64, 128 or 256 supported)"
            )));
        }
        let args = AttnArgs {
            n_heads: c.n_heads as i32,
            n_kv_heads: c.n_kv_heads as i32,
            max_blocks: self.stride as i32,
            window: p.window.map_or(0, |w| w as i32),
            scale: p.scale,
        };
        let threads = 256usize;
        let groups = threads / 32 * (32 / (hd / 8));
        let smem = ((2 * groups + groups * hd) * 4) as u32;
        let off = (il * self.kv.layer_bytes) as u64;
        self.l(
            &format!("attention_{hd}"),
            (c.n_heads as u32, self.n as u32, 1),
            threads as u32,
            smem,
            &[
                Arg::Ptr(ptr(&self.cs.q)),
                Arg::Ptr(self.kv.k.ptr + off),
                Arg::Ptr(self.kv.v.ptr + off),
                Arg::Ptr(self.meta_at(self.lay.pos)),
                Arg::Ptr(self.meta_at(self.lay.seq)),
                Arg::Ptr(self.meta_at(self.lay.tables)),
                Arg::Ptr(ptr(&self.cs.att)),
                raw_arg(&args),
            ],
        )
    }

    fn attn_out(&mut self, il: usize) -> Result<()> {
        self.mark("matmul attn_out")?;
        let w = &self.cm.layers[il].wo;
        self.matmul(&[w], ptr(&self.cs.att), self.n, ptr(&self.cs.o), w.n, false)
    }

    fn attn_residual(&mut self, il: usize) -> Result<()> {
        self.mark("residual + norm")?;
        let c = &self.m.config;
        let l = &self.cm.layers[il];
        let [q0, q1] = self.q8_args();
        self.l(
            "add_norm",
            (self.n as u32, 1, 1),
            Self::norm_threads(c.d_model),
            0,
            &[
                Arg::Ptr(ptr(&self.cs.x)),
                Arg::Ptr(ptr(&self.cs.o)),
                Arg::Ptr(ptr(&l.post_attn_norm)),
                Arg::Ptr(l.ffn_norm.ptr),
                Arg::Ptr(ptr(&self.cs.xn)),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.rms_eps),
                q0,
                q1,
            ],
        )
    }

    fn ffn_gate_up(&mut self, il: usize) -> Result<()> {
        self.mark("matmul gate_up")?;
        let mats: Vec<&DevMat> = self.cm.layers[il].gate_up.mats.iter().collect();
        let ld = self.cm.layers[il].gate_up.n();
        self.matmul(&mats, ptr(&self.cs.xn), self.n, ptr(&self.cs.gu), ld, true)
    }

    fn ffn_act(&mut self) -> Result<()> {
        self.mark("gated act")?;
        let c = &self.m.config;
        let total = self.n * c.ffn;
        let act = i32::from(c.ffn_act == FfnAct::Gelu);
        let [q0, q1] = self.q8_args();
        self.l(
            "gated",
            grid1(total, 256),
            256,
            0,
            &[
                Arg::Ptr(ptr(&self.cs.gu)),
                Arg::Ptr(ptr(&self.cs.act)),
                Arg::I32(c.ffn as i32),
                Arg::I64(total as i64),
                Arg::I32(act),
                q0,
                q1,
            ],
        )
    }

    fn ffn_down(&mut self, il: usize) -> Result<()> {
        self.mark("matmul down")?;
        let w = &self.cm.layers[il].down;
        self.matmul(&[w], ptr(&self.cs.act), self.n, ptr(&self.cs.o), w.n, true)
    }

    fn ffn_residual(&mut self, il: usize) -> Result<()> {
        if !crate::dump::enabled() {
            // Done by the next norm (the next layer's, or the final one).
            self.pending_ffn = Some(il);
            return Ok(());
        }
        self.flush_residual(il)
    }

    fn logits(&mut self) -> Result<()> {
        self.mark("lm head")?;
        let c = &self.m.config;
        let m = self.n_out;
        if let Some(pl) = self.pending_ffn.take() {
            self.flush_residual(pl)?;
        }
        let (q0, q1) = if m <= 8 {
            (ptr(&self.cs.xq), ptr(&self.cs.xd))
        } else {
            (0, 0)
        };
        self.l(
            "rms_norm",
            (m as u32, 1, 1),
            Self::norm_threads(c.d_model),
            0,
            &[
                Arg::Ptr(ptr(&self.cs.x)),
                Arg::Ptr(self.cm.output_norm.ptr),
                Arg::Ptr(ptr(&self.cs.hidden)),
                Arg::Ptr(self.meta_at(self.lay.out_rows)),
                Arg::I32(c.d_model as i32),
                Arg::F32(c.rms_eps),
                Arg::Ptr(q0),
                Arg::Ptr(q1),
            ],
        )?;
        let w = self.cm.output.as_ref().unwrap_or(&self.cm.embd);
        self.matmul(
            &[w],
            ptr(&self.cs.hidden),
            m,
            ptr(&self.cs.logits),
            c.vocab,
            true,
        )?;
        if let Some(cap) = c.final_logit_softcap {
            let total = m * c.vocab;
            self.l(
                "softcap",
                grid1(total, 256),
                256,
                0,
                &[
                    Arg::Ptr(ptr(&self.cs.logits)),
                    Arg::I64(total as i64),
                    Arg::F32(cap),
                ],
            )?;
        }
        Ok(())
    }

    fn dump(&mut self, what: Probe, il: Option<usize>) -> Result<()> {
        use crate::dump::write;
        let c = &self.m.config;
        let (n, d, qd, f) = (self.n, c.d_model, c.q_dim(), c.ffn);
        let cs = &*self.cs;
        let (name, p, len) = match what {
            Probe::Embd => ("embd", ptr(&cs.x), n * d),
            Probe::AttnNorm => ("attn_norm", ptr(&cs.xn), n * d),
            Probe::QkvMatmul => ("qkv-matmul", ptr(&cs.qkv), n * (qd + 2 * c.kv_dim())),
            Probe::QkvRoped => ("Qcur", ptr(&cs.q), n * qd),
            Probe::KqvOut => ("kqv_out", ptr(&cs.att), n * qd),
            Probe::AttnOut => ("attn_out", ptr(&cs.o), n * d),
            Probe::FfnInp => ("ffn_inp", ptr(&cs.x), n * d),
            Probe::FfnNorm => ("ffn_norm", ptr(&cs.xn), n * d),
            Probe::FfnGateUp => ("ffn_gate_up", ptr(&cs.gu), n * 2 * f),
            Probe::FfnAct => ("ffn_act", ptr(&cs.act), n * f),
            Probe::FfnOut => ("ffn_out", ptr(&cs.o), n * d),
            Probe::LOut => ("l_out", ptr(&cs.x), n * d),
            Probe::ResultNorm => ("result_norm", ptr(&cs.hidden), self.n_out * d),
        };
        let v = self.read(p, len)?;
        write(name, il, &v);
        Ok(())
    }
}

/// Host emulations of the device kernels' index arithmetic (`dequant32` and
/// `unit_dot` in `kernels.cu`), held to tl-core's dequantization and to a
/// plain f32 dot product on every quantized kind: the layouts and the dp4a
/// unit decomposition are checked on machines without a GPU too.
#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn h(p: &[u8], i: usize) -> f32 {
        f16::from_le_bytes([p[2 * i], p[2 * i + 1]]).to_f32()
    }

    fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
        if j < 4 {
            ((q[j] & 63) as i32, (q[j + 4] & 63) as i32)
        } else {
            (
                ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as i32,
                ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i32,
            )
        }
    }

    /// `dequant32<T>` of kernels.cu.
    fn dequant32(hp: &HostParts, r: usize, b: usize) -> [f32; 32] {
        let k = hp.cols;
        let nb = k / 32;
        let p = &hp.parts;
        let mut v = [0f32; 32];
        match hp.kind {
            Kind::F16 => (0..32).for_each(|i| v[i] = h(&p[0], r * k + b * 32 + i)),
            Kind::Q8_0 => {
                let d = h(&p[1], r * nb + b);
                (0..32).for_each(|i| v[i] = d * (p[0][r * k + b * 32 + i] as i8) as f32);
            }
            Kind::Q4_1 | Kind::Q5_1 => {
                let q = &p[0][(r * nb + b) * 16..][..16];
                let (d, mn) = (h(&p[1], r * nb + b), h(&p[3], r * nb + b));
                let qh = if hp.kind == Kind::Q5_1 {
                    u32::from_le_bytes(p[2][(r * nb + b) * 4..][..4].try_into().unwrap())
                } else {
                    0
                };
                for i in 0..16 {
                    let lo = (q[i] & 0xF) as i32 | ((((qh >> i) & 1) << 4) as i32);
                    let hi = (q[i] >> 4) as i32 | ((((qh >> (i + 16)) & 1) << 4) as i32);
                    v[i] = d * lo as f32 + mn;
                    v[i + 16] = d * hi as f32 + mn;
                }
            }
            Kind::Q5K => {
                let blk = &p[0][(r * (k / 256) + b / 8) * 176..][..176];
                let j = b % 8;
                let (d, dmin) = (h(blk, 0), h(blk, 1));
                let (sc, m) = scale_min_k4(j, &blk[4..16]);
                let qh = &blk[16..48];
                let q = &blk[48 + 32 * (j / 2)..][..32];
                for i in 0..32 {
                    let n =
                        if j & 1 == 1 { q[i] >> 4 } else { q[i] & 0xF } | (((qh[i] >> j) & 1) << 4);
                    v[i] = d * sc as f32 * n as f32 - dmin * m as f32;
                }
            }
            Kind::Q4_0 | Kind::Q5_0 => {
                let q = &p[0][(r * nb + b) * 16..][..16];
                let d = h(&p[1], r * nb + b);
                let qh = if hp.kind == Kind::Q5_0 {
                    u32::from_le_bytes(p[2][(r * nb + b) * 4..][..4].try_into().unwrap())
                } else {
                    0
                };
                let off = if hp.kind == Kind::Q5_0 { 16 } else { 8 };
                for i in 0..16 {
                    let lo = (q[i] & 0xF) as i32 | ((((qh >> i) & 1) << 4) as i32);
                    let hi = (q[i] >> 4) as i32 | ((((qh >> (i + 16)) & 1) << 4) as i32);
                    v[i] = d * (lo - off) as f32;
                    v[i + 16] = d * (hi - off) as f32;
                }
            }
            Kind::Q4K => {
                let blk = &p[0][(r * (k / 256) + b / 8) * 144..][..144];
                let j = b % 8;
                let (d, dmin) = (h(blk, 0), h(blk, 1));
                let (sc, m) = scale_min_k4(j, &blk[4..16]);
                let q = &blk[16 + 32 * (j / 2)..][..32];
                for i in 0..32 {
                    let n = if j & 1 == 1 { q[i] >> 4 } else { q[i] & 0xF };
                    v[i] = d * sc as f32 * n as f32 - dmin * m as f32;
                }
            }
            Kind::Q6K => {
                let sb = r * (k / 256) + b / 8;
                let (j, n) = (b % 8, (b % 8) / 4);
                let kk = j % 4;
                let ql = &p[0][sb * 128 + n * 64 + (kk & 1) * 32..][..32];
                let qh = &p[2][sb * 64 + n * 32..][..32];
                let sc = &p[3][sb * 16 + n * 8..][..8];
                let d = h(&p[1], sb);
                for l in 0..32 {
                    let lo = if kk >= 2 { ql[l] >> 4 } else { ql[l] & 0xF };
                    let q = (lo | (((qh[l] >> (2 * kk)) & 3) << 4)) as i32 - 32;
                    v[l] = d * (sc[l / 16 + 2 * kk] as i8) as f32 * q as f32;
                }
            }
        }
        v
    }

    fn dp4a(a: i32, b: i32) -> i32 {
        let (a, b) = (a.to_le_bytes(), b.to_le_bytes());
        (0..4)
            .map(|i| (a[i] as i8) as i32 * (b[i] as i8) as i32)
            .sum()
    }

    fn word(p: &[u8], off: usize) -> i32 {
        i32::from_le_bytes(p[off..off + 4].try_into().unwrap())
    }

    fn vsubss4_32(x: i32) -> i32 {
        i32::from_le_bytes(x.to_le_bytes().map(|b| (b as i8 - 32) as u8))
    }

    /// `gemv_q` of kernels.cu for one row and one activation row.
    fn row_dot(hp: &HostParts, r: usize, xq: &[i8], xd: &[f32]) -> f32 {
        let k = hp.cols;
        let nb = k / 32;
        let p = &hp.parts;
        let xw = |pos: usize| {
            i32::from_le_bytes([
                xq[pos] as u8,
                xq[pos + 1] as u8,
                xq[pos + 2] as u8,
                xq[pos + 3] as u8,
            ])
        };
        let units = if hp.kind == Kind::Q6K { k / 16 } else { k / 8 };
        let mut acc = 0f32;
        for u in 0..units {
            match hp.kind {
                Kind::Q8_0 => {
                    let (b, off) = (u / 4, (u % 4) * 8);
                    let base = r * k + b * 32 + off;
                    let s = dp4a(word(&p[0], base), xw(b * 32 + off))
                        + dp4a(word(&p[0], base + 4), xw(b * 32 + off + 4));
                    acc += h(&p[1], r * nb + b) * xd[b] * s as f32;
                }
                Kind::Q4_0 | Kind::Q5_0 | Kind::Q4_1 | Kind::Q5_1 => {
                    let (b, j) = (u / 4, (u % 4) * 4);
                    let q = word(&p[0], (r * nb + b) * 16 + j);
                    let (mut lo, mut hi) = (q & 0x0F0F_0F0F, (q >> 4) & 0x0F0F_0F0F);
                    let off = match hp.kind {
                        Kind::Q4_0 => 8,
                        Kind::Q5_0 => 16,
                        _ => 0,
                    };
                    if matches!(hp.kind, Kind::Q5_0 | Kind::Q5_1) {
                        let qh = word(&p[2], (r * nb + b) * 4) as u32;
                        let (hl, hh) = ((qh >> j) & 0xF, (qh >> (j + 16)) & 0xF);
                        let spread = |x: u32| {
                            (((x & 1) << 4) | ((x & 2) << 11) | ((x & 4) << 18) | ((x & 8) << 25))
                                as i32
                        };
                        lo |= spread(hl);
                        hi |= spread(hh);
                    }
                    let (x0, x1) = (xw(b * 32 + j), xw(b * 32 + 16 + j));
                    let s = dp4a(lo, x0) + dp4a(hi, x1);
                    let sx = dp4a(0x0101_0101, x0) + dp4a(0x0101_0101, x1);
                    let mn = if matches!(hp.kind, Kind::Q4_1 | Kind::Q5_1) {
                        h(&p[3], r * nb + b)
                    } else {
                        0.0
                    };
                    acc += h(&p[1], r * nb + b) * xd[b] * (s - off * sx) as f32
                        + mn * xd[b] * sx as f32;
                }
                Kind::Q4K | Kind::Q5K => {
                    let (sb, l) = (u / 32, u % 32);
                    let (g, pp) = (l / 8, 4 * (l % 8));
                    let (bs, qs) = if hp.kind == Kind::Q4K {
                        (144, 16)
                    } else {
                        (176, 48)
                    };
                    let blk = &p[0][(r * (k / 256) + sb) * bs..][..bs];
                    let q = word(blk, qs + 32 * g + pp);
                    let (mut lo, mut hi) = (q & 0x0F0F_0F0F, (q >> 4) & 0x0F0F_0F0F);
                    if hp.kind == Kind::Q5K {
                        let qh = word(blk, 16 + pp);
                        lo |= ((qh >> (2 * g)) & 0x0101_0101) << 4;
                        hi |= ((qh >> (2 * g + 1)) & 0x0101_0101) << 4;
                    }
                    let (d, dmin) = (h(blk, 0), h(blk, 1));
                    let (sc0, m0) = scale_min_k4(2 * g, &blk[4..16]);
                    let (sc1, m1) = scale_min_k4(2 * g + 1, &blk[4..16]);
                    let (b0, b1) = (sb * 8 + 2 * g, sb * 8 + 2 * g + 1);
                    let (x0, x1) = (xw(b0 * 32 + pp), xw(b1 * 32 + pp));
                    let (s0, s1) = (dp4a(lo, x0), dp4a(hi, x1));
                    let (sx0, sx1) = (dp4a(0x0101_0101, x0), dp4a(0x0101_0101, x1));
                    acc += d * (sc0 as f32 * s0 as f32 * xd[b0] + sc1 as f32 * s1 as f32 * xd[b1])
                        - dmin
                            * (m0 as f32 * sx0 as f32 * xd[b0] + m1 as f32 * sx1 as f32 * xd[b1]);
                }
                Kind::Q6K => {
                    let (sb, rr) = (u / 16, u % 16);
                    let (n, l) = (rr / 8, 4 * (rr % 8));
                    let sbi = r * (k / 256) + sb;
                    let ql0 = word(&p[0], sbi * 128 + n * 64 + l);
                    let ql1 = word(&p[0], sbi * 128 + n * 64 + 32 + l);
                    let qh = word(&p[2], sbi * 64 + n * 32 + l);
                    let q = [
                        vsubss4_32((ql0 & 0x0F0F_0F0F) | ((qh & 0x0303_0303) << 4)),
                        vsubss4_32((ql1 & 0x0F0F_0F0F) | (((qh >> 2) & 0x0303_0303) << 4)),
                        vsubss4_32(((ql0 >> 4) & 0x0F0F_0F0F) | (((qh >> 4) & 0x0303_0303) << 4)),
                        vsubss4_32(((ql1 >> 4) & 0x0F0F_0F0F) | (((qh >> 6) & 0x0303_0303) << 4)),
                    ];
                    let sc = &p[3][sbi * 16 + n * 8 + l / 16..];
                    let xb = sb * 8 + n * 4;
                    let mut s = 0f32;
                    for kk in 0..4 {
                        let x = xw((xb + kk) * 32 + l);
                        s += ((sc[2 * kk] as i8) as i32 * dp4a(q[kk], x)) as f32 * xd[xb + kk];
                    }
                    acc += h(&p[1], sbi) * s;
                }
                Kind::F16 => unreachable!(),
            }
        }
        acc
    }

    fn weight(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Weight, Vec<u8>, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let vals: Vec<f32> = (0..rows * cols)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let mut bytes = vec![0u8; ty.bytes_for((rows * cols) as u64).unwrap() as usize];
        tl_core::quant::quantize(ty, &vals, &mut bytes).unwrap();
        let mut deq = vec![0f32; rows * cols];
        tl_core::quant::dequantize(ty, &bytes, &mut deq).unwrap();
        let w = Weight::for_test("w", ty, rows, cols, bytes.len());
        (w, bytes, deq)
    }

    #[test]
    fn device_layouts_dequantize_as_ggml() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q5_K,
            GgmlType::F32,
        ] {
            let (rows, cols) = (3, 512);
            let (w, bytes, deq) = weight(ty, rows, cols, 7);
            let hp = repack(&w, &bytes).unwrap();
            for r in 0..rows {
                for b in 0..cols / 32 {
                    let v = dequant32(&hp, r, b);
                    for i in 0..32 {
                        let want = deq[r * cols + b * 32 + i];
                        let tol = if hp.kind == Kind::F16 {
                            want.abs() * 1e-3 + 1e-6
                        } else {
                            1e-6
                        };
                        assert!(
                            (v[i] - want).abs() <= tol,
                            "{ty}: row {r} block {b} value {i}: {} vs {want}",
                            v[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn device_gemv_units_sum_to_the_dot_product() {
        let cols = 512;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        // The activation quantization of kernels.cu (`store_q8`).
        let mut xq = vec![0i8; cols];
        let mut xd = vec![0f32; cols / 32];
        for b in 0..cols / 32 {
            let amax = x[b * 32..b * 32 + 32]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            xd[b] = d;
            for i in 0..32 {
                xq[b * 32 + i] = (x[b * 32 + i] * id).round_ties_even() as i8;
            }
        }
        let xdeq: Vec<f32> = (0..cols).map(|i| xq[i] as f32 * xd[i / 32]).collect();
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let (w, bytes, deq) = weight(ty, 2, cols, 9);
            let hp = repack(&w, &bytes).unwrap();
            for r in 0..2 {
                let got = row_dot(&hp, r, &xq, &xd);
                let want: f32 = (0..cols).map(|i| deq[r * cols + i] * xdeq[i]).sum();
                assert!(
                    (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                    "{ty} row {r}: {got} vs {want}"
                );
            }
        }
    }
}
