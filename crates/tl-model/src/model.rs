//! A loaded model and its forward pass over a ragged batch.
//!
//! Input: several sequences, each a run of new tokens starting at some
//! position, with the block table of its KV cache. All tokens of all
//! sequences go through each weight matrix together (one matmul per weight
//! per step), then attention runs per token over its own sequence's cache.
//! A single prompt is a batch of one; prefill and decode tokens can share a
//! step.

use tl_gguf::GgufFile;

use crate::attention::{attend, AttnParams, AttnScratch};
use crate::config::{Arch, Config, FfnAct, RopeLayout};
use crate::error::{ModelError, Result};
use crate::kv::{KvCache, SeqKv, BLOCK_SIZE};
use crate::ops;
use crate::weights::{Weight, Weights};
use tl_core::cpu::kernels;
use tl_core::RopeMode;

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
struct LayerVecs {
    attn_norm: Vec<f32>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    post_ffn_norm: Option<Vec<f32>>,
}

pub struct Model {
    pub config: Config,
    pub file: GgufFile,
    weights: Weights,
    vecs: Vec<LayerVecs>,
    output_norm: Vec<f32>,
}

/// Buffers reused across forward calls; they grow to the largest batch seen
/// and are never shrunk, so steady-state decoding allocates nothing.
#[derive(Default)]
pub struct ForwardState {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// (sequence index, position) of each flattened token.
    meta: Vec<(usize, usize)>,
    out_rows: Vec<usize>,
    hidden_out: Vec<f32>,
    rope: Vec<f32>,
    /// Quantized activations and other matmul buffers.
    act: tl_core::MatmulScratch,
    logits: Vec<f32>,
    last_logits: usize,
    attn: Vec<AttnScratch>,
    /// One embedding row's blocks, read back from a repacked table.
    emb_row: Vec<u8>,
}

impl ForwardState {
    /// The logits rows of the last forward call, for in-place sampling.
    pub fn logits_mut(&mut self) -> &mut [f32] {
        let n = self.last_logits;
        &mut self.logits[..n]
    }
}

fn opt_vec(w: &Option<Weight>, f: &GgufFile) -> Result<Option<Vec<f32>>> {
    w.as_ref().map(|w| ops::vector(w, f)).transpose()
}

/// Runs `f(i)` for rows `0..n`: on the matmul pool in a few chunks per
/// thread when there are enough rows to pay for the hand-off (prefill),
/// inline otherwise (decode).
fn each_row(n: usize, f: &(dyn Fn(usize) + Sync)) {
    const PAR_ROWS: usize = 16;
    let pool = tl_core::pool::ThreadPool::global();
    if n < PAR_ROWS || pool.threads() < 2 {
        (0..n).for_each(f);
        return;
    }
    let per = n.div_ceil(4 * pool.threads());
    pool.run(n.div_ceil(per), &|ch| {
        (ch * per..((ch + 1) * per).min(n)).for_each(f)
    });
}

/// Row `i` (of `w` values) of the buffer behind `p`.
///
/// # Safety
///
/// The buffer holds at least `(i + 1) * w` values, and nothing else
/// touches that row while the slice lives.
unsafe fn row_mut<'a>(p: SyncPtr<f32>, i: usize, w: usize) -> &'a mut [f32] {
    std::slice::from_raw_parts_mut(p.get().add(i * w), w)
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl Model {
    /// Loads a model from a GGUF file: config from metadata, weights by name.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let file = GgufFile::open(path)?;
        Self::from_file(file)
    }

    pub fn from_file(file: GgufFile) -> Result<Self> {
        let vocab_hint = file
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).map(|&v| v as usize));
        let config = Config::from_metadata(&file.metadata, vocab_hint)?;
        let mut weights = Weights::load(&file, &config)?;
        weights.repack(&file)?;
        let mut vecs = Vec::with_capacity(config.n_layers);
        for l in &weights.layers {
            vecs.push(LayerVecs {
                attn_norm: ops::vector(&l.attn_norm, &file)?,
                bq: opt_vec(&l.bq, &file)?,
                bk: opt_vec(&l.bk, &file)?,
                bv: opt_vec(&l.bv, &file)?,
                q_norm: opt_vec(&l.q_norm, &file)?,
                k_norm: opt_vec(&l.k_norm, &file)?,
                post_attn_norm: opt_vec(&l.post_attn_norm, &file)?,
                ffn_norm: ops::vector(&l.ffn_norm, &file)?,
                post_ffn_norm: opt_vec(&l.post_ffn_norm, &file)?,
            });
        }
        let output_norm = ops::vector(&weights.output_norm, &file)?;
        Ok(Model {
            config,
            file,
            weights,
            vecs,
            output_norm,
        })
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

    /// A KV cache for `n_tokens` tokens in total (rounded up to whole blocks).
    pub fn new_cache(&self, n_tokens: usize) -> Result<KvCache> {
        let c = &self.config;
        KvCache::new(
            c.n_layers,
            c.n_kv_heads,
            c.head_dim,
            n_tokens.div_ceil(BLOCK_SIZE).max(1),
        )
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

    fn mm(
        &self,
        w: &Weight,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        act: &mut tl_core::MatmulScratch,
    ) -> Result<()> {
        ops::linear(x, m, w, w.bytes(&self.file), out, act)
    }

    /// Weights applied to the same input (Q, K, V; gate, up): with every one
    /// repacked, one shared quantization and pool dispatch for decode
    /// (`tl_core::matmul_packed_many`, the same bits); otherwise one by one.
    fn mm_many<const N: usize>(
        &self,
        ws: [&Weight; N],
        x: &[f32],
        m: usize,
        mut outs: [&mut [f32]; N],
        act: &mut tl_core::MatmulScratch,
    ) -> Result<()> {
        let packed = ws.map(|w| w.packed.as_deref());
        if let Some(first) = packed[0] {
            if packed.iter().all(Option::is_some) {
                let all = packed.map(|p| p.unwrap_or(first));
                return tl_core::matmul_packed_many(x, m, &all, &mut outs, act).map_err(|e| {
                    ModelError::Core {
                        tensor: ws.map(|w| w.name.as_str()).join("+"),
                        err: e,
                    }
                });
            }
        }
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            self.mm(w, x, m, out, act)?;
        }
        Ok(())
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
        let c = &self.config;
        let (d, qd, kvd, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.head_dim);
        st.meta.clear();
        st.out_rows.clear();
        for (si, s) in batch.iter().enumerate() {
            let end = s.pos + s.tokens.len();
            if s.kv.blocks.len() * BLOCK_SIZE < end {
                return Err(ModelError::Kv(format!(
                    "sequence {si}: block table covers {} tokens, step needs {end}",
                    s.kv.blocks.len() * BLOCK_SIZE
                )));
            }
            if end > c.context {
                return Err(ModelError::ContextOverflow {
                    needed: end,
                    context: c.context,
                });
            }
            for (j, &t) in s.tokens.iter().enumerate() {
                if t as usize >= c.vocab {
                    return Err(ModelError::BadToken {
                        token: t,
                        vocab: c.vocab,
                    });
                }
                let row = st.meta.len();
                st.meta.push((si, s.pos + j));
                let last = j + 1 == s.tokens.len();
                if s.logits == Logits::All || (s.logits == Logits::Last && last) {
                    st.out_rows.push(row);
                }
            }
        }
        let n = st.meta.len();
        st.last_logits = 0;
        if n == 0 {
            return Ok(&st.logits[..0]);
        }
        for b in [&mut st.x, &mut st.xn, &mut st.o] {
            grow(b, n * d);
        }
        grow(&mut st.q, n * qd);
        grow(&mut st.att, n * qd);
        grow(&mut st.k, n * kvd);
        grow(&mut st.v, n * kvd);
        grow(&mut st.gate, n * c.ffn);
        grow(&mut st.up, n * c.ffn);
        if st.attn.len() < n * c.n_kv_heads {
            st.attn.resize_with(n * c.n_kv_heads, AttnScratch::default);
        }

        // Embeddings.
        let emb = &self.weights.token_embd;
        let eb = emb.bytes(&self.file);
        let rb = emb.row_bytes();
        for (i, &(si, pos)) in st.meta.iter().enumerate() {
            let row = &mut st.x[i * d..(i + 1) * d];
            let t = batch[si].tokens[pos - batch[si].pos] as usize;
            let core = |e| ModelError::Core {
                tensor: emb.name.clone(),
                err: e,
            };
            // A table repacked for the output matmul (tied embeddings) is
            // read from its copy: the file's pages were given back, and
            // faulting rows in again maps whole runs of pages around each.
            let blocks = match &emb.packed {
                Some(p) => {
                    p.row_blocks(t, &mut st.emb_row).map_err(core)?;
                    &st.emb_row[..]
                }
                None => &eb[t * rb..(t + 1) * rb],
            };
            tl_core::quant::dequantize(emb.ty, blocks, row).map_err(core)?;
            if c.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= c.embed_scale);
            }
        }
        let dump = crate::dump::enabled();
        if dump {
            crate::dump::write("embd", None, &st.x[..n * d]);
        }

        let rope_mode = match c.rope_layout {
            RopeLayout::Neox => RopeMode::Neox,
            RopeLayout::Normal => RopeMode::Normal,
        };
        let rd = c.rope_dims;
        grow(&mut st.rope, n * rd);
        for (il, (lw, lv)) in self.weights.layers.iter().zip(&self.vecs).enumerate() {
            {
                let (x, xn) = (&st.x, SyncPtr(st.xn.as_mut_ptr()));
                each_row(n, &|i| {
                    // SAFETY: row `i` of `xn` (sized `n * d` above) is
                    // written by this call only.
                    let out = unsafe { row_mut(xn, i, d) };
                    kernels::rms_norm_row(&x[i * d..(i + 1) * d], &lv.attn_norm, c.rms_eps, out);
                });
            }
            if dump {
                crate::dump::write("attn_norm", Some(il), &st.xn[..n * d]);
            }
            self.mm_many(
                [&lw.wq, &lw.wk, &lw.wv],
                &st.xn,
                n,
                [
                    &mut st.q[..n * qd],
                    &mut st.k[..n * kvd],
                    &mut st.v[..n * kvd],
                ],
                &mut st.act,
            )?;
            if dump {
                crate::dump::write("Qcur-matmul", Some(il), &st.q[..n * qd]);
                crate::dump::write("Kcur-matmul", Some(il), &st.k[..n * kvd]);
                crate::dump::write("Vcur-matmul", Some(il), &st.v[..n * kvd]);
            }
            {
                // Biases, q/k norms and rotations, row by row.
                let (qp, kp, vp) = (
                    SyncPtr(st.q.as_mut_ptr()),
                    SyncPtr(st.k.as_mut_ptr()),
                    SyncPtr(st.v.as_mut_ptr()),
                );
                let rope = SyncPtr(st.rope.as_mut_ptr());
                let meta = &st.meta;
                let base = c.rope_base_for(il);
                each_row(n, &|i| {
                    // SAFETY: rows `i` of q, k, v (sized `n * qd`, `n * kvd`)
                    // and of the rotation table (`n * rd`) are touched by
                    // this call only.
                    let (q, k, v, cs) = unsafe {
                        (
                            row_mut(qp, i, qd),
                            row_mut(kp, i, kvd),
                            row_mut(vp, i, kvd),
                            row_mut(rope, i, rd),
                        )
                    };
                    for (buf, bias) in [(&mut *q, &lv.bq), (&mut *k, &lv.bk), (&mut *v, &lv.bv)] {
                        if let Some(b) = bias {
                            buf.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                        }
                    }
                    kernels::rope_cache(meta[i].1 as f32, base, 1.0, None, cs);
                    if let Some(qn) = &lv.q_norm {
                        kernels::rms_norm_rows_inplace(q, hd, qn, c.rms_eps);
                    }
                    if let Some(kn) = &lv.k_norm {
                        kernels::rms_norm_rows_inplace(k, hd, kn, c.rms_eps);
                    }
                    for head in q.chunks_exact_mut(hd) {
                        kernels::rope_rotate(head, cs, rope_mode);
                        if c.arch == Arch::Gemma3 {
                            head.iter_mut().for_each(|v| *v *= c.attn_scale);
                        }
                    }
                    for head in k.chunks_exact_mut(hd) {
                        kernels::rope_rotate(head, cs, rope_mode);
                    }
                });
            }
            if dump {
                crate::dump::write("Qcur", Some(il), &st.q[..n * qd]);
                crate::dump::write("Kcur", Some(il), &st.k[..n * kvd]);
                crate::dump::write("Vcur", Some(il), &st.v[..n * kvd]);
            }
            for i in 0..n {
                let (si, pos) = st.meta[i];
                let Some((block, slot)) = batch[si].kv.slot(pos) else {
                    return Err(ModelError::Kv(format!("no block for position {pos}")));
                };
                cache.write(
                    il,
                    block,
                    slot,
                    &st.k[i * kvd..(i + 1) * kvd],
                    &st.v[i * kvd..(i + 1) * kvd],
                );
            }
            let params = AttnParams {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                scale: if c.arch == Arch::Gemma3 {
                    1.0
                } else {
                    c.attn_scale
                },
                window: if c.is_swa_layer(il) {
                    c.sliding_window
                } else {
                    None
                },
            };
            {
                let cache_ref: &KvCache = cache;
                let meta = &st.meta;
                let q = &st.q;
                // One task per (token, KV head group): the group's query heads
                // are contiguous, so each task owns a disjoint output slice.
                let group = c.n_heads / c.n_kv_heads;
                let n_kv = c.n_kv_heads;
                let out_len = group * hd;
                let att = SyncPtr(st.att[..n * qd].as_mut_ptr());
                let scr = SyncPtr(st.attn[..n * n_kv].as_mut_ptr());
                // On the matmul pool, not rayon: two pools on the same cores
                // spin against each other between the ops of a step.
                tl_core::pool::ThreadPool::global().run(n * n_kv, &|idx| {
                    let (i, g) = (idx / n_kv, idx % n_kv);
                    let (si, pos) = meta[i];
                    let heads = g * group..(g + 1) * group;
                    // SAFETY: task `idx` alone touches output elements
                    // `idx * out_len..(idx + 1) * out_len` (inside the
                    // `n * qd` = `n * n_kv * out_len` sliced above) and
                    // scratch `idx` (inside `n * n_kv`); the pool returns
                    // only after every task is done, before `st` is used
                    // again.
                    let (out, scratch) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(att.get().add(idx * out_len), out_len),
                            &mut *scr.get().add(idx),
                        )
                    };
                    attend(
                        cache_ref,
                        il,
                        batch[si].kv,
                        pos,
                        &params,
                        heads.clone(),
                        &q[i * qd + heads.start * hd..i * qd + heads.end * hd],
                        out,
                        scratch,
                    );
                });
            }
            self.mm(&lw.wo, &st.att, n, &mut st.o, &mut st.act)?;
            if dump {
                crate::dump::write("kqv_out", Some(il), &st.att[..n * qd]);
                crate::dump::write("attn_out", Some(il), &st.o[..n * d]);
            }
            {
                let (xp, xnp, op) = (
                    SyncPtr(st.x.as_mut_ptr()),
                    SyncPtr(st.xn.as_mut_ptr()),
                    SyncPtr(st.o.as_mut_ptr()),
                );
                each_row(n, &|i| {
                    // SAFETY: rows `i` of x, xn and o (each sized `n * d`)
                    // are touched by this call only.
                    let (x, xn, o) =
                        unsafe { (row_mut(xp, i, d), row_mut(xnp, i, d), row_mut(op, i, d)) };
                    if let Some(pn) = &lv.post_attn_norm {
                        kernels::rms_norm_row_inplace(o, pn, c.rms_eps);
                    }
                    x.iter_mut().zip(o.iter()).for_each(|(x, y)| *x += y);
                    kernels::rms_norm_row(x, &lv.ffn_norm, c.rms_eps, xn);
                });
            }
            if dump {
                crate::dump::write("ffn_inp", Some(il), &st.x[..n * d]);
                crate::dump::write("ffn_norm", Some(il), &st.xn[..n * d]);
            }
            self.mm_many(
                [&lw.gate, &lw.up],
                &st.xn,
                n,
                [&mut st.gate[..n * c.ffn], &mut st.up[..n * c.ffn]],
                &mut st.act,
            )?;
            let f = c.ffn;
            if dump {
                crate::dump::write("ffn_gate", Some(il), &st.gate[..n * f]);
                crate::dump::write("ffn_up", Some(il), &st.up[..n * f]);
            }
            match c.ffn_act {
                FfnAct::Silu => kernels::silu_mul(&mut st.gate[..n * f], &st.up[..n * f]),
                FfnAct::Gelu => kernels::gelu_mul(&mut st.gate[..n * f], &st.up[..n * f]),
            }
            if dump {
                crate::dump::write("ffn_act", Some(il), &st.gate[..n * f]);
            }
            self.mm(&lw.down, &st.gate, n, &mut st.o, &mut st.act)?;
            if dump {
                crate::dump::write("ffn_out", Some(il), &st.o[..n * d]);
            }
            {
                let (xp, op) = (SyncPtr(st.x.as_mut_ptr()), SyncPtr(st.o.as_mut_ptr()));
                each_row(n, &|i| {
                    // SAFETY: rows `i` of x and o (each sized `n * d`) are
                    // touched by this call only.
                    let (x, o) = unsafe { (row_mut(xp, i, d), row_mut(op, i, d)) };
                    if let Some(pn) = &lv.post_ffn_norm {
                        kernels::rms_norm_row_inplace(o, pn, c.rms_eps);
                    }
                    x.iter_mut().zip(o.iter()).for_each(|(x, y)| *x += y);
                });
            }
            if dump {
                crate::dump::write("l_out", Some(il), &st.x[..n * d]);
            }
        }

        // Final norm and output projection, only for rows that want logits.
        let m = st.out_rows.len();
        grow(&mut st.hidden_out, m * d);
        grow(&mut st.logits, m * c.vocab);
        for (j, &r) in st.out_rows.iter().enumerate() {
            kernels::rms_norm_row(
                &st.x[r * d..(r + 1) * d],
                &self.output_norm,
                c.rms_eps,
                &mut st.hidden_out[j * d..(j + 1) * d],
            );
        }
        if dump {
            crate::dump::write("result_norm", None, &st.hidden_out[..m * d]);
        }
        let out_w = self
            .weights
            .output
            .as_ref()
            .unwrap_or(&self.weights.token_embd);
        ops::linear(
            &st.hidden_out,
            m,
            out_w,
            out_w.bytes(&self.file),
            &mut st.logits,
            &mut st.act,
        )?;
        if let Some(cap) = c.final_logit_softcap {
            for v in st.logits[..m * c.vocab].iter_mut() {
                *v = (*v / cap).tanh() * cap;
            }
        }
        st.last_logits = m * c.vocab;
        Ok(&st.logits[..m * c.vocab])
    }
}

/// A pointer handed to pool tasks that each touch a disjoint part of what
/// it points at.
struct SyncPtr<T>(*mut T);
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}
// SAFETY: users guarantee disjoint access per task (see the attention
// dispatch in `Model::forward`).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}
