//! Token-level generation on top of the forward pass: chunked prefill, then
//! decode steps in which every live sequence contributes one token to a
//! single ragged batch.

use crate::error::{ModelError, Result};
use crate::kv::{BlockManager, KvCache, SeqKv};
use crate::model::{ForwardState, Logits, Model, SeqBatch};
use crate::sampler::{Sampler, SamplingParams};

use crate::spec::SELF_DRAFT_K as SELF_K;

/// Token-level stop conditions and limits.
#[derive(Clone, Debug)]
pub struct TokenOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (it is not returned).
    pub stop_ids: Vec<u32>,
    /// Tokens per prefill chunk: long prompts are fed in pieces of this size.
    pub prefill_chunk: usize,
    /// Speculative decoding (same output distribution, fewer target steps).
    pub spec: Option<crate::spec::SpecConfig>,
    /// A grammar every sequence's output must follow (each sequence gets
    /// its own copy of this start state).
    pub constraint: Option<crate::constrain::Constraint>,
}

impl Default for TokenOptions {
    fn default() -> Self {
        TokenOptions {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
            prefill_chunk: 512,
            spec: None,
            constraint: None,
        }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    /// The callback asked to stop.
    Cancelled,
}

/// Owns a KV cache, its block manager and the forward buffers.
pub struct Runner<'m> {
    pub model: &'m Model,
    pub cache: KvCache,
    pub blocks: BlockManager,
    state: ForwardState,
    /// Speculation counts since the runner was made.
    pub spec_stats: crate::spec::SpecStats,
    /// A draft model for `SpecMethod::Draft`, with its own cache.
    draft: Option<Box<DraftRunner<'m>>>,
}

/// The draft model's side of speculation: its own paged cache and buffers.
struct DraftRunner<'m> {
    model: &'m Model,
    cache: KvCache,
    blocks: BlockManager,
    state: ForwardState,
}

struct Live {
    kv: SeqKv,
    history: Vec<u32>,
    generated: Vec<u32>,
    sampler: Sampler,
    next: Option<u32>,
    finish: Option<Finish>,
    /// Drafts per speculative round, adapted to the acceptance.
    k: usize,
    /// The draft model's cache of this sequence (`SpecMethod::Draft`).
    dkv: SeqKv,
    /// This sequence's grammar state.
    constraint: Option<crate::constrain::Constraint>,
    /// Tokens the grammar forced after `next` (already emitted), fed with
    /// it in the next step.
    forced: Vec<u32>,
}

impl<'m> Runner<'m> {
    /// A runner whose cache holds `ctx_tokens` tokens in total across all
    /// sequences.
    pub fn new(model: &'m Model, ctx_tokens: usize) -> Result<Self> {
        let cache = model.new_cache(ctx_tokens)?;
        let blocks = BlockManager::new(cache.n_blocks);
        Ok(Runner {
            model,
            cache,
            blocks,
            state: ForwardState::default(),
            spec_stats: Default::default(),
            draft: None,
        })
    }

    /// Attaches a draft model (same vocabulary) for `SpecMethod::Draft`,
    /// with a cache of `ctx_tokens` tokens.
    pub fn with_draft(mut self, draft: &'m Model, ctx_tokens: usize) -> Result<Self> {
        if draft.config.vocab != self.model.config.vocab {
            return Err(ModelError::BadConfig(format!(
                "the draft model has {} tokens, the target {}",
                draft.config.vocab, self.model.config.vocab
            )));
        }
        let cache = draft.new_cache(ctx_tokens)?;
        let blocks = BlockManager::new(cache.n_blocks);
        self.draft = Some(Box::new(DraftRunner {
            model: draft,
            cache,
            blocks,
            state: ForwardState::default(),
        }));
        Ok(self)
    }

    /// Attaches the self-speculation draft (`SpecMethod::SelfDraft`): the
    /// target itself with the layers of [`crate::spec::self_draft_layers`]
    /// left out, with its own cache of `ctx_tokens` tokens for the layers
    /// it runs. CPU only.
    pub fn with_self_draft(mut self, ctx_tokens: usize) -> Result<Self> {
        if self.model.device() != tl_core::Device::Cpu {
            return Err(ModelError::BadConfig(
                "self-speculation (layer skipping) runs on the CPU only".into(),
            ));
        }
        let skip = crate::spec::self_draft_layers(self.model.config.n_layers);
        let held: Vec<bool> = skip.iter().map(|&s| !s).collect();
        let cache = self.model.new_cache_blocks_for_layers(
            ctx_tokens.div_ceil(crate::kv::BLOCK_SIZE).max(1),
            &held,
        )?;
        let blocks = BlockManager::new(cache.n_blocks);
        let state = ForwardState {
            skip_layers: skip,
            ..Default::default()
        };
        self.draft = Some(Box::new(DraftRunner {
            model: self.model,
            cache,
            blocks,
            state,
        }));
        Ok(self)
    }

    /// Feeds `tokens` to a sequence in chunks; returns the last token's logits.
    fn prefill(&mut self, kv: &mut SeqKv, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        kv.reserve(&mut self.blocks, tokens.len())?;
        let mut last = Vec::new();
        let chunk = chunk.max(1);
        for (ci, piece) in tokens.chunks(chunk).enumerate() {
            let is_last = (ci + 1) * chunk >= tokens.len();
            let b = [SeqBatch {
                tokens: piece,
                pos: kv.len,
                kv,
                logits: if is_last { Logits::Last } else { Logits::None },
            }];
            let out = self.model.forward(&mut self.cache, &b, &mut self.state)?;
            if is_last {
                last = out.to_vec();
            }
            kv.len += piece.len();
        }
        Ok(last)
    }

    /// Logits of every position of `tokens` (one fresh sequence, freed after).
    /// Installs (or with `None` removes) an importance-matrix collector:
    /// from then on every forward on the CPU adds its weight products'
    /// input activations to it (see [`crate::imatrix::ImatrixCollector`]).
    /// A model on a GPU refuses it.
    pub fn set_imatrix(&mut self, c: Option<crate::imatrix::ImatrixCollector>) -> Result<()> {
        if c.is_some() && self.model.device() != tl_core::Device::Cpu {
            return Err(ModelError::BadConfig(
                "importance matrices are computed on the CPU only".into(),
            ));
        }
        self.state.imatrix = c.map(Box::new);
        Ok(())
    }

    /// The installed importance-matrix collector, removed from the runner.
    pub fn take_imatrix(&mut self) -> Option<crate::imatrix::ImatrixCollector> {
        self.state.imatrix.take().map(|b| *b)
    }

    pub fn all_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut kv = SeqKv::new();
        kv.reserve(&mut self.blocks, tokens.len())?;
        let b = [SeqBatch {
            tokens,
            pos: 0,
            kv: &kv,
            logits: Logits::All,
        }];
        let out = self
            .model
            .forward(&mut self.cache, &b, &mut self.state)
            .map(|l| l.to_vec());
        kv.free(&mut self.blocks)?;
        out
    }

    /// Generates for several prompts at once. After each prompt's prefill,
    /// all unfinished sequences decode together, one token each per step.
    /// `on_token(seq, token)` sees every generated token as it is produced
    /// and may return `false` to stop that sequence.
    pub fn generate_batch(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &TokenOptions,
        mut on_token: impl FnMut(usize, u32) -> bool,
    ) -> Result<Vec<(Vec<u32>, Finish)>> {
        let mut live = Vec::with_capacity(prompts.len());
        let result = self.run_batch(prompts, opts, &mut on_token, &mut live);
        for l in live.iter_mut() {
            l.kv.free(&mut self.blocks)?;
            if let Some(d) = self.draft.as_mut() {
                l.dkv.free(&mut d.blocks)?;
            }
        }
        result?;
        Ok(live
            .into_iter()
            .map(|l| (l.generated, l.finish.unwrap_or(Finish::Length)))
            .collect())
    }

    fn run_batch(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &TokenOptions,
        on_token: &mut impl FnMut(usize, u32) -> bool,
        live: &mut Vec<Live>,
    ) -> Result<()> {
        let ctx = self.model.config.context;
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(ModelError::EmptyPrompt(i));
            }
            if p.len() > ctx {
                return Err(ModelError::ContextOverflow {
                    needed: p.len(),
                    context: ctx,
                });
            }
            let mut kv = SeqKv::new();
            let mut logits = match self.prefill(&mut kv, p, opts.prefill_chunk) {
                Ok(l) => l,
                Err(e) => {
                    // The sequence is not in `live` yet: free its blocks here.
                    kv.free(&mut self.blocks)?;
                    return Err(e);
                }
            };
            let sampler = Sampler::new(opts.sampling.clone())?;
            let mut l = Live {
                kv,
                history: p.clone(),
                generated: Vec::new(),
                sampler: Sampler::new(SamplingParams::default())?,
                next: None,
                finish: None,
                k: opts.spec.as_ref().map_or(0, |s| s.k),
                dkv: SeqKv::new(),
                constraint: opts.constraint.clone(),
                forced: Vec::new(),
            };
            if opts.max_tokens == 0 {
                l.finish = Some(Finish::Length);
            } else {
                l.sampler = sampler;
                Self::sample_accept(i, &mut l, &mut logits, opts, on_token)?;
            }
            live.push(l);
        }
        let vocab = self.model.config.vocab;
        loop {
            let active: Vec<usize> = (0..live.len())
                .filter(|&i| live[i].finish.is_none())
                .collect();
            if active.is_empty() {
                return Ok(());
            }
            for &i in &active {
                let n = 1 + live[i].forced.len();
                if live[i].kv.len + n > ctx {
                    live[i].finish = Some(Finish::Length);
                    continue;
                }
                live[i].kv.reserve(&mut self.blocks, n)?;
            }
            let active: Vec<usize> = active
                .into_iter()
                .filter(|&i| live[i].finish.is_none())
                .collect();
            if active.is_empty() {
                return Ok(());
            }
            if let Some(sc) = opts.spec.as_ref().filter(|_| opts.constraint.is_none()) {
                self.spec_step(&active, live, sc, opts, on_token)?;
                continue;
            }
            // The chosen token, then any the grammar forced after it.
            let toks: Vec<Vec<u32>> = active
                .iter()
                .map(|&i| {
                    let l = &live[i];
                    let mut v = vec![l.next.unwrap_or(0)];
                    v.extend_from_slice(&l.forced);
                    v
                })
                .collect();
            // On a GPU the pick is taken there (the argmax, or the whole
            // sampler chain) and only the ids are read back.
            let draws: Option<Vec<_>> = (self.model.device() != tl_core::Device::Cpu
                && opts.constraint.is_none())
            .then(|| {
                active
                    .iter()
                    .map(|&i| {
                        let l = &mut live[i];
                        l.sampler.device_draw(&l.history)
                    })
                    .collect()
            });
            let batch: Vec<SeqBatch> = active
                .iter()
                .zip(&toks)
                .map(|(&i, t)| SeqBatch {
                    tokens: t,
                    pos: live[i].kv.len,
                    kv: &live[i].kv,
                    logits: Logits::Last,
                })
                .collect();
            if let Some(draws) = draws {
                let ids =
                    self.model
                        .forward_sampled(&mut self.cache, &batch, &mut self.state, &draws)?;
                drop(batch);
                for (&i, &t) in active.iter().zip(&ids) {
                    let l = &mut live[i];
                    l.kv.len += 1 + std::mem::take(&mut l.forced).len();
                    Self::accept(i, l, t, opts, on_token);
                }
                continue;
            }
            self.model
                .forward(&mut self.cache, &batch, &mut self.state)?;
            drop(batch);
            let rows = self.state.logits_mut();
            for (j, &i) in active.iter().enumerate() {
                let l = &mut live[i];
                l.kv.len += 1 + std::mem::take(&mut l.forced).len();
                Self::sample_accept(i, l, &mut rows[j * vocab..(j + 1) * vocab], opts, on_token)?;
            }
        }
    }

    /// One speculative decode step for the `active` sequences: each feeds
    /// its chosen token and its drafts, all in one ragged forward with
    /// logits for every position; [`crate::spec::verify`] decides what is
    /// emitted; the cache length moves past the accepted tokens only.
    fn spec_step(
        &mut self,
        active: &[usize],
        live: &mut [Live],
        sc: &crate::spec::SpecConfig,
        opts: &TokenOptions,
        on_token: &mut impl FnMut(usize, u32) -> bool,
    ) -> Result<()> {
        let ctx = self.model.config.context;
        let vocab = self.model.config.vocab;
        let drafter = crate::spec::NgramDrafter {
            n_max: sc.ngram_max,
            n_min: sc.ngram_min,
        };
        let mut ks = Vec::with_capacity(active.len());
        for &i in active {
            let l = &live[i];
            let remaining = opts.max_tokens.saturating_sub(l.generated.len());
            let room = (self.model.config.context).saturating_sub(l.kv.len + 1);
            ks.push(
                crate::spec::tile_k(l.k)
                    .min(remaining.saturating_sub(1))
                    .min(room),
            );
        }
        let mut all_drafts: Vec<Vec<u32>> = match sc.method {
            crate::spec::SpecMethod::Ngram => active
                .iter()
                .zip(&ks)
                .map(|(&i, &k)| {
                    let mut d = Vec::new();
                    drafter.draft(&live[i].history, k, &mut d);
                    d
                })
                .collect(),
            crate::spec::SpecMethod::Draft => {
                self.draft_model_tokens(active, live, &ks, sc.p_min)?
            }
            crate::spec::SpecMethod::SelfDraft => {
                // Prompt lookup where it finds a match (free), the
                // layer-skipping draft elsewhere, at most `SELF_K` tokens.
                let mut out: Vec<Vec<u32>> = Vec::with_capacity(active.len());
                let mut rest = ks.clone();
                for (j, (&i, &k)) in active.iter().zip(&ks).enumerate() {
                    let mut d = Vec::new();
                    drafter.draft(&live[i].history, k, &mut d);
                    rest[j] = if d.is_empty() { k.min(SELF_K) } else { 0 };
                    out.push(d);
                }
                if rest.iter().any(|&k| k > 0) {
                    let skip = self.draft_model_tokens(active, live, &rest, sc.p_min)?;
                    for (o, d) in out.iter_mut().zip(skip) {
                        if o.is_empty() {
                            *o = d;
                        }
                    }
                }
                out
            }
        };
        let mut feeds: Vec<Vec<u32>> = Vec::with_capacity(active.len());
        for (&i, drafts) in active.iter().zip(all_drafts.iter_mut()) {
            let l = &mut live[i];
            let mut feed = Vec::with_capacity(1 + drafts.len());
            feed.push(l.next.unwrap_or(0));
            feed.extend_from_slice(drafts);
            debug_assert!(l.kv.len + feed.len() <= ctx);
            l.kv.reserve(&mut self.blocks, feed.len())?;
            feeds.push(feed);
        }
        let batch: Vec<SeqBatch> = active
            .iter()
            .zip(&feeds)
            .map(|(&i, f)| SeqBatch {
                tokens: f,
                pos: live[i].kv.len,
                kv: &live[i].kv,
                logits: Logits::All,
            })
            .collect();
        self.model
            .forward(&mut self.cache, &batch, &mut self.state)?;
        drop(batch);
        let rows = self.state.logits_mut();
        let mut off = 0;
        for (&i, feed) in active.iter().zip(&feeds) {
            let l = &mut live[i];
            let n = feed.len();
            let d = &feed[1..];
            let v = crate::spec::verify(
                &mut l.sampler,
                &mut rows[off * vocab..(off + n) * vocab],
                vocab,
                d,
                &l.history,
            );
            off += n;
            l.kv.len += 1 + v.accepted;
            // The draft cache holds the old history (through `next`) and
            // d1..d(k-1): keep what the accepted text shares with it.
            if self.draft.is_some() {
                l.dkv.len = l.dkv.len.min(l.history.len() + v.accepted);
            }
            if !d.is_empty() {
                self.spec_stats.rounds += 1;
                self.spec_stats.drafted += d.len();
                self.spec_stats.accepted += v.accepted;
                l.k = crate::spec::adapt_k(l.k, d.len(), v.accepted, sc.k);
            }
            for t in v.tokens {
                Self::accept(i, l, t, opts, on_token);
                if l.finish.is_some() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Greedy drafts of up to `ks[j]` tokens from the draft model for each
    /// active sequence: its cache catches up with the sequence's history in
    /// one ragged forward, then one token per forward for all sequences. A
    /// sequence stops at the first pick whose probability is below `p_min`
    /// (that pick is not drafted).
    fn draft_model_tokens(
        &mut self,
        active: &[usize],
        live: &mut [Live],
        ks: &[usize],
        p_min: f32,
    ) -> Result<Vec<Vec<u32>>> {
        let d = self.draft.as_mut().ok_or_else(|| {
            ModelError::BadConfig(
                "speculation with a draft model needs one attached (Runner::with_draft or with_self_draft)"
                    .into(),
            )
        })?;
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); active.len()];
        let kmax = ks.iter().copied().max().unwrap_or(0);
        // Tokens each sequence feeds this iteration (owned copies: the
        // batch borrows the caches).
        let mut feeds: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| live[i].history[live[i].dkv.len..].to_vec())
            .collect();
        for it in 0..kmax {
            let idx: Vec<usize> = (0..active.len())
                .filter(|&j| ks[j] > it && !feeds[j].is_empty())
                .collect();
            if idx.is_empty() {
                break;
            }
            for &j in &idx {
                live[active[j]].dkv.reserve(&mut d.blocks, feeds[j].len())?;
            }
            let batch: Vec<SeqBatch> = idx
                .iter()
                .map(|&j| SeqBatch {
                    tokens: &feeds[j],
                    pos: live[active[j]].dkv.len,
                    kv: &live[active[j]].dkv,
                    logits: Logits::Last,
                })
                .collect();
            let ids = d
                .model
                .forward_draft(&mut d.cache, &batch, &mut d.state, p_min)?;
            drop(batch);
            for (&j, &t) in idx.iter().zip(&ids) {
                live[active[j]].dkv.len += feeds[j].len();
                match t {
                    Some(t) => {
                        out[j].push(t);
                        feeds[j] = vec![t];
                    }
                    // Unsure: this sequence's round drafts no further.
                    None => feeds[j].clear(),
                }
            }
        }
        Ok(out)
    }

    /// Samples from `logits` (masked by the sequence's grammar, if any)
    /// and accepts the token; a grammar that allows nothing more ends the
    /// sequence with `Stop`.
    fn sample_accept(
        i: usize,
        l: &mut Live,
        logits: &mut [f32],
        opts: &TokenOptions,
        on_token: &mut impl FnMut(usize, u32) -> bool,
    ) -> Result<()> {
        let t = match l.constraint.as_mut() {
            Some(c) => {
                let (sampler, history) = (&mut l.sampler, &l.history);
                match c
                    .pick(logits, |row| sampler.sample(row, history))
                    .map_err(ModelError::Constraint)?
                {
                    Some(t) => t,
                    None => {
                        l.next = None;
                        l.finish = Some(Finish::Stop);
                        return Ok(());
                    }
                }
            }
            None => l.sampler.sample(logits, &l.history),
        };
        Self::accept(i, l, t, opts, on_token);
        // Tokens the grammar forces next are emitted now and computed
        // with `t` in the next step (fast-forward).
        let Some(first) = l.next else {
            return Ok(());
        };
        let forced = l
            .constraint
            .as_mut()
            .map(|c| c.take_forced())
            .unwrap_or_default();
        for f in forced {
            Self::accept(i, l, f, opts, on_token);
            if l.next.is_none() {
                break;
            }
            l.forced.push(f);
        }
        if l.next.is_some() {
            l.next = Some(first);
        }
        Ok(())
    }

    fn accept(
        i: usize,
        l: &mut Live,
        t: u32,
        opts: &TokenOptions,
        on_token: &mut impl FnMut(usize, u32) -> bool,
    ) {
        l.next = None;
        if opts.stop_ids.contains(&t) {
            l.finish = Some(Finish::Stop);
            return;
        }
        l.generated.push(t);
        l.history.push(t);
        if !on_token(i, t) {
            l.finish = Some(Finish::Cancelled);
            return;
        }
        if l.generated.len() >= opts.max_tokens {
            l.finish = Some(Finish::Length);
            return;
        }
        l.next = Some(t);
    }
}

/// Result of [`Runner::perplexity`].
#[derive(Clone, Debug)]
pub struct Perplexity {
    pub ppl: f64,
    pub chunks: usize,
    pub scored: usize,
    /// Against a base model ([`Runner::perplexity_vs`]), else `None`.
    pub vs_base: Option<KlStats>,
}

/// How far a model's next-token distributions are from a base model's over
/// the same scored positions (llama.cpp's `--kl-divergence` figures).
#[derive(Clone, Debug, PartialEq)]
pub struct KlStats {
    /// The base model's perplexity on the same tokens.
    pub base_ppl: f64,
    /// Mean over positions of KL(base ‖ model) = Σ p_base·(ln p_base − ln p_model), in nats.
    pub kl_mean: f64,
    /// Its 99th percentile and maximum over positions.
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Fraction of positions where both models' most likely token is the same.
    pub top1_agree: f64,
}

/// Where a perplexity run takes the base distributions it compares with.
pub enum KlBase<'r, 'm> {
    /// A base model (same vocabulary) run on the same chunks.
    Model(&'r mut Runner<'m>),
    /// Log-probabilities an earlier run saved ([`PerplexityOptions::save`])
    /// on the same tokens and chunk size.
    Saved(&'r mut dyn std::io::Read),
}

/// The extras of [`Runner::perplexity_with`].
#[derive(Default)]
pub struct PerplexityOptions<'r, 'm> {
    /// Compare with a base: fills [`Perplexity::vs_base`].
    pub base: Option<KlBase<'r, 'm>>,
    /// Save this model's log-probabilities at every scored position (a
    /// header, then `vocab` little-endian f32 per position), to be a later
    /// run's [`KlBase::Saved`].
    pub save: Option<&'r mut dyn std::io::Write>,
    /// Score at most this many chunks (llama.cpp's `--chunks`); 0: all.
    pub max_chunks: usize,
}

const LOGPROBS_MAGIC: &[u8; 8] = b"TLLOGP01";

/// FNV-1a over the chunking and the tokens, so a saved base is only used
/// against the same text and chunk size.
fn logprobs_key(tokens: &[u32], ctx: usize, vocab: usize) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let words = [ctx as u64, vocab as u64, tokens.len() as u64];
    for w in words
        .iter()
        .copied()
        .chain(tokens.iter().map(|&t| u64::from(t)))
    {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn io_err(what: &str, e: std::io::Error) -> ModelError {
    ModelError::BadConfig(format!("{what}: {e}"))
}

impl Runner<'_> {
    /// Perplexity the way llama.cpp's `perplexity` tool computes it: the
    /// tokens are cut into non-overlapping chunks of `ctx`; each chunk starts
    /// with `bos` when the model adds one; the second half of each chunk is
    /// scored (`-log p(next token)` at positions ctx/2 … ctx-2).
    /// `progress(done, total, running_ppl)` is called after each chunk.
    pub fn perplexity(
        &mut self,
        tokens: &[u32],
        ctx: usize,
        bos: Option<u32>,
        progress: impl FnMut(usize, usize, f64),
    ) -> Result<Perplexity> {
        self.perplexity_with(PerplexityOptions::default(), tokens, ctx, bos, progress)
    }

    /// [`Runner::perplexity`], and with a base (a base model, e.g. the F16
    /// original of a quantized model, or its saved log-probabilities) also
    /// how far this model's distributions are from the base's at the same
    /// positions ([`KlStats`]).
    pub fn perplexity_with(
        &mut self,
        mut opts: PerplexityOptions<'_, '_>,
        tokens: &[u32],
        ctx: usize,
        bos: Option<u32>,
        mut progress: impl FnMut(usize, usize, f64),
    ) -> Result<Perplexity> {
        if ctx < 4 {
            return Err(ModelError::BadConfig(format!(
                "perplexity context {ctx} is too small (≥ 4)"
            )));
        }
        let mut n_chunks = tokens.len() / ctx;
        if n_chunks == 0 {
            return Err(ModelError::BadConfig(format!(
                "the text has {} tokens, fewer than one chunk of {ctx}",
                tokens.len()
            )));
        }
        if opts.max_chunks > 0 {
            n_chunks = n_chunks.min(opts.max_chunks);
        }
        let vocab = self.model.config.vocab;
        let key = logprobs_key(&tokens[..n_chunks * ctx], ctx, vocab);
        match &mut opts.base {
            Some(KlBase::Model(b)) if b.model.config.vocab != vocab => {
                return Err(ModelError::BadConfig(format!(
                    "the base model's vocabulary ({}) is not this model's ({vocab})",
                    b.model.config.vocab
                )));
            }
            Some(KlBase::Saved(r)) => {
                let mut head = [0u8; 16];
                r.read_exact(&mut head)
                    .map_err(|e| io_err("base log-probabilities", e))?;
                if &head[..8] != LOGPROBS_MAGIC {
                    return Err(ModelError::BadConfig(
                        "base log-probabilities: not a file saved by `tl perplexity --save-logprobs`"
                            .into(),
                    ));
                }
                if head[8..] != key.to_le_bytes() {
                    return Err(ModelError::BadConfig(
                        "base log-probabilities were saved for another text, chunk size, chunk count or vocabulary".into(),
                    ));
                }
            }
            _ => {}
        }
        if let Some(w) = opts.save.as_mut() {
            w.write_all(LOGPROBS_MAGIC)
                .and_then(|_| w.write_all(&key.to_le_bytes()))
                .map_err(|e| io_err("saving log-probabilities", e))?;
        }
        let (mut nll, mut count) = (0f64, 0usize);
        let (mut base_nll, mut agree) = (0f64, 0usize);
        let mut kls: Vec<f64> = Vec::new();
        let log_sum_exp = |row: &[f32]| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
        };
        let log_softmax = |row: &[f32], out: &mut Vec<f64>| {
            let lse = log_sum_exp(row);
            out.clear();
            out.extend(row.iter().map(|&x| x as f64 - lse));
        };
        // The whole distribution is only needed to save it or compare it.
        let full_rows = opts.save.is_some() || opts.base.is_some();
        fn argmax<T: PartialOrd>(row: &[T]) -> usize {
            let mut bi = 0;
            for (i, x) in row.iter().enumerate() {
                if *x > row[bi] {
                    bi = i;
                }
            }
            bi
        }
        let (mut lp, mut lq) = (Vec::new(), Vec::new());
        let mut bytes = Vec::new();
        let mut chunk = Vec::with_capacity(ctx);
        for c in 0..n_chunks {
            chunk.clear();
            chunk.extend_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
            if let Some(b) = bos {
                chunk[0] = b;
            }
            let logits = self.all_logits(&chunk)?;
            let base_logits = match &mut opts.base {
                Some(KlBase::Model(b)) => Some(b.all_logits(&chunk)?),
                _ => None,
            };
            for j in ctx / 2..ctx - 1 {
                let row = &logits[j * vocab..(j + 1) * vocab];
                let next = tokens[c * ctx + j + 1] as usize;
                count += 1;
                if !full_rows {
                    nll += log_sum_exp(row) - row[next] as f64;
                    continue;
                }
                log_softmax(row, &mut lq);
                nll -= lq[next];
                if let Some(w) = opts.save.as_mut() {
                    bytes.clear();
                    bytes.extend(lq.iter().flat_map(|&x| (x as f32).to_le_bytes()));
                    w.write_all(&bytes)
                        .map_err(|e| io_err("saving log-probabilities", e))?;
                }
                match &mut opts.base {
                    None => continue,
                    Some(KlBase::Model(_)) => {
                        if let Some(bl) = &base_logits {
                            log_softmax(&bl[j * vocab..(j + 1) * vocab], &mut lp);
                        }
                    }
                    Some(KlBase::Saved(r)) => {
                        bytes.resize(vocab * 4, 0);
                        r.read_exact(&mut bytes).map_err(|e| {
                            io_err("base log-probabilities (fewer positions than this run)", e)
                        })?;
                        lp.clear();
                        lp.extend(
                            bytes
                                .chunks_exact(4)
                                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                        );
                    }
                }
                base_nll -= lp[next];
                let kl: f64 = lp
                    .iter()
                    .zip(&lq)
                    .map(|(&p, &q)| {
                        if p > f64::NEG_INFINITY {
                            p.exp() * (p - q)
                        } else {
                            0.0
                        }
                    })
                    .sum();
                kls.push(kl.max(0.0));
                agree += usize::from(argmax(row) == argmax(&lp));
            }
            progress(c + 1, n_chunks, (nll / count as f64).exp());
        }
        let vs_base = opts.base.map(|_| {
            let n = kls.len().max(1) as f64;
            let mean = kls.iter().sum::<f64>() / n;
            kls.sort_by(f64::total_cmp);
            let p99 = kls
                .get(((kls.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0.0);
            KlStats {
                base_ppl: (base_nll / count as f64).exp(),
                kl_mean: mean,
                kl_p99: p99,
                kl_max: kls.last().copied().unwrap_or(0.0),
                top1_agree: agree as f64 / n,
            }
        });
        Ok(Perplexity {
            ppl: (nll / count as f64).exp(),
            chunks: n_chunks,
            scored: count,
            vs_base,
        })
    }
}

impl Runner<'_> {
    /// Prefills `tokens` as one fresh sequence (last logits only), then frees
    /// it: the unit of work of a prompt-processing benchmark.
    pub fn prefill_only(&mut self, tokens: &[u32], chunk: usize) -> Result<()> {
        let mut kv = SeqKv::new();
        let r = self.prefill(&mut kv, tokens, chunk);
        kv.free(&mut self.blocks)?;
        r.map(|_| ())
    }
}
