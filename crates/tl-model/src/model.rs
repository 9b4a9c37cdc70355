//! A loaded model and its forward pass over a ragged batch.
//!
//! Input: several sequences, each a run of new tokens starting at some
//! position, with the block table of its KV cache. All tokens of all
//! sequences go through each weight matrix together (one matmul per weight
//! per step), then attention runs per token over its own sequence's cache.
//! A single prompt is a batch of one; prefill and decode tokens can share a
//! step.

use tl_core::Device;
use tl_gguf::{GgmlType, GgufFile};

use crate::attention::AttnScratch;
use crate::config::Config;
use crate::cuda::Out;
use crate::error::{ModelError, Result};
use crate::forward::Plan;
use crate::kv::{KvCache, KvType, SeqKv, BLOCK_SIZE};
use crate::ops;
use crate::sampler::DeviceDraw;
use crate::weights::{Weight, Weights};

/// Which logits a sequence wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// One sequence's part of a batch.
pub struct SeqBatch<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`: the number of tokens already cached.
    pub pos: usize,
    /// Block table; must already cover `pos + tokens.len()` tokens.
    pub kv: &'a SeqKv,
    pub logits: Logits,
}

/// Per-layer vectors (norm scales, biases) dequantized once at load.
pub(crate) struct LayerVecs {
    pub(crate) attn_norm: Option<Vec<f32>>,
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) post_attn_norm: Option<Vec<f32>>,
    pub(crate) ffn_norm: Option<Vec<f32>>,
    pub(crate) post_ffn_norm: Option<Vec<f32>>,
    /// The attention output's bias (gpt-oss).
    pub(crate) bo: Option<Vec<f32>>,
    /// Sink logits per query head (gpt-oss), shared with each step's
    /// attention parameters.
    pub(crate) sinks: Option<std::sync::Arc<[f32]>>,
    /// The router's bias and the experts' gate, up and down biases
    /// (`[n_expert][ffn]`, `[n_expert][ffn]`, `[n_expert][d_model]`).
    pub(crate) router_b: Option<Vec<f32>>,
    pub(crate) expert_b: Option<[Vec<f32>; 3]>,
}

/// Grammar masks handed to [`Model::forward_sampled_masked`]: called once
/// per step, after the forward is launched, for one optional mask per draw.
pub type MaskHook<'a> = &'a mut dyn FnMut() -> Vec<Option<Vec<u32>>>;

pub struct Model {
    pub config: Config,
    pub file: GgufFile,
    pub(crate) weights: Weights,
    pub(crate) vecs: Vec<LayerVecs>,
    pub(crate) output_norm: Vec<f32>,
    /// RoPE frequency factors (one per rotated pair), when the file has them.
    pub(crate) rope_freqs: Option<Vec<f32>>,
    /// The weights in device memory when the model runs on a GPU.
    pub(crate) cuda: Option<crate::cuda::CudaModel>,
    /// The element type of the caches [`Model::new_cache`] makes.
    kv_type: KvType,
    /// Steps of more tokens fail as out of memory ([`Model::limit_step_tokens`]).
    step_limit: std::sync::atomic::AtomicUsize,
    /// Steps left before an injected fault ([`Model::inject_fault`];
    /// `usize::MAX`: none) and whether it loses the device.
    fault_in: std::sync::atomic::AtomicUsize,
    fault_fatal: std::sync::atomic::AtomicBool,
    /// Why the device was lost, once it was: every later step fails at
    /// once with it instead of touching the device.
    lost: std::sync::Mutex<Option<String>>,
}

/// One pick per row of `logits` (rows of `vocab` values) as `draws` say,
/// taken on `device`: the CUDA sampling kernel on its own on a GPU,
/// [`crate::sampler::pick`] on the CPU. For tests and measurements of the
/// sampler; a forward's picks go through [`Model::forward_sampled`].
pub fn sample_rows_on(
    device: Device,
    logits: &[f32],
    vocab: usize,
    draws: &[DeviceDraw],
) -> Result<Vec<u32>> {
    sample_rows_masked_on(device, logits, vocab, draws, &[])
}

/// [`sample_rows_on`] with a grammar mask per row where `masks[i]` has one
/// (bits as [`crate::sampler::apply_mask`] reads them).
pub fn sample_rows_masked_on(
    device: Device,
    logits: &[f32],
    vocab: usize,
    draws: &[DeviceDraw],
    masks: &[Option<Vec<u32>>],
) -> Result<Vec<u32>> {
    if vocab == 0 || logits.len() != vocab * draws.len() {
        return Err(ModelError::BadConfig(format!(
            "{} logits for {} rows of {vocab}",
            logits.len(),
            draws.len()
        )));
    }
    match device {
        Device::Cuda(n) => crate::cuda::sample_rows(n, logits, vocab, draws, masks),
        Device::Cpu => Ok(logits
            .chunks_exact(vocab)
            .zip(draws)
            .enumerate()
            .map(|(i, (row, d))| {
                let mask = masks.get(i).and_then(Option::as_deref);
                crate::sampler::pick_masked(&mut row.to_vec(), d, mask)
            })
            .collect()),
    }
}

/// Buffers reused across forward calls; they grow to the largest batch seen
/// and are never shrunk, so steady-state decoding allocates nothing.
#[derive(Default)]
///
/// The host buffers serve the CPU executor; a model on a GPU keeps its
/// buffers in device memory (`cuda`) and copies only the requested logits
/// rows back into `logits`.
pub struct ForwardState {
    pub(crate) x: Vec<f32>,
    pub(crate) xn: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) att: Vec<f32>,
    pub(crate) o: Vec<f32>,
    /// The attention output of a layer whose FFN runs beside it
    /// (`NormPlacement::Parallel`), kept for the residual add.
    pub(crate) attn_o: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    pub(crate) plan: Plan,
    pub(crate) hidden_out: Vec<f32>,
    pub(crate) rope: Vec<f32>,
    /// Quantized activations and other matmul buffers.
    pub(crate) act: tl_core::MatmulScratch,
    pub(crate) logits: Vec<f32>,
    pub(crate) last_logits: usize,
    pub(crate) attn: Vec<AttnScratch>,
    /// One embedding row's blocks, read back from a repacked table.
    pub(crate) emb_row: Vec<u8>,
    /// Device buffers and captured graphs of a model on a GPU.
    pub(crate) cuda: Option<crate::cuda::CudaState>,
    /// Layers this state's forward leaves out (`skip[il]`; empty: none).
    /// Set only for the self-speculation draft, which runs on the CPU.
    pub(crate) skip_layers: Vec<bool>,
    /// Importance-matrix sums fed by the CPU forward's weight products
    /// (`tl imatrix`); `None`: not collected.
    pub(crate) imatrix: Option<Box<crate::imatrix::ImatrixCollector>>,
}

impl ForwardState {
    /// Buffers for a forward that leaves out the layers `skip[il]` marks
    /// (the self-speculation draft; CPU only: a GPU forward refuses it).
    pub fn skipping(skip: Vec<bool>) -> Self {
        ForwardState {
            skip_layers: skip,
            ..Default::default()
        }
    }

    /// The logits rows of the last forward call, for in-place sampling.
    pub fn logits_mut(&mut self) -> &mut [f32] {
        let n = self.last_logits;
        &mut self.logits[..n]
    }
}

fn opt_vec(w: &Option<Weight>, f: &GgufFile) -> Result<Option<Vec<f32>>> {
    w.as_ref().map(|w| ops::vector(w, f)).transpose()
}

impl Model {
    /// Loads a model from a GGUF file: config from metadata, weights by name.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::load_on(path, Device::Cpu)
    }

    /// Loads a model onto `device`: on a GPU the weights are uploaded in
    /// the device's block layouts and every forward runs there.
    pub fn load_on(path: impl AsRef<std::path::Path>, device: Device) -> Result<Self> {
        Self::load_ctx(path, device, 0)
    }

    /// [`Model::load_on`] for a runtime context of `ctx` tokens (see
    /// [`Model::from_file_ctx`]; 0: the training context).
    pub fn load_ctx(path: impl AsRef<std::path::Path>, device: Device, ctx: usize) -> Result<Self> {
        let file = GgufFile::open(path)?;
        Self::from_file_ctx(file, device, ctx)
    }

    /// Whether `file` can be loaded, without reading its weights: the
    /// architecture and hyper-parameters, every tensor's name, shape and
    /// block type. The error names the missing piece.
    pub fn check_file(file: &GgufFile) -> Result<()> {
        let vocab_hint = file
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).map(|&v| v as usize));
        let config = crate::config::Config::from_metadata(&file.metadata, vocab_hint)?;
        crate::weights::Weights::load(file, &config)?;
        Ok(())
    }

    pub fn from_file(file: GgufFile) -> Result<Self> {
        Self::from_file_on(file, Device::Cpu)
    }

    pub fn from_file_on(file: GgufFile, device: Device) -> Result<Self> {
        Self::from_file_ctx(file, device, 0)
    }

    /// [`Model::from_file_on`] for a runtime context of `ctx` tokens (0:
    /// the training context), which picks Phi-3 LongRoPE's factor set as
    /// llama.cpp's `n_ctx` does: the context rounded up to a multiple of
    /// 256 (llama.cpp's `n_ctx_seq` for one sequence), the long factors
    /// where that exceeds `rope.scaling.original_context_length`.
    pub fn from_file_ctx(file: GgufFile, device: Device, ctx: usize) -> Result<Self> {
        let vocab_hint = file
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).map(|&v| v as usize));
        let mut config = Config::from_metadata(&file.metadata, vocab_hint)?;
        let ctx = if ctx == 0 { config.context } else { ctx };
        config.rope_ctx = ctx.div_ceil(256).saturating_mul(256);
        let mut weights = Weights::load(&file, &config)?;
        if device == Device::Cpu {
            weights.repack(&file)?;
        }
        let mut vecs = Vec::with_capacity(config.n_layers);
        for l in &weights.layers {
            vecs.push(LayerVecs {
                attn_norm: opt_vec(&l.attn_norm, &file)?,
                bq: opt_vec(&l.bq, &file)?,
                bk: opt_vec(&l.bk, &file)?,
                bv: opt_vec(&l.bv, &file)?,
                q_norm: opt_vec(&l.q_norm, &file)?,
                k_norm: opt_vec(&l.k_norm, &file)?,
                post_attn_norm: opt_vec(&l.post_attn_norm, &file)?,
                ffn_norm: opt_vec(&l.ffn_norm, &file)?,
                post_ffn_norm: opt_vec(&l.post_ffn_norm, &file)?,
                bo: opt_vec(&l.bo, &file)?,
                sinks: opt_vec(&l.sinks, &file)?.map(std::sync::Arc::from),
                router_b: match &l.moe {
                    Some(m) => opt_vec(&m.router_bias, &file)?,
                    None => None,
                },
                expert_b: match l.moe.as_ref().and_then(|m| m.biases.as_ref()) {
                    Some([g, u, d]) => Some([
                        ops::vector(g, &file)?,
                        ops::vector(u, &file)?,
                        ops::vector(d, &file)?,
                    ]),
                    None => None,
                },
            });
        }
        let output_norm = ops::vector(&weights.output_norm, &file)?;
        let rope_freqs = opt_vec(&weights.rope_freqs, &file)?;
        let mut model = Model {
            config,
            file,
            weights,
            vecs,
            output_norm,
            rope_freqs,
            cuda: None,
            kv_type: KvType::F16,
            step_limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
            fault_in: std::sync::atomic::AtomicUsize::new(usize::MAX),
            fault_fatal: std::sync::atomic::AtomicBool::new(false),
            lost: std::sync::Mutex::new(None),
        };
        if let Device::Cuda(ordinal) = device {
            model.cuda = Some(crate::cuda::CudaModel::upload(&model, ordinal)?);
        }
        Ok(model)
    }

    /// The device the forward runs on.
    pub fn device(&self) -> Device {
        match &self.cuda {
            Some(c) => Device::Cuda(c.ordinal()),
            None => Device::Cpu,
        }
    }

    /// A one-line description of the device (GPU name, memory taken by the
    /// weights), for startup logs.
    pub fn device_summary(&self) -> String {
        match &self.cuda {
            Some(c) => c.summary(),
            None => format!(
                "cpu ({} threads)",
                tl_core::pool::ThreadPool::global().threads()
            ),
        }
    }

    /// Free and total memory of the model's GPU, in bytes (`None` on the
    /// CPU).
    pub fn device_memory(&self) -> Option<(usize, usize)> {
        self.cuda.as_ref().and_then(|c| c.mem_info().ok())
    }

    /// Device memory a forward of up to `tokens` tokens (as many logits
    /// rows) takes besides the weights and the KV cache: activations,
    /// their 8-bit and f16 copies, the logits, the f16 weight scratch of
    /// prefill products. 0 on the CPU.
    pub fn step_bytes(&self, tokens: usize) -> usize {
        match &self.cuda {
            Some(c) => c.step_bytes(&self.config, tokens),
            None => 0,
        }
    }

    /// GPU time per forward stage, when the model runs on a GPU with
    /// `TL_CUDA_PROFILE=1`: (stage, milliseconds, calls), largest first.
    pub fn device_profile(&self) -> Option<Vec<(&'static str, f64, usize)>> {
        match &self.cuda {
            Some(c) if crate::cuda::profiling() => Some(c.profile_report()),
            _ => None,
        }
    }

    /// The LM head's weight (the embedding table when tied).
    /// Requantizes the CPU copy of the output projection to `ty` where the
    /// file's type takes more bytes, for a draft model: its picks are
    /// verified by the target, so they need not be the file's exactly, and
    /// the output projection is the largest single read of a small model's
    /// decode step (Qwen2.5-0.5B: a Q8_0 head of 138 MiB of ≈374 MiB; as
    /// Q4_0, 73 MiB). Embedding lookups still read the file's rows. Returns
    /// whether it changed anything: not on a GPU, not where the type is
    /// already as small, the rows are not whole blocks of `ty`, or this CPU
    /// has no packed kernel for `ty`.
    pub fn requantize_output(&mut self, ty: GgmlType) -> Result<bool> {
        if self.cuda.is_some() {
            return Ok(false);
        }
        let w = self.output_weight();
        let (rows, cols, from) = (w.rows, w.cols, w.ty);
        let row_bytes = |t: GgmlType| t.bytes_for(cols as u64).map(|b| b as usize);
        let (Some(src_row), Some(dst_row)) = (row_bytes(from), row_bytes(ty)) else {
            return Ok(false);
        };
        if dst_row >= src_row || cols % ty.block_size() != 0 {
            return Ok(false);
        }
        let src = w.bytes(&self.file);
        let core = |err| ModelError::Core {
            tensor: "output.weight".into(),
            err,
        };
        let mut out = vec![0u8; rows * dst_row];
        let chunk = 1024;
        let mut f = vec![0f32; chunk * cols];
        for (i, dst) in out.chunks_mut(chunk * dst_row).enumerate() {
            let n = dst.len() / dst_row;
            let at = i * chunk * src_row;
            let rows_src = src.get(at..at + n * src_row).ok_or_else(|| {
                ModelError::BadConfig("output.weight: fewer bytes than its shape".into())
            })?;
            tl_core::quant::dequantize(from, rows_src, &mut f[..n * cols]).map_err(core)?;
            tl_core::quant::quantize(ty, &f[..n * cols], dst).map_err(core)?;
        }
        let Some(p) = tl_core::PackedWeight::pack(ty, cols, rows, &out).map_err(core)? else {
            return Ok(false);
        };
        let w = match self.weights.output.as_mut() {
            Some(o) => o,
            None => &mut self.weights.token_embd,
        };
        w.packed = Some(std::sync::Arc::new(p));
        Ok(true)
    }

    /// The block type of the output projection's file copy.
    pub fn output_type(&self) -> GgmlType {
        self.output_weight().ty
    }

    pub(crate) fn output_weight(&self) -> &Weight {
        self.weights
            .output
            .as_ref()
            .unwrap_or(&self.weights.token_embd)
    }

    /// The repacked copy of the matmul weight named `name` (its GGUF name),
    /// if the load repacked it (see [`Weights::repack`]).
    pub fn packed_weight(&self, name: &str) -> Option<std::sync::Arc<tl_core::PackedWeight>> {
        let w = &self.weights;
        let mut all = w
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .chain(w.output.as_ref())
            .chain(std::iter::once(&w.token_embd));
        all.find(|x| x.name == name).and_then(|x| x.packed.clone())
    }

    /// Sets the element type of the KV caches this model makes from now on
    /// (f16 by default); fails when the head dimension does not fit it.
    pub fn set_kv_type(&mut self, ty: KvType) -> Result<()> {
        ty.check_head_dim(self.config.head_dim)?;
        self.kv_type = ty;
        Ok(())
    }

    /// The element type of the KV caches this model makes.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Bytes one token of context occupies in this model's KV cache (all
    /// layers, K and V, scales included).
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        KvCache::bytes_per_token(self.kv_type, c.n_layers, c.n_kv_heads, c.head_dim)
    }

    /// A KV cache for `n_tokens` tokens in total (rounded up to whole blocks).
    pub fn new_cache(&self, n_tokens: usize) -> Result<KvCache> {
        self.new_cache_blocks(n_tokens.div_ceil(BLOCK_SIZE).max(1))
    }

    /// A host KV cache of `n_blocks` blocks with room for the layers
    /// `il` where `held[il]` only (the self-speculation draft's layers).
    /// CPU only.
    pub fn new_cache_blocks_for_layers(&self, n_blocks: usize, held: &[bool]) -> Result<KvCache> {
        let c = &self.config;
        if self.cuda.is_some() {
            return Err(ModelError::BadConfig(
                "a KV cache of some layers only is for the CPU".into(),
            ));
        }
        if held.len() != c.n_layers {
            return Err(ModelError::BadConfig(format!(
                "a KV cache of {} layers' flags for a model of {} layers",
                held.len(),
                c.n_layers
            )));
        }
        KvCache::new_for_layers(self.kv_type, held, c.n_kv_heads, c.head_dim, n_blocks)
    }

    /// Bytes one token occupies in a cache of `n_layers` of this model's
    /// layers.
    pub fn kv_bytes_per_token_layers(&self, n_layers: usize) -> usize {
        let c = &self.config;
        KvCache::bytes_per_token(self.kv_type, n_layers, c.n_kv_heads, c.head_dim)
    }

    /// A KV cache of `n_blocks` blocks on the model's device.
    pub fn new_cache_blocks(&self, n_blocks: usize) -> Result<KvCache> {
        let c = &self.config;
        match &self.cuda {
            Some(cm) => KvCache::new_on_device(
                self.kv_type,
                c.n_layers,
                c.n_kv_heads,
                c.head_dim,
                n_blocks,
                cm.alloc_kv(self.kv_type, c.n_layers, c.n_kv_heads, c.head_dim, n_blocks)?,
            ),
            None => {
                KvCache::new_typed(self.kv_type, c.n_layers, c.n_kv_heads, c.head_dim, n_blocks)
            }
        }
    }

    /// `y[m, n] = x[m, k] · Wᵀ` on the model's GPU for a weight `W` of
    /// this model given by its mapped bytes (GGML type `ty`, `n` rows of
    /// `k`): the forward's product kernels, the weight uploaded on first
    /// use. `Ok(None)` when the model is on the CPU (the caller multiplies
    /// there). For programs in the language (`linear`).
    #[allow(clippy::too_many_arguments)]
    pub fn device_linear(
        &self,
        name: &str,
        ty: tl_gguf::GgmlType,
        n: usize,
        k: usize,
        bytes: &[u8],
        x: &[f32],
        m: usize,
    ) -> Result<Option<Vec<f32>>> {
        match &self.cuda {
            Some(cm) => cm.op_linear(name, ty, n, k, bytes, x, m).map(Some),
            None => Ok(None),
        }
    }

    /// Writes K and V of `t` tokens at positions `pos..pos + t` of
    /// `layer` into a device cache (its sequence's blocks `table`) and
    /// attends each token's queries causally over its positions on the
    /// GPU; `q`, `k`, `v` are `[t, heads · head_dim]` with RoPE applied,
    /// `p` the layer's attention parameters (soft-capping is not in the
    /// GPU kernel: an error). `Ok(None)` when the cache is on the host.
    /// For programs in the language (`attention`).
    #[allow(clippy::too_many_arguments)]
    pub fn device_attention(
        &self,
        cache: &KvCache,
        layer: usize,
        p: &crate::attention::AttnParams,
        pos: usize,
        table: &[u32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
    ) -> Result<Option<Vec<f32>>> {
        let (Some(cm), Some(kv)) = (&self.cuda, &cache.device) else {
            return Ok(None);
        };
        if p.softcap.is_some() {
            return Err(ModelError::Device(
                "attention soft-capping is not in the CUDA attention kernel yet".into(),
            ));
        }
        if layer >= self.config.n_layers {
            return Err(ModelError::Kv(format!(
                "attention: layer {layer} of {}",
                self.config.n_layers
            )));
        }
        let a = crate::cuda::OpAttn {
            layer,
            n_heads: p.n_heads,
            n_kv_heads: p.n_kv_heads,
            head_dim: p.head_dim,
            scale: p.scale,
            window: p.window.unwrap_or(0),
            pos,
            table,
        };
        cm.op_attention(kv, &a, q, k, v, t).map(Some)
    }

    /// Scans every weight for NaN/Inf; returns the names of the bad ones.
    pub fn check_tensors(&self) -> Result<Vec<String>> {
        let mut bad = Vec::new();
        for t in &self.file.tensors {
            if !tl_core::quant::is_supported(t.ty) {
                continue;
            }
            let mut buf = vec![0.0f32; t.n_elements() as usize];
            tl_core::quant::dequantize(t.ty, self.file.tensor_data(t), &mut buf).map_err(|e| {
                ModelError::Core {
                    tensor: t.name.clone(),
                    err: e,
                }
            })?;
            if buf.iter().any(|v| !v.is_finite()) {
                bad.push(t.name.clone());
            }
        }
        Ok(bad)
    }

    /// Runs one step over a ragged batch, writing K/V of every token into
    /// `cache`, and returns the requested logits rows (sequence order; one
    /// row per token for `Logits::All`, one for `Logits::Last`).
    pub fn forward<'s>(
        &self,
        cache: &mut KvCache,
        batch: &[SeqBatch],
        st: &'s mut ForwardState,
    ) -> Result<&'s [f32]> {
        let mut plan = std::mem::take(&mut st.plan);
        let r = self.forward_planned(cache, batch, st, &mut plan, Out::Logits, None);
        st.plan = plan;
        r?;
        Ok(&st.logits[..st.last_logits])
    }

    /// Like [`Model::forward`], then one token picked per requested logits
    /// row as `draws` (one per row, in row order; see
    /// [`crate::sampler::Sampler::device_draw`]) say. On a GPU the pick is
    /// taken there (penalties, top-k/top-p/min-p, temperature, the draw)
    /// and only the ids cross to the host; on the CPU it is
    /// [`crate::sampler::pick`] on the host rows.
    pub fn forward_sampled(
        &self,
        cache: &mut KvCache,
        batch: &[SeqBatch],
        st: &mut ForwardState,
        draws: &[DeviceDraw],
    ) -> Result<Vec<u32>> {
        self.forward_sampled_masked(cache, batch, st, draws, None)
    }

    /// [`Model::forward_sampled`] under grammar masks: `masks`, called once
    /// the forward is under way (on a GPU, while the device computes it),
    /// returns one optional mask per draw (bits, as
    /// [`crate::sampler::apply_mask`] reads them), applied to the row
    /// before its pick, on the device where the pick is taken. The caller
    /// computes its masks in the meantime, so they cost the step nothing
    /// where the host would wait anyway.
    pub fn forward_sampled_masked(
        &self,
        cache: &mut KvCache,
        batch: &[SeqBatch],
        st: &mut ForwardState,
        draws: &[DeviceDraw],
        mut masks: Option<MaskHook<'_>>,
    ) -> Result<Vec<u32>> {
        if masks.is_none() && draws.iter().all(DeviceDraw::is_plain_argmax) {
            return self.forward_greedy(cache, batch, st);
        }
        let mut plan = std::mem::take(&mut st.plan);
        let r = self.forward_planned(
            cache,
            batch,
            st,
            &mut plan,
            Out::Sample(draws),
            masks.as_deref_mut(),
        );
        st.plan = plan;
        r?;
        if self.cuda.is_some() {
            if let Some(cs) = &st.cuda {
                return Ok(cs.greedy_ids());
            }
        }
        let rows_masks = match masks {
            Some(h) => h(),
            None => Vec::new(),
        };
        let v = self.config.vocab;
        Ok(st.logits[..st.last_logits]
            .chunks_exact_mut(v)
            .zip(draws)
            .enumerate()
            .map(|(i, (row, d))| {
                crate::sampler::pick_masked(row, d, rows_masks.get(i).and_then(Option::as_deref))
            })
            .collect())
    }

    /// Like [`Model::forward`] for greedy decoding: returns the argmax token
    /// of each requested logits row. On a GPU only these ids cross to the
    /// host.
    pub fn forward_greedy(
        &self,
        cache: &mut KvCache,
        batch: &[SeqBatch],
        st: &mut ForwardState,
    ) -> Result<Vec<u32>> {
        let mut plan = std::mem::take(&mut st.plan);
        let r = self.forward_planned(cache, batch, st, &mut plan, Out::Greedy, None);
        st.plan = plan;
        r?;
        if let Some(cs) = &st.cuda {
            if self.cuda.is_some() {
                return Ok(cs.greedy_ids());
            }
        }
        let v = self.config.vocab;
        Ok(st.logits[..st.last_logits]
            .chunks_exact(v)
            .map(crate::sampler::argmax)
            .collect())
    }

    /// The draft model's step of speculative decoding: like
    /// [`Model::forward_greedy`], with `None` for a row whose top
    /// probability (softmax of the row) is below `p_min` — the drafter
    /// stops there (llama.cpp's `--draft-p-min`). `p_min <= 0` never
    /// stops and takes the greedy path (on a GPU only the ids cross to the
    /// host); otherwise the rows are read on the host.
    pub fn forward_draft(
        &self,
        cache: &mut KvCache,
        batch: &[SeqBatch],
        st: &mut ForwardState,
        p_min: f32,
    ) -> Result<Vec<Option<u32>>> {
        if p_min <= 0.0 {
            return Ok(self
                .forward_greedy(cache, batch, st)?
                .into_iter()
                .map(Some)
                .collect());
        }
        let v = self.config.vocab;
        let rows = self.forward(cache, batch, st)?;
        Ok(rows
            .chunks_exact(v)
            .map(|row| {
                let t = crate::sampler::argmax(row);
                let max = row.get(t as usize).copied().unwrap_or(f32::NAN);
                crate::spec::top_prob_at_least(row, max, p_min).then_some(t)
            })
            .collect())
    }

    /// Batch-invariant mode (off by default): a sequence's logits are then
    /// bit-identical whatever else shares its steps. The CPU always is; on
    /// a GPU this keeps every product of up to 64 rows on the 8-row GEMVs
    /// instead of the tensor-core kernels (which sum a row in another
    /// order, so logits move in the last bits between batch sizes of up to
    /// 8 and more), at the cost of batched decode speed.
    pub fn set_batch_invariant(&self, on: bool) {
        if let Some(c) = &self.cuda {
            c.set_batch_invariant(on);
        }
    }

    /// On a GPU, prompt steps of a mixture of experts group the (token,
    /// expert) pairs per expert and run each expert's rows as one product
    /// (instead of one product per pair, each reading its expert's
    /// weights); also `TL_CUDA_MOE_GROUPED=1`. Nothing on the CPU.
    pub fn set_moe_grouped(&self, on: bool) {
        if let Some(c) = &self.cuda {
            c.set_moe_grouped(on);
        }
    }

    /// From now on a step of more than `tokens` tokens fails with
    /// [`ModelError::OutOfMemory`] before it runs, as a device allocation
    /// failure would (`None`: no limit). How callers recover from a device
    /// running out of memory mid-serve is tested with it on every device.
    pub fn limit_step_tokens(&self, tokens: Option<usize>) {
        self.step_limit.store(
            tokens.unwrap_or(usize::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// After `after` more steps, the next one fails as a device error
    /// would: with `fatal`, as a lost device ([`ModelError::DeviceLost`],
    /// and every later step too), else as one failed step
    /// ([`ModelError::Device`]). How callers handle GPU faults mid-serve is
    /// tested with it on every device.
    pub fn inject_fault(&self, after: usize, fatal: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.fault_fatal.store(fatal, Relaxed);
        self.fault_in.store(after, Relaxed);
    }

    /// Why the model's device is lost to this process, once it is.
    pub fn device_lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }

    /// Fails the step when the device is lost or a fault is due.
    fn check_device(&self) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(why) = self.device_lost() {
            return Err(ModelError::DeviceLost(why));
        }
        let n = self.fault_in.load(Relaxed);
        if n == usize::MAX {
            return Ok(());
        }
        if n > 0 {
            self.fault_in.store(n - 1, Relaxed);
            return Ok(());
        }
        self.fault_in.store(usize::MAX, Relaxed);
        if self.fault_fatal.load(Relaxed) {
            let why = "injected fault: the device stopped responding".to_string();
            self.note_lost(&why);
            Err(ModelError::DeviceLost(why))
        } else {
            Err(ModelError::Device(
                "injected fault: a kernel launch failed".into(),
            ))
        }
    }

    fn note_lost(&self, why: &str) {
        if let Ok(mut l) = self.lost.lock() {
            l.get_or_insert_with(|| why.to_string());
        }
    }

    fn forward_planned(
        &self,
        cache: &mut KvCache,
        batch: &[SeqBatch],
        st: &mut ForwardState,
        plan: &mut Plan,
        out: Out<'_>,
        masks: Option<&mut (dyn FnMut() -> Vec<Option<Vec<u32>>> + '_)>,
    ) -> Result<()> {
        let c = &self.config;
        plan.build(c, batch)?;
        st.last_logits = 0;
        if let Out::Sample(d) = out {
            if d.len() != plan.out_rows.len() {
                return Err(ModelError::BadConfig(format!(
                    "{} draws for {} logits rows",
                    d.len(),
                    plan.out_rows.len()
                )));
            }
        }
        if plan.n_tokens() == 0 {
            return Ok(());
        }
        let limit = self.step_limit.load(std::sync::atomic::Ordering::Relaxed);
        if plan.n_tokens() > limit {
            return Err(ModelError::OutOfMemory(format!(
                "a step of {} tokens is over this model's limit of {limit}",
                plan.n_tokens()
            )));
        }
        self.check_device()?;
        match &self.cuda {
            Some(_) if st.skip_layers.iter().any(|&s| s) => Err(ModelError::BadConfig(
                "self-speculation (layer skipping) runs on the CPU only".into(),
            )),
            Some(cm) => {
                let r = cm.forward(self, cache, batch, plan, st, out, masks);
                if let Err(ModelError::DeviceLost(why)) = &r {
                    self.note_lost(why);
                }
                r
            }
            None => {
                if let Some(il) = (0..c.n_layers).find(|&il| {
                    !st.skip_layers.get(il).copied().unwrap_or(false) && !cache.holds_layer(il)
                }) {
                    return Err(ModelError::BadConfig(format!(
                        "the KV cache has no room for layer {il}, which this forward runs"
                    )));
                }
                let skip = std::mem::take(&mut st.skip_layers);
                let mut ex = crate::exec_cpu::CpuExec {
                    m: self,
                    cache,
                    batch,
                    plan,
                    st,
                    moe: false,
                };
                ex.prepare();
                let r = crate::forward::run_layers(c, &mut ex, &skip);
                st.skip_layers = skip;
                r
            }
        }
    }
}
