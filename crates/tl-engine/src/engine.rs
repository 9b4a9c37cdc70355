//! The engine handle: a dedicated OS thread runs the [`Scheduler`] (the
//! model is CPU-bound and parallel inside, so it must not sit on the async
//! runtime's workers) and takes [`Command`]s over a channel; each request
//! gets its own stream of [`Event`]s back.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tl_model::kv::BLOCK_SIZE;
use tl_model::llm::Llm;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, info_span, warn};

use crate::error::{EngineError, Result};
use crate::request::{Event, GenerationRequest, ValidRequest, Validator};
use crate::scheduler::{DraftModel, RequestId, Scheduler, SchedulerConfig, Stats};

/// How the engine is sized.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Bytes of KV cache (K and V, all layers).
    pub kv_bytes: usize,
    /// On a GPU: size the KV cache so that the process uses this fraction
    /// of the card's memory (vLLM's `--gpu-memory-utilization`): the
    /// fraction of the total, less what is in use once the weights are
    /// loaded (by this process and any other), less the largest step's
    /// activations and a margin. Overrides `kv_bytes`.
    pub gpu_memory_utilization: Option<f64>,
    /// Most requests waiting to start; more are refused with `QueueFull`.
    pub max_queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            scheduler: SchedulerConfig::default(),
            kv_bytes: 512 << 20,
            gpu_memory_utilization: None,
            max_queue: 64,
        }
    }
}

/// What the engine thread is told.
pub enum Command {
    Submit {
        id: RequestId,
        req: ValidRequest,
        tx: mpsc::UnboundedSender<Event>,
    },
    Cancel(RequestId),
    Stats(oneshot::Sender<Stats>),
    Shutdown,
}

struct Shared {
    queued: Arc<AtomicUsize>,
    accepting: AtomicBool,
    next_id: AtomicU64,
    /// Published after every step, for metrics that must not wait on a step.
    stats: Mutex<Stats>,
    /// Why the device was lost, once a step found it so.
    lost: Mutex<Option<String>>,
}

/// A running engine. Dropping it shuts the thread down.
pub struct Engine {
    tx: mpsc::UnboundedSender<Command>,
    validator: Validator,
    shared: Arc<Shared>,
    max_queue: usize,
    kv_blocks: usize,
    draft_kv_bytes: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The events of one request. Dropping it cancels the request (a client
/// that went away frees its blocks at the next step).
pub struct RequestStream {
    id: RequestId,
    rx: mpsc::UnboundedReceiver<Event>,
    cancel: mpsc::UnboundedSender<Command>,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event; `None` once every choice has finished.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Blocking variant for code outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // Harmless when the request already finished.
        let _ = self.cancel.send(Command::Cancel(self.id));
    }
}

/// The KV cache's bytes: `kv_bytes`, or on a GPU with
/// `gpu_memory_utilization` what the fraction leaves.
fn kv_budget(llm: &Llm, cfg: &EngineConfig) -> Result<usize> {
    let Some(f) = cfg.gpu_memory_utilization else {
        return Ok(cfg.kv_bytes);
    };
    if !(f > 0.0 && f <= 1.0) {
        return Err(EngineError::Setup(format!(
            "--gpu-memory-utilization {f}: must be in (0, 1]"
        )));
    }
    let Some((free, total)) = llm.model.device_memory() else {
        return Err(EngineError::Setup(
            "--gpu-memory-utilization applies to a model on a GPU (use --kv-memory on the CPU)"
                .into(),
        ));
    };
    // The step buffers of the largest step, and a margin for the CUDA
    // context's own allocations (cuBLAS workspace, graphs).
    let step = llm
        .model
        .step_bytes(cfg.scheduler.max_batch_tokens.max(cfg.scheduler.max_batch));
    let margin = 256usize << 20;
    let in_use = total - free.min(total);
    let budget = (f * total as f64) as usize;
    let kv = budget
        .checked_sub(in_use + step + margin)
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            EngineError::Setup(format!(
                "--gpu-memory-utilization {f}: {:.2} GiB of the card's {:.2} GiB leave nothing \
                 for the KV cache ({:.2} GiB in use after loading, {:.2} GiB for step buffers \
                 and margin)",
                budget as f64 / GIB,
                total as f64 / GIB,
                in_use as f64 / GIB,
                (step + margin) as f64 / GIB
            ))
        })?;
    info!(
        fraction = f,
        total_gib = total as f64 / GIB,
        in_use_gib = in_use as f64 / GIB,
        step_gib = step as f64 / GIB,
        kv_gib = kv as f64 / GIB,
        "KV cache sized from the GPU's memory"
    );
    Ok(kv)
}

const GIB: f64 = (1u64 << 30) as f64;

impl Engine {
    /// Allocates the KV cache and starts the engine thread.
    pub fn start(llm: Arc<Llm>, cfg: EngineConfig) -> Result<Engine> {
        Self::start_with_draft(llm, None, cfg)
    }

    /// As [`Engine::start`], with the draft model that `SpecMethod::Draft`
    /// speculates with (required for it; its vocabulary must be the
    /// target's, token text by token text). `SpecMethod::SelfDraft` needs
    /// none: the target drafts for itself. A draft model gets its own KV
    /// cache with as many blocks as the target's; the two share the KV
    /// memory (`kv_bytes` or what `gpu_memory_utilization` leaves).
    pub fn start_with_draft(
        llm: Arc<Llm>,
        draft: Option<Arc<Llm>>,
        cfg: EngineConfig,
    ) -> Result<Engine> {
        let method = cfg.scheduler.spec.as_ref().map(|c| c.method.clone());
        // The model that drafts: a second one, or the target itself.
        let drafter: Option<Arc<Llm>> = match (&method, draft) {
            (Some(tl_model::spec::SpecMethod::Draft), Some(d)) => {
                llm.check_draft(&d)
                    .map_err(|e| EngineError::Setup(format!("the draft model: {e}")))?;
                Some(d)
            }
            (Some(tl_model::spec::SpecMethod::Draft), None) => {
                return Err(EngineError::Setup(
                    "speculation with a draft model needs a draft model (--draft-model FILE)"
                        .into(),
                ))
            }
            (Some(tl_model::spec::SpecMethod::SelfDraft), None) => {
                if llm.model.device().is_gpu() {
                    return Err(EngineError::Setup(
                        "--spec self (layer skipping) runs on the CPU only".into(),
                    ));
                }
                Some(llm.clone())
            }
            (_, Some(_)) => {
                return Err(EngineError::Setup(
                    "a draft model is used with speculation method 'draft' only".into(),
                ))
            }
            (_, None) => None,
        };
        // The self-speculation draft keeps K and V of the layers it runs
        // only.
        let self_skip = match &method {
            Some(tl_model::spec::SpecMethod::SelfDraft) => {
                Some(tl_model::spec::self_draft_layers(llm.model.config.n_layers))
            }
            _ => None,
        };
        let per_block = llm.model.kv_bytes_per_token() * BLOCK_SIZE;
        let draft_per_block = match (&drafter, &self_skip) {
            (Some(d), Some(skip)) => {
                d.model
                    .kv_bytes_per_token_layers(skip.iter().filter(|&&s| !s).count())
                    * BLOCK_SIZE
            }
            (Some(d), None) => d.model.kv_bytes_per_token() * BLOCK_SIZE,
            (None, _) => 0,
        };
        let kv_bytes = kv_budget(&llm, &cfg)?;
        let kv_blocks = kv_bytes / (per_block + draft_per_block).max(1);
        if kv_blocks == 0 {
            return Err(EngineError::Setup(format!(
                "{kv_bytes} bytes of KV memory hold no block of {} bytes",
                per_block + draft_per_block
            )));
        }
        let cache = llm
            .model
            .new_cache_blocks(kv_blocks)
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        let draft_cache = match (&drafter, &self_skip) {
            (Some(d), Some(skip)) => {
                let held: Vec<bool> = skip.iter().map(|&s| !s).collect();
                Some(
                    d.model
                        .new_cache_blocks_for_layers(kv_blocks, &held)
                        .map_err(|e| {
                            EngineError::Setup(format!("the self-speculation draft's cache: {e}"))
                        })?,
                )
            }
            (Some(d), None) => Some(
                d.model
                    .new_cache_blocks(kv_blocks)
                    .map_err(|e| EngineError::Setup(format!("the draft model's cache: {e}")))?,
            ),
            (None, _) => None,
        };
        let draft_kv_bytes = draft_cache.as_ref().map_or(0, |c| c.host_bytes());
        if let Some(c) = &draft_cache {
            info!(
                method = %method.as_ref().map_or(String::new(), |m| m.to_string()),
                kv_blocks,
                bytes = kv_blocks * draft_per_block,
                layers = c.held_layers(),
                "draft KV cache allocated"
            );
        }
        info!(
            device = %llm.model.device(),
            kv_type = %llm.model.kv_type(),
            kv_blocks,
            kv_tokens = kv_blocks * BLOCK_SIZE,
            bytes = kv_blocks * per_block,
            "KV cache allocated: {} tokens fit",
            kv_blocks * BLOCK_SIZE
        );
        let validator = Validator::new(llm.clone(), kv_blocks * BLOCK_SIZE);
        let shared = Arc::new(Shared {
            queued: Arc::new(AtomicUsize::new(0)),
            accepting: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            stats: Mutex::new(Stats {
                kv_blocks_total: kv_blocks,
                kv_blocks_free: kv_blocks,
                ..Default::default()
            }),
            lost: Mutex::new(None),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let sh = shared.clone();
        let sched_cfg = cfg.scheduler.clone();
        let thread = std::thread::Builder::new()
            .name("tl-engine".into())
            .spawn(move || {
                let mut sched = Scheduler::with_cache(&llm, sched_cfg, cache);
                sched.set_queue_counter(sh.queued.clone());
                if let (Some(d), Some(dc)) = (&drafter, draft_cache) {
                    let dm = match method {
                        Some(tl_model::spec::SpecMethod::SelfDraft) => {
                            DraftModel::self_draft(&d.model, dc)
                        }
                        _ => Ok(DraftModel::new(&d.model, dc)),
                    };
                    match dm {
                        Ok(dm) => sched.set_draft(dm),
                        Err(e) => warn!(error = %e, "no draft model: speculation drafts nothing"),
                    }
                }
                run_loop(&mut sched, rx, &sh);
            })
            .map_err(|e| EngineError::Setup(format!("spawning the engine thread: {e}")))?;
        Ok(Engine {
            tx,
            validator,
            shared,
            max_queue: cfg.max_queue,
            kv_blocks,
            draft_kv_bytes,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    pub fn llm(&self) -> &Arc<Llm> {
        self.validator.llm()
    }

    pub fn kv_blocks(&self) -> usize {
        self.kv_blocks
    }

    /// Bytes of the draft's KV cache in host memory (0 without a draft,
    /// or with its cache on a GPU).
    pub fn draft_kv_bytes(&self) -> usize {
        self.draft_kv_bytes
    }

    pub fn validate(&self, r: GenerationRequest) -> Result<ValidRequest> {
        self.validator.validate(r)
    }

    /// Queues a validated request. Fails at once when the queue is full or
    /// the engine is shutting down.
    pub fn submit(&self, req: ValidRequest) -> Result<RequestStream> {
        if let Some(why) = self.device_lost() {
            return Err(EngineError::DeviceLost(why));
        }
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        let q = &self.shared.queued;
        if q.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            q.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull {
                max: self.max_queue,
            });
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        if self.tx.send(Command::Submit { id, req, tx }).is_err() {
            q.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::ShuttingDown);
        }
        Ok(RequestStream {
            id,
            rx,
            cancel: self.tx.clone(),
        })
    }

    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    /// Why the model's device is lost to this process, once a step found
    /// it so (every request in the engine then failed with
    /// [`EngineError::DeviceLost`]; new ones are refused). A server stops
    /// on it, so that whatever supervises it can start a fresh one.
    pub fn device_lost(&self) -> Option<String> {
        match self.shared.lost.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Requests submitted and not yet started.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Exact stats, answered between two steps.
    pub async fn stats(&self) -> Result<Stats> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Stats(tx))
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Stats as of the last step, without waiting for the engine.
    pub fn last_stats(&self) -> Stats {
        match self.shared.stats.lock() {
            Ok(s) => *s,
            Err(p) => *p.into_inner(),
        }
    }

    /// Refuse new requests from now on; the ones in flight go on.
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// Stops the thread; requests still in flight get `ShuttingDown`.
    pub fn shutdown(&self) {
        self.stop_accepting();
        let _ = self.tx.send(Command::Shutdown);
        let handle = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(h) = handle {
            if h.join().is_err() {
                warn!("the engine thread panicked");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Returns `false` on shutdown.
fn handle(sched: &mut Scheduler, cmd: Command) -> bool {
    match cmd {
        Command::Submit { id, req, tx } => {
            info_span!("request", id).in_scope(|| {
                tracing::debug!(prompt = req.prompt.len(), n = req.n, "queued");
            });
            sched.add(id, req, tx);
        }
        Command::Cancel(id) => sched.cancel(id),
        Command::Stats(tx) => {
            let _ = tx.send(sched.stats());
        }
        Command::Shutdown => return false,
    }
    true
}

fn publish(sched: &Scheduler, sh: &Shared) {
    if let Some(why) = sched.device_lost() {
        sh.accepting.store(false, Ordering::Release);
        match sh.lost.lock() {
            Ok(mut g) => *g = Some(why.to_string()),
            Err(p) => *p.into_inner() = Some(why.to_string()),
        }
    }
    let s = sched.stats();
    match sh.stats.lock() {
        Ok(mut g) => *g = s,
        Err(p) => *p.into_inner() = s,
    }
}

fn run_loop(sched: &mut Scheduler, mut rx: mpsc::UnboundedReceiver<Command>, sh: &Shared) {
    'outer: loop {
        if sched.is_idle() {
            publish(sched, sh);
            match rx.blocking_recv() {
                Some(cmd) => {
                    if !handle(sched, cmd) {
                        break;
                    }
                }
                None => break,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            if !handle(sched, cmd) {
                break 'outer;
            }
        }
        if !sched.is_idle() {
            sched.step();
        }
        publish(sched, sh);
    }
    sched.abort_all(EngineError::ShuttingDown);
    publish(sched, sh);
    info!("engine stopped");
}
