//! Prometheus metrics. Request-level figures (latencies, token counts,
//! outcomes) are recorded by the handlers as they happen; engine-level ones
//! (queue, KV blocks, prefix cache) are read from the engine's last
//! published stats at scrape time, so a scrape never waits for a step.
//!
//! Next to the `tl_*` families the same figures are published under the
//! names vLLM uses (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
//! `vllm:time_to_first_token_seconds`, …), labelled `model_name` and
//! `engine` as vLLM labels them, so routers and autoscalers written for vLLM
//! read a `tl serve` replica unchanged.

use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tl_engine::Stats;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    running: IntGauge,
    waiting: IntGauge,
    kv_total: IntGauge,
    kv_used: IntGauge,
    kv_free: IntGauge,
    kv_cached: IntGauge,
    draft_kv_used: IntGauge,
    prefix_hit_rate: prometheus::Gauge,
    engine_counters: Mutex<EngineCounters>,
    pub vllm: VllmMetrics,
}

/// The vLLM-named families, each already bound to this server's labels.
pub struct VllmMetrics {
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    gpu_cache_usage: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    success: IntCounterVec,
    preemptions: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    labels: [String; 2],
}

impl VllmMetrics {
    /// Counts a finished request by why it finished (`stop`, `length`,
    /// `abort`), as `vllm:request_success_total` does.
    pub fn success(&self, finished_reason: &str) {
        self.success
            .with_label_values(&[&self.labels[0], &self.labels[1], finished_reason])
            .inc();
    }
}

const VLLM_LABELS: [&str; 2] = ["model_name", "engine"];

fn vllm_gauge(r: &Registry, name: &str, help: &str, l: &[&str; 2]) -> prometheus::Result<Gauge> {
    let g = GaugeVec::new(Opts::new(name, help), &VLLM_LABELS)?;
    r.register(Box::new(g.clone()))?;
    Ok(g.with_label_values(l))
}

fn vllm_int_gauge(
    r: &Registry,
    name: &str,
    help: &str,
    l: &[&str; 2],
) -> prometheus::Result<IntGauge> {
    let g = IntGaugeVec::new(Opts::new(name, help), &VLLM_LABELS)?;
    r.register(Box::new(g.clone()))?;
    Ok(g.with_label_values(l))
}

fn vllm_counter(
    r: &Registry,
    name: &str,
    help: &str,
    l: &[&str; 2],
) -> prometheus::Result<IntCounter> {
    let c = IntCounterVec::new(Opts::new(name, help), &VLLM_LABELS)?;
    r.register(Box::new(c.clone()))?;
    Ok(c.with_label_values(l))
}

fn vllm_histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    l: &[&str; 2],
) -> prometheus::Result<Histogram> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &VLLM_LABELS,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h.with_label_values(l))
}

impl VllmMetrics {
    fn new(r: &Registry, model_name: &str) -> prometheus::Result<Self> {
        let l = [model_name, "0"];
        let lat = vec![
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
        ];
        let tok = vec![
            0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0,
        ];
        let e2e = vec![
            0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
        ];
        let success = IntCounterVec::new(
            Opts::new(
                "vllm:request_success_total",
                "Count of successfully processed requests.",
            ),
            &["model_name", "engine", "finished_reason"],
        )?;
        r.register(Box::new(success.clone()))?;
        Ok(VllmMetrics {
            running: vllm_int_gauge(
                r,
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                &l,
            )?,
            waiting: vllm_int_gauge(
                r,
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                &l,
            )?,
            kv_usage: vllm_gauge(
                r,
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                &l,
            )?,
            gpu_cache_usage: vllm_gauge(
                r,
                "vllm:gpu_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage (the older name of vllm:kv_cache_usage_perc).",
                &l,
            )?,
            prompt_tokens: vllm_counter(
                r,
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
                &l,
            )?,
            generation_tokens: vllm_counter(
                r,
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                &l,
            )?,
            ttft: vllm_histogram(
                r,
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                lat,
                &l,
            )?,
            itl: vllm_histogram(
                r,
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                tok.clone(),
                &l,
            )?,
            tpot: vllm_histogram(
                r,
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                tok,
                &l,
            )?,
            e2e: vllm_histogram(
                r,
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                e2e,
                &l,
            )?,
            success,
            preemptions: vllm_counter(
                r,
                "vllm:num_preemptions_total",
                "Cumulative number of preemption from the engine.",
                &l,
            )?,
            prefix_queries: vllm_counter(
                r,
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                &l,
            )?,
            prefix_hits: vllm_counter(
                r,
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                &l,
            )?,
            labels: [model_name.to_string(), "0".to_string()],
        })
    }
}

/// Engine totals mirrored into Prometheus counters (which only go up by
/// deltas).
struct EngineCounters {
    prefix_queried: IntCounter,
    prefix_hit: IntCounter,
    prefill: IntCounter,
    generated: IntCounter,
    oom_events: IntCounter,
    forced: IntCounter,
    step_us: IntCounter,
    forward_us: IntCounter,
    masks: IntCounter,
    mask_us: IntCounter,
    mask_wait_us: IntCounter,
    preemptions: IntCounter,
    steps: IntCounter,
    spec_drafted: IntCounter,
    spec_accepted: IntCounter,
    draft_forwards: IntCounter,
    draft_us: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn bump(c: &IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

impl Metrics {
    /// `model_name` is the label of the vLLM-named families (the served id).
    pub fn new(model_name: &str) -> prometheus::Result<Self> {
        let r = Registry::new();
        let vllm = VllmMetrics::new(&r, model_name)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "tl_requests_total",
                "HTTP requests to the generation endpoints by endpoint and status code",
            ),
            &["endpoint", "status"],
        )?;
        r.register(Box::new(requests.clone()))?;
        let lat = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let itl = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
        ];
        let e2e = vec![
            0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ];
        Ok(Metrics {
            prompt_tokens: counter(
                &r,
                "tl_prompt_tokens_total",
                "Prompt tokens of finished requests",
            )?,
            completion_tokens: counter(
                &r,
                "tl_generation_tokens_total",
                "Generated tokens of finished requests",
            )?,
            ttft: histogram(
                &r,
                "tl_time_to_first_token_seconds",
                "From request arrival to its first generated token",
                lat,
            )?,
            itl: histogram(
                &r,
                "tl_inter_token_latency_seconds",
                "Between consecutive generated tokens of one choice",
                itl,
            )?,
            e2e: histogram(
                &r,
                "tl_request_duration_seconds",
                "From request arrival to its last byte",
                e2e,
            )?,
            running: gauge(&r, "tl_requests_running", "Requests being generated")?,
            waiting: gauge(&r, "tl_requests_waiting", "Requests queued, not started")?,
            kv_total: gauge(&r, "tl_kv_blocks_total", "KV cache blocks in the pool")?,
            kv_used: gauge(
                &r,
                "tl_kv_blocks_used",
                "KV blocks referenced by live sequences",
            )?,
            kv_free: gauge(&r, "tl_kv_blocks_free", "KV blocks on the free list")?,
            kv_cached: gauge(
                &r,
                "tl_kv_blocks_cached",
                "KV blocks held by the prefix cache",
            )?,
            draft_kv_used: gauge(
                &r,
                "tl_draft_kv_blocks_used",
                "Draft-model KV blocks held by live sequences (--spec draft or self)",
            )?,
            prefix_hit_rate: {
                let g = prometheus::Gauge::new(
                    "tl_prefix_cache_hit_rate",
                    "Share of looked-up prompt tokens found in the prefix cache",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            engine_counters: Mutex::new(EngineCounters {
                prefix_queried: counter(
                    &r,
                    "tl_prefix_cache_queried_tokens_total",
                    "Prompt tokens looked up in the prefix cache",
                )?,
                prefix_hit: counter(
                    &r,
                    "tl_prefix_cache_hit_tokens_total",
                    "Prompt tokens whose KV came from the prefix cache",
                )?,
                prefill: counter(
                    &r,
                    "tl_prefill_tokens_total",
                    "Tokens run through the model as prompt (recomputation included)",
                )?,
                generated: counter(&r, "tl_engine_generated_tokens_total", "Tokens sampled")?,
                preemptions: counter(
                    &r,
                    "tl_preemptions_total",
                    "Sequences preempted (recompute) for lack of KV blocks",
                )?,
                forced: counter(
                    &r,
                    "tl_forced_tokens_total",
                    "Tokens a grammar forced, appended without sampling (fast-forward)",
                )?,
                step_us: counter(
                    &r,
                    "tl_engine_step_microseconds_total",
                    "Time in engine steps (scheduling, forward, outputs)",
                )?,
                forward_us: counter(
                    &r,
                    "tl_engine_forward_microseconds_total",
                    "Time of engine steps inside the model's forward (device work and the wait for it)",
                )?,
                masks: counter(
                    &r,
                    "tl_engine_masks_total",
                    "Grammar masks computed for constrained sampling",
                )?,
                mask_us: counter(
                    &r,
                    "tl_engine_mask_microseconds_total",
                    "Time computing and applying grammar masks, on whichever thread",
                )?,
                mask_wait_us: counter(
                    &r,
                    "tl_engine_mask_wait_microseconds_total",
                    "Time of steps spent on masks: computed after the forward, waited for, applied",
                )?,
                oom_events: counter(
                    &r,
                    "tl_oom_events_total",
                    "Steps the device had no memory for (each halved the step limits and preempted)",
                )?,
                steps: counter(
                    &r,
                    "tl_engine_steps_total",
                    "Forward passes run by the engine",
                )?,
                spec_drafted: counter(
                    &r,
                    "tl_spec_drafted_tokens_total",
                    "Tokens drafted for speculative decoding",
                )?,
                spec_accepted: counter(
                    &r,
                    "tl_spec_accepted_tokens_total",
                    "Drafted tokens accepted by verification (acceptance rate = accepted / drafted)",
                )?,
                draft_forwards: counter(
                    &r,
                    "tl_spec_draft_forwards_total",
                    "Forward passes of the draft model (--spec draft or self)",
                )?,
                draft_us: counter(
                    &r,
                    "tl_spec_draft_microseconds_total",
                    "Time of engine steps in the draft model (part of the step time, not of the forward time)",
                )?,
            }),
            requests,
            vllm,
            registry: r,
        })
    }

    /// The text exposition, engine gauges refreshed from `stats`.
    pub fn render(&self, stats: Option<Stats>) -> String {
        if let Some(s) = stats {
            self.running.set(s.running_requests as i64);
            self.waiting.set(s.waiting_requests as i64);
            self.kv_total.set(s.kv_blocks_total as i64);
            self.kv_used.set(s.kv_blocks_used as i64);
            self.kv_free.set(s.kv_blocks_free as i64);
            self.kv_cached.set(s.kv_blocks_cached as i64);
            let rate = if s.prefix_queried_tokens == 0 {
                0.0
            } else {
                s.prefix_hit_tokens as f64 / s.prefix_queried_tokens as f64
            };
            self.prefix_hit_rate.set(rate);
            let v = &self.vllm;
            v.running.set(s.running_requests as i64);
            v.waiting.set(s.waiting_requests as i64);
            let usage = if s.kv_blocks_total == 0 {
                0.0
            } else {
                s.kv_blocks_used as f64 / s.kv_blocks_total as f64
            };
            v.kv_usage.set(usage);
            v.gpu_cache_usage.set(usage);
            bump(&v.preemptions, s.preemptions);
            bump(&v.prefix_queries, s.prefix_queried_tokens);
            bump(&v.prefix_hits, s.prefix_hit_tokens);
            let c = match self.engine_counters.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            bump(&c.prefix_queried, s.prefix_queried_tokens);
            bump(&c.prefix_hit, s.prefix_hit_tokens);
            bump(&c.prefill, s.prefill_tokens);
            bump(&c.generated, s.generated_tokens);
            bump(&c.preemptions, s.preemptions);
            bump(&c.oom_events, s.oom_events);
            bump(&c.forced, s.forced_tokens);
            bump(&c.step_us, s.step_us);
            bump(&c.forward_us, s.forward_us);
            bump(&c.masks, s.masks);
            bump(&c.mask_us, s.mask_us);
            bump(&c.mask_wait_us, s.mask_wait_us);
            bump(&c.steps, s.steps);
            bump(&c.spec_drafted, s.spec_drafted);
            bump(&c.spec_accepted, s.spec_accepted);
            bump(&c.draft_forwards, s.draft_forwards);
            bump(&c.draft_us, s.draft_us);
            self.draft_kv_used.set(s.draft_kv_blocks_used as i64);
        }
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
