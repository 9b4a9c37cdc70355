//! `POST /v1/embeddings` in OpenAI's shape, served by an encoder model
//! (bert, nomic-bert): `input` a string, an array of strings, an array of
//! token ids or an array of such arrays; `encoding_format` `float` (the
//! default) or `base64` (the little-endian f32 bytes); `usage.prompt_tokens`
//! the tokens embedded. All inputs of a request run as one batch; vectors
//! are pooled as the model says and L2-normalised, as llama.cpp's server
//! returns them.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tl_model::encoder::{Embedder, Pooling};

use crate::error::ApiError;
use crate::AppState;

/// Standard base64 with padding (RFC 4648).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for ch in bytes.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= ch.len() {
                out.push(char::from(A[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A token id from JSON, or a 400 naming where it sits.
fn token(v: &Value, at: &str) -> Result<u32, ApiError> {
    v.as_u64()
        .and_then(|t| u32::try_from(t).ok())
        .ok_or_else(|| ApiError::invalid("input", format!("{at}: expected a token id, got {v}")))
}

/// The request's inputs as token sequences.
fn inputs(emb: &Embedder, input: Option<&Value>) -> Result<Vec<Vec<u32>>, ApiError> {
    let tokenize = |s: &str| {
        emb.tokenize(s)
            .map_err(|e| ApiError::invalid("input", format!("tokenizing: {e}")))
    };
    let seqs = match input {
        None => return Err(ApiError::invalid("input", "'input' is required")),
        Some(Value::String(s)) => vec![tokenize(s)?],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("input", "'input' is an empty array"))
        }
        Some(Value::Array(items)) => match &items[0] {
            // One token array.
            Value::Number(_) => vec![items
                .iter()
                .enumerate()
                .map(|(i, v)| token(v, &format!("input[{i}]")))
                .collect::<Result<_, _>>()?],
            _ => items
                .iter()
                .enumerate()
                .map(|(i, it)| match it {
                    Value::String(s) => tokenize(s),
                    Value::Array(ts) => ts
                        .iter()
                        .enumerate()
                        .map(|(j, v)| token(v, &format!("input[{i}][{j}]")))
                        .collect(),
                    other => Err(ApiError::invalid(
                        "input",
                        format!(
                            "input[{i}]: expected a string or an array of token ids, got {other}"
                        ),
                    )),
                })
                .collect::<Result<_, _>>()?,
        },
        Some(other) => {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "'input' must be a string, an array of strings or token arrays, got {other}"
                ),
            ))
        }
    };
    emb.check(&seqs).map_err(|m| {
        let e = ApiError::invalid("input", m.clone());
        if m.contains("context") {
            e.with_code("context_length_exceeded")
        } else {
            e
        }
    })?;
    Ok(seqs)
}

pub(crate) async fn handle(st: Arc<AppState>, headers: HeaderMap, body: Body) -> Response {
    match run(st, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(st: Arc<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    crate::authorize(&st, &headers)?;
    let bytes = crate::read_body(&st, body).await?;
    let req: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !req.is_object() {
        return Err(ApiError::invalid("", "the body must be a JSON object"));
    }
    let id = &st.cfg.model_id;
    match req.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if m == id => {}
        Some(Value::String(m)) => return Err(ApiError::unknown_model(m, id)),
        Some(other) => {
            return Err(ApiError::invalid(
                "model",
                format!("'model' must be a string, got {other}"),
            ))
        }
    }
    let base64_out = match req.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("'encoding_format' must be \"float\" or \"base64\", got {other}"),
            ))
        }
    };
    let Some(emb) = st.embedder().cloned() else {
        if st.engine().is_some() {
            return Err(ApiError::invalid(
                "model",
                format!("the model '{id}' is a text generator, not an embedding model"),
            )
            .with_code("model_not_embedding"));
        }
        return Err(ApiError::loading());
    };
    if emb.encoder.config.pooling == Pooling::None {
        return Err(ApiError::invalid(
            "model",
            format!(
                "the model '{id}' pools nothing (one vector per token); /v1/embeddings returns one \
                 vector per input (use `tl embed` for token vectors)"
            ),
        ));
    }
    let seqs = inputs(&emb, req.get("input"))?;
    let n_tokens: usize = seqs.iter().map(Vec::len).sum();
    let vecs = tokio::task::spawn_blocking(move || emb.embed(&seqs, true))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the embedding task failed: {e}"),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                e.to_string(),
            )
        })?;
    let data: Vec<Value> = vecs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64_out {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": id,
        "usage": { "prompt_tokens": n_tokens, "total_tokens": n_tokens },
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
