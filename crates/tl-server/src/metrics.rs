//! Prometheus metrics. Request-level figures (latencies, token counts,
//! outcomes) are recorded by the handlers as they happen; engine-level ones
//! (queue, KV blocks, prefix cache) are read from the engine's last
//! published stats at scrape time, so a scrape never waits for a step.

use std::sync::Mutex;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
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
    prefix_hit_rate: prometheus::Gauge,
    engine_counters: Mutex<EngineCounters>,
}

/// Engine totals mirrored into Prometheus counters (which only go up by
/// deltas).
struct EngineCounters {
    prefix_queried: IntCounter,
    prefix_hit: IntCounter,
    prefill: IntCounter,
    generated: IntCounter,
    preemptions: IntCounter,
    steps: IntCounter,
    spec_drafted: IntCounter,
    spec_accepted: IntCounter,
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
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
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
            }),
            requests,
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
            let c = match self.engine_counters.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            bump(&c.prefix_queried, s.prefix_queried_tokens);
            bump(&c.prefix_hit, s.prefix_hit_tokens);
            bump(&c.prefill, s.prefill_tokens);
            bump(&c.generated, s.generated_tokens);
            bump(&c.preemptions, s.preemptions);
            bump(&c.steps, s.steps);
            bump(&c.spec_drafted, s.spec_drafted);
            bump(&c.spec_accepted, s.spec_accepted);
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
