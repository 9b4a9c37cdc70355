//! The endpoints that routers, gateways and autoscalers written for vLLM
//! and SGLang probe, in their JSON shapes: `/version`, `/get_server_info`
//! (also `/server_info`), `/get_model_info`, `/get_load` (SGLang's
//! `{"load": N}`, which vllm-router's load-based policies read), `/load`
//! (vLLM's `{"server_load": N}`), `/health_generate` (a one-token
//! generation) and vLLM's `/tokenize` and `/detokenize`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tl_engine::{Engine, Event, GenerationRequest, PromptInput};
use tl_tokenizer::{ChatMessage, DecodeOptions};

use crate::error::ApiError;
use crate::{authorize, AppState};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn ready(st: &AppState) -> Result<Arc<Engine>, ApiError> {
    if st.draining.load(Ordering::Acquire) {
        return Err(tl_engine::EngineError::ShuttingDown.into());
    }
    st.engine().cloned().ok_or_else(ApiError::loading)
}

fn status(st: &AppState) -> &'static str {
    if st.draining.load(Ordering::Acquire) {
        "draining"
    } else if st.engine().is_some() || st.embedder().is_some() {
        "ok"
    } else {
        "loading"
    }
}

pub async fn version() -> Json<Value> {
    Json(json!({ "version": VERSION }))
}

/// The server's settings (answers while loading too: `status` says which).
pub async fn server_info(State(st): State<Arc<AppState>>) -> Json<Value> {
    let mut v = json!({
        "version": VERSION,
        "status": status(&st),
        "model_path": st.cfg.model_path,
        "tokenizer_path": st.cfg.model_path,
        "served_model_name": st.cfg.model_id,
        "host": st.cfg.host,
        "port": st.cfg.port,
        "api_key_required": st.cfg.api_key.is_some(),
        "max_body_bytes": st.cfg.max_body_bytes,
        "request_timeout_s": st.cfg.request_timeout.as_secs_f64(),
    });
    if let (Some(m), Some(args)) = (v.as_object_mut(), st.engine_args.get()) {
        if let Some(a) = args.as_object() {
            for (k, x) in a {
                m.insert(k.clone(), x.clone());
            }
        }
    }
    if let (Some(m), Some(e)) = (v.as_object_mut(), st.engine()) {
        let c = &e.llm().model.config;
        m.insert("context_length".into(), c.context.into());
        m.insert("max_model_len".into(), e.validator().limit().into());
        m.insert(
            "max_total_num_tokens".into(),
            (e.kv_blocks() * tl_model::kv::BLOCK_SIZE).into(),
        );
        m.insert("kv_cache_blocks".into(), e.kv_blocks().into());
        m.insert("page_size".into(), tl_model::kv::BLOCK_SIZE.into());
    }
    Json(v)
}

pub async fn model_info(State(st): State<Arc<AppState>>) -> Response {
    if let Some(emb) = st.embedder() {
        let c = &emb.encoder.config;
        return Json(json!({
            "model_path": st.cfg.model_path,
            "tokenizer_path": st.cfg.model_path,
            "served_model_name": st.cfg.model_id,
            "is_generation": false,
            "preferred_sampling_params": Value::Null,
            "model_type": c.arch.name(),
            "architectures": [c.arch.name()],
            "max_model_len": c.context,
            "vocab_size": c.vocab,
            "pooling": c.pooling.name(),
            "embedding_length": c.d_model,
        }))
        .into_response();
    }
    let e = match st.engine() {
        Some(e) => e.clone(),
        None => return ApiError::loading().into_response(),
    };
    let c = &e.llm().model.config;
    Json(json!({
        "model_path": st.cfg.model_path,
        "tokenizer_path": st.cfg.model_path,
        "served_model_name": st.cfg.model_id,
        "is_generation": true,
        "preferred_sampling_params": Value::Null,
        "model_type": c.arch.name(),
        "architectures": [c.arch.name()],
        "max_model_len": e.validator().limit(),
        "vocab_size": c.vocab,
    }))
    .into_response()
}

/// Requests running, waiting, and token slots of KV held by live
/// sequences (all 0 until loaded).
fn load_now(st: &AppState) -> (usize, usize, usize) {
    st.engine().map_or((0, 0, 0), |e| {
        let s = e.last_stats();
        (
            s.running_requests,
            s.waiting_requests,
            s.kv_blocks_used * tl_model::kv::BLOCK_SIZE,
        )
    })
}

pub async fn get_load(State(st): State<Arc<AppState>>) -> Json<Value> {
    let (running, waiting, tokens) = load_now(&st);
    Json(json!({
        "load": running + waiting,
        "num_reqs": running,
        "num_waiting_reqs": waiting,
        "num_tokens": tokens,
    }))
}

pub async fn load(State(st): State<Arc<AppState>>) -> Json<Value> {
    let (running, waiting, _) = load_now(&st);
    Json(json!({ "server_load": running + waiting }))
}

/// 200 once one token has been generated end to end (the engine thread is
/// alive and stepping), 503 while loading or draining or when no token
/// comes within 30 s.
pub async fn health_generate(State(st): State<Arc<AppState>>) -> Response {
    let e = match ready(&st) {
        Ok(e) => e,
        Err(err) => return err.into_response(),
    };
    let mut req = GenerationRequest::new(PromptInput::Text("ping".into()));
    req.max_tokens = Some(1);
    req.temperature = Some(0.0);
    let eng = e.clone();
    let stream =
        tokio::task::spawn_blocking(move || eng.validate(req).and_then(|v| eng.submit(v))).await;
    let mut stream = match stream {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => return ApiError::from(err).into_response(),
        Err(err) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("health check task failed: {err}"),
            )
            .into_response()
        }
    };
    let run = async {
        while let Some(ev) = stream.next().await {
            match ev {
                Event::Finished { .. } => return Ok(()),
                Event::Error(err) => return Err(ApiError::from(err)),
                Event::Delta { .. } => {}
            }
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine ended the health request without finishing it",
        ))
    };
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(())) => Json(json!({ "status": "ok" })).into_response(),
        Ok(Err(err)) => err.into_response(),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no token generated within 30 s",
        )
        .into_response(),
    }
}

async fn read_json(st: &AppState, body: Body) -> Result<Value, ApiError> {
    let bytes = crate::read_body(st, body).await?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    Ok(v)
}

fn check_model(st: &AppState, v: &Value) -> Result<(), ApiError> {
    match v.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m.is_empty() || *m == st.cfg.model_id => Ok(()),
        Some(Value::String(m)) => Err(ApiError::unknown_model(m, &st.cfg.model_id)),
        Some(_) => Err(ApiError::invalid("model", "'model' must be a string")),
    }
}

#[derive(Deserialize)]
struct TokenizeMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct TokenizeBody {
    prompt: Option<String>,
    messages: Option<Vec<TokenizeMessage>>,
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: Option<bool>,
}

/// vLLM's `POST /tokenize`: `{"prompt": "..."}` or `{"messages": [...]}`
/// (rendered with the chat template) → `{"count", "max_model_len",
/// "tokens"}` (and `"token_strs"` with `return_token_strs`).
pub async fn tokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    match tokenize_inner(&st, &headers, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn tokenize_inner(st: &AppState, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    authorize(st, headers)?;
    let e = ready(st)?;
    let v = read_json(st, body).await?;
    check_model(st, &v)?;
    let b = TokenizeBody::deserialize(&v)
        .map_err(|err| ApiError::invalid("body", format!("invalid tokenize request: {err}")))?;
    let strs = b.return_token_strs.unwrap_or(false);
    let eng = e.clone();
    let (ids, limit) = match (b.prompt, b.messages) {
        (Some(p), None) => {
            let special = b.add_special_tokens.unwrap_or(true);
            tokio::task::spawn_blocking(move || {
                let llm = eng.llm();
                let ids = if special {
                    llm.encode_prompt(&p, true)
                        .map_err(|err| ApiError::invalid("prompt", err.to_string()))?
                } else {
                    llm.tokenizer
                        .encode(
                            &p,
                            tl_tokenizer::EncodeOptions {
                                add_special: false,
                                parse_special: true,
                            },
                        )
                        .map_err(|err| ApiError::invalid("prompt", err.to_string()))?
                };
                Ok::<_, ApiError>((ids, eng.validator().limit()))
            })
            .await
        }
        (None, Some(msgs)) => {
            let msgs: Vec<ChatMessage> = msgs
                .into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect();
            tokio::task::spawn_blocking(move || {
                let ids = eng
                    .validator()
                    .tokenize(&PromptInput::Chat(msgs), None)
                    .map_err(ApiError::from)?;
                Ok::<_, ApiError>((ids, eng.validator().limit()))
            })
            .await
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of 'prompt' (a string) or 'messages'",
            ))
        }
    }
    .map_err(|err| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("tokenize task failed: {err}"),
        )
    })??;
    let mut out = json!({
        "count": ids.len(),
        "max_model_len": limit,
        "tokens": ids,
    });
    if strs {
        let tok = &e.llm().tokenizer;
        let pieces: Vec<String> = ids
            .iter()
            .map(|&t| {
                tok.token_to_piece(t, true)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default()
            })
            .collect();
        out["token_strs"] = pieces.into();
    }
    Ok(out)
}

#[derive(Deserialize)]
struct DetokenizeBody {
    tokens: Vec<i64>,
}

/// vLLM's `POST /detokenize`: `{"tokens": [ids]}` → `{"prompt": text}`.
pub async fn detokenize(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let run = async {
        authorize(&st, &headers)?;
        let e = ready(&st)?;
        let v = read_json(&st, body).await?;
        check_model(&st, &v)?;
        let b = DetokenizeBody::deserialize(&v).map_err(|err| {
            ApiError::invalid(
                "tokens",
                format!("'tokens' must be a list of token ids: {err}"),
            )
        })?;
        let vocab = e.llm().tokenizer.n_vocab();
        let ids = b
            .tokens
            .iter()
            .map(|&t| {
                u32::try_from(t)
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "tokens",
                            format!("token id {t} is out of range (vocabulary of {vocab})"),
                        )
                    })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let text = e
            .llm()
            .tokenizer
            .decode(
                &ids,
                DecodeOptions {
                    remove_special: false,
                    unparse_special: true,
                },
            )
            .map_err(|err| ApiError::invalid("tokens", err.to_string()))?;
        Ok::<_, ApiError>(json!({ "prompt": text }))
    };
    match run.await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
