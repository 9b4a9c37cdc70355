//! The forward pass, written once for every device.
//!
//! [`run`] is the whole transformer step of the supported architectures
//! (qwen2, llama, gemma3) as a sequence of calls on an [`Exec`]: the model
//! says *what* each stage computes; the executor of the model's device
//! decides *how* (the CPU's SIMD kernels and thread pool in
//! `exec_cpu.rs`, CUDA kernels and graphs in `cuda/`). Architecture
//! differences (Gemma's extra norms, query scale, sliding window, softcap;
//! OLMo 2's post-only norms; Command-R's LayerNorms and parallel
//! attention/FFN) are data in the config and the weights, read by every
//! executor the same way (or refused by one that lacks them).
//!
//! Executors own their buffers (on their device), allocated for the
//! largest batch seen and reused, so a steady decode step allocates nothing.
//!
//! Encoder (embedding) models — bert, nomic-bert — do not go through this
//! forward: no KV cache, non-causal attention over whole sequences,
//! post-LayerNorms with biases and pooled outputs make a different step,
//! written with its own typed config in `encoder.rs` (CPU only).

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::kv::BLOCK_SIZE;
use crate::model::{Logits, SeqBatch};

/// Where each flattened token of a step comes from, and which rows want
/// logits: built on the host once per step and shared by every executor.
#[derive(Default)]
pub struct Plan {
    /// (sequence index, position) of each flattened token.
    pub meta: Vec<(usize, usize)>,
    /// Flattened rows whose logits are returned, in order.
    pub out_rows: Vec<usize>,
}

impl Plan {
    /// Validates a batch against the config and lays it out.
    pub fn build(&mut self, c: &Config, batch: &[SeqBatch]) -> Result<()> {
        self.meta.clear();
        self.out_rows.clear();
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
                let row = self.meta.len();
                self.meta.push((si, s.pos + j));
                let last = j + 1 == s.tokens.len();
                if s.logits == Logits::All || (s.logits == Logits::Last && last) {
                    self.out_rows.push(row);
                }
            }
        }
        Ok(())
    }

    pub fn n_tokens(&self) -> usize {
        self.meta.len()
    }
}

/// Buffers an executor can be asked to dump (`TL_DUMP_TENSORS`), by the
/// names llama.cpp's graph gives them.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    Embd,
    AttnNorm,
    QkvMatmul,
    QkvRoped,
    KqvOut,
    AttnOut,
    FfnInp,
    FfnNorm,
    FfnGateUp,
    FfnAct,
    FfnOut,
    LOut,
    ResultNorm,
}

/// The stages of one transformer step on one device. Each call covers all
/// tokens of the step; `il` is the layer.
pub trait Exec {
    /// `x = embed(tokens) · embed_scale`.
    fn embed(&mut self) -> Result<()>;
    /// `xn = norm(x) · attn_norm[il]` (`xn = x` without pre-norms).
    fn attn_norm(&mut self, il: usize) -> Result<()>;
    /// `q, k, v = xn · W_q, W_k, W_v` (one pass over the input for all three).
    fn qkv(&mut self, il: usize) -> Result<()>;
    /// Q/K/V biases, Q/K norms (per head or over the projection), RoPE at each token's
    /// position, the query scale; K and V written into the paged cache.
    fn rope_store_kv(&mut self, il: usize) -> Result<()>;
    /// Causal (optionally sliding-window) attention of every query head
    /// over its sequence's cached keys and values.
    fn attention(&mut self, il: usize) -> Result<()>;
    /// `o = att · W_o`.
    fn attn_out(&mut self, il: usize) -> Result<()>;
    /// `x += post_attn_norm?(o)`, then `xn = norm(x) · ffn_norm[il]`
    /// (`xn = x` without pre-norms). With attention and FFN in parallel
    /// `o` is kept for [`Exec::ffn_residual`] and `xn` stays the
    /// attention's norm.
    fn attn_residual(&mut self, il: usize) -> Result<()>;
    /// `gate, up = xn · W_gate, W_up`.
    fn ffn_gate_up(&mut self, il: usize) -> Result<()>;
    /// `act = act(gate) ⊙ up`.
    fn ffn_act(&mut self) -> Result<()>;
    /// `o = act · W_down`.
    fn ffn_down(&mut self, il: usize) -> Result<()>;
    /// `x += post_ffn_norm?(o)` (in parallel: `x = (o + x) + attn_o`).
    fn ffn_residual(&mut self, il: usize) -> Result<()>;
    /// For the rows that want logits: `norm(x) · output_norm`, the
    /// LM head, the logit scale, the final softcap.
    fn logits(&mut self) -> Result<()>;
    /// Writes a buffer for `TL_DUMP_TENSORS` (debugging only; may copy
    /// device memory to the host).
    fn dump(&mut self, what: Probe, il: Option<usize>) -> Result<()>;
}

/// One forward step: the same sequence of stages on every device.
pub fn run<E: Exec>(c: &Config, ex: &mut E) -> Result<()> {
    run_layers(c, ex, &[])
}

/// [`run`] with the layers `il` where `skip[il]` is true left out (the
/// residual stream passes them unchanged): the self-speculation draft.
pub fn run_layers<E: Exec>(c: &Config, ex: &mut E, skip: &[bool]) -> Result<()> {
    let dump = crate::dump::enabled();
    let probe = |ex: &mut E, p: Probe, il: Option<usize>| -> Result<()> {
        if dump {
            ex.dump(p, il)?;
        }
        Ok(())
    };
    ex.embed()?;
    probe(ex, Probe::Embd, None)?;
    for il in 0..c.n_layers {
        if skip.get(il).copied().unwrap_or(false) {
            continue;
        }
        let l = Some(il);
        ex.attn_norm(il)?;
        probe(ex, Probe::AttnNorm, l)?;
        ex.qkv(il)?;
        probe(ex, Probe::QkvMatmul, l)?;
        ex.rope_store_kv(il)?;
        probe(ex, Probe::QkvRoped, l)?;
        ex.attention(il)?;
        ex.attn_out(il)?;
        probe(ex, Probe::KqvOut, l)?;
        probe(ex, Probe::AttnOut, l)?;
        ex.attn_residual(il)?;
        probe(ex, Probe::FfnInp, l)?;
        probe(ex, Probe::FfnNorm, l)?;
        ex.ffn_gate_up(il)?;
        probe(ex, Probe::FfnGateUp, l)?;
        ex.ffn_act()?;
        probe(ex, Probe::FfnAct, l)?;
        ex.ffn_down(il)?;
        probe(ex, Probe::FfnOut, l)?;
        ex.ffn_residual(il)?;
        probe(ex, Probe::LOut, l)?;
    }
    ex.logits()?;
    probe(ex, Probe::ResultNorm, None)
}
