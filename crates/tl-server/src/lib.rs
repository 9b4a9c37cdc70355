//! The OpenAI-compatible HTTP server over a [`tl_engine::Engine`].
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or
//! SSE streams ending in `data: [DONE]`), `POST /v1/embeddings` (served
//! instead of generation when the model is an embedding model: bert,
//! nomic-bert; see `embeddings.rs`), `GET /v1/models`, `GET /health`
//! (200 only once the model is loaded and while not draining),
//! `GET /metrics` (Prometheus text) and the web chat page at `/`, plus the
//! endpoints routers and autoscalers built for vLLM and SGLang probe:
//! `GET /version`, `/get_server_info` (`/server_info`), `/get_model_info`,
//! `/get_load`, `/load`, `/health_generate`, `POST /tokenize` and
//! `/detokenize`.
//!
//! Each generation request is read with a size limit, parsed and validated
//! at the edge ([`api::parse`], then the engine's `Validator`), submitted to
//! the engine (a bounded queue: 429 with `Retry-After` when full), and
//! answered from the engine's event stream. Every failure goes through one
//! mapping to OpenAI's error JSON ([`error::ApiError`]). A streaming client
//! that goes away cancels its request at once (the forwarding task watches
//! the body channel); every request has a deadline. On SIGTERM or SIGINT
//! the server stops accepting connections and requests, lets the streams in
//! flight finish, then stops the engine.

pub mod api;
mod compat;
mod embeddings;
pub mod error;
pub mod harmony;
pub mod metrics;
pub mod tools;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, SelectAll, StreamExt};
use serde_json::{json, Value};
use tl_engine::{Engine, EngineConfig, Event, RequestStream, TokenLogprob};
use tl_model::llm::Llm;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::{Endpoint, Parsed, Usage};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// How the HTTP side is set up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on `/v1/*` when set.
    pub api_key: Option<String>,
    /// The id `/v1/models` lists and requests must name (or omit).
    pub model_id: String,
    pub max_body_bytes: usize,
    /// Longest a request may run, queueing included (a request may ask
    /// for less with `X-Request-Timeout`).
    pub request_timeout: Duration,
    /// The model file, for `/get_model_info` and `/get_server_info`.
    pub model_path: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            model_id: "model".into(),
            max_body_bytes: 4 << 20,
            request_timeout: Duration::from_secs(600),
            model_path: String::new(),
        }
    }
}

/// Errors that stop the server (never a request's error).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("loading the model: {0}")]
    Load(String),
    #[error("starting the engine")]
    Engine(#[from] tl_engine::EngineError),
    #[error("server I/O")]
    Io(#[from] std::io::Error),
    #[error("metrics registry")]
    Metrics(#[from] prometheus::Error),
    #[error("the device failed, so the server stopped: {0}")]
    DeviceLost(String),
}

/// Everything a handler needs.
pub struct AppState {
    cfg: ServerConfig,
    engine: OnceLock<Arc<Engine>>,
    draining: AtomicBool,
    metrics: Metrics,
    created: u64,
    next_id: AtomicU64,
    /// The engine's settings as `/get_server_info` reports them.
    engine_args: OnceLock<Value>,
    /// The embedding model, when the server serves one (no engine then).
    embedder: OnceLock<Arc<tl_model::encoder::Embedder>>,
}

impl AppState {
    pub fn new(cfg: ServerConfig) -> Result<Arc<Self>, ServerError> {
        let metrics = Metrics::new(&cfg.model_id)?;
        Ok(Arc::new(AppState {
            cfg,
            engine: OnceLock::new(),
            draining: AtomicBool::new(false),
            metrics,
            created: now_secs(),
            next_id: AtomicU64::new(1),
            engine_args: OnceLock::new(),
            embedder: OnceLock::new(),
        }))
    }

    /// Makes the server ready (once).
    pub fn set_engine(&self, e: Arc<Engine>) {
        let _ = self.engine.set(e);
    }

    /// Records the engine's settings for `/get_server_info`.
    pub fn set_engine_args(&self, cfg: &EngineConfig) {
        let s = &cfg.scheduler;
        let _ = self.engine_args.set(json!({
            "max_running_requests": s.max_batch,
            "max_batch_tokens": s.max_batch_tokens,
            "max_queued_requests": cfg.max_queue,
            "kv_cache_bytes": if cfg.gpu_memory_utilization.is_some() { serde_json::Value::Null } else { cfg.kv_bytes.into() },
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "enable_prefix_caching": s.prefix_caching,
            "speculative": s.spec.is_some(),
            "speculative_method": s.spec.as_ref().map(|c| c.method.to_string()),
        }));
    }

    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.get()
    }

    /// Makes the server ready with an embedding model (once).
    pub fn set_embedder(&self, e: Arc<tl_model::encoder::Embedder>) {
        let _ = self.embedder.set(e);
    }

    pub fn embedder(&self) -> Option<&Arc<tl_model::encoder::Embedder>> {
        self.embedder.get()
    }

    /// Stop taking generation requests (`/health` turns 503); streams in
    /// flight go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        if let Some(e) = self.engine.get() {
            e.stop_accepting();
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/version", get(compat::version))
        .route("/get_server_info", get(compat::server_info))
        .route("/server_info", get(compat::server_info))
        .route("/get_model_info", get(compat::model_info))
        .route("/get_load", get(compat::get_load))
        .route("/load", get(compat::load))
        .route("/health_generate", get(compat::health_generate))
        .route("/tokenize", post(compat::tokenize))
        .route("/detokenize", post(compat::detokenize))
        .fallback(not_found)
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then drains: no new
/// connections or requests, streams in flight run to their end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let st = state.clone();
    let signal = async move {
        shutdown.await;
        info!("shutting down: draining requests in flight");
        st.start_draining();
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(signal)
        .await?;
    Ok(())
}

/// Resolves once the engine reports its device lost.
async fn device_lost(st: Arc<AppState>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Some(why) = st.engine().and_then(|e| e.device_lost()) {
            tracing::error!(error = %why, "the device is lost: stopping the server");
            eprintln!("tl serve: the device failed ({why}); stopping");
            return;
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The HTTP server's runtime (two workers: the engine has its own thread).
fn http_runtime() -> Result<tokio::runtime::Runtime, ServerError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tl-http")
        .enable_all()
        .build()?)
}

/// Binds the configured address.
async fn listen(
    cfg: &ServerConfig,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), ServerError> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Runs `server` while `loader` loads the model: a load that fails ends
/// the server with its error; otherwise the server runs to its end.
async fn serve_while_loading(
    server: impl Future<Output = Result<(), ServerError>>,
    loader: tokio::task::JoinHandle<Result<(), ServerError>>,
) -> Result<(), ServerError> {
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r,
        l = loader => match l {
            Ok(Ok(())) => server.await,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(ServerError::Load(format!("the loader thread failed: {e}"))),
        },
    }
}

/// `tl serve`: listens at once (so `/health` can say "loading"), loads the
/// model on a blocking thread, serves until SIGTERM/SIGINT, drains, stops
/// the engine. A model that fails to load ends the server with that error.
pub fn run(
    cfg: ServerConfig,
    engine_cfg: EngineConfig,
    load: impl FnOnce() -> Result<Llm, String> + Send + 'static,
) -> Result<(), ServerError> {
    run_with_draft(cfg, engine_cfg, move || load().map(|l| (l, None)))
}

/// As [`run`], where `load` also gives the draft model of speculation
/// method `draft` (see [`Engine::start_with_draft`]).
pub fn run_with_draft(
    cfg: ServerConfig,
    engine_cfg: EngineConfig,
    load: impl FnOnce() -> Result<(Llm, Option<Llm>), String> + Send + 'static,
) -> Result<(), ServerError> {
    http_runtime()?.block_on(async move {
        let (listener, local) = listen(&cfg).await?;
        let state = AppState::new(cfg)?;
        state.set_engine_args(&engine_cfg);
        info!(%local, "listening; loading the model");
        eprintln!("tl serve: listening on http://{local} (loading the model)");
        let st = state.clone();
        let loader = tokio::task::spawn_blocking(move || -> Result<(), ServerError> {
            let t = Instant::now();
            let (llm, draft) = load().map_err(ServerError::Load)?;
            let engine = Engine::start_with_draft(Arc::new(llm), draft.map(Arc::new), engine_cfg)?;
            eprintln!(
                "tl serve: model loaded in {:.1} s, {} KV blocks; ready",
                t.elapsed().as_secs_f64(),
                engine.kv_blocks()
            );
            st.set_engine(Arc::new(engine));
            Ok(())
        });
        // Stop on SIGTERM/SIGINT, or when the engine's device is lost
        // (after which nothing can run: exit, so that a supervisor or a
        // router moves the traffic to a working replica).
        let watched = state.clone();
        let stop = async move {
            tokio::select! {
                _ = shutdown_signal() => {},
                _ = device_lost(watched) => {},
            }
        };
        serve_while_loading(serve(listener, state.clone(), stop), loader).await?;
        let lost = state.engine().and_then(|e| e.device_lost());
        if let Some(e) = state.engine() {
            let e = e.clone();
            let _ = tokio::task::spawn_blocking(move || e.shutdown()).await;
        }
        if let Some(why) = lost {
            return Err(ServerError::DeviceLost(why));
        }
        eprintln!("tl serve: stopped");
        Ok(())
    })
}

/// `tl serve` of an embedding model: as [`run`], with `/v1/embeddings`
/// served by the loaded encoder and no generation engine.
pub fn run_embedding(
    cfg: ServerConfig,
    load: impl FnOnce() -> Result<tl_model::encoder::Embedder, String> + Send + 'static,
) -> Result<(), ServerError> {
    http_runtime()?.block_on(async move {
        let (listener, local) = listen(&cfg).await?;
        let state = AppState::new(cfg)?;
        eprintln!("tl serve: listening on http://{local} (loading the embedding model)");
        let st = state.clone();
        let loader = tokio::task::spawn_blocking(move || -> Result<(), ServerError> {
            let t = Instant::now();
            let emb = load().map_err(ServerError::Load)?;
            eprintln!(
                "tl serve: embedding model loaded in {:.1} s; ready (/v1/embeddings)",
                t.elapsed().as_secs_f64()
            );
            st.set_embedder(Arc::new(emb));
            Ok(())
        });
        serve_while_loading(serve(listener, state.clone(), shutdown_signal()), loader).await?;
        eprintln!("tl serve: stopped");
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Small handlers

const PAGE: &str = include_str!("page.html");

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint (see /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, /health, /metrics, /tokenize, /detokenize, /version, /get_server_info, /get_model_info, /get_load)",
    )
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let (code, status) = if st.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if st.engine().is_some() || st.embedder().is_some() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    (code, axum::Json(json!({ "status": status }))).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let stats = st.engine().map(|e| e.last_stats());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        st.metrics.render(stats),
    )
        .into_response()
}

/// The request body, at most `max_body_bytes` (413 beyond that).
pub(crate) async fn read_body(st: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let limit = st.cfg.max_body_bytes;
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the limit of {limit} bytes (or was cut off)"),
        )
        .with_code("body_too_large")
    })
}

fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let Some(key) = &st.cfg.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time in the content; the key's length is not secret.
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return e.into_response();
    }
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_id,
            "object": "model",
            "created": st.created,
            "owned_by": "tensorlogic",
        }]
    }))
    .into_response()
}

async fn embeddings(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    crate::embeddings::handle(st, headers, body).await
}

/// The 400 for a generation request to a server of an embedding model.
fn not_a_generator(st: &AppState) -> Option<Response> {
    st.embedder().map(|_| {
        ApiError::invalid(
            "model",
            format!(
                "the model '{}' is an embedding model: use /v1/embeddings",
                st.cfg.model_id
            ),
        )
        .into_response()
    })
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = not_a_generator(&st) {
        return r;
    }
    generate(st, Endpoint::Chat, headers, body).await
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = not_a_generator(&st) {
        return r;
    }
    generate(st, Endpoint::Completions, headers, body).await
}

// ---------------------------------------------------------------------------
// Generation

/// One choice of the answer, as it accumulates.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    /// Bytes of `text` already streamed (text that may be a tool call is
    /// held back).
    sent: usize,
    /// Harmony replies: how much of the reasoning and of the content was
    /// streamed.
    harmony: harmony::Sent,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    last_token: Option<Instant>,
}

/// The engine streams of one HTTP request, tagged with their prompt index.
type Merged = SelectAll<stream::BoxStream<'static, (usize, Event)>>;

fn merge(streams: Vec<RequestStream>) -> Merged {
    stream::select_all(streams.into_iter().enumerate().map(|(p, rs)| {
        stream::unfold(rs, move |mut rs| async move {
            rs.next().await.map(|e| ((p, e), rs))
        })
        .boxed()
    }))
}

/// What the handler keeps while a request runs.
struct Run {
    st: Arc<AppState>,
    endpoint: Endpoint,
    id: String,
    n: usize,
    start: Instant,
    /// Seconds to the first generated token, once there is one.
    ttft: Option<f64>,
    /// This request's deadline (the server's, or less if it asked).
    timeout: Duration,
    usage: Usage,
    choices: Vec<ChoiceAcc>,
    logprobs: bool,
    /// The model's tool-call format, when this chat request has tools.
    tool_format: Option<tools::ToolFormat>,
    /// The request's function names (for calls written without a marker).
    tool_names: Vec<String>,
    /// A chat reply in harmony (gpt-oss): split into reasoning, content
    /// and tool calls by channel.
    harmony: bool,
}

impl Run {
    /// The id of tool call `k` of choice `i`.
    fn call_id(&self, i: usize, k: usize) -> String {
        format!("call_{}_{i}_{k}", self.id.rsplit('-').next().unwrap_or(""))
    }

    /// Streaming with tools: the frame for choice `idx` after its text
    /// grew — the part that cannot begin a tool call; at `finish`, the
    /// held text as tool calls (or as content when it is none).
    fn tool_frame(
        &mut self,
        idx: usize,
        fmt: tools::ToolFormat,
        finish: Option<&str>,
    ) -> Vec<Value> {
        let Some(c) = self.choices.get(idx) else {
            return Vec::new();
        };
        let rest = &c.text[c.sent..];
        let mut out = Vec::new();
        let Some(finish) = finish else {
            let end = tools::hold_from(fmt, rest, c.sent == 0).map_or(c.text.len(), |p| c.sent + p);
            if end > c.sent {
                let t = c.text[c.sent..end].to_string();
                out.push(chunk_choice(self, idx, Some(&t), false, None, None));
                if let Some(c) = self.choices.get_mut(idx) {
                    c.sent = end;
                }
            }
            return out;
        };
        let finish = match tools::parse_calls(fmt, rest, &self.tool_names) {
            Some((before, calls)) => {
                if !before.is_empty() {
                    out.push(chunk_choice(self, idx, Some(&before), false, None, None));
                }
                for (k, t) in calls.iter().enumerate() {
                    let mut call = t.json(&self.call_id(idx, k));
                    call["index"] = k.into();
                    out.push(json!({"index": idx, "delta": {"tool_calls": [call]},
                                    "logprobs": Value::Null, "finish_reason": Value::Null}));
                }
                "tool_calls"
            }
            None => {
                if !rest.is_empty() {
                    let t = rest.to_string();
                    out.push(chunk_choice(self, idx, Some(&t), false, None, None));
                }
                finish
            }
        };
        if let Some(c) = self.choices.get_mut(idx) {
            c.sent = c.text.len();
        }
        out.push(chunk_choice(self, idx, None, false, None, Some(finish)));
        out
    }

    /// Streaming a harmony reply: the frames for choice `idx` after its
    /// text grew — what its reasoning and content gained; at `finish`, the
    /// tool calls too.
    fn harmony_frame(&mut self, idx: usize, finish: Option<&str>) -> Vec<Value> {
        let Some(c) = self.choices.get(idx) else {
            return Vec::new();
        };
        let mut sent = c.harmony;
        let d = sent.step(&c.text, finish.is_some());
        if let Some(c) = self.choices.get_mut(idx) {
            c.harmony = sent;
        }
        let mut out = Vec::new();
        let delta = |key: &str, t: &str| {
            json!({"index": idx, "delta": {key: t}, "logprobs": Value::Null,
                   "finish_reason": Value::Null})
        };
        if let Some(t) = &d.reasoning {
            out.push(delta("reasoning_content", t));
        }
        if let Some(t) = &d.content {
            out.push(delta("content", t));
        }
        let Some(finish) = finish else {
            return out;
        };
        for (k, t) in d.calls.iter().enumerate() {
            let mut call = t.json(&self.call_id(idx, k));
            call["index"] = k.into();
            out.push(json!({"index": idx, "delta": {"tool_calls": [call]},
                            "logprobs": Value::Null, "finish_reason": Value::Null}));
        }
        let finish = if d.calls.is_empty() {
            finish
        } else {
            "tool_calls"
        };
        out.push(chunk_choice(self, idx, None, false, None, Some(finish)));
        out
    }

    /// Records a token's timing; returns nothing.
    fn on_token(&mut self, idx: usize) {
        let now = Instant::now();
        if self.ttft.is_none() {
            let t = now.duration_since(self.start).as_secs_f64();
            self.ttft = Some(t);
            self.st.metrics.ttft.observe(t);
            self.st.metrics.vllm.ttft.observe(t);
        }
        if let Some(c) = self.choices.get_mut(idx) {
            if let Some(t) = c.last_token {
                let d = now.duration_since(t).as_secs_f64();
                self.st.metrics.itl.observe(d);
                self.st.metrics.vllm.itl.observe(d);
            }
            c.last_token = Some(now);
        }
    }

    fn done(&self, status: StatusCode) {
        let m = &self.st.metrics;
        m.requests
            .with_label_values(&[self.endpoint.name(), status.as_str()])
            .inc();
        let e2e = self.start.elapsed().as_secs_f64();
        m.prompt_tokens.inc_by(self.usage.prompt as u64);
        m.completion_tokens.inc_by(self.usage.completion as u64);
        m.e2e.observe(e2e);
        let v = &m.vllm;
        v.prompt_tokens.inc_by(self.usage.prompt as u64);
        v.generation_tokens.inc_by(self.usage.completion as u64);
        v.e2e.observe(e2e);
        if let (Some(ttft), true) = (self.ttft, self.usage.completion > 1) {
            v.tpot
                .observe((e2e - ttft).max(0.0) / (self.usage.completion - 1) as f64);
        }
        // vLLM counts every finished request here, aborted ones as "abort".
        let reason = if status == StatusCode::OK {
            self.choices
                .first()
                .and_then(|c| c.finish)
                .unwrap_or("stop")
        } else {
            "abort"
        };
        v.success(reason);
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("object".into(), self.object(chunk).into());
        m.insert("created".into(), now_secs().into());
        m.insert("model".into(), self.st.cfg.model_id.clone().into());
        m.insert("system_fingerprint".into(), FINGERPRINT.into());
        m.insert("choices".into(), Value::Array(choices));
        m
    }
}

const FINGERPRINT: &str = concat!("tl-", env!("CARGO_PKG_VERSION"));

async fn generate(
    st: Arc<AppState>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let count = |status: StatusCode| {
        st.metrics
            .requests
            .with_label_values(&[endpoint.name(), status.as_str()])
            .inc();
    };
    let timeout = match request_timeout(&st, &headers) {
        Ok(t) => t,
        Err(e) => {
            count(e.status);
            return e.into_response();
        }
    };
    let prepared = prepare(&st, endpoint, &headers, body).await;
    let (parsed, streams, prompt_lens) = match prepared {
        Ok(p) => p,
        Err(e) => {
            count(e.status);
            return e.into_response();
        }
    };
    let seq = st.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let n_choices = parsed.n * prompt_lens.len();
    let mut run = Run {
        st: st.clone(),
        endpoint,
        id: format!("{prefix}-{:x}{seq:06x}", st.created),
        n: parsed.n,
        start,
        ttft: None,
        timeout,
        usage: Usage {
            prompt: prompt_lens.iter().sum(),
            ..Default::default()
        },
        choices: (0..n_choices).map(|_| ChoiceAcc::default()).collect(),
        logprobs: parsed.logprobs.is_some(),
        tool_format: parsed.tools.as_ref().and_then(|t| t.format),
        tool_names: parsed
            .tools
            .as_ref()
            .map_or_else(Vec::new, |t| tools::names(&t.tools)),
        harmony: endpoint == Endpoint::Chat
            && st
                .engine()
                .is_some_and(|e| harmony::is_harmony(&e.llm().tokenizer)),
    };
    if let Some(echo) = &parsed.echo {
        for (i, c) in run.choices.iter_mut().enumerate() {
            c.text = echo.get(i / parsed.n).cloned().unwrap_or_default();
        }
    }
    let deadline = tokio::time::Instant::from_std(start + timeout);
    let merged = merge(streams);
    if parsed.stream {
        stream_response(run, merged, deadline, parsed.include_usage)
    } else {
        collect_response(run, merged, deadline).await
    }
}

/// The request's deadline: the server's `--request-timeout`, or less when
/// the `X-Request-Timeout` header (seconds) asks for less.
fn request_timeout(st: &AppState, headers: &HeaderMap) -> Result<Duration, ApiError> {
    let max = st.cfg.request_timeout;
    let Some(v) = headers.get("x-request-timeout") else {
        return Ok(max);
    };
    let secs = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| {
            ApiError::invalid(
                "X-Request-Timeout",
                "the X-Request-Timeout header must be a positive number of seconds",
            )
        })?;
    Ok(Duration::from_secs_f64(secs.min(max.as_secs_f64())))
}

/// Auth, readiness, body, parsing, validation and submission.
async fn prepare(
    st: &Arc<AppState>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Parsed, Vec<RequestStream>, Vec<usize>), ApiError> {
    authorize(st, headers)?;
    if st.draining.load(Ordering::Acquire) {
        return Err(tl_engine::EngineError::ShuttingDown.into());
    }
    let engine = st.engine().ok_or_else(ApiError::loading)?.clone();
    let bytes = read_body(st, body).await?;
    let mut parsed = api::parse(endpoint, &bytes)?;
    // `required` or a named function: a grammar in the model's own
    // tool-call format makes the reply a call. `auto`: the reply is free
    // until the format's trigger and a valid call from there (unless the
    // request constrains the whole reply itself).
    if let Some(t) = &mut parsed.tools {
        let tok = &engine.llm().tokenizer;
        let fmt = tools::ToolFormat::detect(tok);
        t.format = Some(fmt);
        let g = if t.choice == tools::ToolChoice::Auto {
            tools::lazy_grammar(fmt, tok, &t.tools, t.parallel)?.map(|g| ("tools", g))
        } else {
            Some((
                "tool_choice",
                tools::grammar(fmt, tok, &t.tools, &t.choice, t.parallel)?,
            ))
        };
        if let Some(g) = g {
            for r in &mut parsed.requests {
                if r.grammar.is_none() {
                    r.grammar = Some(g.clone());
                }
            }
        }
    }
    if let Some(m) = &parsed.model {
        if !m.is_empty() && *m != st.cfg.model_id {
            return Err(ApiError::unknown_model(m, &st.cfg.model_id));
        }
    }
    // Tokenizing and template rendering are CPU work: off the async workers.
    let reqs = parsed.requests.clone();
    let eng = engine.clone();
    let valid = tokio::task::spawn_blocking(move || {
        reqs.into_iter()
            .map(|r| {
                // `auto`'s lazy call grammar is a help, not a demand: tools
                // whose schemas it cannot compile leave the reply free.
                let lazy = r.grammar.as_ref().is_some_and(|g| g.0 == "tools");
                if !lazy {
                    return eng.validate(r);
                }
                match eng.validate(r.clone()) {
                    Err(tl_engine::EngineError::InvalidParam {
                        param: "tools",
                        message,
                    }) => {
                        warn!(error = %message, "tool-call grammar did not compile; the reply is left free");
                        let mut r = r;
                        r.grammar = None;
                        eng.validate(r)
                    }
                    v => v,
                }
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("validation task failed: {e}"),
        )
    })??;
    let lens = valid.iter().map(|v| v.prompt_tokens().len()).collect();
    let mut streams = Vec::with_capacity(valid.len());
    for v in valid {
        // On failure the streams already submitted drop, cancelling them.
        streams.push(engine.submit(v)?);
    }
    Ok((parsed, streams, lens))
}

/// Applies one event; returns an error event's error.
fn apply(run: &mut Run, prompt: usize, ev: Event) -> Result<(), ApiError> {
    match ev {
        Event::Delta {
            choice,
            text,
            token,
            logprob,
        } => {
            let idx = prompt * run.n + choice;
            if token.is_some() {
                run.usage.completion += 1;
                run.on_token(idx);
            }
            if let Some(c) = run.choices.get_mut(idx) {
                c.text.push_str(&text);
                if let Some(l) = logprob {
                    c.logprobs.push(l);
                }
            }
            Ok(())
        }
        Event::Finished {
            choice,
            reason,
            cached_tokens,
            ..
        } => {
            if choice == 0 {
                run.usage.cached += cached_tokens;
            }
            if let Some(c) = run.choices.get_mut(prompt * run.n + choice) {
                c.finish = Some(reason.as_str());
            }
            Ok(())
        }
        Event::Error(e) => Err(e.into()),
    }
}

async fn collect_response(
    mut run: Run,
    mut merged: Merged,
    deadline: tokio::time::Instant,
) -> Response {
    loop {
        let next = tokio::time::timeout_at(deadline, merged.next()).await;
        match next {
            Err(_) => {
                let e = ApiError::timeout(run.timeout.as_secs_f64());
                run.done(e.status);
                return e.into_response();
            }
            Ok(None) => break,
            Ok(Some((p, ev))) => {
                if let Err(e) = apply(&mut run, p, ev) {
                    run.done(e.status);
                    return e.into_response();
                }
            }
        }
    }
    let choices: Vec<Value> = run
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| match run.endpoint {
            Endpoint::Chat if run.harmony => {
                let p = harmony::parse(&c.text, true);
                let mut message = json!({"role": "assistant",
                    "content": if p.content.is_empty() && !p.calls.is_empty() {
                        Value::Null
                    } else {
                        p.content.clone().into()
                    }});
                if !p.reasoning.is_empty() {
                    message["reasoning_content"] = p.reasoning.clone().into();
                }
                let finish = if p.calls.is_empty() {
                    c.finish.unwrap_or("stop")
                } else {
                    message["tool_calls"] = p
                        .calls
                        .iter()
                        .enumerate()
                        .map(|(k, t)| t.json(&run.call_id(i, k)))
                        .collect::<Vec<_>>()
                        .into();
                    "tool_calls"
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if run.logprobs {
                        json!({"content": c.logprobs.iter().map(api::chat_logprob).collect::<Vec<_>>()})
                    } else { Value::Null },
                    "finish_reason": finish,
                })
            }
            Endpoint::Chat => {
                let calls = run
                    .tool_format
                    .and_then(|f| tools::parse_calls(f, &c.text, &run.tool_names));
                let (message, finish) = match calls {
                    Some((before, calls)) => (
                        json!({"role": "assistant",
                               "content": if before.is_empty() { Value::Null } else { before.into() },
                               "tool_calls": calls.iter().enumerate()
                                   .map(|(k, t)| t.json(&run.call_id(i, k)))
                                   .collect::<Vec<_>>()}),
                        "tool_calls",
                    ),
                    None => (
                        json!({"role": "assistant", "content": c.text}),
                        c.finish.unwrap_or("stop"),
                    ),
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if run.logprobs {
                        json!({"content": c.logprobs.iter().map(api::chat_logprob).collect::<Vec<_>>()})
                    } else { Value::Null },
                    "finish_reason": finish,
                })
            }
            Endpoint::Completions => json!({
                "index": i,
                "text": c.text,
                "logprobs": if run.logprobs {
                    api::completion_logprobs(&c.logprobs, 0)
                } else { Value::Null },
                "finish_reason": c.finish.unwrap_or("stop"),
            }),
        })
        .collect();
    let mut body = run.envelope(false, choices);
    body.insert("usage".into(), run.usage.json());
    run.done(StatusCode::OK);
    axum::Json(Value::Object(body)).into_response()
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn stream_response(
    run: Run,
    merged: Merged,
    deadline: tokio::time::Instant,
    include_usage: bool,
) -> Response {
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(forward(run, merged, deadline, include_usage, tx));
    let body = stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Builds one streamed choice object.
fn chunk_choice(
    run: &Run,
    index: usize,
    text: Option<&str>,
    role: bool,
    lp: Option<&TokenLogprob>,
    finish: Option<&str>,
) -> Value {
    match run.endpoint {
        Endpoint::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = text {
                delta.insert("content".into(), t.into());
            }
            json!({
                "index": index,
                "delta": delta,
                "logprobs": lp.map_or(Value::Null, |l| json!({"content": [api::chat_logprob(l)]})),
                "finish_reason": finish,
            })
        }
        Endpoint::Completions => {
            let offset = run.choices.get(index).map_or(0, |c| c.text.len());
            json!({
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": lp.map_or(Value::Null, |l| api::completion_logprobs(std::slice::from_ref(l), offset)),
                "finish_reason": finish,
            })
        }
    }
}

/// Drives one streaming request: engine events → SSE frames on `tx`. Ends
/// (dropping the engine streams, which cancels them) as soon as the client
/// is gone, the deadline passes or every choice finished.
async fn forward(
    mut run: Run,
    mut merged: Merged,
    deadline: tokio::time::Instant,
    include_usage: bool,
    tx: mpsc::Sender<Bytes>,
) {
    // With include_usage, OpenAI's chunks carry `"usage": null` until the
    // last one.
    let usage_field = |m: &mut serde_json::Map<String, Value>| {
        if include_usage {
            m.insert("usage".into(), Value::Null);
        }
    };
    // Opening chunk of every choice (the role; echo text for completions).
    let mut opening = Vec::new();
    for i in 0..run.choices.len() {
        let echo = run.choices[i].text.clone();
        let c = match run.endpoint {
            Endpoint::Chat => chunk_choice(&run, i, Some(""), true, None, None),
            Endpoint::Completions => {
                if echo.is_empty() {
                    continue;
                }
                let mut c = chunk_choice(&run, i, Some(&echo), false, None, None);
                c["logprobs"] = Value::Null;
                c
            }
        };
        opening.push(c);
    }
    if !opening.is_empty() {
        let mut m = run.envelope(true, opening);
        usage_field(&mut m);
        if tx.send(sse(&Value::Object(m))).await.is_err() {
            run.done(StatusCode::from_u16(499).unwrap_or(StatusCode::OK));
            return;
        }
    }
    let status = loop {
        let ev = tokio::select! {
            ev = merged.next() => ev,
            _ = tx.closed() => break StatusCode::from_u16(499).unwrap_or(StatusCode::OK),
            _ = tokio::time::sleep_until(deadline) => {
                let e = ApiError::timeout(run.timeout.as_secs_f64());
                let _ = tx.send(sse(&e.body())).await;
                break e.status;
            }
        };
        let Some((p, ev)) = ev else {
            break StatusCode::OK;
        };
        let by_channel = run.harmony && run.endpoint == Endpoint::Chat;
        if let (Some(fmt), Endpoint::Chat) = (
            run.tool_format
                .or(by_channel.then_some(tools::ToolFormat::Harmony)),
            run.endpoint,
        ) {
            let (idx, finish) = match &ev {
                Event::Delta { choice, .. } => (p * run.n + choice, None),
                Event::Finished { choice, reason, .. } => {
                    (p * run.n + choice, Some(reason.as_str()))
                }
                Event::Error(_) => (0, None),
            };
            let is_err = matches!(ev, Event::Error(_));
            if let Err(e) = apply(&mut run, p, ev) {
                let _ = tx.send(sse(&e.body())).await;
                break e.status;
            }
            if is_err {
                continue;
            }
            let mut gone = false;
            let frames = if by_channel {
                run.harmony_frame(idx, finish)
            } else {
                run.tool_frame(idx, fmt, finish)
            };
            for c in frames {
                let mut m = run.envelope(true, vec![c]);
                usage_field(&mut m);
                if tx.send(sse(&Value::Object(m))).await.is_err() {
                    gone = true;
                    break;
                }
            }
            if gone {
                break StatusCode::from_u16(499).unwrap_or(StatusCode::OK);
            }
            continue;
        }
        let frame = match &ev {
            Event::Delta {
                choice,
                text,
                logprob,
                ..
            } => {
                let idx = p * run.n + choice;
                if text.is_empty() && logprob.is_none() {
                    None
                } else {
                    Some(chunk_choice(
                        &run,
                        idx,
                        Some(text),
                        false,
                        logprob.as_ref(),
                        None,
                    ))
                }
            }
            Event::Finished { choice, reason, .. } => {
                let idx = p * run.n + choice;
                let text = match run.endpoint {
                    Endpoint::Chat => None,
                    Endpoint::Completions => Some(""),
                };
                Some(chunk_choice(
                    &run,
                    idx,
                    text,
                    false,
                    None,
                    Some(reason.as_str()),
                ))
            }
            Event::Error(_) => None,
        };
        if let Err(e) = apply(&mut run, p, ev) {
            let _ = tx.send(sse(&e.body())).await;
            break e.status;
        }
        if let Some(c) = frame {
            let mut m = run.envelope(true, vec![c]);
            usage_field(&mut m);
            if tx.send(sse(&Value::Object(m))).await.is_err() {
                break StatusCode::from_u16(499).unwrap_or(StatusCode::OK);
            }
        }
    };
    // Counted before the last frames go out, so a client that has seen
    // `[DONE]` also sees the request in the metrics.
    run.done(status);
    if status == StatusCode::OK {
        if include_usage {
            let mut m = run.envelope(true, Vec::new());
            m.insert("usage".into(), run.usage.json());
            let _ = tx.send(sse(&Value::Object(m))).await;
        }
    } else if status.as_u16() == 499 {
        warn!(id = %run.id, "client went away; request cancelled");
    }
    if status.as_u16() != 499 {
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    }
}
