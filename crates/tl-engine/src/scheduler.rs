//! The continuous-batching scheduler: one [`Scheduler::step`] = one
//! `Model::forward` over a ragged batch.
//!
//! Policy (after vLLM's scheduler, simplified):
//!
//! 1. **Decoders first.** Every running sequence whose prompt is computed
//!    contributes its next token. If the pool cannot give each of them a
//!    slot, the most recently admitted running sequence is *preempted by
//!    recompute*: its blocks go back (full ones stay in the prefix cache)
//!    and it returns to the head of the queue with all its tokens, prompt
//!    and generated, to be prefilled again later. Its sampler and the text
//!    it already streamed are kept, so the client sees nothing but a pause.
//! 2. **Chunked prefill.** What is left of the per-step token budget
//!    (`max_batch_tokens`) goes to running sequences still prefilling, in
//!    admission order, a chunk each; a long prompt thus takes several steps
//!    while the decoders keep getting one token per step.
//! 3. **Admission.** While the batch has room (`max_batch` sequences) and
//!    budget is left, queued sequences are admitted in arrival order: the
//!    prefix cache supplies the KV of the longest cached run of full blocks,
//!    and blocks for the whole rest of the prompt are reserved up front (so
//!    an admitted prompt never stalls half-way). A sequence that does not
//!    fit blocks the ones behind it (no starvation of long prompts).
//!    Choices 2..n of a request wait until choice 1 has computed the prompt,
//!    then join through the prefix cache and compute only the prompt's last,
//!    partial block.
//! 4. Finished sequences (stop token, stop string, `max_tokens`) leave at
//!    once and free their blocks; cancelled or disconnected requests are
//!    dropped at the start of the next step.
//!
//! **Speculation.** While at most `spec_max_batch` sequences decode, each
//! decoder that speculates feeds its next token and up to k drafts, with
//! logits for all of them, in the same ragged forward as everything else;
//! [`verify`] keeps the accepted prefix. The drafts come from prompt lookup
//! (`SpecMethod::Ngram`), or from a [`DraftModel`]: a smaller model of the
//! same vocabulary (`SpecMethod::Draft`) or the target with layers left out
//! (`SpecMethod::SelfDraft`, after prompt lookup). A draft model has its
//! own paged cache: every sequence's draft cache holds a prefix of its
//! tokens, catches up in the draft's first forward of a round, and is cut
//! back to the accepted text after verification; it is freed with the
//! sequence (finish, cancel, preemption).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tl_model::kv::{KvCache, SeqKv, BLOCK_SIZE};
use tl_model::llm::Llm;
use tl_model::model::{ForwardState, Logits, Model, SeqBatch};
use tl_model::sampler::{DeviceDraw, Sampler};
use tl_model::spec::{verify, verify_lazy, NgramDrafter, SpecConfig, SpecMethod, SELF_DRAFT_K};
use tl_tokenizer::StreamDecoder;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use crate::error::{EngineError, Result};
use crate::pool::BlockPool;
use crate::request::{Event, FinishReason, TokenLogprob, ValidRequest};
use crate::stop::StopFilter;

/// Request id, unique per engine.
pub type RequestId = u64;

/// Limits of one step.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences in one batch.
    pub max_batch: usize,
    /// Most tokens in one forward call (decode tokens + prefill chunks).
    pub max_batch_tokens: usize,
    pub prefix_caching: bool,
    /// Speculative decoding by default (requests opt out with
    /// `speculative: false`, or in with `true` when this is `None`).
    pub spec: Option<SpecConfig>,
    /// Speculate only while at most this many sequences decode: a larger
    /// batch already uses the weights it reads.
    pub spec_max_batch: usize,
    /// Threads that compute the step's grammar masks while its forward
    /// runs; 0 computes each in the sampling loop, after the forward.
    pub mask_threads: usize,
    /// Take the GPU's sampling path (tokens drawn inside the forward) on
    /// the CPU too, through the forward's host fallback: for tests of that
    /// path on machines without a GPU.
    pub device_draws_on_cpu: bool,
    /// Streams' events are sent by a thread of their own after each step
    /// (waking the receivers off the engine's path): for a GPU, where the
    /// host's part of a step is time the device waits.
    pub emit_thread: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch: 16,
            max_batch_tokens: 256,
            prefix_caching: true,
            spec: None,
            spec_max_batch: 2,
            mask_threads: 1,
            device_draws_on_cpu: false,
            emit_thread: false,
        }
    }
}

/// A snapshot of the scheduler's state and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub running_requests: usize,
    pub waiting_requests: usize,
    pub running_seqs: usize,
    pub waiting_seqs: usize,
    pub kv_blocks_total: usize,
    /// Referenced by live sequences.
    pub kv_blocks_used: usize,
    /// On the free list.
    pub kv_blocks_free: usize,
    /// Held by the prefix cache (some may also be used).
    pub kv_blocks_cached: usize,
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Prompt (and recomputed) tokens run through the model.
    pub prefill_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// Steps the device had no memory for (each halved the step limits).
    pub oom_events: u64,
    pub steps: u64,
    /// Tokens a grammar forced (appended without sampling).
    pub forced_tokens: u64,
    /// Microseconds spent in steps (scheduling, the forward, the outputs)
    /// and, of those, in the model's forward (the device's work and the
    /// wait for it): the rest is the host's share of a step.
    pub step_us: u64,
    pub forward_us: u64,
    /// Speculative decoding: tokens drafted and drafts accepted.
    pub spec_drafted: u64,
    pub spec_accepted: u64,
    /// Grammar masks computed, the microseconds spent on them (computing
    /// and applying, on whichever thread), and of those the ones on the
    /// step's path: masks computed in the sampling loop, the wait for the
    /// mask threads after the forward, and applying the masks.
    pub masks: u64,
    pub mask_us: u64,
    pub mask_wait_us: u64,
    /// Draft-model forwards (catch-up and one per drafted position) and
    /// the microseconds they took (part of `step_us`, not of `forward_us`).
    pub draft_forwards: u64,
    pub draft_us: u64,
    /// The draft model's KV blocks in use by live sequences.
    pub draft_kv_blocks_used: usize,
}

/// The drafting model of `SpecMethod::Draft` (a smaller model of the same
/// vocabulary) or `SpecMethod::SelfDraft` (the target itself with a subset
/// of its layers, see [`tl_model::spec::self_draft_layers`]): its own paged
/// cache and block pool (no prefix cache), and its forward buffers.
pub struct DraftModel<'a> {
    model: &'a Model,
    cache: KvCache,
    pool: BlockPool,
    state: ForwardState,
}

impl<'a> DraftModel<'a> {
    /// A draft model over `cache` (made by `model.new_cache_blocks`). The
    /// caller checks that its vocabulary is the target's
    /// (`Llm::check_draft`).
    pub fn new(model: &'a Model, cache: KvCache) -> Self {
        let pool = BlockPool::new(cache.n_blocks, false);
        DraftModel {
            model,
            cache,
            pool,
            state: ForwardState::default(),
        }
    }

    /// The self-speculation draft of `target` over `cache`: a cache of the
    /// target's shape, or of the layers the draft runs only
    /// (`Model::new_cache_blocks_for_layers` with the complement of
    /// [`tl_model::spec::self_draft_layers`]). CPU only.
    pub fn self_draft(target: &'a Model, cache: KvCache) -> Result<Self> {
        if target.device().is_gpu() {
            return Err(EngineError::Setup(
                "--spec self (layer skipping) runs on the CPU only".into(),
            ));
        }
        let mut d = Self::new(target, cache);
        d.state = ForwardState::skipping(tl_model::spec::self_draft_layers(target.config.n_layers));
        Ok(d)
    }
}

struct ReqState {
    tx: UnboundedSender<Event>,
    stop_ids: Vec<u32>,
    logprobs: Option<usize>,
    /// Choices not finished yet.
    live: usize,
    /// Some choice has been admitted once (the request left the queue).
    started: bool,
}

struct Seq<'a> {
    req: RequestId,
    choice: usize,
    /// Prompt and generated tokens; `kv.len` of them are in the cache.
    tokens: Vec<u32>,
    prompt_len: usize,
    kv: SeqKv,
    /// Leading full blocks already registered in the prefix cache.
    hashed: usize,
    last_hash: u64,
    sampler: Sampler,
    max_tokens: usize,
    generated: usize,
    decoder: StreamDecoder<'a>,
    stop: StopFilter,
    cached_tokens: usize,
    admitted_once: bool,
    /// Most drafts per speculative round (0: this sequence does not
    /// speculate); adapted to the acceptance.
    spec_k: usize,
    /// This step's speculative feed: the last token, then the drafts.
    feed: Vec<u32>,
    /// This sequence's draft-model cache: `dkv.len` leading tokens of
    /// `tokens` are in it.
    dkv: SeqKv,
    /// The grammar state of a constrained choice.
    constraint: Option<Box<tl_model::constrain::Constraint>>,
    /// Tokens the grammar forced (appended without sampling), not yet
    /// counted in the stats.
    forced: u64,
}

impl Seq<'_> {
    fn is_decoding(&self) -> bool {
        self.tokens.len() - self.kv.len == 1
    }
}

enum Outcome {
    Continue,
    Finished(FinishReason),
    /// The client is gone.
    Closed,
}

/// Owns the model's KV cache and every live sequence.
pub struct Scheduler<'a> {
    llm: &'a Llm,
    cfg: SchedulerConfig,
    cache: KvCache,
    pool: BlockPool,
    state: ForwardState,
    reqs: HashMap<RequestId, ReqState>,
    waiting: VecDeque<Seq<'a>>,
    running: Vec<Seq<'a>>,
    /// Requests submitted but not started; decremented here on start.
    queued: Option<Arc<AtomicUsize>>,
    stats: Stats,
    raw: Vec<f32>,
    /// Set once the model's device is lost (see [`Scheduler::device_lost`]).
    lost: Option<String>,
    /// The mask threads, started with the first constrained step.
    masks: Option<crate::masks::MaskWorkers>,
    /// The draft model of `SpecMethod::Draft` / `SelfDraft`.
    draft: Option<DraftModel<'a>>,
    /// Events of this step for the requests' streams, sent together when
    /// the step ends ([`Scheduler::flush`]).
    outbox: Outbox,
    /// The thread that sends them, where `SchedulerConfig::emit_thread`
    /// says so.
    emitter: Option<Emitter>,
}

/// Events waiting to be sent, each with its stream.
type Outbox = Vec<(UnboundedSender<Event>, Event)>;

/// Queues `ev` for the stream `tx`; false when its client is gone.
fn post(ob: &mut Outbox, tx: &UnboundedSender<Event>, ev: Event) -> bool {
    if tx.is_closed() {
        return false;
    }
    ob.push((tx.clone(), ev));
    true
}

/// A thread that sends each step's events to the requests' streams, so
/// that waking the receivers (a system call each where one sleeps) is off
/// the engine's path: on a GPU the next step is prepared and launched
/// meanwhile. Steps' events go out in order.
struct Emitter {
    tx: Option<std::sync::mpsc::Sender<Outbox>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Emitter {
    fn start() -> std::io::Result<Emitter> {
        let (tx, rx) = std::sync::mpsc::channel::<Outbox>();
        let handle = std::thread::Builder::new()
            .name("tl-emit".into())
            .spawn(move || {
                while let Ok(batch) = rx.recv() {
                    for (tx, ev) in batch {
                        let _ = tx.send(ev);
                    }
                }
            })?;
        Ok(Emitter {
            tx: Some(tx),
            handle: Some(handle),
        })
    }
}

impl Drop for Emitter {
    /// Every event handed over is delivered before the thread ends.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl<'a> Scheduler<'a> {
    /// A scheduler over a cache of `kv_blocks` blocks.
    pub fn new(llm: &'a Llm, cfg: SchedulerConfig, kv_blocks: usize) -> Result<Self> {
        let cache = llm
            .model
            .new_cache_blocks(kv_blocks.max(1))
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        Ok(Self::with_cache(llm, cfg, cache))
    }

    pub fn with_cache(llm: &'a Llm, mut cfg: SchedulerConfig, cache: KvCache) -> Self {
        cfg.max_batch = cfg.max_batch.max(1);
        cfg.max_batch_tokens = cfg.max_batch_tokens.max(cfg.max_batch);
        let pool = BlockPool::new(cache.n_blocks, cfg.prefix_caching);
        Scheduler {
            llm,
            cfg,
            cache,
            pool,
            state: ForwardState::default(),
            reqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            queued: None,
            stats: Stats::default(),
            raw: Vec::new(),
            lost: None,
            masks: None,
            draft: None,
            outbox: Vec::new(),
            emitter: None,
        }
    }

    /// Sends the events queued so far: handed to the emitter thread in one
    /// piece where there is one (started on first use), else sent here.
    pub fn flush(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.outbox);
        if self.cfg.emit_thread && self.emitter.is_none() {
            match Emitter::start() {
                Ok(e) => self.emitter = Some(e),
                Err(e) => {
                    warn!(error = %e, "no emitter thread; events are sent from the engine's");
                    self.cfg.emit_thread = false;
                }
            }
        }
        let batch = match self.emitter.as_ref().and_then(|e| e.tx.as_ref()) {
            Some(tx) => match tx.send(batch) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => batch,
        };
        for (tx, ev) in batch {
            let _ = tx.send(ev);
        }
    }

    /// Attaches the draft model that `SpecMethod::Draft` and `SelfDraft`
    /// speculate with (without one they draft nothing).
    pub fn set_draft(&mut self, d: DraftModel<'a>) {
        self.draft = Some(d);
    }

    /// Why the model's device is lost, once a step found it so: every
    /// request then failed with [`EngineError::DeviceLost`], and new ones
    /// fail at once.
    pub fn device_lost(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// Shares the counter of not-yet-started requests with the submitter.
    pub fn set_queue_counter(&mut self, c: Arc<AtomicUsize>) {
        self.queued = Some(c);
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.running_seqs = self.running.len();
        s.waiting_seqs = self.waiting.len();
        s.running_requests = self.reqs.values().filter(|r| r.started).count();
        s.waiting_requests = self.reqs.len() - s.running_requests;
        s.kv_blocks_total = self.pool.n_total();
        s.kv_blocks_used = self.pool.n_used();
        s.kv_blocks_free = self.pool.n_free();
        s.kv_blocks_cached = self.pool.n_cached();
        s.prefix_queried_tokens = self.pool.stats.queried;
        s.prefix_hit_tokens = self.pool.stats.hit;
        s.draft_kv_blocks_used = self.draft.as_ref().map_or(0, |d| d.pool.n_used());
        s
    }

    /// Queues a request; its events go to `tx`.
    pub fn add(&mut self, id: RequestId, req: ValidRequest, tx: UnboundedSender<Event>) {
        if let Some(why) = &self.lost {
            post(
                &mut self.outbox,
                &tx,
                Event::Error(EngineError::DeviceLost(why.clone())),
            );
            self.dequeued(1);
            self.flush();
            return;
        }
        let mut seqs = Vec::with_capacity(req.n);
        // Logprobs report the plain step's distribution: such requests
        // decode one token at a time, as do constrained ones (a lazy
        // grammar speculates until its trigger, see `run_plan`).
        let constrained = req.constraint.as_ref().is_some_and(|c| !c.is_waiting());
        let spec_k = match (req.speculative, &self.cfg.spec) {
            _ if req.logprobs.is_some() || constrained => 0,
            (Some(false), _) => 0,
            (Some(true), None) => 8,
            (_, Some(c)) => c.k,
            (None, None) => 0,
        };
        for choice in 0..req.n {
            let mut params = req.sampling.clone();
            params.seed = params.seed.wrapping_add(choice as u64);
            let sampler = match Sampler::new(params) {
                Ok(s) => s,
                Err(e) => {
                    post(
                        &mut self.outbox,
                        &tx,
                        Event::Error(EngineError::InvalidParam {
                            param: "temperature",
                            message: e.to_string(),
                        }),
                    );
                    self.dequeued(1);
                    self.flush();
                    return;
                }
            };
            seqs.push(Seq {
                req: id,
                choice,
                tokens: req.prompt.clone(),
                prompt_len: req.prompt.len(),
                kv: SeqKv::new(),
                hashed: 0,
                last_hash: 0,
                sampler,
                max_tokens: req.max_tokens,
                generated: 0,
                decoder: self.llm.tokenizer.stream_decoder(false),
                stop: StopFilter::new(req.stop.clone()),
                cached_tokens: 0,
                admitted_once: false,
                spec_k,
                feed: Vec::new(),
                dkv: SeqKv::new(),
                constraint: req.constraint.clone(),
                forced: 0,
            });
        }
        self.reqs.insert(
            id,
            ReqState {
                tx,
                stop_ids: req.stop_ids,
                logprobs: req.logprobs,
                live: req.n,
                started: false,
            },
        );
        self.waiting.extend(seqs);
    }

    fn dequeued(&self, n: usize) {
        if let Some(q) = &self.queued {
            let _ = q.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
        }
    }

    /// Drops a request wherever it is and frees its blocks. Unknown ids are
    /// ignored (the request may have finished already).
    pub fn cancel(&mut self, id: RequestId) {
        let Some(r) = self.reqs.remove(&id) else {
            return;
        };
        if !r.started {
            self.dequeued(1);
        }
        for s in self.waiting.iter_mut().chain(self.running.iter_mut()) {
            if s.req == id {
                if let Err(e) = self.pool.free_seq(&mut s.kv) {
                    warn!(request = id, error = %e, "freeing blocks of a cancelled request");
                }
                if let Err(e) = free_draft(&mut self.draft, &mut s.dkv) {
                    warn!(request = id, error = %e, "freeing draft blocks of a cancelled request");
                }
            }
        }
        self.waiting.retain(|s| s.req != id);
        self.running.retain(|s| s.req != id);
        debug!(request = id, "cancelled");
    }

    /// Fails every request (shutdown).
    pub fn abort_all(&mut self, err: EngineError) {
        let ids: Vec<RequestId> = self.reqs.keys().copied().collect();
        for id in ids {
            if let Some(r) = self.reqs.get(&id) {
                post(&mut self.outbox, &r.tx, Event::Error(err.clone()));
            }
            self.cancel(id);
        }
        self.flush();
    }

    fn fail(&mut self, id: RequestId, err: EngineError) {
        if let Some(r) = self.reqs.get(&id) {
            post(&mut self.outbox, &r.tx, Event::Error(err));
        }
        self.cancel(id);
    }

    fn reap_closed(&mut self) {
        let closed: Vec<RequestId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in closed {
            self.cancel(id);
        }
    }

    fn preempt(&mut self, mut s: Seq<'a>) -> Result<()> {
        self.pool.free_seq(&mut s.kv)?;
        free_draft(&mut self.draft, &mut s.dkv)?;
        s.hashed = 0;
        s.last_hash = 0;
        self.stats.preemptions += 1;
        debug!(
            request = s.req,
            choice = s.choice,
            tokens = s.tokens.len(),
            "preempted"
        );
        self.waiting.push_front(s);
        Ok(())
    }

    /// Choices after the first wait for the first to compute the prompt, so
    /// they can share its full blocks.
    fn gated(&self, s: &Seq) -> bool {
        if s.choice == 0
            || s.admitted_once
            || !self.cfg.prefix_caching
            || s.prompt_len <= BLOCK_SIZE
        {
            return false;
        }
        let leader_pending = |o: &Seq| o.req == s.req && o.choice == 0;
        self.waiting.iter().any(leader_pending)
            || self
                .running
                .iter()
                .any(|o| leader_pending(o) && o.kv.len < o.prompt_len)
    }

    /// Runs one step; returns the number of tokens that went through the
    /// model (0 when there was nothing to do).
    pub fn step(&mut self) -> usize {
        let t0 = std::time::Instant::now();
        let r = self.try_step();
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                // A broken invariant of the block pool: fail what is running
                // rather than the process.
                warn!(error = %e, "scheduler step failed");
                let ids: Vec<RequestId> = self.running.iter().map(|s| s.req).collect();
                for id in ids {
                    self.fail(id, e.clone());
                }
                0
            }
        };
        self.flush();
        self.stats.step_us += t0.elapsed().as_micros() as u64;
        n
    }

    fn try_step(&mut self) -> Result<usize> {
        self.reap_closed();

        // 1. Room for every decoder (and for tokens a grammar forced),
        // preempting the newest when short.
        loop {
            let need: usize = self
                .running
                .iter()
                .map(|s| BlockPool::blocks_needed(&s.kv, s.tokens.len() - s.kv.len))
                .sum();
            if need <= self.pool.available() {
                break;
            }
            match self.running.pop() {
                Some(victim) => self.preempt(victim)?,
                None => break,
            }
        }
        let mut budget = self.cfg.max_batch_tokens;
        // (index into running, tokens this step)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let n_dec = self.running.iter().filter(|s| s.is_decoding()).count();
        let speculate = n_dec <= self.cfg.spec_max_batch;
        let ctx = self.llm.model.config.context;
        // (index into running, most drafts this step)
        let mut ks: Vec<(usize, usize)> = Vec::new();
        let mut left = budget;
        for (i, s) in self.running.iter_mut().enumerate() {
            if s.is_decoding() {
                if !self.pool.reserve(&mut s.kv, 1)? {
                    return Err(EngineError::Model("no KV block for a decoder".into()));
                }
                s.feed.clear();
                // A lazy grammar speculates until its trigger fires.
                let free = s.constraint.as_ref().is_none_or(|c| c.is_waiting());
                let k = if speculate && s.spec_k > 0 && free {
                    tl_model::spec::tile_k(s.spec_k)
                        .min(s.max_tokens.saturating_sub(s.generated + 1))
                        .min(ctx.saturating_sub(s.kv.len + 1))
                        .min(left.saturating_sub(1))
                } else {
                    0
                };
                left = left.saturating_sub(1 + k);
                ks.push((i, k));
            }
        }
        let drafts = self.drafts(&ks);
        for (&(i, _), d) in ks.iter().zip(drafts) {
            let s = &mut self.running[i];
            // Drafts only where the blocks are there; else plain.
            if !d.is_empty() && self.pool.reserve(&mut s.kv, 1 + d.len())? {
                s.feed.push(s.tokens[s.kv.len]);
                s.feed.extend_from_slice(&d);
            }
            let n = s.feed.len().max(1);
            plan.push((i, n));
            budget = budget.saturating_sub(n);
        }
        // 2. Chunks of prompts in progress (and of forced tokens, whose
        // blocks step 1 made room for).
        for (i, s) in self.running.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            if !s.is_decoding() {
                let n = (s.tokens.len() - s.kv.len).min(budget);
                if !self.pool.reserve(&mut s.kv, n)? {
                    return Err(EngineError::Model("no KV block for a prompt chunk".into()));
                }
                plan.push((i, n));
                budget -= n;
            }
        }
        // 3. Admission.
        let mut idx = 0;
        while budget > 0 && self.running.len() < self.cfg.max_batch && idx < self.waiting.len() {
            if self.gated(&self.waiting[idx]) {
                idx += 1;
                continue;
            }
            let Some(mut s) = self.waiting.remove(idx) else {
                break;
            };
            let (matched, last_hash) = self.pool.lookup(&s.tokens, &mut s.kv)?;
            let rest = s.tokens.len() - s.kv.len;
            let watermark = usize::from(!self.running.is_empty());
            if BlockPool::blocks_needed(&s.kv, rest) + watermark > self.pool.available()
                || !self.pool.reserve(&mut s.kv, rest)?
            {
                self.pool.free_seq(&mut s.kv)?;
                self.waiting.insert(idx, s);
                break;
            }
            s.hashed = matched;
            s.last_hash = last_hash;
            if !s.admitted_once {
                s.admitted_once = true;
                s.cached_tokens = s.kv.len.min(s.prompt_len);
            }
            if let Some(r) = self.reqs.get_mut(&s.req) {
                if !r.started {
                    r.started = true;
                    self.dequeued(1);
                }
            }
            let n = rest.min(budget);
            budget -= n;
            debug!(
                request = s.req,
                choice = s.choice,
                cached = s.kv.len,
                rest,
                "admitted"
            );
            self.running.push(s);
            plan.push((self.running.len() - 1, n));
        }
        if plan.is_empty() {
            return Ok(0);
        }
        self.run_plan(&plan)
    }

    /// Drafts of up to `k` tokens for each `(running index, k)` of `ks`
    /// (empty where `k` is 0 or nothing was found), from the configured
    /// source: prompt lookup, the draft model, or (self-speculation) prompt
    /// lookup and the layer-skipping draft where the lookup finds nothing.
    /// A draft model that fails drafts nothing this step (the step goes on
    /// without drafts: the target's output does not depend on them).
    fn drafts(&mut self, ks: &[(usize, usize)]) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); ks.len()];
        let method = self
            .cfg
            .spec
            .as_ref()
            .map_or(SpecMethod::Ngram, |c| c.method.clone());
        let lookup = NgramDrafter {
            n_max: self.cfg.spec.as_ref().map_or(4, |c| c.ngram_max),
            n_min: self.cfg.spec.as_ref().map_or(2, |c| c.ngram_min),
        };
        // Tokens wanted from the draft model, per entry.
        let mut want = vec![0usize; ks.len()];
        for (j, &(i, k)) in ks.iter().enumerate() {
            if k == 0 {
                continue;
            }
            let Some(s) = self.running.get(i) else {
                continue;
            };
            match method {
                SpecMethod::Draft => want[j] = k,
                SpecMethod::SelfDraft => {
                    lookup.draft(&s.tokens, k, &mut out[j]);
                    if out[j].is_empty() {
                        want[j] = k.min(SELF_DRAFT_K);
                    }
                }
                SpecMethod::Ngram => lookup.draft(&s.tokens, k, &mut out[j]),
            }
        }
        if want.iter().all(|&w| w == 0) {
            return out;
        }
        let Some(d) = self.draft.as_mut() else {
            return out;
        };
        let t0 = std::time::Instant::now();
        let chunk = self.cfg.max_batch_tokens;
        let p_min = self.cfg.spec.as_ref().map_or(0.0, |c| c.p_min);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model_drafts(d, &mut self.running, ks, &mut want, &mut out, chunk, p_min)
        }));
        self.stats.draft_us += t0.elapsed().as_micros() as u64;
        match r {
            Ok(Ok(n)) => self.stats.draft_forwards += n,
            Ok(Err(e)) => {
                warn!(error = %e, "the draft model failed; this step goes on without its drafts");
                for (o, &w) in out.iter_mut().zip(&want) {
                    if w > 0 {
                        o.clear();
                    }
                }
            }
            Err(_) => {
                warn!("the draft model panicked; this step goes on without its drafts");
                for (o, &w) in out.iter_mut().zip(&want) {
                    if w > 0 {
                        o.clear();
                    }
                }
            }
        }
        out
    }

    /// On a GPU, the draws of a step whose every pick can be taken there
    /// (no speculative round, no grammar mask, no logprobs): one per sequence
    /// that ends its input this step, in plan order. `None` on the CPU or
    /// when some pick needs the logits on the host.
    fn device_draws(&mut self, plan: &[(usize, usize)]) -> Option<(Vec<DeviceDraw>, Vec<usize>)> {
        if !self.llm.model.device().is_gpu() && !self.cfg.device_draws_on_cpu {
            return None;
        }
        let picks = |s: &Seq<'_>, n: usize| s.feed.is_empty() && s.kv.len + n == s.tokens.len();
        for &(i, n) in plan {
            let s = &self.running[i];
            if !s.feed.is_empty() {
                return None;
            }
            let logprobs = self.reqs.get(&s.req).is_some_and(|r| r.logprobs.is_some());
            // A grammar's mask goes to the device with the draw; only a lazy
            // trigger spelled by text at the reply's start needs the row here.
            let host = s.constraint.as_ref().is_some_and(|c| !c.device_pickable());
            if picks(s, n) && (host || logprobs) {
                return None;
            }
        }
        let mut draws = Vec::new();
        let mut slots = Vec::new();
        for &(i, n) in plan {
            let s = &mut self.running[i];
            if picks(s, n) {
                draws.push(s.sampler.device_draw(&s.tokens));
                slots.push(i);
            }
        }
        Some((draws, slots))
    }

    /// The device ran out of memory in a step of `n_tokens` tokens over
    /// `plan.len()` sequences: nothing of it was kept. Steps from now on
    /// take at most half as many tokens (and sequences, when it had more
    /// than one), the newest sequences past that are preempted (their
    /// tokens recomputed later), and the step is run again next time. The
    /// lower limits hold for the engine's life: the memory that was
    /// missing does not come back by itself.
    fn shrink_after_oom(
        &mut self,
        plan: &[(usize, usize)],
        n_tokens: usize,
        msg: &str,
    ) -> Result<()> {
        let seqs = plan.len();
        self.cfg.max_batch_tokens = self.cfg.max_batch_tokens.min((n_tokens / 2).max(1));
        if seqs > 1 {
            self.cfg.max_batch = self.cfg.max_batch.min((seqs / 2).max(1));
        }
        let mut preempted = 0;
        while self.running.len() > self.cfg.max_batch {
            match self.running.pop() {
                Some(victim) => self.preempt(victim)?,
                None => break,
            }
            preempted += 1;
        }
        self.stats.oom_events += 1;
        warn!(
            error = msg,
            step_tokens = n_tokens,
            step_seqs = seqs,
            preempted,
            max_batch = self.cfg.max_batch,
            max_batch_tokens = self.cfg.max_batch_tokens,
            "device out of memory: smaller steps from now on"
        );
        Ok(())
    }

    /// Hands the constraints of the sequences that pick a token this step
    /// to the mask threads, which compute their next masks while the
    /// forward runs. Returns the slots (indices into `running`) sent.
    fn send_masks(&mut self, plan: &[(usize, usize)]) -> Vec<usize> {
        if self.cfg.mask_threads == 0 {
            return Vec::new();
        }
        let picks: Vec<usize> = plan
            .iter()
            .filter(|&&(i, n)| {
                let s = &self.running[i];
                s.feed.is_empty()
                    && s.kv.len + n == s.tokens.len()
                    && s.constraint.as_ref().is_some_and(|c| c.needs_mask())
            })
            .map(|p| p.0)
            .collect();
        if picks.is_empty() {
            return Vec::new();
        }
        if self.masks.is_none() {
            match crate::masks::MaskWorkers::new(self.cfg.mask_threads) {
                Ok(w) => self.masks = Some(w),
                Err(e) => {
                    warn!(error = %e, "no mask threads; masks are computed after the forward");
                    self.cfg.mask_threads = 0;
                    return Vec::new();
                }
            }
        }
        let Some(workers) = self.masks.as_mut() else {
            return Vec::new();
        };
        let mut sent = Vec::with_capacity(picks.len());
        for i in picks {
            let Some(c) = self.running[i].constraint.take() else {
                continue;
            };
            match workers.send(crate::masks::Job { slot: i, c }) {
                Ok(()) => sent.push(i),
                // The thread is gone: this mask is computed when sampling.
                Err(job) => self.running[i].constraint = Some(job.c),
            }
        }
        sent
    }

    /// Takes back the constraints [`Scheduler::send_masks`] sent, masks
    /// computed; the time waited for them is on the step's path.
    fn recv_masks(&mut self, sent: &[usize]) -> Result<()> {
        let (back, complete) = recv_masks_from(&self.masks, sent, &mut self.stats);
        for (slot, c) in back {
            if let Some(s) = self.running.get_mut(slot) {
                s.constraint = Some(c);
            }
        }
        self.check_mask_threads(complete)
    }

    /// After the mask threads answered: `complete` false means one was lost.
    fn check_mask_threads(&mut self, complete: bool) -> Result<()> {
        if !complete {
            // Cannot happen short of a thread dying outside the grammar
            // code: the constraints it held are lost, so their sequences
            // cannot go on; later masks are computed when sampling.
            self.masks = None;
            self.cfg.mask_threads = 0;
            return Err(EngineError::Model(
                "a grammar mask thread was lost; its requests cannot go on".into(),
            ));
        }
        Ok(())
    }

    fn run_plan(&mut self, plan: &[(usize, usize)]) -> Result<usize> {
        let n_tokens: usize = plan.iter().map(|p| p.1).sum();
        let draws = self.device_draws(plan);
        let masking = self.send_masks(plan);
        let span = tracing::debug_span!("step", seqs = plan.len(), tokens = n_tokens);
        let _g = span.enter();
        // Picks drawn on the device under grammar masks: the constraints of
        // those rows are held here during the step (or are with the mask
        // threads), and the model asks for the masks once the forward is
        // launched (`DeviceMasks::masks`).
        let vocab = self.llm.model.config.vocab;
        let mut dm = DeviceMasks::default();
        if let Some((_, slots)) = &draws {
            for &i in slots {
                if masking.contains(&i) {
                    dm.any = true;
                } else if let Some(c) = self.running[i].constraint.take() {
                    dm.any = true;
                    dm.held.push((i, c));
                }
            }
        }
        let batch: Vec<SeqBatch> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                if !s.feed.is_empty() {
                    return SeqBatch {
                        tokens: &s.feed,
                        pos: s.kv.len,
                        kv: &s.kv,
                        logits: Logits::All,
                    };
                }
                let end = s.kv.len + n;
                SeqBatch {
                    tokens: &s.tokens[s.kv.len..end],
                    pos: s.kv.len,
                    kv: &s.kv,
                    logits: if end == s.tokens.len() {
                        Logits::Last
                    } else {
                        Logits::None
                    },
                }
            })
            .collect();
        let model = &self.llm.model;
        let cache = &mut self.cache;
        let state = &mut self.state;
        // A panic inside the model must not take the other requests' server
        // down with it: the batch fails, the engine goes on.
        let t0 = std::time::Instant::now();
        let masked = dm.any;
        let (workers, stats) = (&self.masks, &mut self.stats);
        let slots = draws.as_ref().map_or(&[][..], |d| &d.1[..]);
        let res = {
            let mut hook = || dm.masks(workers, &masking, slots, vocab, stats);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &draws {
                Some((d, _)) if masked => model
                    .forward_sampled_masked(cache, &batch, state, d, Some(&mut hook))
                    .map(Some),
                Some((d, _)) => model.forward_sampled(cache, &batch, state, d).map(Some),
                None => model.forward(cache, &batch, state).map(|_| None),
            }))
        };
        self.stats.forward_us += t0.elapsed().as_micros() as u64;
        drop(batch);
        let fates = std::mem::take(&mut dm.fates);
        let held_back = dm.received;
        for (slot, c) in dm.held.drain(..) {
            if let Some(s) = self.running.get_mut(slot) {
                s.constraint = Some(c);
            }
        }
        if held_back {
            self.check_mask_threads(dm.complete)?;
        } else {
            self.recv_masks(&masking)?;
        }
        let (ids, err) = match res {
            Ok(Ok(ids)) => (ids, None),
            Ok(Err(tl_model::ModelError::OutOfMemory(msg))) if n_tokens > 1 => {
                self.shrink_after_oom(plan, n_tokens, &msg)?;
                return Ok(0);
            }
            Ok(Err(tl_model::ModelError::DeviceLost(why))) => {
                // Nothing can run any more: every request fails with the
                // reason, and the engine refuses new ones.
                warn!(error = %why, "the device is lost; failing every request");
                self.lost = Some(why.clone());
                let ids: Vec<RequestId> = self.reqs.keys().copied().collect();
                for id in ids {
                    self.fail(id, EngineError::DeviceLost(why.clone()));
                }
                return Ok(0);
            }
            Ok(Err(e)) => (None, Some(EngineError::Model(e.to_string()))),
            Err(_) => (
                None,
                Some(EngineError::Model("the forward pass panicked".into())),
            ),
        };
        if let Some(e) = err {
            warn!(error = %e, "forward failed; failing its batch");
            let mut ids: Vec<RequestId> = plan.iter().map(|&(i, _)| self.running[i].req).collect();
            ids.dedup();
            for id in ids {
                self.fail(id, e.clone());
            }
            return Ok(0);
        }
        self.stats.steps += 1;

        let vocab = self.llm.model.config.vocab;
        let mut row = 0;
        let mut done: Vec<(usize, Outcome)> = Vec::new();
        let logits = self.state.logits_mut();
        for &(i, n) in plan {
            let s = &mut self.running[i];
            if !s.feed.is_empty() {
                // A speculative round: verify the drafts, keep the cache
                // past the accepted tokens only, emit them one by one.
                let Some(rows) = logits.get_mut(row * vocab..(row + n) * vocab) else {
                    return Err(EngineError::Model("missing logits rows".into()));
                };
                row += n;
                let feed = std::mem::take(&mut s.feed);
                let drafts = &feed[1..];
                // Under a lazy grammar each row is picked through it, and
                // the round ends at its trigger (`verify_lazy`).
                let (v, grammar_done) = match s.constraint.as_mut() {
                    None => (
                        verify(&mut s.sampler, rows, vocab, drafts, &s.tokens),
                        false,
                    ),
                    Some(c) => {
                        let r = verify_lazy(&mut s.sampler, rows, vocab, drafts, &s.tokens, c);
                        let time = c.take_time();
                        self.stats.masks += time.masks;
                        self.stats.mask_us += time.compute_us + time.apply_us;
                        self.stats.mask_wait_us += time.compute_us + time.apply_us;
                        match r {
                            Ok(v) => v,
                            Err(e) => {
                                warn!(request = s.req, error = %e, "grammar failed; ending the choice");
                                (
                                    tl_model::spec::Verified {
                                        accepted: 0,
                                        tokens: Vec::new(),
                                    },
                                    true,
                                )
                            }
                        }
                    }
                };
                s.kv.len += 1 + v.accepted;
                self.stats.spec_drafted += drafts.len() as u64;
                self.stats.spec_accepted += v.accepted as u64;
                let max_k = self.cfg.spec.as_ref().map_or(8, |c| c.k);
                s.spec_k = tl_model::spec::adapt_k(s.spec_k, drafts.len(), v.accepted, max_k);
                let Some(r) = self.reqs.get(&s.req) else {
                    done.push((i, Outcome::Closed));
                    continue;
                };
                let before = s.generated;
                // The draft cache holds the tokens so far and maybe drafts
                // past them: keep what the accepted text shares with it.
                s.dkv.len = s.dkv.len.min(s.tokens.len() + v.accepted);
                let mut out = Outcome::Continue;
                for t in v.tokens {
                    out = emit(self.llm, s, r, &mut self.outbox, t, None);
                    if !matches!(out, Outcome::Continue) {
                        break;
                    }
                }
                if matches!(out, Outcome::Continue) {
                    out = if grammar_done {
                        finish(self.llm, s, r, &mut self.outbox, FinishReason::Stop)
                    } else {
                        // A trigger that fired at the round's end may force
                        // what follows.
                        emit_forced(self.llm, s, r, &mut self.outbox)
                    };
                }
                if !matches!(out, Outcome::Continue) {
                    done.push((i, out));
                }
                self.stats.generated_tokens += (s.generated - before) as u64;
                self.stats.forced_tokens += std::mem::take(&mut s.forced);
                // After the emits: the accepted tokens are in `tokens` now.
                register_blocks(&mut self.pool, s)?;
                continue;
            }
            if n > 1 || !s.is_decoding() {
                self.stats.prefill_tokens += n as u64;
            }
            s.kv.len += n;
            register_blocks(&mut self.pool, s)?;
            if s.kv.len < s.tokens.len() {
                continue;
            }
            if let Some(ids) = &ids {
                // Picked on the device.
                let Some(&t) = ids.get(row) else {
                    return Err(EngineError::Model("missing sampled id".into()));
                };
                row += 1;
                let Some(r) = self.reqs.get(&s.req) else {
                    done.push((i, Outcome::Closed));
                    continue;
                };
                let before = s.generated;
                // The grammar takes the token (drawn under its mask, or seen
                // by a lazy trigger, which may turn it on and force the
                // tokens that follow); one that had nothing more to allow
                // ends the choice, the pick dropped, as on the host.
                let failed = match fates.get(row - 1) {
                    Some(Fate::End) => Some(None),
                    Some(Fate::Failed(e)) => Some(Some(e.clone())),
                    _ => match s.constraint.as_mut().map(|c| c.take_device_pick(t)) {
                        Some(Err(e)) => Some(Some(e)),
                        _ => None,
                    },
                };
                if let Some(why) = failed {
                    if let Some(e) = why {
                        warn!(request = s.req, error = %e, "grammar failed; ending the choice");
                    }
                    let out = finish(self.llm, s, r, &mut self.outbox, FinishReason::Stop);
                    if !matches!(out, Outcome::Continue) {
                        done.push((i, out));
                    }
                    continue;
                }
                let mut out = emit(self.llm, s, r, &mut self.outbox, t, None);
                if matches!(out, Outcome::Continue) {
                    out = emit_forced(self.llm, s, r, &mut self.outbox);
                }
                self.stats.generated_tokens += (s.generated - before) as u64;
                self.stats.forced_tokens += std::mem::take(&mut s.forced);
                if !matches!(out, Outcome::Continue) {
                    done.push((i, out));
                }
                continue;
            }
            let Some(lrow) = logits.get_mut(row * vocab..(row + 1) * vocab) else {
                return Err(EngineError::Model("missing logits row".into()));
            };
            row += 1;
            let Some(r) = self.reqs.get(&s.req) else {
                done.push((i, Outcome::Closed));
                continue;
            };
            let before = s.generated;
            let out = advance(
                self.llm,
                s,
                r,
                &mut self.outbox,
                lrow,
                &mut self.raw,
                &mut self.stats,
            );
            self.stats.generated_tokens += (s.generated - before) as u64;
            self.stats.forced_tokens += std::mem::take(&mut s.forced);
            if !matches!(out, Outcome::Continue) {
                done.push((i, out));
            }
        }
        // Remove back to front so indices stay valid.
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        let mut closed = Vec::new();
        for (i, out) in done {
            let mut s = self.running.remove(i);
            self.pool.free_seq(&mut s.kv)?;
            free_draft(&mut self.draft, &mut s.dkv)?;
            match out {
                Outcome::Finished(reason) => {
                    if let Some(r) = self.reqs.get_mut(&s.req) {
                        post(
                            &mut self.outbox,
                            &r.tx,
                            Event::Finished {
                                choice: s.choice,
                                reason,
                                completion_tokens: s.generated,
                                cached_tokens: s.cached_tokens,
                            },
                        );
                        r.live = r.live.saturating_sub(1);
                        if r.live == 0 {
                            self.reqs.remove(&s.req);
                        }
                    }
                }
                Outcome::Closed => closed.push(s.req),
                Outcome::Continue => {}
            }
        }
        for id in closed {
            self.cancel(id);
        }
        Ok(n_tokens)
    }
}

/// What a pick drawn on the device means for its grammar.
#[derive(Clone, Debug, Default, PartialEq)]
enum Fate {
    /// The token stands (free, or drawn under the mask).
    #[default]
    Free,
    /// The grammar was complete: the pick is dropped, the choice ends.
    End,
    /// The grammar failed: the pick is dropped, the choice ends.
    Failed(String),
}

/// The grammar masks of one step's picks drawn on the device
/// ([`Scheduler::run_plan`]): the picking rows' constraints, held while the
/// step runs, and what became of each pick.
#[derive(Default)]
struct DeviceMasks {
    /// Whether any pick is under a constraint.
    any: bool,
    /// The picking rows' constraints (slot, constraint) during the step.
    held: Vec<(usize, Box<tl_model::constrain::Constraint>)>,
    /// Whether the mask threads' constraints were taken back into `held`,
    /// and whether all came back.
    received: bool,
    complete: bool,
    /// Per draw row.
    fates: Vec<Fate>,
}

impl DeviceMasks {
    /// The masks, one per draw row (`slots[row]` is its sequence), once the
    /// forward is under way: the mask threads' work taken back, the rest
    /// computed here.
    fn masks(
        &mut self,
        workers: &Option<crate::masks::MaskWorkers>,
        sent: &[usize],
        slots: &[usize],
        vocab: usize,
        stats: &mut Stats,
    ) -> Vec<Option<Vec<u32>>> {
        use tl_model::constrain::DeviceMask;
        if !self.received {
            let (back, complete) = recv_masks_from(workers, sent, stats);
            self.held.extend(back);
            self.received = true;
            self.complete = complete;
        }
        self.fates = vec![Fate::Free; slots.len()];
        let mut out = Vec::with_capacity(slots.len());
        for (row, &slot) in slots.iter().enumerate() {
            let Some((_, c)) = self.held.iter_mut().find(|h| h.0 == slot) else {
                out.push(None);
                continue;
            };
            let m = c.device_mask(vocab);
            let time = c.take_time();
            stats.masks += time.masks;
            stats.mask_us += time.compute_us + time.apply_us;
            stats.mask_wait_us += time.compute_us + time.apply_us;
            out.push(match m {
                Ok(DeviceMask::Words(w)) => Some(w),
                Ok(DeviceMask::Free) => None,
                Ok(DeviceMask::End) => {
                    self.fates[row] = Fate::End;
                    None
                }
                Err(e) => {
                    self.fates[row] = Fate::Failed(e);
                    None
                }
            });
        }
        out
    }
}

/// The constraints the mask threads hold for `sent`, masks computed, and
/// whether all came back; the time waited is on the step's path.
fn recv_masks_from(
    workers: &Option<crate::masks::MaskWorkers>,
    sent: &[usize],
    stats: &mut Stats,
) -> (Vec<(usize, Box<tl_model::constrain::Constraint>)>, bool) {
    let mut back = Vec::with_capacity(sent.len());
    if sent.is_empty() {
        return (back, true);
    }
    let t0 = std::time::Instant::now();
    if let Some(w) = workers {
        while back.len() < sent.len() {
            let Some(d) = w.recv() else {
                break;
            };
            stats.masks += d.time.masks;
            stats.mask_us += d.time.compute_us + d.time.apply_us;
            back.push((d.slot, d.c));
        }
    }
    stats.mask_wait_us += t0.elapsed().as_micros() as u64;
    let complete = back.len() == sent.len();
    (back, complete)
}

/// Gives a sequence's draft-model blocks back.
fn free_draft(draft: &mut Option<DraftModel<'_>>, dkv: &mut SeqKv) -> Result<()> {
    match draft {
        Some(d) => d.pool.free_seq(dkv),
        None => {
            dkv.blocks.clear();
            dkv.len = 0;
            Ok(())
        }
    }
}

/// Greedy drafts from the draft model: `want[j]` tokens for the sequence
/// `running[ks[j].0]`, appended to `out[j]`. Each draft cache first catches
/// up with its sequence's tokens (long gaps in chunks of `chunk` tokens,
/// the rest in the first ragged forward, which gives the first draft), then
/// one forward per drafted position for all sequences together. A
/// sequence whose draft blocks run out drafts nothing (its `want` is set to
/// 0); one stops at the first pick whose probability is below `p_min`
/// (that pick is not drafted). Returns the number of forwards.
fn model_drafts(
    d: &mut DraftModel<'_>,
    running: &mut [Seq<'_>],
    ks: &[(usize, usize)],
    want: &mut [usize],
    out: &mut [Vec<u32>],
    chunk: usize,
    p_min: f32,
) -> Result<u64> {
    let dctx = d.model.config.context;
    let chunk = chunk.max(1);
    let mut forwards = 0u64;
    // What each sequence feeds next (owned: the batch borrows the caches).
    let mut feeds: Vec<Vec<u32>> = vec![Vec::new(); ks.len()];
    for (j, &(i, _)) in ks.iter().enumerate() {
        if want[j] == 0 {
            continue;
        }
        let Some(s) = running.get_mut(i) else {
            want[j] = 0;
            continue;
        };
        let len = s.tokens.len();
        // Within the draft model's context: positions len .. len+want-1.
        want[j] = want[j].min((dctx + 1).saturating_sub(len));
        s.dkv.len = s.dkv.len.min(len.saturating_sub(1));
        let write = len - s.dkv.len + want[j].saturating_sub(1);
        if want[j] == 0 || !d.pool.reserve(&mut s.dkv, write)? {
            want[j] = 0;
            continue;
        }
        // Catch-up beyond one chunk: whole chunks first, no logits.
        while len - s.dkv.len > chunk {
            let piece = &s.tokens[s.dkv.len..s.dkv.len + chunk];
            let b = [SeqBatch {
                tokens: piece,
                pos: s.dkv.len,
                kv: &s.dkv,
                logits: Logits::None,
            }];
            d.model
                .forward(&mut d.cache, &b, &mut d.state)
                .map_err(|e| EngineError::Model(format!("draft model: {e}")))?;
            forwards += 1;
            s.dkv.len += chunk;
        }
        feeds[j] = s.tokens[s.dkv.len..].to_vec();
    }
    let kmax = want.iter().copied().max().unwrap_or(0);
    for it in 0..kmax {
        let idx: Vec<usize> = (0..ks.len())
            .filter(|&j| want[j] > it && !feeds[j].is_empty())
            .collect();
        if idx.is_empty() {
            break;
        }
        let batch: Vec<SeqBatch> = idx
            .iter()
            .filter_map(|&j| {
                let s = running.get(ks[j].0)?;
                Some(SeqBatch {
                    tokens: &feeds[j],
                    pos: s.dkv.len,
                    kv: &s.dkv,
                    logits: Logits::Last,
                })
            })
            .collect();
        if batch.len() != idx.len() {
            return Err(EngineError::Model("a drafting sequence is missing".into()));
        }
        let ids = d
            .model
            .forward_draft(&mut d.cache, &batch, &mut d.state, p_min)
            .map_err(|e| EngineError::Model(format!("draft model: {e}")))?;
        forwards += 1;
        drop(batch);
        if ids.len() != idx.len() {
            return Err(EngineError::Model(format!(
                "the draft model gave {} tokens for {} sequences",
                ids.len(),
                idx.len()
            )));
        }
        for (&j, &t) in idx.iter().zip(&ids) {
            if let Some(s) = running.get_mut(ks[j].0) {
                s.dkv.len += feeds[j].len();
            }
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
    Ok(forwards)
}

/// Samples the next token of `s` from its logits row, streams it, and says
/// whether the sequence goes on.
#[allow(clippy::too_many_arguments)]
fn advance<'a>(
    llm: &'a Llm,
    s: &mut Seq<'a>,
    r: &ReqState,
    ob: &mut Outbox,
    row: &mut [f32],
    raw: &mut Vec<f32>,
    stats: &mut Stats,
) -> Outcome {
    if r.logprobs.is_some() {
        raw.clear();
        raw.extend_from_slice(row);
    }
    let t = match s.constraint.as_mut() {
        Some(c) => {
            let (sampler, tokens) = (&mut s.sampler, &s.tokens);
            let picked = c.pick(row, |row| sampler.sample(row, tokens));
            // What was not computed ahead was computed here, on the path.
            let time = c.take_time();
            stats.masks += time.masks;
            stats.mask_us += time.compute_us + time.apply_us;
            stats.mask_wait_us += time.compute_us + time.apply_us;
            match picked {
                Ok(Some(t)) => t,
                // The grammar is complete: nothing more may follow.
                Ok(None) => return finish(llm, s, r, ob, FinishReason::Stop),
                Err(e) => {
                    warn!(request = s.req, error = %e, "grammar failed; ending the choice");
                    return finish(llm, s, r, ob, FinishReason::Stop);
                }
            }
        }
        None => s.sampler.sample(row, &s.tokens),
    };
    let logprob = r.logprobs.map(|k| token_logprob(llm, raw, t, k));
    let out = emit(llm, s, r, ob, t, logprob);
    if matches!(out, Outcome::Continue) {
        return emit_forced(llm, s, r, ob);
    }
    out
}

/// Tokens the grammar forces next are appended at once (fast-forward) and
/// computed together in the next step, like a prompt chunk; not where
/// logprobs were asked for (a forced token has none).
fn emit_forced<'a>(llm: &'a Llm, s: &mut Seq<'a>, r: &ReqState, ob: &mut Outbox) -> Outcome {
    if r.logprobs.is_some() {
        return Outcome::Continue;
    }
    let forced = s
        .constraint
        .as_mut()
        .map(|c| c.take_forced())
        .unwrap_or_default();
    for f in forced {
        s.forced += 1;
        let out = emit(llm, s, r, ob, f, None);
        if !matches!(out, Outcome::Continue) {
            return out;
        }
    }
    Outcome::Continue
}

/// Registers the sequence's newly completed blocks in the prefix cache
/// (only tokens in the cache: rejected drafts never are).
fn register_blocks(pool: &mut BlockPool, s: &mut Seq<'_>) -> Result<()> {
    while (s.hashed + 1) * BLOCK_SIZE <= s.kv.len.min(s.tokens.len()) {
        let b = s.hashed;
        let Some(&block) = s.kv.blocks.get(b) else {
            break;
        };
        s.last_hash = pool.register(
            s.last_hash,
            &s.tokens[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE],
            block,
        )?;
        s.hashed += 1;
    }
    Ok(())
}

/// Appends the chosen token `t`: stop checks, the text delta, the length
/// limit.
fn emit<'a>(
    llm: &'a Llm,
    s: &mut Seq<'a>,
    r: &ReqState,
    ob: &mut Outbox,
    t: u32,
    logprob: Option<TokenLogprob>,
) -> Outcome {
    if r.stop_ids.contains(&t) {
        return finish(llm, s, r, ob, FinishReason::Stop);
    }
    s.tokens.push(t);
    s.generated += 1;
    let piece = s.decoder.push(t).unwrap_or_default();
    let (text, hit) = s.stop.push(&piece);
    if !post(
        ob,
        &r.tx,
        Event::Delta {
            choice: s.choice,
            text,
            token: Some(t),
            logprob,
        },
    ) {
        return Outcome::Closed;
    }
    if hit {
        return Outcome::Finished(FinishReason::Stop);
    }
    if s.generated >= s.max_tokens || s.tokens.len() >= llm.model.config.context {
        return finish(llm, s, r, ob, FinishReason::Length);
    }
    Outcome::Continue
}

/// Flushes held-back text before a finish that was not a stop string.
fn finish<'a>(
    llm: &'a Llm,
    s: &mut Seq<'a>,
    r: &ReqState,
    ob: &mut Outbox,
    reason: FinishReason,
) -> Outcome {
    let dec = std::mem::replace(&mut s.decoder, llm.tokenizer.stream_decoder(false));
    let (mut text, hit) = s.stop.push(&dec.finish());
    if !hit {
        text.push_str(&s.stop.finish());
    }
    if !text.is_empty()
        && !post(
            ob,
            &r.tx,
            Event::Delta {
                choice: s.choice,
                text,
                token: None,
                logprob: None,
            },
        )
    {
        return Outcome::Closed;
    }
    Outcome::Finished(if hit { FinishReason::Stop } else { reason })
}

/// Log-softmax of the model's own distribution (before penalties and
/// temperature, as OpenAI reports it) at `token`, plus the `k` most likely.
fn token_logprob(llm: &Llm, raw: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + raw.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &x) in raw.iter().enumerate() {
            if top.len() < k || top.last().is_some_and(|l| x > l.0) {
                let at = top.partition_point(|p| p.0 >= x);
                top.insert(at, (x, i as u32));
                top.truncate(k);
            }
        }
    }
    let piece = |t: u32| -> (String, Vec<u8>) {
        let b = llm
            .tokenizer
            .token_to_piece(t, false)
            .map(|b| b.to_vec())
            .unwrap_or_default();
        (String::from_utf8_lossy(&b).into_owned(), b)
    };
    let (text, bytes) = piece(token);
    TokenLogprob {
        token,
        text,
        bytes,
        logprob: raw
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| x - lse),
        top: top
            .into_iter()
            .map(|(x, t)| {
                let (s, b) = piece(t);
                (t, s, b, x - lse)
            })
            .collect(),
    }
}
