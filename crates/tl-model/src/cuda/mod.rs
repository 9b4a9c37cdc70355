//! The CUDA executor of the forward stages (see `forward.rs`): weights,
//! activations and the paged KV cache in device memory, the kernels of
//! `tl-cuda/src/kernels.cu`, and one CUDA-graph replay per decode step.
//!
//! Weights are uploaded once, repacked per block type so that every load
//! is aligned (layouts in `kernels.cu`); Q/K/V and gate/up of the same type
//! are concatenated row-wise into one matrix, so each is one product.
//! Products of up to 64 rows (decode, small batches) run as quantized
//! GEMVs on 8-bit activations (dp4a, 8 rows a launch); larger ones
//! (prefill) dequantize the weight to f16 and run cuBLAS on tensor cores. Types without a quantized kernel here
//! (F32, BF16, Q2_K, Q3_K) are converted to f16 at load.
//!
//! Only the step's token metadata goes up (one copy) and only the requested
//! logits rows, or just the greedy token ids, come back.

use std::collections::HashMap;
use std::sync::Arc;

use tl_cuda::{DevBuf, Gpu, Graph};

use crate::error::{ModelError, Result};
use crate::forward::Plan;
use crate::kv::{KvCache, KvType, BLOCK_SIZE};
use crate::model::{ForwardState, Model, SeqBatch};
use crate::sampler::DeviceDraw;

mod exec;
mod ops;
#[cfg(test)]
mod tests;
mod weights;

use crate::weights::Weight;
use exec::CudaExec;
pub(crate) use ops::OpAttn;
use weights::{repack, upload_f32, upload_opt, DevMat, DevMats};

fn cuda_err(e: tl_cuda::CudaError) -> ModelError {
    match e {
        tl_cuda::CudaError::OutOfMemory { .. } => ModelError::OutOfMemory(e.to_string()),
        _ if e.is_fatal() => ModelError::DeviceLost(e.to_string()),
        _ => ModelError::Device(e.to_string()),
    }
}

struct DevLayer {
    /// The pre-norms (absent in OLMo 2, whose sub-layers read `x`).
    attn_norm: Option<DevBuf>,
    ffn_norm: Option<DevBuf>,
    bq: Option<DevBuf>,
    bk: Option<DevBuf>,
    bv: Option<DevBuf>,
    q_norm: Option<DevBuf>,
    k_norm: Option<DevBuf>,
    post_attn_norm: Option<DevBuf>,
    post_ffn_norm: Option<DevBuf>,
    /// The attention output's bias and the sink logit of each query head
    /// (gpt-oss).
    bo: Option<DevBuf>,
    sinks: Option<DevBuf>,
    qkv: DevMats,
    wo: DevMat,
    /// The dense FFN (absent in mixture-of-experts layers).
    gate_up: Option<DevMats>,
    down: Option<DevMat>,
    moe: Option<DevMoe>,
}

/// A mixture-of-experts FFN on the device: the router, each projection's
/// experts stacked into one matrix (expert e's rows after e's
/// predecessors', as `gemv_*_id` reads them), and the shared expert.
struct DevMoe {
    router: DevMat,
    /// An f32 router's weights as they are (`router_f32`), used instead
    /// of `router`'s f16 copy.
    router_f32: Option<DevBuf>,
    gate: DevMat,
    up: DevMat,
    down: DevMat,
    shared: Option<DevShared>,
    /// The router's bias and every expert's gate, up and down biases
    /// (gpt-oss).
    router_b: Option<DevBuf>,
    biases: Option<[DevBuf; 3]>,
}

/// qwen2moe's shared expert: gate/up, down, and its gate's input row.
struct DevShared {
    gate_up: DevMats,
    down: DevMat,
    gate_inp: DevMat,
}

impl DevLayer {
    /// The matrices that go through `exec::matmul_on` (which may
    /// dequantize one whole into scratch): all but the stacked experts.
    fn products(&self) -> impl Iterator<Item = &DevMat> {
        let moe = self.moe.iter().flat_map(|m| {
            std::iter::once(&m.router).chain(
                m.shared
                    .iter()
                    .flat_map(|s| s.gate_up.mats.iter().chain([&s.down, &s.gate_inp])),
            )
        });
        self.qkv
            .mats
            .iter()
            .chain(self.gate_up.iter().flat_map(|g| g.mats.iter()))
            .chain([&self.wo])
            .chain(self.down.iter())
            .chain(moe)
    }

    fn bytes(&self) -> usize {
        let experts = self
            .moe
            .as_ref()
            .map_or(0, |m| m.gate.bytes() + m.up.bytes() + m.down.bytes());
        self.products().map(DevMat::bytes).sum::<usize>() + experts
    }
}

/// Uploads the weights of every expert of one projection as one matrix.
fn upload_experts(gpu: &Gpu, ws: &[&Weight], file: &tl_gguf::GgufFile) -> Result<DevMat> {
    let mut all: Option<weights::HostParts> = None;
    let rows = ws.first().map_or(0, |w| w.rows);
    for w in ws {
        let hp = repack(w, w.bytes(file))?;
        match &mut all {
            None => all = Some(hp),
            Some(a) => {
                if a.kind != hp.kind || a.cols != hp.cols || hp.rows != rows {
                    return Err(ModelError::Device(format!(
                        "tensor '{}': experts of different types or shapes",
                        w.name
                    )));
                }
                for (p, q) in a.parts.iter_mut().zip(hp.parts) {
                    p.extend_from_slice(&q);
                }
                a.rows += hp.rows;
            }
        }
    }
    let Some(hp) = all else {
        return Err(ModelError::Device(
            "a mixture-of-experts layer without experts".into(),
        ));
    };
    let name = ws
        .first()
        .map_or("experts", |w| w.name.as_str())
        .to_string();
    DevMat::upload(gpu, hp, &name)
}

/// The model's weights on one GPU.
pub(crate) struct CudaModel {
    gpu: Arc<Gpu>,
    embd: DevMat,
    output: Option<DevMat>,
    output_norm: DevBuf,
    /// RoPE frequency factors, when the model has them.
    rope_freqs: Option<DevBuf>,
    layers: Vec<DevLayer>,
    weight_bytes: usize,
    /// Elements of the largest matrix (the f16 scratch of prefill products).
    max_mat: usize,
    /// Products of this many rows or more (up to `GEMV_ROWS`) run on the
    /// tensor-core kernels; `GEMV_ROWS + 1` in batch-invariant mode.
    pub(super) mmq_min: std::sync::atomic::AtomicUsize,
    /// Prompt steps of a mixture of experts group their (token, expert)
    /// pairs per expert and run each expert's rows as one product
    /// (`TL_CUDA_MOE_GROUPED=1`; [`CudaModel::set_moe_grouped`]).
    pub(super) moe_grouped: std::sync::atomic::AtomicBool,
    /// Whether steps take the staged tensor-core products (`exec::mmqs_on`
    /// and the card took their shared memory).
    mmqs: bool,
    /// Weights and scratch of single operations for programs (`ops.rs`).
    ops: std::sync::Mutex<ops::OpsState>,
}

/// The paged K and V pools of every layer in device memory, laid out as the
/// host cache: per layer `[block][kv_head][slot]` head rows of the cache
/// type's values (f16, int8, packed 4-bit or FP8), and for a quantized type
/// a second pool of the rows' f16 scales in the same order.
pub(crate) struct DeviceKv {
    ty: crate::kv::KvType,
    k: DevBuf,
    v: DevBuf,
    ks: Option<DevBuf>,
    vs: Option<DevBuf>,
    layer_bytes: usize,
    layer_scale_bytes: usize,
}

fn ptr(b: &Option<DevBuf>) -> u64 {
    b.as_ref().map_or(0, |b| b.ptr)
}

/// The error for an encoder (embedding) model asked to run on a GPU:
/// given before anything touches the device.
pub(crate) fn refuse_encoder(arch: &str) -> ModelError {
    ModelError::Device(format!(
        "{arch}: not supported on CUDA yet: encoder models (non-causal attention, pooled \
         embeddings) (run it with --device cpu)"
    ))
}

impl CudaModel {
    pub fn upload(m: &Model, ordinal: usize) -> Result<CudaModel> {
        let c = &m.config;
        let unsupported = |what: &str| {
            ModelError::Device(format!(
                "{}: not supported on CUDA yet: {what} (run it with --device cpu)",
                c.arch.name()
            ))
        };

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
            if matches!(
                c.qk_norm,
                crate::config::QkNorm::Whole | crate::config::QkNorm::HeadWeights
            ) && (lv.bq.is_some() || lv.bk.is_some())
            {
                return Err(unsupported(
                    "Q/K biases before whole-projection or per-head-weight Q/K norms",
                ));
            }
            let moe = match &lw.moe {
                None => None,
                Some(mw) => {
                    let pick =
                        |i: usize| -> Vec<&Weight> { mw.experts.iter().map(|e| &e[i]).collect() };
                    Some(DevMoe {
                        router: DevMat::upload(
                            &gpu,
                            repack(&mw.router, mw.router.bytes(file))?,
                            &mw.router.name,
                        )?,
                        router_f32: if mw.router.ty == tl_gguf::GgmlType::F32 {
                            // Little-endian f32 rows, as the file holds them.
                            let b = mw.router.bytes(file);
                            Some(gpu.upload(b, "f32 router").map_err(cuda_err)?)
                        } else {
                            None
                        },
                        gate: upload_experts(&gpu, &pick(0), file)?,
                        up: upload_experts(&gpu, &pick(1), file)?,
                        down: upload_experts(&gpu, &pick(2), file)?,
                        shared: match &mw.shared {
                            None => None,
                            Some(([g, u, dn], gi)) => Some(DevShared {
                                gate_up: DevMats::upload(&gpu, &[g, u], file)?,
                                down: DevMat::upload(&gpu, repack(dn, dn.bytes(file))?, &dn.name)?,
                                gate_inp: DevMat::upload(
                                    &gpu,
                                    repack(gi, gi.bytes(file))?,
                                    &gi.name,
                                )?,
                            }),
                        },
                        router_b: upload_opt(&gpu, &lv.router_b, "router bias")?,
                        biases: match &lv.expert_b {
                            None => None,
                            Some([g, u, dn]) => Some([
                                upload_f32(&gpu, g, "expert gate biases")?,
                                upload_f32(&gpu, u, "expert up biases")?,
                                upload_f32(&gpu, dn, "expert down biases")?,
                            ]),
                        },
                    })
                }
            };
            let dense = moe.is_none();
            let l = DevLayer {
                attn_norm: upload_opt(&gpu, &lv.attn_norm, "attn_norm")?,
                ffn_norm: upload_opt(&gpu, &lv.ffn_norm, "ffn_norm")?,
                bq: upload_opt(&gpu, &lv.bq, "bq")?,
                bk: upload_opt(&gpu, &lv.bk, "bk")?,
                bv: upload_opt(&gpu, &lv.bv, "bv")?,
                q_norm: upload_opt(&gpu, &lv.q_norm, "q_norm")?,
                k_norm: upload_opt(&gpu, &lv.k_norm, "k_norm")?,
                post_attn_norm: upload_opt(&gpu, &lv.post_attn_norm, "post_attn_norm")?,
                post_ffn_norm: upload_opt(&gpu, &lv.post_ffn_norm, "post_ffn_norm")?,
                bo: upload_opt(&gpu, &lv.bo, "attention output bias")?,
                sinks: match &lv.sinks {
                    Some(s) => Some(upload_f32(&gpu, s, "attention sinks")?),
                    None => None,
                },
                qkv: DevMats::upload(&gpu, &[&lw.wq, &lw.wk, &lw.wv], file)?,
                wo: DevMat::upload(&gpu, repack(&lw.wo, lw.wo.bytes(file))?, &lw.wo.name)?,
                gate_up: if dense {
                    Some(DevMats::upload(&gpu, &[&lw.gate, &lw.up], file)?)
                } else {
                    None
                },
                down: if dense {
                    Some(DevMat::upload(
                        &gpu,
                        repack(&lw.down, lw.down.bytes(file))?,
                        &lw.down.name,
                    )?)
                } else {
                    None
                },
                moe,
            };
            for mm in l.products() {
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
        let rope_freqs = upload_opt(&gpu, &m.rope_freqs, "rope_freqs")?;
        let mut weight_bytes = embd.bytes() + output.as_ref().map_or(0, DevMat::bytes);
        for l in &layers {
            weight_bytes += l.bytes();
        }
        let mmqs = exec::mmqs_on() && exec::mmqs_prepare(&gpu).is_ok();
        Ok(CudaModel {
            gpu,
            embd,
            output,
            output_norm,
            rope_freqs,
            layers,
            weight_bytes,
            max_mat,
            mmq_min: std::sync::atomic::AtomicUsize::new(exec::mmq_min_rows()),
            moe_grouped: std::sync::atomic::AtomicBool::new(
                std::env::var("TL_CUDA_MOE_GROUPED").is_ok_and(|v| v == "1"),
            ),
            mmqs,
            ops: std::sync::Mutex::new(ops::OpsState::default()),
        })
    }

    /// Batch-invariant mode: every product of up to `GEMV_ROWS` rows takes
    /// the 8-row GEMVs, whose arithmetic per row does not depend on the
    /// other rows, so a sequence's logits are bit-identical alone and in
    /// any batch (the tensor-core kernels sum a row in another order).
    pub fn set_batch_invariant(&self, on: bool) {
        let v = if on {
            exec::GEMV_ROWS + 1
        } else {
            exec::mmq_min_rows()
        };
        self.mmq_min.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turns the grouped mixture-of-experts prompt path on or off (see
    /// `moe_grouped`).
    pub fn set_moe_grouped(&self, on: bool) {
        self.moe_grouped
            .store(on, std::sync::atomic::Ordering::Relaxed);
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

    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.gpu.mem_info().map_err(cuda_err)
    }

    /// What [`CudaState::ensure`] allocates for a step of `n` tokens and
    /// as many logits rows (rounded up as it rounds), in bytes.
    pub fn step_bytes(&self, c: &crate::config::Config, n: usize) -> usize {
        let n = n.next_power_of_two().max(8);
        let (d, qd, kvd, f) = (c.d_model, c.q_dim(), c.kv_dim(), c.ffn);
        let maxk = d.max(qd).max(f).max(c.ffn_shared);
        let moe = if c.n_expert > 0 {
            MoeBufs::per_token(c)
        } else {
            0
        };
        let per_token =
            4 * (4 * d + (qd + 2 * kvd) + 2 * qd + 3 * f) + maxk + maxk / 8 + 2 * maxk + moe;
        let out = n * (c.d_model + c.vocab + 2 * exec::argmax_parts(c.vocab) + 1) * 4;
        let scratch = if n > exec::GEMV_ROWS {
            2 * self.max_mat.max(c.vocab * c.d_model)
        } else {
            0
        };
        n * per_token + out + scratch + if self.mmqs { MMQS_BYTES } else { 0 }
    }

    pub fn alloc_kv(
        &self,
        ty: crate::kv::KvType,
        n_layers: usize,
        n_kv: usize,
        hd: usize,
        n_blocks: usize,
    ) -> Result<DeviceKv> {
        let rows = n_blocks * n_kv * BLOCK_SIZE;
        // Rows of scales padded so every layer's pool starts 16-byte aligned.
        let layer_bytes = (rows * ty.row_bytes(hd)).next_multiple_of(16);
        let layer_scale_bytes = (rows * 2 * ty.row_scales(hd)).next_multiple_of(16);
        let total = layer_bytes * n_layers;
        let k = self
            .gpu
            .alloc_zeroed(total, "KV cache (K)")
            .map_err(cuda_err)?;
        let v = self
            .gpu
            .alloc_zeroed(total, "KV cache (V)")
            .map_err(cuda_err)?;
        let (ks, vs) = if layer_scale_bytes > 0 {
            let n = layer_scale_bytes * n_layers;
            (
                Some(
                    self.gpu
                        .alloc_zeroed(n, "KV cache (K scales)")
                        .map_err(cuda_err)?,
                ),
                Some(
                    self.gpu
                        .alloc_zeroed(n, "KV cache (V scales)")
                        .map_err(cuda_err)?,
                ),
            )
        } else {
            (None, None)
        };
        Ok(DeviceKv {
            ty,
            k,
            v,
            ks,
            vs,
            layer_bytes,
            layer_scale_bytes,
        })
    }

    // The step's inputs and outputs, each its own borrow.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        m: &Model,
        cache: &mut KvCache,
        batch: &[SeqBatch],
        plan: &Plan,
        st: &mut ForwardState,
        out: Out<'_>,
        masks: Option<&mut (dyn FnMut() -> Vec<Option<Vec<u32>>> + '_)>,
    ) -> Result<()> {
        let greedy = matches!(out, Out::Greedy);
        let gpu = &*self.gpu;
        gpu.bind().map_err(cuda_err)?;
        let kv = cache.device.as_ref().ok_or_else(|| {
            ModelError::Kv("the model is on a GPU but this KV cache is in host memory".into())
        })?;
        let c = &m.config;
        let n_real = plan.n_tokens();
        let n_out_real = plan.out_rows.len();
        // A decode step (one token per sequence) replays a CUDA graph
        // captured for its batch-size bucket: the step is padded to the
        // bucket with rows that write no KV and whose outputs are not read.
        let decode = n_real == batch.len()
            && n_real <= exec::GEMV_ROWS
            && graphs_enabled()
            && !crate::dump::enabled()
            && !gpu.tracing();
        let n = if decode { graph_bucket(n_real) } else { n_real };
        let pad = n - n_real;
        let n_out = n_out_real + pad;
        // Block-table row length: a power of two, at least 64 blocks (1,024
        // positions), so that a decode graph captured for a batch size
        // serves every context up to that without a new capture (each
        // capture of a 64-row step costs milliseconds); the attention's
        // chunks past a sequence's length return at once.
        let stride = batch
            .iter()
            .map(|s| s.kv.blocks.len())
            .max()
            .unwrap_or(1)
            .next_power_of_two()
            .max(MIN_STRIDE);
        let cs = st.cuda.get_or_insert_with(CudaState::default);
        cs.ensure(gpu, m, self, n, n_out.max(1), batch.len() * stride)?;
        // The split-KV attention's partial states for this step's grid.
        let (chunk, zs) = exec::attn_chunks(n, stride);
        if chunk > 0 {
            let need = n * c.n_heads * zs * (c.head_dim + 2) * 4;
            if cs.attn_part.as_ref().map_or(0, |b| b.bytes) < need {
                cs.attn_part = Some(
                    gpu.alloc(need.next_power_of_two(), "attention partial states")
                        .map_err(cuda_err)?,
                );
                cs.graphs.clear();
            }
        }
        // Step metadata, one upload: ids | pos | slots | seq | out_rows | tables.
        let h = &mut cs.host_meta;
        h.clear();
        for &(si, pos) in &plan.meta {
            h.push(batch[si].tokens[pos - batch[si].pos] as i32);
        }
        h.extend(std::iter::repeat_n(0, pad));
        for &(_, pos) in &plan.meta {
            h.push(pos as i32);
        }
        h.extend(std::iter::repeat_n(0, pad));
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
        // Padding rows: no KV slot, sequence 0's table, position 0 (they
        // read one cached position and write nothing).
        h.extend(std::iter::repeat_n(-1, pad));
        for &(si, _) in &plan.meta {
            h.push(si as i32);
        }
        h.extend(std::iter::repeat_n(0, pad));
        for &r in &plan.out_rows {
            h.push(r as i32);
        }
        h.extend((n_real..n).map(|r| r as i32));
        for s in batch {
            for i in 0..stride {
                h.push(s.kv.blocks.get(i).map_or(0, |&b| b as i32));
            }
        }
        // Prefill attention tiles (`fa_prefill`): up to 64 consecutive rows
        // of one sequence each, as (first row, rows).
        let mut n_tiles = 0;
        let mut max_keys = 0;
        if n > exec::GEMV_ROWS {
            let mut r = 0;
            while r < n_real {
                let si = plan.meta[r].0;
                let mut e = r + 1;
                while e < n_real && e - r < 64 && plan.meta[e].0 == si {
                    e += 1;
                }
                h.push(r as i32);
                h.push((e - r) as i32);
                n_tiles += 1;
                max_keys = max_keys.max(plan.meta[e - 1].1 + 1);
                r = e;
            }
        }
        let fa_split = (n_tiles > 0
            && kv.ty == KvType::F16
            && matches!(c.head_dim, 64 | 128)
            && exec::fa_prefill())
        .then(|| exec::fa_split(n_tiles * c.n_heads, max_keys, gpu.sm_count));
        if let Some((splits @ 2.., _)) = fa_split {
            let need = n * c.n_heads * splits * (c.head_dim + 2) * 4;
            if cs.attn_part.as_ref().map_or(0, |b| b.bytes) < need {
                cs.attn_part = Some(
                    gpu.alloc(need.next_power_of_two(), "attention partial states")
                        .map_err(cuda_err)?,
                );
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

        let key = GraphKey {
            n,
            n_out,
            stride,
            greedy,
            kv: kv.k.ptr,
            mmq_min: self.mmq_min.load(std::sync::atomic::Ordering::Relaxed),
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
            n_tiles,
            fa_split,
            moe: false,
            decode_shaped: n_real == batch.len(),
        };
        if decode {
            // With the profiler, a fresh capture each step: its timing
            // events are nodes of the graph, read after this replay.
            if let Some(g) = ex.cs.graphs.get(&key).filter(|_| !profiling()) {
                gpu.replay(g).map_err(cuda_err)?;
            } else {
                gpu.begin_capture().map_err(cuda_err)?;
                let r = crate::forward::run(c, &mut ex).and_then(|_| ex.finish());
                let g = gpu.end_capture().map_err(cuda_err);
                r?;
                let g = g?;
                gpu.replay(&g).map_err(cuda_err)?;
                if profiling() {
                    gpu.sync().map_err(cuda_err)?;
                    gpu.profile_flush().map_err(cuda_err)?;
                } else {
                    ex.cs.graphs.insert(key, g);
                }
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
        let n_out = n_out_real;
        if let Out::Sample(draws) = out {
            // The forward is queued on the device: the host's masks are
            // computed while it runs, then applied by the sampling kernel.
            let row_masks = masks.map(|h| h()).unwrap_or_default();
            cs.sample(gpu, draws, &row_masks, c.vocab)?;
        }
        if !matches!(out, Out::Logits) {
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

/// What a forward leaves for the host.
#[derive(Clone, Copy)]
pub(crate) enum Out<'a> {
    /// The requested logits rows.
    Logits,
    /// The argmax of each row (in the captured graph).
    Greedy,
    /// One pick per row, sampled on the device.
    Sample(&'a [DeviceDraw]),
}

/// `SampleRow` of kernels.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SampleRow {
    u: f64,
    temp: f32,
    top_p: f32,
    min_p: f32,
    rep: f32,
    pres: f32,
    freq: f32,
    top_k: i32,
    n_pen: i32,
    pen_off: i32,
    /// The row's grammar mask: index of its first word from the penalties'
    /// start, in 4-byte words; −1: none.
    mask: i32,
}

/// Bytes of the kernels' `SampScratch` (one per sampled row; the kernel
/// source asserts the size).
const SAMP_SCRATCH_BYTES: usize = 18176;
/// Blocks per row at most (the kernels' `SB_MAXG`).
const SAMP_MAX_GROUPS: usize = 64;

/// Blocks per sampled row: one per 4,096 logits (up to 64) for a few rows;
/// for many, fewer, so that a phase launches about `TL_CUDA_SAMPLE_BLOCKS`
/// (default 512, ≈4 per SM of an H100) blocks in all, since every block
/// re-reads the row's radix histograms (12 KiB) at each phase. The picks do
/// not depend on it (the sums are integers). Measured on an H100 (0.5B
/// shape, sampled, batch 64): 12,787 tok/s against 12,649 with a block per
/// 4,096 logits at every batch, and no change at batch 1 or 16 — the
/// chain's ≈1 ms a step at batch 64 is not in the blocks' count (nor in
/// its launches, now one graph).
pub(crate) fn sample_groups(vocab: usize, rows: usize) -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let budget = *BUDGET.get_or_init(|| {
        std::env::var("TL_CUDA_SAMPLE_BLOCKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512)
    });
    let by_vocab = vocab.div_ceil(4096).clamp(1, SAMP_MAX_GROUPS);
    by_vocab.min((budget / rows.max(1)).max(1))
}

/// What a captured sampling chain depends on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct SampKey {
    rows: usize,
    groups: u32,
    vocab: usize,
    params: u64,
    scratch: u64,
    logits: u64,
    ids: u64,
}

/// The sampling kernel on its own: one pick per row of `logits` (rows of
/// `vocab`) on GPU `ordinal`.
pub(crate) fn sample_rows(
    ordinal: usize,
    logits: &[f32],
    vocab: usize,
    draws: &[DeviceDraw],
    masks: &[Option<Vec<u32>>],
) -> Result<Vec<u32>> {
    let gpu = Gpu::new(ordinal).map_err(cuda_err)?;
    gpu.bind().map_err(cuda_err)?;
    let rows = draws.len();
    let mut cs = CudaState {
        logits: Some(gpu.alloc(logits.len() * 4, "logits").map_err(cuda_err)?),
        ids: Some(gpu.alloc(rows * 4, "token ids").map_err(cuda_err)?),
        ..Default::default()
    };
    // SAFETY: f32 slice viewed as bytes.
    let lb = unsafe { std::slice::from_raw_parts(logits.as_ptr() as *const u8, logits.len() * 4) };
    gpu.htod(cs.logits_ptr(), lb).map_err(cuda_err)?;
    cs.sample(&gpu, draws, masks, vocab)?;
    let mut ids = vec![0u8; rows * 4];
    gpu.dtoh(&mut ids, cs.ids_ptr()).map_err(cuda_err)?;
    Ok(ids
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Device bytes of the staged products' split-K buffers.
const MMQS_BYTES: usize = exec::MMQS_PART_FLOATS * 4 + exec::MMQS_TILES * 4;

/// `TL_CUDA_PROFILE=1`: time every stage with events (graphs off).
pub(crate) fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TL_CUDA_PROFILE").is_ok_and(|v| v == "1"))
}

/// The shortest block-table row of a step (see `forward`).
const MIN_STRIDE: usize = 64;

/// The batch size a decode step of `n` sequences is captured (and padded)
/// at: exact up to 8 (each of those sizes has its own GEMV kernels), then
/// multiples of 8 (the tensor-core products take any row count at nearly
/// the same cost), so at most 15 graphs per context-length class.
pub(crate) fn graph_bucket(n: usize) -> usize {
    if n <= 8 {
        n
    } else {
        n.div_ceil(8) * 8
    }
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
    /// Prefill attention tiles, after the `tables` entries of the tables.
    tiles: usize,
}

impl MetaLayout {
    fn new(n: usize, n_out: usize, tables: usize) -> Self {
        MetaLayout {
            ids: 0,
            pos: n,
            slots: 2 * n,
            seq: 3 * n,
            out_rows: 4 * n,
            tables: 4 * n + n_out,
            tiles: 4 * n + n_out + tables,
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
    mmq_min: usize,
}

/// A mixture-of-experts step's buffers, per token: router logits, the
/// chosen experts and their weights, and per (token, expert) slot the
/// gate/up rows, the activation (and its 8-bit copy) and the output;
/// the shared expert's gate/up, activation, output and gate logit.
pub(crate) struct MoeBufs {
    logits: DevBuf,
    ids: DevBuf,
    wts: DevBuf,
    gu: DevBuf,
    act: DevBuf,
    xq: DevBuf,
    xd: DevBuf,
    y: DevBuf,
    /// Grouped prompt steps (`moe_grouped`): each slot's place in expert
    /// order and the expert of each place (2 × slots i32), and the rows in
    /// that order (slots × d f32).
    perm: DevBuf,
    sorted: DevBuf,
    sh_gu: Option<DevBuf>,
    sh_act: Option<DevBuf>,
    sh_y: Option<DevBuf>,
    sh_z: Option<DevBuf>,
}

impl MoeBufs {
    /// Bytes per token of a step.
    fn per_token(c: &crate::config::Config) -> usize {
        let (d, f, k, fs) = (c.d_model, c.ffn, c.n_expert_used, c.ffn_shared);
        4 * (c.n_expert + 2 * k + 3 * k * f + k * d + 3 * fs + d + 1)
            + k * f
            + k * f / 8
            + 4 * (2 * k + k * d)
    }

    fn alloc(gpu: &Gpu, c: &crate::config::Config, n: usize) -> Result<MoeBufs> {
        let (d, f, k, fs) = (c.d_model, c.ffn, c.n_expert_used, c.ffn_shared);
        let a = |bytes: usize, what: &str| gpu.alloc(bytes.max(4), what).map_err(cuda_err);
        let sh = |bytes: usize, what: &str| -> Result<Option<DevBuf>> {
            if fs == 0 {
                Ok(None)
            } else {
                a(bytes, what).map(Some)
            }
        };
        Ok(MoeBufs {
            logits: a(n * c.n_expert * 4, "router logits")?,
            ids: a(n * k * 4, "chosen experts")?,
            wts: a(n * k * 4, "expert weights")?,
            gu: a(n * k * 2 * f * 4, "expert gate/up")?,
            act: a(n * k * f * 4, "expert activations")?,
            xq: a(n * k * f, "expert 8-bit activations")?,
            xd: a(n * k * f / 32 * 4, "expert activation scales")?,
            y: a(n * k * d * 4, "expert outputs")?,
            perm: a(n * k * 2 * 4, "expert order")?,
            sorted: a(n * k * d * 4, "rows in expert order")?,
            sh_gu: sh(n * 2 * fs * 4, "shared expert gate/up")?,
            sh_act: sh(n * fs * 4, "shared expert activations")?,
            sh_y: sh(n * d * 4, "shared expert output")?,
            sh_z: sh(n * 4, "shared expert gate")?,
        })
    }
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
    /// The attention's output while the FFN runs beside it (Command-R).
    attn_o: Option<DevBuf>,
    /// Mixture-of-experts scratch (models with experts).
    moe: Option<MoeBufs>,
    gu: Option<DevBuf>,
    act: Option<DevBuf>,
    hidden: Option<DevBuf>,
    logits: Option<DevBuf>,
    ids: Option<DevBuf>,
    /// The greedy argmax's per-block partial maxima and their indices.
    arg_v: Option<DevBuf>,
    arg_i: Option<DevBuf>,
    xq: Option<DevBuf>,
    xd: Option<DevBuf>,
    /// Split-KV attention: each chunk's partial state, and per (token,
    /// head) pair the count of chunks done (zeroed; the merging block
    /// resets it).
    attn_part: Option<DevBuf>,
    attn_cnt: Option<DevBuf>,
    xh: Option<DevBuf>,
    wh: Option<DevBuf>,
    /// The staged products' split-K partial sums and tile counters
    /// (`exec::MatScratch::part`, `cnt`).
    mmqs_part: Option<DevBuf>,
    mmqs_cnt: Option<DevBuf>,
    meta: Option<DevBuf>,
    host_meta: Vec<i32>,
    /// The sampling kernel's per-row parameters and penalty pairs.
    samp: Option<DevBuf>,
    /// Per-row state the sampling phases pass on (`SampScratch`).
    samp_scratch: Option<DevBuf>,
    host_samp: Vec<u8>,
    last_ids: Vec<u32>,
    graphs: HashMap<GraphKey, Graph>,
    /// The sampling chain's graphs (see `sample`).
    samp_graphs: HashMap<SampKey, Graph>,
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
            // The captured graphs hold the old buffers' addresses, and each
            // assignment below frees one: they go first (an allocation may
            // fail halfway, leaving some buffers replaced).
            self.graphs.clear();
            let n = n.next_power_of_two().max(8);
            let (d, qd, kvd, f) = (c.d_model, c.q_dim(), c.kv_dim(), c.ffn);
            let maxk = d.max(qd).max(f).max(c.ffn_shared);
            let a = |bytes: usize, what: &str| gpu.alloc(bytes, what).map(Some).map_err(cuda_err);
            self.x = a(n * d * 4, "activations x")?;
            self.xn = a(n * d * 4, "activations xn")?;
            self.qkv = a(n * (qd + 2 * kvd) * 4, "activations qkv")?;
            self.q = a(n * qd * 4, "activations q")?;
            self.att = a(n * qd * 4, "activations att")?;
            self.o = a(n * d * 4, "activations o")?;
            if c.norm_placement == crate::config::NormPlacement::Parallel {
                self.attn_o = a(n * d * 4, "activations attn_o")?;
            }
            if c.n_expert > 0 {
                self.moe = None;
                self.moe = Some(MoeBufs::alloc(gpu, c, n)?);
            }
            self.gu = a(n * 2 * f * 4, "activations gate/up")?;
            self.act = a(n * f * 4, "activations act")?;
            self.xq = a(n * maxk, "quantized activations")?;
            self.xd = a(n * maxk / 32 * 4, "activation scales")?;
            self.xh = a(n * maxk * 2, "f16 activations")?;
            self.attn_cnt = Some(
                gpu.alloc_zeroed(
                    n.min(exec::GEMV_ROWS) * c.n_heads * 4,
                    "attention chunk counters",
                )
                .map_err(cuda_err)?,
            );
            if n > exec::GEMV_ROWS && self.wh.is_none() {
                self.wh = a(cm.max_mat.max(1) * 2, "f16 weight scratch")?;
            }
            self.cap_tokens = n;
            self.graphs.clear();
        }
        if n_out > self.cap_out {
            self.graphs.clear();
            let n_out = n_out.next_power_of_two().max(8);
            let a = |bytes: usize, what: &str| gpu.alloc(bytes, what).map(Some).map_err(cuda_err);
            self.hidden = a(n_out * c.d_model * 4, "final hidden")?;
            self.logits = a(n_out * c.vocab * 4, "logits")?;
            self.ids = a(n_out * 4, "token ids")?;
            let parts = exec::argmax_parts(c.vocab);
            self.arg_v = a(n_out * parts * 4, "argmax partial maxima")?;
            self.arg_i = a(n_out * parts * 4, "argmax partial indices")?;
            // The LM head's f16 scratch for more than GEMV_ROWS rows.
            if n_out > exec::GEMV_ROWS {
                let lm = c.vocab * c.d_model;
                if self.wh.as_ref().map_or(0, |b| b.bytes) < lm * 2 {
                    self.wh = a(lm.max(cm.max_mat) * 2, "f16 weight scratch")?;
                }
            }
            self.cap_out = n_out;
            self.graphs.clear();
        }
        if self.mmqs_part.is_none() && cm.mmqs {
            self.graphs.clear();
            self.mmqs_part = Some(
                gpu.alloc(exec::MMQS_PART_FLOATS * 4, "split-K partial sums")
                    .map_err(cuda_err)?,
            );
            self.mmqs_cnt = Some(
                gpu.alloc_zeroed(exec::MMQS_TILES * 4, "split-K tile counters")
                    .map_err(cuda_err)?,
            );
        }
        if n > exec::GEMV_ROWS && self.wh.as_ref().map_or(0, |b| b.bytes) < cm.max_mat * 2 {
            self.wh = gpu
                .alloc(cm.max_mat * 2, "f16 weight scratch")
                .map(Some)
                .map_err(cuda_err)?;
        }
        Ok(())
    }

    /// Samples one token per logits row on the device (`sample_rows`),
    /// leaving the ids where the greedy argmax leaves them. `masks[i]`, where
    /// present, is row i's grammar mask (bits; a clear bit refuses the
    /// token), applied by the kernel's first phase.
    fn sample(
        &mut self,
        gpu: &Gpu,
        draws: &[DeviceDraw],
        masks: &[Option<Vec<u32>>],
        vocab: usize,
    ) -> Result<()> {
        let rows = draws.len();
        let h = &mut self.host_samp;
        h.clear();
        let mut off = 0usize;
        // The masks follow the penalties in the same buffer; a row's `mask`
        // is the index (in 4-byte words from the penalties' start) of its
        // first word, −1 for none.
        let n_pen: usize = draws.iter().map(|d| d.penalties.len()).sum();
        let mut mask_at = 2 * n_pen;
        let words = vocab.div_ceil(32);
        for (i, d) in draws.iter().enumerate() {
            let mask = match masks.get(i) {
                Some(Some(m)) => {
                    if m.len() < words {
                        return Err(ModelError::BadConfig(format!(
                            "a grammar mask of {} words for a vocabulary of {vocab}",
                            m.len()
                        )));
                    }
                    let at = i32::try_from(mask_at).map_err(|_| {
                        ModelError::BadConfig("grammar masks past 2^31 words".into())
                    })?;
                    mask_at += words;
                    at
                }
                _ => -1,
            };
            let r = SampleRow {
                u: d.u,
                temp: d.temperature,
                top_p: d.top_p,
                min_p: d.min_p,
                rep: d.repeat_penalty,
                pres: d.presence_penalty,
                freq: d.frequency_penalty,
                top_k: d.top_k,
                n_pen: d.penalties.len() as i32,
                pen_off: off as i32,
                mask,
            };
            h.extend_from_slice(tl_cuda::raw_bytes(&r));
            off += d.penalties.len();
        }
        let pen_at = h.len();
        for d in draws {
            for &(t, c) in &d.penalties {
                h.extend_from_slice(&(t as i32).to_le_bytes());
                h.extend_from_slice(&(c as i32).to_le_bytes());
            }
        }
        for m in masks.iter().take(rows).flatten() {
            for w in &m[..words] {
                h.extend_from_slice(&w.to_le_bytes());
            }
        }
        if h.len() > self.samp.as_ref().map_or(0, |b| b.bytes) {
            self.samp = Some(
                gpu.alloc(h.len().next_power_of_two().max(4096), "sampling parameters")
                    .map_err(cuda_err)?,
            );
            self.samp_graphs.clear();
        }
        let base = ptr(&self.samp);
        gpu.htod(base, h).map_err(cuda_err)?;
        // The multi-block chain (kernels.cu, "Sampling on the device"):
        // G blocks of 256 threads per row, 14 phases.
        let groups = sample_groups(vocab, rows) as u32;
        let need = rows * SAMP_SCRATCH_BYTES;
        if need > self.samp_scratch.as_ref().map_or(0, |b| b.bytes) {
            self.samp_scratch = Some(
                gpu.alloc(need.next_power_of_two(), "sampling scratch")
                    .map_err(cuda_err)?,
            );
            self.samp_graphs.clear();
        }
        let key = SampKey {
            rows,
            groups,
            vocab,
            params: base,
            scratch: ptr(&self.samp_scratch),
            logits: ptr(&self.logits),
            ids: ptr(&self.ids),
        };
        let launch = |gpu: &Gpu| -> Result<()> {
            for phase in 0..14 {
                gpu.launch(
                    "sample_phase",
                    (groups, rows as u32, 1),
                    256,
                    0,
                    &[
                        tl_cuda::Arg::I32(phase),
                        tl_cuda::Arg::Ptr(key.logits),
                        tl_cuda::Arg::I32(vocab as i32),
                        tl_cuda::Arg::Ptr(base),
                        tl_cuda::Arg::Ptr(base + pen_at as u64),
                        tl_cuda::Arg::Ptr(key.scratch),
                        tl_cuda::Arg::Ptr(key.ids),
                    ],
                )
                .map_err(cuda_err)?;
            }
            Ok(())
        };
        // The 14 launches replay as one graph per (rows, buffers): the
        // parameters are read from device memory, uploaded above, so one
        // capture serves every step of that batch size.
        if !graphs_enabled() || profiling() || gpu.tracing() {
            return launch(gpu);
        }
        if let Some(g) = self.samp_graphs.get(&key) {
            return gpu.replay(g).map_err(cuda_err);
        }
        gpu.begin_capture().map_err(cuda_err)?;
        let r = launch(gpu);
        let g = gpu.end_capture().map_err(cuda_err);
        r?;
        let g = g?;
        gpu.replay(&g).map_err(cuda_err)?;
        self.samp_graphs.insert(key, g);
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
