//! The CPU executor of the forward stages: host buffers, the SIMD
//! quantized matmuls of tl-core (repacked weights, shared activation
//! quantization for Q/K/V and gate/up), per-row norms and RoPE on the
//! thread pool, and attention over the paged host cache per (token, KV
//! head group). In `--numerics reference` every kernel follows ggml's
//! portable float order, bit for bit.

use crate::attention::{attend, AttnParams};
use crate::config::{
    Config, FfnAct, MoeGating, NormKind, NormPlacement, QkNorm, RopeLayout, SWIGLU_OAI_ALPHA,
    SWIGLU_OAI_LIMIT,
};
use crate::error::{ModelError, Result};
use crate::forward::{Exec, Plan, Probe};
use crate::kv::KvCache;
use crate::model::{ForwardState, Model, SeqBatch};
use crate::ops;
use crate::weights::Weight;
use tl_core::cpu::kernels;
use tl_core::RopeMode;

pub(crate) struct CpuExec<'a> {
    pub m: &'a Model,
    pub cache: &'a mut KvCache,
    pub batch: &'a [SeqBatch<'a>],
    pub plan: &'a Plan,
    pub st: &'a mut ForwardState,
    /// The current layer's FFN was a mixture of experts, computed whole
    /// in `ffn_gate_up` (its result in `st.o`).
    pub moe: bool,
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

/// Adds a product's input `x` (`m` rows) to the importance-matrix sums of
/// each weight in `ws` that takes it, once per tensor (the row ranges of a
/// fused matrix are one entry). Nothing when no collector is installed.
fn collect(
    c: &mut Option<Box<crate::imatrix::ImatrixCollector>>,
    ws: &[&Weight],
    x: &[f32],
    m: usize,
) -> Result<()> {
    let Some(c) = c.as_deref_mut() else {
        return Ok(());
    };
    let cols = ws.first().map_or(0, |w| w.cols);
    let x = &x[..(m * cols).min(x.len())];
    for (i, w) in ws.iter().enumerate() {
        let name = crate::imatrix::tensor_name(&w.name);
        if ws[..i]
            .iter()
            .any(|p| crate::imatrix::tensor_name(&p.name) == name)
        {
            continue;
        }
        c.dense(&w.name, x, m)?;
    }
    Ok(())
}

/// `out = norm(x) · w` with the model's kind of norm.
fn norm_row(kind: NormKind, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    match kind {
        NormKind::Rms => kernels::rms_norm_row(x, w, eps, out),
        NormKind::Layer => kernels::layer_norm_row(x, w, eps, out),
    }
}

/// In-place [`norm_row`].
fn norm_row_inplace(kind: NormKind, x: &mut [f32], w: &[f32], eps: f32) {
    match kind {
        NormKind::Rms => kernels::rms_norm_row_inplace(x, w, eps),
        NormKind::Layer => kernels::layer_norm_row_inplace(x, w, eps),
    }
}

/// The Q or K norm of one token's projection `x` (all its heads).
fn qk_norm(c: &Config, x: &mut [f32], w: &[f32]) {
    let hd = c.head_dim;
    match c.qk_norm {
        QkNorm::None => {}
        QkNorm::Head => kernels::rms_norm_rows_inplace(x, hd, w, c.rms_eps),
        QkNorm::HeadWeights => {
            for (head, w) in x.chunks_exact_mut(hd).zip(w.chunks_exact(hd)) {
                norm_row_inplace(c.norm, head, w, c.rms_eps);
            }
        }
        QkNorm::Whole => norm_row_inplace(c.norm, x, w, c.rms_eps),
    }
}

/// ggml `swiglu_oai` (gpt-oss), in place on the gate: with `x` the gate
/// clamped above at the limit and `y` the up value clamped to ±the limit,
/// `x / (1 + e^(-α x)) · (y + 1)`.
fn swiglu_oai(g: &mut [f32], u: &[f32]) {
    for (g, &u) in g.iter_mut().zip(u) {
        let x = g.min(SWIGLU_OAI_LIMIT);
        let y = u.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT);
        let out_glu = x / (1.0 + (SWIGLU_OAI_ALPHA * -x).exp());
        *g = out_glu * (y + 1.0);
    }
}

/// The gated activation of `act` in place on `g`.
fn gated_act(act: FfnAct, g: &mut [f32], u: &[f32]) {
    match act {
        FfnAct::Silu => kernels::silu_mul(g, u),
        FfnAct::Gelu => kernels::gelu_mul(g, u),
        FfnAct::SwigluOai => swiglu_oai(g, u),
    }
}

/// Adds `bias` to each row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len().max(1)) {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

/// llama.cpp's `SOFTMAX_WEIGHT` gating: the `k` largest router logits
/// (`order[..k]`, rank order), weighted by a softmax over just those, as
/// ggml's `soft_max` computes it for a short row (f32 `expf`, the sum in
/// f64, one multiply by the f32 reciprocal).
fn softmax_selected(l: &[f32], order: &[usize], out: &mut [(usize, f32)]) {
    let max = order.iter().fold(f32::NEG_INFINITY, |m, &e| m.max(l[e]));
    let mut sum = 0f64;
    for (o, &e) in out.iter_mut().zip(order) {
        let v = (l[e] - max).exp();
        sum += f64::from(v);
        *o = (e, v);
    }
    let inv = (1.0 / sum) as f32;
    out.iter_mut().for_each(|o| o.1 *= inv);
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// An expert's output rows and its down product's input rows.
type Expert = (Vec<f32>, Vec<f32>);

impl CpuExec<'_> {
    /// A mixture-of-experts FFN over the step's rows (`st.xn` → `st.o`),
    /// as llama.cpp's `build_moe_ffn` with softmax gating: router logits,
    /// softmax, the top `n_expert_used` experts by probability, their
    /// probabilities renormalised to sum 1 (the sum clamped below at
    /// 2^-14); each expert runs once over the rows that chose it (its
    /// weights read once per step), and each row's output is the
    /// weighted sum of its experts' outputs in rank order.
    ///
    /// gpt-oss: the router's bias is added to its logits, the experts are
    /// the top `n_expert_used` logits weighted by a softmax over those
    /// ([`MoeGating::SoftmaxSelected`]), the experts' biases are added
    /// after each product and the activation is `swiglu_oai`.
    fn moe_ffn(&mut self, moe: &crate::weights::MoeWeights, il: usize) -> Result<()> {
        let c = &self.m.config;
        let lv = &self.m.vecs[il];
        let (n, d, f, ne, k) = (self.n(), c.d_model, c.ffn, c.n_expert, c.n_expert_used);
        let file = &self.m.file;
        let st = &mut *self.st;
        let mut logits = vec![0f32; n * ne];
        ops::linear(
            &st.xn[..n * d],
            n,
            &moe.router,
            moe.router.bytes(file),
            &mut logits,
            &mut st.act,
        )?;
        collect(&mut st.imatrix, &[&moe.router], &st.xn, n)?;
        if let Some(b) = &lv.router_b {
            add_rows(&mut logits, b);
        }
        // Per row: the chosen experts (rank order) and their weights.
        let mut chosen = vec![(0usize, 0f32); n * k];
        let mut order: Vec<usize> = Vec::with_capacity(ne);
        for t in 0..n {
            let l = &mut logits[t * ne..(t + 1) * ne];
            if c.moe_gating == MoeGating::SoftmaxSelected {
                order.clear();
                order.extend(0..ne);
                order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
                softmax_selected(l, &order[..k], &mut chosen[t * k..(t + 1) * k]);
                continue;
            }
            let max = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for v in l.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            l.iter_mut().for_each(|v| *v /= sum);
            order.clear();
            order.extend(0..ne);
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
            let wsum: f32 = if !c.moe_norm_weights {
                1.0
            } else {
                order[..k]
                    .iter()
                    .map(|&e| l[e])
                    .sum::<f32>()
                    .max(6.103_515_6e-5)
            };
            for (j, &e) in order[..k].iter().enumerate() {
                chosen[t * k + j] = (e, l[e] / wsum);
            }
        }
        // Each expert once, over the rows that chose it. With few rows
        // (decode) the experts run side by side on the pool, each one's
        // products on its thread (a nested `run` is inline); with many
        // (prefill) one after another, each product spread over the pool.
        let active: Vec<(usize, Vec<usize>)> = (0..ne)
            .filter_map(|e| {
                let slots: Vec<usize> = (0..n * k).filter(|&s| chosen[s].0 == e).collect();
                (!slots.is_empty()).then_some((e, slots))
            })
            .collect();
        let xn = &st.xn;
        let biases = lv.expert_b.as_ref();
        let ffn_act = c.ffn_act;
        let expert =
            |e: usize, slots: &[usize], act: &mut tl_core::MatmulScratch| -> Result<Expert> {
                let [wg, wu, wd] = &moe.experts[e];
                let m = slots.len();
                let mut x = Vec::with_capacity(m * d);
                for &s in slots {
                    let t = s / k;
                    x.extend_from_slice(&xn[t * d..(t + 1) * d]);
                }
                let (mut g, mut u, mut y) =
                    (vec![0f32; m * f], vec![0f32; m * f], vec![0f32; m * d]);
                ops::linear(&x, m, wg, wg.bytes(file), &mut g, act)?;
                ops::linear(&x, m, wu, wu.bytes(file), &mut u, act)?;
                if let Some([bg, bu, _]) = biases {
                    add_rows(&mut g, &bg[e * f..(e + 1) * f]);
                    add_rows(&mut u, &bu[e * f..(e + 1) * f]);
                }
                gated_act(ffn_act, &mut g, &u);
                ops::linear(&g, m, wd, wd.bytes(file), &mut y, act)?;
                if let Some([_, _, bd]) = biases {
                    add_rows(&mut y, &bd[e * d..(e + 1) * d]);
                }
                Ok((y, g))
            };
        let ys: Vec<Result<Expert>> = if n <= 4 {
            let cells: Vec<std::sync::Mutex<Option<Result<Expert>>>> =
                active.iter().map(|_| std::sync::Mutex::new(None)).collect();
            tl_core::pool::ThreadPool::global().run(active.len(), &|i| {
                let mut act = tl_core::MatmulScratch::default();
                let r = expert(active[i].0, &active[i].1, &mut act);
                if let Ok(mut c) = cells[i].lock() {
                    *c = Some(r);
                }
            });
            cells
                .into_iter()
                .map(|c| {
                    c.into_inner().ok().flatten().unwrap_or_else(|| {
                        Err(ModelError::Device("an expert's product did not run".into()))
                    })
                })
                .collect()
        } else {
            let mut act = std::mem::take(&mut st.act);
            let r = active
                .iter()
                .map(|(e, slots)| expert(*e, slots, &mut act))
                .collect();
            st.act = act;
            r
        };
        let mut outs = vec![0f32; n * k * d];
        for ((e, slots), y) in active.iter().zip(ys) {
            let (y, g) = y?;
            if let Some(c) = st.imatrix.as_deref_mut() {
                // The expert's input rows: gate and up take the normed
                // rows of the tokens that chose it, down its activations.
                let [wg, wu, wd] = &moe.experts[*e];
                for &s in slots.iter() {
                    let t = s / k;
                    let row = &st.xn[t * d..(t + 1) * d];
                    c.expert(&wg.name, ne, *e, row, d)?;
                    c.expert(&wu.name, ne, *e, row, d)?;
                }
                c.expert(&wd.name, ne, *e, &g, f)?;
            }
            for (i, &s) in slots.iter().enumerate() {
                let w = chosen[s].1;
                for (o, v) in outs[s * d..(s + 1) * d]
                    .iter_mut()
                    .zip(&y[i * d..(i + 1) * d])
                {
                    *o = v * w;
                }
            }
        }
        for t in 0..n {
            let o = &mut st.o[t * d..(t + 1) * d];
            o.copy_from_slice(&outs[t * k * d..(t * k + 1) * d]);
            for j in 1..k {
                let s = t * k + j;
                o.iter_mut()
                    .zip(&outs[s * d..(s + 1) * d])
                    .for_each(|(a, b)| *a += b);
            }
        }
        // The shared expert (qwen2moe), gated per row by
        // sigmoid(x · w), computed as ggml does: silu(z) / z.
        if let Some(([wg, wu, wd], wgate)) = &moe.shared {
            let fs = c.ffn_shared;
            let (mut g, mut u, mut y) = (vec![0f32; n * fs], vec![0f32; n * fs], vec![0f32; n * d]);
            let mut z = vec![0f32; n];
            let x = &st.xn[..n * d];
            ops::linear(x, n, wg, wg.bytes(file), &mut g, &mut st.act)?;
            ops::linear(x, n, wu, wu.bytes(file), &mut u, &mut st.act)?;
            kernels::silu_mul(&mut g, &u);
            ops::linear(&g, n, wd, wd.bytes(file), &mut y, &mut st.act)?;
            ops::linear(x, n, wgate, wgate.bytes(file), &mut z, &mut st.act)?;
            collect(&mut st.imatrix, &[wg, wu, wgate], x, n)?;
            collect(&mut st.imatrix, &[wd], &g, n)?;
            for t in 0..n {
                let zt = z[t];
                let gate = (zt / (1.0 + (-zt).exp())) / zt;
                st.o[t * d..(t + 1) * d]
                    .iter_mut()
                    .zip(&y[t * d..(t + 1) * d])
                    .for_each(|(o, v)| *o += v * gate);
            }
        }
        Ok(())
    }

    fn n(&self) -> usize {
        self.plan.n_tokens()
    }

    /// Sizes the buffers for this step (they only grow).
    pub fn prepare(&mut self) {
        let c = &self.m.config;
        let (n, d, qd, kvd) = (self.n(), c.d_model, c.q_dim(), c.kv_dim());
        let st = &mut *self.st;
        for b in [&mut st.x, &mut st.xn, &mut st.o] {
            grow(b, n * d);
        }
        grow(&mut st.q, n * qd);
        grow(&mut st.att, n * qd);
        grow(&mut st.k, n * kvd);
        grow(&mut st.v, n * kvd);
        grow(&mut st.gate, n * c.ffn);
        grow(&mut st.up, n * c.ffn);
        grow(&mut st.rope, n * c.rope_dims);
        if c.norm_placement == NormPlacement::Parallel {
            grow(&mut st.attn_o, n * d);
        }
        if st.attn.len() < n * c.n_kv_heads {
            st.attn
                .resize_with(n * c.n_kv_heads, crate::attention::AttnScratch::default);
        }
    }
}

impl Exec for CpuExec<'_> {
    fn embed(&mut self) -> Result<()> {
        let c = &self.m.config;
        let d = c.d_model;
        let emb = &self.m.weights.token_embd;
        let eb = emb.bytes(&self.m.file);
        let rb = emb.row_bytes();
        let st = &mut *self.st;
        for (i, &(si, pos)) in self.plan.meta.iter().enumerate() {
            let row = &mut st.x[i * d..(i + 1) * d];
            let t = self.batch[si].tokens[pos - self.batch[si].pos] as usize;
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
        Ok(())
    }

    fn attn_norm(&mut self, il: usize) -> Result<()> {
        let c = &self.m.config;
        let (n, d, eps) = (self.n(), c.d_model, c.rms_eps);
        let Some(w) = &self.m.vecs[il].attn_norm else {
            // No pre-norm: attention reads the residual stream.
            let st = &mut *self.st;
            st.xn[..n * d].copy_from_slice(&st.x[..n * d]);
            return Ok(());
        };
        let (x, xn) = (&self.st.x, SyncPtr(self.st.xn.as_mut_ptr()));
        each_row(n, &|i| {
            // SAFETY: row `i` of `xn` (sized `n * d` in `prepare`) is
            // written by this call only.
            let out = unsafe { row_mut(xn, i, d) };
            norm_row(c.norm, &x[i * d..(i + 1) * d], w, eps, out);
        });
        Ok(())
    }

    fn qkv(&mut self, il: usize) -> Result<()> {
        let c = &self.m.config;
        let (n, qd, kvd) = (self.n(), c.q_dim(), c.kv_dim());
        let lw = &self.m.weights.layers[il];
        let st = &mut *self.st;
        self.m.exec_cpu_mm_many(
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
        collect(&mut st.imatrix, &[&lw.wq, &lw.wk, &lw.wv], &st.xn, n)
    }

    fn rope_store_kv(&mut self, il: usize) -> Result<()> {
        let c = &self.m.config;
        let (n, qd, kvd, hd, rd) = (self.n(), c.q_dim(), c.kv_dim(), c.head_dim, c.rope_dims);
        let lv = &self.m.vecs[il];
        let rope_mode = match c.rope_layout {
            RopeLayout::Neox => RopeMode::Neox,
            RopeLayout::Normal => RopeMode::Normal,
        };
        let st = &mut *self.st;
        {
            // Biases, q/k norms and rotations, row by row.
            let (qp, kp, vp) = (
                SyncPtr(st.q.as_mut_ptr()),
                SyncPtr(st.k.as_mut_ptr()),
                SyncPtr(st.v.as_mut_ptr()),
            );
            let rope = SyncPtr(st.rope.as_mut_ptr());
            let meta = &self.plan.meta;
            let base = c.rope_base_for(il);
            let use_rope = c.rope_in_layer(il);
            let yarn = c.rope_scaling_for(il).map(|y| kernels::YarnRope {
                freq_scale: y.freq_scale,
                ext_factor: y.ext_factor,
                attn_factor: y.attn_factor,
                corr_dims: kernels::rope_yarn_corr_dims(
                    rd,
                    y.n_ctx_orig,
                    base,
                    y.beta_fast,
                    y.beta_slow,
                ),
            });
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
                if use_rope {
                    let ff = self.m.rope_freqs.as_deref();
                    let pos = meta[i].1 as f32;
                    match &yarn {
                        Some(y) => kernels::rope_cache_yarn(pos, base, y, ff, cs),
                        None => kernels::rope_cache(pos, base, 1.0, ff, cs),
                    }
                }
                if let Some(qn) = &lv.q_norm {
                    qk_norm(c, q, qn);
                }
                if let Some(kn) = &lv.k_norm {
                    qk_norm(c, k, kn);
                }
                // Mistral 3's temperature: the query times a factor of
                // its position, after RoPE.
                let temp = c.attn_temp.map(|t| t.at(meta[i].1));
                for head in q.chunks_exact_mut(hd) {
                    if use_rope {
                        kernels::rope_rotate(head, cs, rope_mode);
                    }
                    if let Some(t) = temp {
                        head.iter_mut().for_each(|v| *v *= t);
                    }
                    if c.prescale_q() {
                        head.iter_mut().for_each(|v| *v *= c.attn_scale);
                    }
                }
                if use_rope {
                    for head in k.chunks_exact_mut(hd) {
                        kernels::rope_rotate(head, cs, rope_mode);
                    }
                }
            });
        }
        let kv = self.cache.host_mut()?;
        for i in 0..n {
            let (si, pos) = self.plan.meta[i];
            let Some((block, slot)) = self.batch[si].kv.slot(pos) else {
                return Err(ModelError::Kv(format!("no block for position {pos}")));
            };
            kv.write(
                il,
                block,
                slot,
                &st.k[i * kvd..(i + 1) * kvd],
                &st.v[i * kvd..(i + 1) * kvd],
            );
        }
        Ok(())
    }

    fn attention(&mut self, il: usize) -> Result<()> {
        let c = &self.m.config;
        let (n, qd, hd) = (self.n(), c.q_dim(), c.head_dim);
        let mut params = AttnParams::for_layer(c, il);
        params.sinks = self.m.vecs[il].sinks.clone();
        let cache_ref: &KvCache = self.cache;
        cache_ref.host()?;
        let meta = &self.plan.meta;
        let batch = self.batch;
        let st = &mut *self.st;
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
        Ok(())
    }

    fn attn_out(&mut self, il: usize) -> Result<()> {
        let n = self.n();
        let st = &mut *self.st;
        let w = &self.m.weights.layers[il].wo;
        ops::linear(&st.att, n, w, w.bytes(&self.m.file), &mut st.o, &mut st.act)?;
        if let Some(b) = &self.m.vecs[il].bo {
            add_rows(&mut st.o[..n * self.m.config.d_model], b);
        }
        collect(&mut st.imatrix, &[w], &st.att, n)
    }

    fn attn_residual(&mut self, il: usize) -> Result<()> {
        let c = &self.m.config;
        let (n, d) = (self.n(), c.d_model);
        let lv = &self.m.vecs[il];
        let st = &mut *self.st;
        if c.norm_placement == NormPlacement::Parallel {
            // The FFN reads the attention's norm (still in `xn`); the
            // attention output waits for the FFN's in `attn_o`.
            std::mem::swap(&mut st.o, &mut st.attn_o);
            return Ok(());
        }
        let (xp, xnp, op) = (
            SyncPtr(st.x.as_mut_ptr()),
            SyncPtr(st.xn.as_mut_ptr()),
            SyncPtr(st.o.as_mut_ptr()),
        );
        each_row(n, &|i| {
            // SAFETY: rows `i` of x, xn and o (each sized `n * d`)
            // are touched by this call only.
            let (x, xn, o) = unsafe { (row_mut(xp, i, d), row_mut(xnp, i, d), row_mut(op, i, d)) };
            if let Some(pn) = &lv.post_attn_norm {
                kernels::rms_norm_row_inplace(o, pn, c.rms_eps);
            }
            if c.residual_scale != 1.0 {
                o.iter_mut().for_each(|v| *v *= c.residual_scale);
            }
            x.iter_mut().zip(o.iter()).for_each(|(x, y)| *x += y);
            match &lv.ffn_norm {
                Some(w) => norm_row(c.norm, x, w, c.rms_eps, xn),
                None => xn.copy_from_slice(x),
            }
        });
        Ok(())
    }

    fn ffn_gate_up(&mut self, il: usize) -> Result<()> {
        let (n, f) = (self.n(), self.m.config.ffn);
        let lw = &self.m.weights.layers[il];
        self.moe = lw.moe.is_some();
        if let Some(moe) = &lw.moe {
            return self.moe_ffn(moe, il);
        }
        let st = &mut *self.st;
        self.m.exec_cpu_mm_many(
            [&lw.gate, &lw.up],
            &st.xn,
            n,
            [&mut st.gate[..n * f], &mut st.up[..n * f]],
            &mut st.act,
        )?;
        collect(&mut st.imatrix, &[&lw.gate, &lw.up], &st.xn, n)
    }

    fn ffn_act(&mut self) -> Result<()> {
        if self.moe {
            return Ok(());
        }
        let (n, f) = (self.n(), self.m.config.ffn);
        let st = &mut *self.st;
        gated_act(
            self.m.config.ffn_act,
            &mut st.gate[..n * f],
            &st.up[..n * f],
        );
        Ok(())
    }

    fn ffn_down(&mut self, il: usize) -> Result<()> {
        if self.moe {
            return Ok(());
        }
        let n = self.n();
        let st = &mut *self.st;
        let w = &self.m.weights.layers[il].down;
        ops::linear(
            &st.gate,
            n,
            w,
            w.bytes(&self.m.file),
            &mut st.o,
            &mut st.act,
        )?;
        collect(&mut st.imatrix, &[w], &st.gate, n)
    }

    fn ffn_residual(&mut self, il: usize) -> Result<()> {
        let c = &self.m.config;
        let (n, d) = (self.n(), c.d_model);
        let lv = &self.m.vecs[il];
        let st = &mut *self.st;
        if c.norm_placement == NormPlacement::Parallel {
            // llama.cpp's order: (ffn + x) + attn.
            let (x, o, a) = (&mut st.x[..n * d], &st.o[..n * d], &st.attn_o[..n * d]);
            for ((x, o), a) in x.iter_mut().zip(o).zip(a) {
                *x = (*o + *x) + *a;
            }
            return Ok(());
        }
        let (xp, op) = (SyncPtr(st.x.as_mut_ptr()), SyncPtr(st.o.as_mut_ptr()));
        each_row(n, &|i| {
            // SAFETY: rows `i` of x and o (each sized `n * d`) are
            // touched by this call only.
            let (x, o) = unsafe { (row_mut(xp, i, d), row_mut(op, i, d)) };
            if let Some(pn) = &lv.post_ffn_norm {
                kernels::rms_norm_row_inplace(o, pn, c.rms_eps);
            }
            if c.residual_scale != 1.0 {
                o.iter_mut().for_each(|v| *v *= c.residual_scale);
            }
            x.iter_mut().zip(o.iter()).for_each(|(x, y)| *x += y);
        });
        Ok(())
    }

    fn logits(&mut self) -> Result<()> {
        // Final norm and output projection, only for rows that want logits.
        let c = &self.m.config;
        let d = c.d_model;
        let m = self.plan.out_rows.len();
        let st = &mut *self.st;
        grow(&mut st.hidden_out, m * d);
        grow(&mut st.logits, m * c.vocab);
        for (j, &r) in self.plan.out_rows.iter().enumerate() {
            norm_row(
                c.norm,
                &st.x[r * d..(r + 1) * d],
                &self.m.output_norm,
                c.rms_eps,
                &mut st.hidden_out[j * d..(j + 1) * d],
            );
        }
        let out_w = self.m.output_weight();
        ops::linear(
            &st.hidden_out,
            m,
            out_w,
            out_w.bytes(&self.m.file),
            &mut st.logits,
            &mut st.act,
        )?;
        collect(&mut st.imatrix, &[out_w], &st.hidden_out, m)?;
        if c.logit_mul != 1.0 {
            let s = c.logit_mul;
            st.logits[..m * c.vocab].iter_mut().for_each(|v| *v *= s);
        }
        if let Some(cap) = c.final_logit_softcap {
            for v in st.logits[..m * c.vocab].iter_mut() {
                *v = (*v * (1.0 / cap)).tanh() * cap;
            }
        }
        st.last_logits = m * c.vocab;
        Ok(())
    }

    fn dump(&mut self, what: Probe, il: Option<usize>) -> Result<()> {
        use crate::dump::write;
        let c = &self.m.config;
        let (n, d, qd, kvd, f) = (self.n(), c.d_model, c.q_dim(), c.kv_dim(), c.ffn);
        let st = &*self.st;
        match what {
            Probe::Embd => write("embd", il, &st.x[..n * d]),
            Probe::AttnNorm => write("attn_norm", il, &st.xn[..n * d]),
            Probe::QkvMatmul | Probe::QkvRoped => {
                let sfx = if matches!(what, Probe::QkvMatmul) {
                    "-matmul"
                } else {
                    ""
                };
                write(&format!("Qcur{sfx}"), il, &st.q[..n * qd]);
                write(&format!("Kcur{sfx}"), il, &st.k[..n * kvd]);
                write(&format!("Vcur{sfx}"), il, &st.v[..n * kvd]);
            }
            Probe::KqvOut => write("kqv_out", il, &st.att[..n * qd]),
            Probe::AttnOut => write("attn_out", il, &st.o[..n * d]),
            Probe::FfnInp => write("ffn_inp", il, &st.x[..n * d]),
            Probe::FfnNorm => write("ffn_norm", il, &st.xn[..n * d]),
            Probe::FfnGateUp => {
                write("ffn_gate", il, &st.gate[..n * f]);
                write("ffn_up", il, &st.up[..n * f]);
            }
            Probe::FfnAct => write("ffn_act", il, &st.gate[..n * f]),
            Probe::FfnOut => write("ffn_out", il, &st.o[..n * d]),
            Probe::LOut => write("l_out", il, &st.x[..n * d]),
            Probe::ResultNorm => {
                let m = self.plan.out_rows.len();
                write("result_norm", il, &st.hidden_out[..m * d])
            }
        }
        Ok(())
    }
}

impl Model {
    /// Weights applied to the same input (Q, K, V; gate, up): with every one
    /// repacked, one shared quantization and pool dispatch for decode
    /// (`tl_core::matmul_packed_many`, the same bits); otherwise one by one.
    pub(crate) fn exec_cpu_mm_many<const N: usize>(
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
            ops::linear(x, m, w, w.bytes(&self.file), out, act)?;
        }
        Ok(())
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
// dispatch above).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}
