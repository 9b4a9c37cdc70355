//! Weights looked up by their GGUF names, validated against the config's
//! shapes at load. A weight borrows its bytes from the memory-mapped file;
//! [`Weights::repack`] gives the matmul weights of the 32-value types an
//! owned copy in the layout of this CPU's kernels instead.

use tl_gguf::{GgmlType, GgufFile, TensorInfo};

use crate::config::{Arch, Config, NormPlacement, QkNorm};
use crate::error::{ModelError, Result};

/// A 2-D weight of `rows` output rows by `cols` inputs (GGML dims `[cols, rows]`),
/// or a 1-D vector (`rows == 1`).
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    start: usize,
    len: usize,
    /// The same weight repacked for this CPU's kernels (see
    /// [`Weights::repack`]); the matmul then reads this copy.
    pub packed: Option<std::sync::Arc<tl_core::PackedWeight>>,
}

impl Weight {
    /// A weight description over `len` bytes at offset 0, for callers that
    /// hold the bytes themselves (a program's `linear` on the device, unit
    /// tests).
    pub(crate) fn standalone(
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        len: usize,
    ) -> Self {
        Weight {
            name: name.to_string(),
            ty,
            rows,
            cols,
            start: 0,
            len,
            packed: None,
        }
    }

    /// The raw (block-format) bytes.
    pub fn bytes<'a>(&self, file: &'a GgufFile) -> &'a [u8] {
        file.bytes()
            .get(self.start..self.start + self.len)
            .unwrap_or(&[])
    }

    /// Rows `r0..r0 + n` of a matrix, as a weight of its own (the rows of
    /// a fused matrix: Q, K and V of `attn_qkv`, gate and up of Phi-3's
    /// `ffn_up`). Block rows are independent, so this is a byte range.
    pub(crate) fn row_range(&self, suffix: &str, r0: usize, n: usize) -> Weight {
        let rb = self.row_bytes();
        Weight {
            name: format!("{}[{suffix}]", self.name),
            ty: self.ty,
            rows: n,
            cols: self.cols,
            start: self.start + r0 * rb,
            len: n * rb,
            packed: None,
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.len / self.rows.max(1)
    }
}

/// A mixture-of-experts FFN: the router and each expert's gate, up and
/// down matrices (row ranges of the stacked `*_exps` tensors, still in
/// their block format).
pub struct MoeWeights {
    pub router: Weight,
    pub experts: Vec<[Weight; 3]>,
    /// The shared expert (gate, up, down) and its gate's input weight
    /// (qwen2moe).
    pub shared: Option<([Weight; 3], Weight)>,
    /// The router's bias (gpt-oss: `ffn_gate_inp.bias`, `[n_expert]`).
    pub router_bias: Option<Weight>,
    /// Every expert's gate, up and down biases (gpt-oss:
    /// `ffn_{gate,up,down}_exps.bias`, `[ffn, n_expert]` and
    /// `[d_model, n_expert]`).
    pub biases: Option<[Weight; 3]>,
}

pub struct LayerWeights {
    /// `None` without pre-norms (olmo2).
    pub attn_norm: Option<Weight>,
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub bq: Option<Weight>,
    pub bk: Option<Weight>,
    pub bv: Option<Weight>,
    pub q_norm: Option<Weight>,
    pub k_norm: Option<Weight>,
    pub wo: Weight,
    /// The attention output's bias (gpt-oss).
    pub bo: Option<Weight>,
    /// A learned softmax logit per query head (gpt-oss `attn_sinks`).
    pub sinks: Option<Weight>,
    pub post_attn_norm: Option<Weight>,
    /// `None` without pre-norms (olmo2) and where the FFN shares the
    /// attention's norm (command-r).
    pub ffn_norm: Option<Weight>,
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
    pub post_ffn_norm: Option<Weight>,
    /// Set for MoE layers (`gate`, `up`, `down` are then expert 0's).
    pub moe: Option<MoeWeights>,
}

pub struct Weights {
    pub token_embd: Weight,
    pub output_norm: Weight,
    /// `None` when tied to the embedding table.
    pub output: Option<Weight>,
    /// RoPE frequency factors (`rope_freqs.weight`, or Phi-3's
    /// `rope_factors_long/short.weight` chosen by the context; Llama 3.1+ context
    /// extension): each pair's angle is divided by its factor.
    pub rope_freqs: Option<Weight>,
    pub layers: Vec<LayerWeights>,
}

pub(crate) struct Loader<'a> {
    pub(crate) file: &'a GgufFile,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.file
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// A tensor that must have GGML dims exactly `dims`.
    pub(crate) fn get(&self, name: &str, dims: &[usize]) -> Result<Weight> {
        let t = self.info(name)?;
        let got: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        // A trailing 1 is the same shape (some converters write [n, 1]).
        let trimmed: Vec<usize> = {
            let mut g = got.clone();
            while g.len() > dims.len() && g.last() == Some(&1) {
                g.pop();
            }
            g
        };
        if trimmed != dims {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: dims.to_vec(),
                found: got,
            });
        }
        if !tl_core::quant::is_supported(t.ty) {
            return Err(ModelError::Core {
                tensor: name.to_string(),
                err: tl_core::CoreError::UnsupportedType {
                    ty: t.ty,
                    tensor: name.to_string(),
                },
            });
        }
        let start = (self.file.data_offset + t.offset) as usize;
        Ok(Weight {
            name: name.to_string(),
            ty: t.ty,
            rows: dims.get(1).copied().unwrap_or(1),
            cols: dims[0],
            start,
            len: t.size as usize,
            packed: None,
        })
    }

    pub(crate) fn opt(&self, name: &str, dims: &[usize]) -> Result<Option<Weight>> {
        if self.file.tensor(name).is_none() {
            return Ok(None);
        }
        self.get(name, dims).map(Some)
    }
}

impl Weights {
    /// Repacks every matmul weight that this CPU has a packed kernel for
    /// (`tl_core::PackedWeight`: same bytes, same results bit for bit) and
    /// gives the mapped pages of the original back to the kernel, so the
    /// weight is resident once. Returns the bytes repacked.
    pub fn repack(&mut self, file: &GgufFile) -> Result<usize> {
        let mut total = 0;
        let mut one = |w: &mut Weight| -> Result<()> {
            let bytes = w.bytes(file);
            let start = w.start;
            // Pages are given back as soon as their rows are repacked, so a
            // large weight is never resident twice.
            let release = |r: std::ops::Range<usize>| file.release_pages(start + r.start, r.len());
            let p = tl_core::PackedWeight::pack_releasing(w.ty, w.cols, w.rows, bytes, &release)
                .map_err(|e| ModelError::Core {
                    tensor: w.name.clone(),
                    err: e,
                })?;
            if let Some(p) = p {
                total += w.len;
                w.packed = Some(std::sync::Arc::new(p));
                // Pages straddling two chunks of rows.
                file.release_pages(w.start, w.len);
            }
            Ok(())
        };
        for l in &mut self.layers {
            for w in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                one(w)?;
            }
            // Every expert's slices too (a MoE layer's gate/up/down above
            // are expert 0's copies).
            if let Some(m) = &mut l.moe {
                for e in &mut m.experts {
                    for w in e.iter_mut() {
                        one(w)?;
                    }
                }
                if let Some((sh, _)) = &mut m.shared {
                    for w in sh.iter_mut() {
                        one(w)?;
                    }
                }
            }
        }
        match &mut self.output {
            Some(o) => one(o)?,
            // Tied: the table is the output matmul's weight; embedding
            // lookups read its few rows from the file again.
            None => one(&mut self.token_embd)?,
        }
        Ok(total)
    }

    pub fn load(file: &GgufFile, c: &Config) -> Result<Self> {
        let l = Loader { file };
        let d = c.d_model;
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let post_norms = matches!(c.arch, Arch::Gemma2 | Arch::Gemma3)
            || c.norm_placement == NormPlacement::Post;
        // Q/K norm weights' GGML dims.
        let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let qk_dims: Option<(Vec<usize>, Vec<usize>)> = match c.qk_norm {
            QkNorm::None => None,
            QkNorm::Head => Some((vec![hd], vec![hd])),
            QkNorm::HeadWeights => Some((vec![hd, nh], vec![hd, nkv])),
            QkNorm::Whole => Some((vec![qd], vec![kvd])),
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let req = |s: &str, dims: &[usize]| l.get(&n(s), dims);
            let if_post = |s: &str, dims: &[usize]| -> Result<Option<Weight>> {
                if post_norms {
                    req(s, dims).map(Some)
                } else {
                    Ok(None)
                }
            };
            // Q/K/V: separate, or fused in `attn_qkv` (Phi-3 and some
            // llama conversions); gate/up: separate, or fused in Phi-3's
            // `ffn_up` (gate rows first).
            let (wq, wk, wv) = match l.opt(&n("attn_qkv.weight"), &[d, qd + 2 * kvd])? {
                Some(f) => (
                    f.row_range("q", 0, qd),
                    f.row_range("k", qd, kvd),
                    f.row_range("v", qd + kvd, kvd),
                ),
                None => (
                    req("attn_q.weight", &[d, qd])?,
                    req("attn_k.weight", &[d, kvd])?,
                    req("attn_v.weight", &[d, kvd])?,
                ),
            };
            let gpt_oss = c.arch == Arch::GptOss;
            // Tensors gpt-oss must have; the other architectures do not
            // read them (as llama.cpp's graphs for them do not).
            let want = |s: &str, dims: &[usize]| -> Result<Option<Weight>> {
                if gpt_oss {
                    req(s, dims).map(Some)
                } else {
                    Ok(None)
                }
            };
            let moe = if c.n_expert > 0 {
                let ne = c.n_expert;
                let g = l.get(&n("ffn_gate_exps.weight"), &[d, c.ffn, ne])?;
                let u = l.get(&n("ffn_up_exps.weight"), &[d, c.ffn, ne])?;
                let dn = l.get(&n("ffn_down_exps.weight"), &[c.ffn, d, ne])?;
                // As 2-D: expert e is rows e·ffn.. of gate/up, e·d.. of down.
                let as2d = |w: Weight, rows: usize| Weight {
                    rows: rows * ne,
                    ..w
                };
                let (g, u, dn) = (as2d(g, c.ffn), as2d(u, c.ffn), as2d(dn, d));
                let shared = if c.ffn_shared > 0 {
                    let fs = c.ffn_shared;
                    Some((
                        [
                            req("ffn_gate_shexp.weight", &[d, fs])?,
                            req("ffn_up_shexp.weight", &[d, fs])?,
                            req("ffn_down_shexp.weight", &[fs, d])?,
                        ],
                        req("ffn_gate_inp_shexp.weight", &[d])?,
                    ))
                } else {
                    None
                };
                let biases = match (
                    want("ffn_gate_exps.bias", &[c.ffn, ne])?,
                    want("ffn_up_exps.bias", &[c.ffn, ne])?,
                    want("ffn_down_exps.bias", &[d, ne])?,
                ) {
                    (Some(g), Some(u), Some(dn)) => Some([g, u, dn]),
                    (None, None, None) => None,
                    _ => {
                        return Err(ModelError::MissingTensor(format!(
                            "blk.{i}.ffn_{{gate,up,down}}_exps.bias (all three or none)"
                        )))
                    }
                };
                Some(MoeWeights {
                    shared,
                    router_bias: want("ffn_gate_inp.bias", &[ne])?,
                    biases,
                    router: req("ffn_gate_inp.weight", &[d, ne])?,
                    experts: (0..ne)
                        .map(|e| {
                            let s = format!("expert {e}");
                            [
                                g.row_range(&s, e * c.ffn, c.ffn),
                                u.row_range(&s, e * c.ffn, c.ffn),
                                dn.row_range(&s, e * d, d),
                            ]
                        })
                        .collect(),
                })
            } else {
                None
            };
            let (gate, up) = if let Some(m) = &moe {
                (m.experts[0][0].clone(), m.experts[0][1].clone())
            } else if c.arch == Arch::Phi3 {
                let f = req("ffn_up.weight", &[d, 2 * c.ffn])?;
                (
                    f.row_range("gate", 0, c.ffn),
                    f.row_range("up", c.ffn, c.ffn),
                )
            } else {
                (
                    req("ffn_gate.weight", &[d, c.ffn])?,
                    req("ffn_up.weight", &[d, c.ffn])?,
                )
            };
            let pre = |s: &str, yes: bool| -> Result<Option<Weight>> {
                if yes {
                    req(s, &[d]).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerWeights {
                attn_norm: pre("attn_norm.weight", c.norm_placement != NormPlacement::Post)?,
                wq,
                wk,
                wv,
                bq: l.opt(&n("attn_q.bias"), &[qd])?,
                bk: l.opt(&n("attn_k.bias"), &[kvd])?,
                bv: l.opt(&n("attn_v.bias"), &[kvd])?,
                q_norm: match &qk_dims {
                    Some((q, _)) => Some(req("attn_q_norm.weight", q)?),
                    None => None,
                },
                k_norm: match &qk_dims {
                    Some((_, k)) => Some(req("attn_k_norm.weight", k)?),
                    None => None,
                },
                wo: req("attn_output.weight", &[qd, d])?,
                bo: want("attn_output.bias", &[d])?,
                sinks: if gpt_oss {
                    Some(req("attn_sinks.weight", &[nh])?)
                } else {
                    None
                },
                post_attn_norm: if_post("post_attention_norm.weight", &[d])?,
                // gpt-oss names its pre-FFN norm `post_attention_norm`.
                ffn_norm: if gpt_oss {
                    Some(req("post_attention_norm.weight", &[d])?)
                } else {
                    pre("ffn_norm.weight", c.norm_placement == NormPlacement::Pre)?
                },
                gate,
                up,
                down: match &moe {
                    Some(m) => m.experts[0][2].clone(),
                    None => req("ffn_down.weight", &[c.ffn, d])?,
                },
                post_ffn_norm: if_post("post_ffw_norm.weight", &[d])?,
                moe,
            });
        }
        // Phi-3 LongRoPE (llama.cpp `get_rope_factors`): the long
        // factors where the runtime context (`rope_ctx`, llama.cpp's
        // `n_ctx_seq`) exceeds the original one, else the short ones;
        // `rope_freqs` wins where both are present. Other architectures'
        // graphs read no such factors.
        let rope_freqs = l.opt("rope_freqs.weight", &[c.rope_dims / 2])?;
        let long_rope = if rope_freqs.is_some() {
            None
        } else {
            let name = if c.rope_ctx > c.n_ctx_orig {
                "rope_factors_long.weight"
            } else {
                "rope_factors_short.weight"
            };
            for f in ["rope_factors_long.weight", "rope_factors_short.weight"] {
                if c.arch != Arch::Phi3 && file.tensor(f).is_some() {
                    return Err(ModelError::BadConfig(format!(
                        "{}: LongRoPE frequency factors ({f}) are read for phi3 only",
                        c.arch.name()
                    )));
                }
            }
            l.opt(name, &[c.rope_dims / 2])?
        };
        // Mistral 3's optional biases (llama.cpp reads them; converted
        // Ministral 3 files have none): refused rather than ignored.
        if c.arch == Arch::Mistral3 {
            for b in [
                "attn_output.bias",
                "ffn_gate.bias",
                "ffn_up.bias",
                "ffn_down.bias",
            ] {
                if let Some(i) =
                    (0..c.n_layers).find(|i| file.tensor(&format!("blk.{i}.{b}")).is_some())
                {
                    return Err(ModelError::BadConfig(format!(
                        "mistral3 with biases (blk.{i}.{b}) is not supported yet"
                    )));
                }
            }
        }
        if matches!(c.arch, Arch::Qwen2 | Arch::GptOss) {
            for (i, lw) in layers.iter().enumerate() {
                if lw.bq.is_none() || lw.bk.is_none() || lw.bv.is_none() {
                    return Err(ModelError::MissingTensor(format!(
                        "blk.{i}.attn_q/k/v.bias ({} has Q/K/V biases)",
                        c.arch.name()
                    )));
                }
            }
        }
        Ok(Weights {
            token_embd: l.get("token_embd.weight", &[d, c.vocab])?,
            output_norm: l.get("output_norm.weight", &[d])?,
            // Command-R's and Gemma's LM head is always the embedding
            // table (llama.cpp reads no `output.weight` for them).
            output: if matches!(c.arch, Arch::CommandR | Arch::Gemma) {
                None
            } else {
                l.opt("output.weight", &[d, c.vocab])?
            },
            rope_freqs: rope_freqs.or(long_rope),
            layers,
        })
    }
}
