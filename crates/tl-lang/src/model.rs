//! Model values: a GGUF model opened by `load_model`, its weight tree
//! (`model.blk[i].attn_q.weight` is the GGUF tensor `blk.i.attn_q.weight`,
//! a zero-copy view of the mapped file that keeps its block format), its
//! config, and the paged KV cache that `attention` writes in place.
//!
//! Attention is tl-model's own (`tl_model::attention::attend` over a
//! `KvCache` with a `SeqKv` block table), so a program attends exactly as
//! the native forward does.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::sync::Mutex;

use tl_core::Tensor;
use tl_model::attention::{attend, AttnParams, AttnScratch};
use tl_model::config::{Arch, Config};
use tl_model::kv::{BlockManager, KvCache, SeqKv};
use tl_model::llm::Llm;

use crate::diag::Span;
use crate::error::{LangError, Result};
use crate::value::{TData, Tens, Value};

pub struct ModelVal {
    pub path: String,
    pub llm: Llm,
    /// Names already resolved, so a loop reading `model.blk[i]…` every
    /// step builds each view once and scans the tensor list once per name.
    resolved: RefCell<HashMap<String, Resolved>>,
}

#[derive(Clone)]
enum Resolved {
    Tensor(Rc<Tens>),
    Prefix,
}

impl fmt::Debug for ModelVal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelVal({})", self.path)
    }
}

fn model_err(span: Span, op: &'static str) -> impl Fn(tl_model::ModelError) -> LangError {
    move |source| LangError::Model {
        span,
        op,
        source: Box::new(source),
    }
}

impl ModelVal {
    pub fn load(path: &str, device: tl_core::Device, span: Span) -> Result<Rc<ModelVal>> {
        // `~/` as a shell would expand it, so programs can name the model
        // cache without knowing the home folder.
        let full = match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
            (Some(rest), Some(home)) => std::path::Path::new(&home).join(rest),
            _ => std::path::PathBuf::from(path),
        };
        let llm = Llm::load_on(&full, device).map_err(|e| LangError::Io {
            span: Some(span),
            path: path.to_string(),
            message: e.to_string(),
        })?;
        Ok(Rc::new(ModelVal {
            path: path.to_string(),
            llm,
            resolved: RefCell::new(HashMap::new()),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.llm.model.config
    }

    /// `model.<path>.<field>`: a config value, a tensor, or a longer prefix.
    /// Config fields are listed in docs/LANGUAGE.md.
    pub fn field(self: &Rc<Self>, path: Option<&str>, field: &str, span: Span) -> Result<Value> {
        if path == Some("config") {
            return self.config_field(field, span);
        }
        if path.is_none() && field == "config" {
            return Ok(Value::Node(self.clone(), "config".into()));
        }
        let name = match path {
            Some(p) => format!("{p}.{field}"),
            None => field.to_string(),
        };
        let hit = self.resolved.borrow().get(&name).cloned();
        match hit {
            Some(Resolved::Tensor(t)) => return Ok(Value::Tensor(t)),
            Some(Resolved::Prefix) => return Ok(Value::Node(self.clone(), name.into())),
            None => {}
        }
        let file = &self.llm.model.file;
        if let Some(info) = file.tensor(&name) {
            let t = Tensor::from_gguf(file, info).map_err(|source| LangError::Kernel {
                span,
                op: "model weight",
                source,
            })?;
            if let Some(p) = self.llm.model.packed_weight(&name) {
                crate::builtins::register_packed(file.tensor_data(info), p);
            }
            if self.llm.model.device().is_gpu() {
                crate::builtins::register_device(file.tensor_data(info), self, &name);
            }
            let tens = Rc::new(Tens {
                shape: t.dims().to_vec(),
                data: TData::Core(t),
            });
            self.resolved
                .borrow_mut()
                .insert(name, Resolved::Tensor(tens.clone()));
            return Ok(Value::Tensor(tens));
        }
        let prefix = format!("{name}.");
        if file.tensors.iter().any(|t| t.name.starts_with(&prefix)) {
            self.resolved
                .borrow_mut()
                .insert(name.clone(), Resolved::Prefix);
            return Ok(Value::Node(self.clone(), name.into()));
        }
        Err(LangError::Undefined {
            span,
            what: "model tensor",
            name,
        })
    }

    /// `model.blk[i]`.
    pub fn index(self: &Rc<Self>, path: &str, i: i64, span: Span) -> Result<Value> {
        let n = self.config().n_layers;
        if path == "blk" && (i < 0 || i as usize >= n) {
            return Err(LangError::Index {
                span,
                index: i,
                len: n,
            });
        }
        Ok(Value::Node(self.clone(), format!("{path}.{i}").into()))
    }

    fn config_field(&self, field: &str, span: Span) -> Result<Value> {
        let c = self.config();
        let int = |n: usize| Value::Int(n as i64);
        // The f64 nearest the f32's shortest decimal (1e-6, not
        // 9.99999997e-7); it converts back to the same f32.
        let float = |x: f32| Value::Float(x.to_string().parse().unwrap_or(f64::from(x)));
        Ok(match field {
            "n_layers" => int(c.n_layers),
            "d_model" => int(c.d_model),
            "n_heads" => int(c.n_heads),
            "n_kv_heads" => int(c.n_kv_heads),
            "head_dim" => int(c.head_dim),
            "ffn" => int(c.ffn),
            "vocab" => int(c.vocab),
            "context" => int(c.context),
            "rope_base" => float(c.rope_base),
            "rope_base_swa" => float(c.rope_base_swa),
            "sliding_window" => int(c.sliding_window.unwrap_or(0)),
            "swa_period" => int(c.swa_period),
            "rms_eps" => float(c.rms_eps),
            "embed_scale" => float(c.embed_scale),
            "arch" => Value::Str(c.arch.name().into()),
            other => {
                return Err(LangError::Undefined {
                    span,
                    what: "config field",
                    name: other.to_string(),
                })
            }
        })
    }
}

/// A paged KV cache for one sequence of a model.
pub struct CacheVal {
    /// The model whose layers the cache holds (its device runs `attention`
    /// when the cache is in device memory).
    model: Rc<ModelVal>,
    config: Config,
    kv: KvCache,
    mgr: BlockManager,
    seq: SeqKv,
    /// One per (token, KV head) task of a step, reused across steps.
    scratch: Vec<Mutex<AttnScratch>>,
    capacity: usize,
}

impl fmt::Debug for CacheVal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheVal({} tokens)", self.capacity)
    }
}

impl CacheVal {
    pub fn new(m: &Rc<ModelVal>, n_tokens: usize, span: Span) -> Result<CacheVal> {
        let kv = m
            .llm
            .model
            .new_cache(n_tokens)
            .map_err(model_err(span, "kv_cache"))?;
        let mgr = BlockManager::new(kv.n_blocks);
        Ok(CacheVal {
            model: m.clone(),
            config: m.config().clone(),
            kv,
            mgr,
            seq: SeqKv::new(),
            scratch: Vec::new(),
            capacity: n_tokens,
        })
    }

    /// The queries and parameters layer `layer` attends with. Gemma: the
    /// native forward scales the queries before attention (and attends
    /// with scale 1); doing the same keeps the f16 rounding of the scaled
    /// queries, so the numbers agree exactly. Windowed layers (gemma,
    /// gpt-oss) get the window; gpt-oss its sink logits.
    fn layer_query<'q>(&self, q: &'q [f32], layer: usize) -> (Cow<'q, [f32]>, AttnParams) {
        let c = &self.config;
        let gemma = matches!(c.arch, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3);
        let params = AttnParams {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: if gemma { 1.0 } else { c.attn_scale },
            window: if c.is_swa_layer(layer) {
                c.sliding_window
            } else {
                None
            },
            softcap: c.attn_logit_softcap,
            sinks: self.sinks(layer),
        };
        let q = if gemma {
            Cow::Owned(q.iter().map(|v| v * c.attn_scale).collect())
        } else {
            Cow::Borrowed(q)
        };
        (q, params)
    }

    /// gpt-oss's sink logits of `layer` (`blk.N.attn_sinks.weight`, which
    /// the model's load checked); `None` for the other architectures.
    fn sinks(&self, layer: usize) -> Option<std::sync::Arc<[f32]>> {
        if self.config.arch != Arch::GptOss {
            return None;
        }
        let file = &self.model.llm.model.file;
        let t = file.tensor(&format!("blk.{layer}.attn_sinks.weight"))?;
        let mut v = vec![0f32; self.config.n_heads];
        tl_core::quant::dequantize(t.ty, file.tensor_data(t), &mut v).ok()?;
        Some(v.into())
    }

    /// [`CacheVal::attention`] on the model's GPU: the positions' blocks
    /// are already reserved; the device writes K/V and attends.
    #[allow(clippy::too_many_arguments)]
    fn attention_on_device(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        layer: usize,
        pos: usize,
        span: Span,
    ) -> Result<Vec<f32>> {
        let (q, params) = self.layer_query(q, layer);
        let out = self
            .model
            .llm
            .model
            .device_attention(&self.kv, layer, &params, pos, &self.seq.blocks, &q, k, v, t)
            .map_err(model_err(span, "attention"))?
            .ok_or_else(|| LangError::invalid(span, "attention: the KV cache is not on a GPU"))?;
        self.seq.len = self.seq.len.max(pos + t);
        Ok(out)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How `attention` of `t` tokens at `pos` in `layer` is differentiated
    /// (see [`crate::autodiff::AttnSpec`]), or why it is not: only a call
    /// that attends over its own tokens alone (`pos` 0: nothing an earlier
    /// call cached, whose gradient would be lost), in a host cache of f16
    /// values, without a window that hides keys, score soft-capping or
    /// sink logits.
    pub fn grad_spec(
        &self,
        layer: usize,
        pos: usize,
        t: usize,
    ) -> std::result::Result<crate::autodiff::AttnSpec, String> {
        let c = &self.config;
        if pos != 0 {
            return Err(format!(
                "attention at position {pos} (its gradient would miss the earlier positions' keys and values; attend over the whole sequence in one call at position 0)"
            ));
        }
        if !self.kv.is_host() || self.kv.kv_type != tl_model::kv::KvType::F16 {
            return Err("attention over a quantized or device KV cache".into());
        }
        let (_, params) = self.layer_query(&[], layer);
        if params.softcap.is_some() || params.sinks.is_some() {
            return Err("attention with soft-capped scores or sink logits".into());
        }
        if params.window.is_some_and(|w| w < t) {
            return Err("attention with a sliding window shorter than the sequence".into());
        }
        let gemma = matches!(c.arch, Arch::Gemma2 | Arch::Gemma3);
        Ok(crate::autodiff::AttnSpec {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            q_mul: if gemma { c.attn_scale } else { 1.0 },
            scale: params.scale,
        })
    }

    /// Writes K/V rows of tokens at positions `pos..pos + t` of `layer`,
    /// then attends each token's queries over positions `0..=its own`.
    /// `q` is `[t, n_heads * head_dim]`, `k` and `v` `[t, n_kv_heads *
    /// head_dim]`; the result is `[t, n_heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        layer: usize,
        pos: usize,
        span: Span,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (hd, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
        if q.len() != t * qd || k.len() != t * kvd || v.len() != t * kvd {
            return Err(LangError::shape(
                span,
                format!(
                    "attention: q, k, v of {t} tokens need {qd}, {kvd}, {kvd} values per token"
                ),
            ));
        }
        if layer >= c.n_layers {
            return Err(LangError::Index {
                span,
                index: layer as i64,
                len: c.n_layers,
            });
        }
        let end = pos + t;
        if end
            > self
                .capacity
                .max(self.kv.n_blocks * tl_model::kv::BLOCK_SIZE)
        {
            return Err(LangError::Limit {
                span,
                message: format!(
                    "attention at positions up to {end} overflows a KV cache of {} tokens",
                    self.capacity
                ),
            });
        }
        if pos > self.seq.len {
            return Err(LangError::invalid(
                span,
                format!(
                    "attention at position {pos} but only {} positions are cached",
                    self.seq.len
                ),
            ));
        }
        if end > self.seq.len {
            let more = end - self.seq.len;
            self.seq
                .reserve(&mut self.mgr, more)
                .map_err(model_err(span, "attention"))?;
        }
        if !self.kv.is_host() {
            return self.attention_on_device(q, k, v, t, layer, pos, span);
        }
        for i in 0..t {
            let Some((block, slot)) = self.seq.slot(pos + i) else {
                return Err(LangError::invalid(span, "attention: no KV block"));
            };
            self.kv.write(
                layer,
                block,
                slot,
                &k[i * kvd..(i + 1) * kvd],
                &v[i * kvd..(i + 1) * kvd],
            );
        }
        // Positions cached so far, by any layer: a program runs each step's
        // layers in turn, each at the same `pos`.
        self.seq.len = self.seq.len.max(end);
        let (q, params) = self.layer_query(q, layer);
        let q: &[f32] = &q;
        // One task per (token, KV head group), on the matmul thread pool as
        // the native forward does: a group's query heads are contiguous, so
        // each task owns one output chunk (locks are never contended).
        let group = c.n_heads / c.n_kv_heads.max(1);
        let chunk = group * hd;
        let n_tasks = t * c.n_kv_heads;
        if self.scratch.len() < n_tasks {
            self.scratch
                .resize_with(n_tasks, || Mutex::new(AttnScratch::default()));
        }
        let mut out = vec![0.0f32; t * qd];
        if chunk > 0 {
            let outs: Vec<Mutex<&mut [f32]>> = out.chunks_mut(chunk).map(Mutex::new).collect();
            let (kv, seq, scratch, params) = (&self.kv, &self.seq, &self.scratch, &params);
            tl_core::pool::ThreadPool::global().run(n_tasks, &|idx| {
                let (i, g) = (idx / c.n_kv_heads, idx % c.n_kv_heads);
                let heads = g * group..(g + 1) * group;
                let (Some(o), Some(sc)) = (outs.get(idx), scratch.get(idx)) else {
                    return;
                };
                let (Ok(mut o), Ok(mut sc)) = (o.lock(), sc.lock()) else {
                    return;
                };
                attend(
                    kv,
                    layer,
                    seq,
                    pos + i,
                    params,
                    heads.clone(),
                    &q[i * qd + heads.start * hd..i * qd + heads.end * hd],
                    &mut o,
                    &mut sc,
                );
            });
        }
        Ok(out)
    }
}
