//! The server driven over real HTTP on loopback, on a tiny synthetic model:
//! response shapes, SSE framing, every error case, auth, backpressure,
//! timeouts, disconnects and graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tl_engine::{Engine, EngineConfig, SchedulerConfig};
use tl_model::llm::Llm;
use tl_model::synth::{synthesize, SynthSpec};
use tl_server::{AppState, ServerConfig};

fn llm() -> Arc<Llm> {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let path = PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("tl-server-test-{}.gguf", std::process::id()));
        synthesize(&SynthSpec::default())
            .expect("synth")
            .write_file(&p)
            .expect("write");
        p
    });
    Arc::new(Llm::load(path).expect("load"))
}

struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(cfg: ServerConfig, max_batch: usize, max_queue: usize) -> Server {
        Self::start_with(cfg, max_batch, max_queue, true)
    }

    fn start_with(cfg: ServerConfig, max_batch: usize, max_queue: usize, ready: bool) -> Server {
        let state = AppState::new(cfg).expect("state");
        if ready {
            let engine = Engine::start(
                llm(),
                EngineConfig {
                    scheduler: SchedulerConfig {
                        max_batch,
                        max_batch_tokens: 256,
                        prefix_caching: true,
                        ..Default::default()
                    },
                    kv_bytes: 8 << 20,
                    gpu_memory_utilization: None,
                    max_queue,
                },
            )
            .expect("engine");
            state.set_engine(Arc::new(engine));
        }
        Self::serve_state(state)
    }

    fn serve_state(state: Arc<AppState>) -> Server {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (atx, arx) = std::sync::mpsc::channel();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                atx.send(l.local_addr().expect("addr")).expect("send");
                tl_server::serve(l, st, async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
            });
        });
        let addr = arx.recv().expect("addr");
        Server {
            addr,
            state,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn engine(&self) -> &Arc<Engine> {
        self.state.engine().expect("engine")
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter_map(|f| f.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server that refuses a body (413) may answer and close before all of
    // it is written; the reply is read all the same.
    let _ = s.write_all(body);
    s
}

/// Sends a JSON POST and returns the open connection, reply unread.
fn send_json(addr: SocketAddr, path: &str, body: &Value) -> TcpStream {
    send_request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn read_reply(s: TcpStream) -> Reply {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..n]);
            if n == 0 {
                break;
            }
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    read_reply(send_request(addr, method, path, headers, body))
}

fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    read_reply(send_json(addr, path, &body))
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], b"")
}

fn cfg() -> ServerConfig {
    ServerConfig {
        model_id: "synthetic".into(),
        ..Default::default()
    }
}

fn chat_body(max_tokens: usize) -> Value {
    json!({
        "model": "synthetic",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

fn assert_error(r: &Reply, status: u16, param: Option<&str>) -> Value {
    assert_eq!(
        r.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&r.body)
    );
    let j = r.json();
    let e = &j["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
    assert!(e["type"].is_string(), "{j}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{j}");
    }
    j
}

#[test]
fn health_models_and_page() {
    let mut s = Server::start_with(cfg(), 4, 8, false);
    let h = get(s.addr, "/health");
    assert_eq!(h.status, 503);
    assert_eq!(h.json()["status"], "loading");
    assert_error(
        &post(s.addr, "/v1/chat/completions", chat_body(4)),
        503,
        None,
    );
    s.shutdown();

    let s = Server::start(cfg(), 4, 8);
    let h = get(s.addr, "/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let m = get(s.addr, "/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "synthetic");
    let p = get(s.addr, "/");
    assert_eq!(p.status, 200);
    let page = String::from_utf8_lossy(&p.body);
    assert!(page.contains("/v1/chat/completions") && page.contains("id=\"send\""));
    assert_error(&get(s.addr, "/v2/nothing"), 404, None);
}

#[test]
fn chat_completion_shape_and_usage() {
    let s = Server::start(cfg(), 4, 8);
    let r = post(s.addr, "/v1/chat/completions", chat_body(7));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(j["model"], "synthetic");
    let c = &j["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["message"]["content"].is_string());
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(j["usage"]["completion_tokens"], 7);
    let p = j["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(p > 4);
    assert_eq!(j["usage"]["total_tokens"], p + 7);

    // The same request again: greedy output is the same, and the prompt's
    // full blocks come from the prefix cache.
    let again = post(s.addr, "/v1/chat/completions", chat_body(7)).json();
    assert_eq!(again["choices"][0]["message"], c["message"]);
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(
        cached,
        p / 16 * 16,
        "cached tokens {cached} of a {p}-token prompt"
    );

    // max_completion_tokens is the newer name of max_tokens.
    let mut b = chat_body(0);
    b.as_object_mut().unwrap().remove("max_tokens");
    b["max_completion_tokens"] = json!(3);
    assert_eq!(
        post(s.addr, "/v1/chat/completions", b).json()["usage"]["completion_tokens"],
        3
    );

    // Content given as parts.
    let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        "max_tokens": 2, "temperature": 0});
    assert_eq!(post(s.addr, "/v1/chat/completions", parts).status, 200);
}

#[test]
fn streaming_chat_and_completions() {
    let s = Server::start(cfg(), 4, 8);
    let mut b = chat_body(6);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let r = post(s.addr, "/v1/chat/completions", b.clone());
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let ev = r.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert!(chunks[1]["usage"].is_null() && chunks[1].get("usage").is_some());
    // Streamed text equals the non-streamed answer.
    b["stream"] = json!(false);
    let whole = post(s.addr, "/v1/chat/completions", b).json();
    assert_eq!(whole["choices"][0]["message"]["content"], text.as_str());

    // Completions, token prompt, n = 2, logprobs, echo.
    let body = json!({"prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "n": 2, "temperature": 0.8,
        "seed": 11, "logprobs": 3, "stream": true, "ignore_eos": true});
    let ev = post(s.addr, "/v1/completions", body).events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let mut per_choice = [0, 0];
    for e in &ev[..ev.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        let ch = &c["choices"][0];
        let i = ch["index"].as_u64().unwrap() as usize;
        if ch["finish_reason"].is_null() {
            per_choice[i] += 1;
            let lp = &ch["logprobs"];
            assert_eq!(lp["tokens"].as_array().unwrap().len(), 1);
            assert_eq!(
                lp["top_logprobs"][0].as_object().unwrap().len().min(3),
                lp["top_logprobs"][0].as_object().unwrap().len()
            );
            assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
        }
    }
    assert_eq!(per_choice, [4, 4]);
}

#[test]
fn completions_n_logprobs_seed_and_stop() {
    let s = Server::start(cfg(), 4, 8);
    let body = json!({"model": "synthetic", "prompt": "abc def", "max_tokens": 8, "n": 3,
        "temperature": 1.0, "seed": 42, "logprobs": 2, "ignore_eos": true});
    let a = post(s.addr, "/v1/completions", body.clone()).json();
    let b = post(s.addr, "/v1/completions", body).json();
    assert_eq!(a["object"], "text_completion");
    let ch = a["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 3);
    for (i, c) in ch.iter().enumerate() {
        assert_eq!(c["index"], i);
        let lp = &c["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), 8);
        assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
        let offs: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(offs.windows(2).all(|w| w[0] <= w[1]));
    }
    // Same seed, same choices.
    for (x, y) in ch.iter().zip(b["choices"].as_array().unwrap()) {
        assert_eq!(x["text"], y["text"]);
    }
    assert_eq!(a["usage"]["completion_tokens"], 24);

    // A stop string cuts the text before it and finishes with "stop".
    let greedy =
        json!({"prompt": "abc def", "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let full = post(s.addr, "/v1/completions", greedy.clone()).json();
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..5].iter().collect();
        let mut with_stop = greedy;
        with_stop["stop"] = json!([stop.clone()]);
        let cut = post(s.addr, "/v1/completions", with_stop).json();
        let got = cut["choices"][0]["text"].as_str().unwrap();
        assert_eq!(got, &text[..text.find(&stop).unwrap()]);
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    }

    // Several prompts in one request: choices indexed prompt-major.
    let multi = json!({"prompt": ["abc", "def ghi"], "max_tokens": 2, "n": 2, "temperature": 0, "ignore_eos": true});
    let m = post(s.addr, "/v1/completions", multi).json();
    assert_eq!(m["choices"].as_array().unwrap().len(), 4);
    assert_eq!(m["usage"]["completion_tokens"], 8);
    // echo puts the prompt first.
    let e = post(
        s.addr,
        "/v1/completions",
        json!({"prompt": "abc", "max_tokens": 2, "echo": true, "temperature": 0}),
    )
    .json();
    assert!(e["choices"][0]["text"].as_str().unwrap().starts_with("abc"));
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = Server::start(cfg(), 4, 8);
    let a = s.addr;
    let raw = |body: &[u8]| {
        request(
            a,
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", "application/json")],
            body,
        )
    };
    assert_error(&raw(b"{not json"), 400, Some("body"));
    assert_error(&raw(b"[1, 2]"), 400, Some("body"));
    assert_error(&raw(b"{\"messages\": \"hi\"}"), 400, Some("body"));
    assert_error(
        &post(a, "/v1/chat/completions", json!({"max_tokens": 3})),
        400,
        Some("messages"),
    );
    assert_error(
        &post(a, "/v1/chat/completions", json!({"messages": []})),
        400,
        Some("messages"),
    );
    let j = assert_error(
        &post(
            a,
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
        ),
        400,
        Some("messages"),
    );
    assert!(j["error"]["message"].as_str().unwrap().contains("wizard"));
    let j = assert_error(
        &post(
            a,
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
        ),
        404,
        Some("model"),
    );
    assert_eq!(j["error"]["code"], "model_not_found");
    let j = assert_error(
        &post(
            a,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
        ),
        400,
        Some("max_tokens"),
    );
    assert_eq!(j["error"]["code"], "context_length_exceeded");
    for (field, value) in [
        ("temperature", json!(3.5)),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("presence_penalty", json!(-3)),
        ("frequency_penalty", json!(9)),
        ("min_p", json!(2)),
        ("n", json!(0)),
        ("n", json!(99)),
        ("max_tokens", json!(-1)),
        ("top_k", json!(-5)),
    ] {
        let mut b = json!({"messages": [{"role": "user", "content": "x"}]});
        b[field] = value.clone();
        assert_error(&post(a, "/v1/chat/completions", b), 400, Some(field));
    }
    let mut b = json!({"messages": [{"role": "user", "content": "x"}]});
    b["temperature"] = json!("hot");
    assert_error(&post(a, "/v1/chat/completions", b), 400, Some("body"));
    assert_error(
        &post(a, "/v1/completions", json!({"prompt": ""})),
        400,
        Some("prompt"),
    );
    assert_error(
        &post(a, "/v1/completions", json!({"prompt": [1, "x"]})),
        400,
        Some("prompt"),
    );
    assert_error(
        &post(a, "/v1/completions", json!({"prompt": [999999]})),
        400,
        Some("prompt"),
    );
    assert_error(&post(a, "/v1/completions", json!({})), 400, Some("prompt"));
    assert_error(
        &post(
            a,
            "/v1/completions",
            json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
        ),
        400,
        Some("stop"),
    );
    for (field, value) in [
        ("logit_bias", json!({"5": 10})),
        ("best_of", json!(3)),
        ("response_format", json!({"type": "xml"})),
        ("response_format", json!({"type": "json_schema"})),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
        ),
        ("grammar", json!("root ::= undefined-rule")),
        ("grammar", json!(5)),
        ("json_schema", json!("not a schema")),
    ] {
        let mut b = json!({"prompt": "x", "max_tokens": 2});
        b[field] = value;
        assert_error(&post(a, "/v1/completions", b), 400, Some(field));
    }
    // Their neutral values are accepted.
    let neutral = json!({"prompt": "x", "max_tokens": 2, "logit_bias": {}, "best_of": 1,
        "response_format": {"type": "text"}, "user": "u1"});
    assert_eq!(post(a, "/v1/completions", neutral).status, 200);
    // Oversized body.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
    let r = request(
        a,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        big.as_bytes(),
    );
    assert_error(&r, 413, None);
    // Nothing above broke the server.
    assert_eq!(post(a, "/v1/chat/completions", chat_body(2)).status, 200);
    wait_idle(s.engine());
}

/// Structured output: whatever the (random-weight) model would say, the
/// text follows the schema or grammar; streaming and non-streaming.
#[test]
fn response_format_json_schema_and_grammar() {
    let s = Server::start(cfg(), 4, 16);
    let a = s.addr;
    let schema = json!({"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "color": {"enum": ["red", "green"]}},
        "required": ["ok", "n", "color"], "additionalProperties": false});
    let bodies = [
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": true}}}),
        json!({"json_schema": schema}),
    ];
    for (i, extra) in bodies.iter().enumerate() {
        for seed in 0..3 {
            let mut b = chat_body(64);
            b["temperature"] = json!(1.0);
            b["seed"] = json!(seed);
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            let r = post(a, "/v1/chat/completions", b);
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let j = r.json();
            let text = j["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("body {i} seed {seed}: {e}: {text:?}"));
            assert!(
                v["ok"].is_boolean() && v["n"].as_u64().is_some_and(|n| n <= 9),
                "{text}"
            );
            assert!(v["color"] == "red" || v["color"] == "green", "{text}");
            assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
            assert_eq!(j["choices"][0]["finish_reason"], "stop", "{j}");
        }
    }
    // The schema's fixed keys and punctuation were forced, not sampled.
    let forced = String::from_utf8_lossy(&get(a, "/metrics").body)
        .lines()
        .find_map(|l| {
            l.strip_prefix("tl_forced_tokens_total ")
                .map(str::to_string)
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(forced > 0.0, "no token was fast-forwarded");
    let masks = String::from_utf8_lossy(&get(a, "/metrics").body)
        .lines()
        .find_map(|l| l.strip_prefix("tl_engine_masks_total ").map(str::to_string))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(masks > 0.0, "no grammar mask was counted");
    // Any JSON object.
    let mut b = chat_body(48);
    b["response_format"] = json!({"type": "json_object"});
    b["max_tokens"] = json!(400);
    b["temperature"] = json!(0.5);
    let r = post(a, "/v1/chat/completions", b);
    assert_eq!(r.status, 200);
    let text = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    if r.json()["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_object()),
            "{text:?}"
        );
    } else {
        assert!(text.starts_with('{'), "{text:?}");
    }
    // GBNF on completions, n = 2.
    let r = post(
        a,
        "/v1/completions",
        json!({"prompt": "answer:", "max_tokens": 32, "n": 2, "temperature": 1.0, "seed": 4,
               "grammar": "root ::= (\"yes\" | \"no\") (\",\" ws (\"yes\" | \"no\")){0,2}\nws ::= \" \"?\n"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for c in r.json()["choices"].as_array().unwrap() {
        let t = c["text"].as_str().unwrap();
        let parts: Vec<&str> = t.split(',').map(str::trim).collect();
        assert!(
            (1..=3).contains(&parts.len()) && parts.iter().all(|p| *p == "yes" || *p == "no"),
            "{t:?}"
        );
    }
    // Two constraints at once is an error.
    let mut b = chat_body(8);
    b["grammar"] = json!("root ::= \"a\"");
    b["response_format"] = json!({"type": "json_object"});
    assert_error(&post(a, "/v1/chat/completions", b), 400, Some("grammar"));
    wait_idle(s.engine());
}

/// `tool_choice: "auto"` on the synthetic vocabulary (no tool-call token:
/// the Llama 3 JSON format, lazy on a reply opening with `{`): whatever the
/// random weights write, a reply read as a call is valid against the
/// tool's schema, and anything else comes back as content; tools whose
/// parameters make no grammar leave `auto` free (a forced call is a 400).
#[test]
fn auto_tool_choice_compiles_its_lazy_grammar() {
    let s = Server::start(cfg(), 4, 16);
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x"], "additionalProperties": false}}}]);
    for seed in 0..4 {
        let mut b = chat_body(24);
        b["ignore_eos"] = json!(false);
        b["temperature"] = json!(1.0);
        b["seed"] = json!(seed);
        b["tools"] = tools.clone();
        b["tool_choice"] = json!("auto");
        let r = post(s.addr, "/v1/chat/completions", b);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        let c = &j["choices"][0];
        if c["finish_reason"] == "tool_calls" {
            let call = &c["message"]["tool_calls"][0]["function"];
            assert_eq!(call["name"], "f", "{j}");
            let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
            assert!(args["x"].as_u64().is_some_and(|x| x <= 9), "{j}");
        } else {
            assert!(c["message"]["content"].is_string(), "{j}");
        }
    }
    // Parameters no grammar can be made of: `auto` leaves the reply free,
    // a forced call is a 400.
    let bad = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]);
    let mut b = chat_body(4);
    b["tools"] = bad;
    assert_eq!(post(s.addr, "/v1/chat/completions", b.clone()).status, 200);
    b["tool_choice"] = json!("required");
    assert_error(
        &post(s.addr, "/v1/chat/completions", b),
        400,
        Some("tool_choice"),
    );
    wait_idle(s.engine());
}

#[test]
fn api_key_is_required_when_set() {
    let s = Server::start(
        ServerConfig {
            api_key: Some("s3cret".into()),
            ..cfg()
        },
        4,
        8,
    );
    let body = chat_body(2).to_string();
    let send =
        |h: &[(&str, &str)]| request(s.addr, "POST", "/v1/chat/completions", h, body.as_bytes());
    let j = assert_error(&send(&[]), 401, None);
    assert_eq!(j["error"]["code"], "invalid_api_key");
    assert_error(&send(&[("Authorization", "Bearer wrong")]), 401, None);
    assert_error(&send(&[("Authorization", "Bearer s3cre")]), 401, None);
    assert_error(&send(&[("Authorization", "s3cret")]), 401, None);
    assert_eq!(send(&[("Authorization", "Bearer s3cret")]).status, 200);
    assert_error(&get(s.addr, "/v1/models"), 401, None);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(get(s.addr, "/health").status, 200);
    assert_eq!(get(s.addr, "/metrics").status, 200);
}

#[test]
fn full_queue_answers_429_with_retry_after() {
    let s = Server::start(cfg(), 1, 2);
    let addr = s.addr;
    let threads: Vec<_> = (0..12)
        .map(|_| {
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/completions",
                    json!({"prompt": [5, 6, 7], "max_tokens": 400,
                    "temperature": 0, "ignore_eos": true}),
                )
            })
        })
        .collect();
    let replies: Vec<Reply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let full: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(ok >= 1, "some requests are served");
    assert!(
        !full.is_empty(),
        "statuses: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(ok + full.len(), 12);
    for r in full {
        assert_error(r, 429, None);
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    wait_idle(s.engine());
}

#[test]
fn slow_requests_time_out() {
    let s = Server::start(
        ServerConfig {
            request_timeout: Duration::from_millis(5),
            ..cfg()
        },
        4,
        8,
    );
    let long =
        json!({"prompt": [5, 6, 7], "max_tokens": 480, "temperature": 0, "ignore_eos": true});
    let j = assert_error(&post(s.addr, "/v1/completions", long.clone()), 504, None);
    assert_eq!(j["error"]["code"], "timeout");
    let mut streamed = long;
    streamed["stream"] = json!(true);
    let ev = post(s.addr, "/v1/completions", streamed).events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let err: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "timeout");
    wait_idle(s.engine());
}

fn wait_idle(e: &Engine) {
    let t = Instant::now();
    loop {
        let st = e.last_stats();
        if st.running_requests == 0 && st.waiting_requests == 0 && st.kv_blocks_used == 0 {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "engine not idle: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn disconnected_stream_is_cancelled_and_frees_blocks() {
    let s = Server::start(cfg(), 4, 8);
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 480, "temperature": 0, "ignore_eos": true, "stream": true});
    let conn = send_json(s.addr, "/v1/completions", &body);
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    while !line.starts_with("data: ") && !line.contains("\r\ndata: ") {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        line = l;
    }
    drop(r);
    wait_idle(s.engine());
    let generated = s.engine().last_stats().generated_tokens;
    assert!(
        generated < 480,
        "the request ran to its end ({generated} tokens)"
    );
    let m = String::from_utf8(get(s.addr, "/metrics").body).unwrap();
    assert!(
        m.contains("tl_requests_total{endpoint=\"completions\",status=\"499\"} 1"),
        "{m}"
    );
}

#[test]
fn metrics_report_requests_latency_and_kv() {
    let s = Server::start(cfg(), 4, 8);
    let mut b = chat_body(5);
    b["stream"] = json!(true);
    assert_eq!(post(s.addr, "/v1/chat/completions", b).status, 200);
    assert_eq!(
        post(s.addr, "/v1/chat/completions", chat_body(5)).status,
        200
    );
    // The engine publishes its stats after the step that answered.
    wait_idle(s.engine());
    let r = get(s.addr, "/metrics");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let m = String::from_utf8(r.body).unwrap();
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("{name} missing in\n{m}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("tl_requests_total{endpoint=\"chat_completions\",status=\"200\"}"),
        2.0
    );
    assert_eq!(value("tl_generation_tokens_total"), 10.0);
    assert!(value("tl_prompt_tokens_total") > 0.0);
    assert_eq!(value("tl_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(value("tl_inter_token_latency_seconds_count"), 8.0);
    assert_eq!(
        value("tl_requests_running"),
        0.0,
        "{:?}\n{m}",
        s.engine().last_stats()
    );
    assert_eq!(value("tl_requests_waiting"), 0.0);
    assert_eq!(value("tl_kv_blocks_used"), 0.0);
    assert!(value("tl_kv_blocks_free") > 0.0);
    assert!(value("tl_kv_blocks_total") >= value("tl_kv_blocks_free"));
    let rate = value("tl_prefix_cache_hit_rate");
    assert!(
        rate > 0.0 && rate <= 1.0,
        "the second request reuses the first's prompt blocks"
    );
}

#[test]
fn shutdown_finishes_streams_in_flight() {
    let mut s = Server::start(cfg(), 4, 8);
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 300, "temperature": 0, "ignore_eos": true, "stream": true});
    let conn = send_json(s.addr, "/v1/completions", &body);
    let addr = s.addr;
    let reader = std::thread::spawn(move || read_reply(conn));
    std::thread::sleep(Duration::from_millis(20));
    s.state.start_draining();
    // Draining: health says so, new requests are refused.
    assert_eq!(get(addr, "/health").status, 503);
    assert_error(
        &post(
            addr,
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 2}),
        ),
        503,
        None,
    );
    s.shutdown();
    let r = reader.join().unwrap();
    let ev = r.events();
    assert_eq!(
        ev.last().unwrap(),
        "[DONE]",
        "the stream in flight ran to its end"
    );
    let fin: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    assert!(
        TcpStream::connect(addr).is_err(),
        "no new connections after shutdown"
    );
}

#[test]
fn disconnected_plain_request_is_cancelled() {
    let s = Server::start(cfg(), 4, 8);
    let body =
        json!({"prompt": [5, 6, 7], "max_tokens": 480, "temperature": 0, "ignore_eos": true});
    let conn = send_json(s.addr, "/v1/completions", &body);
    let t = Instant::now();
    while s.engine().last_stats().generated_tokens == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the request never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(conn);
    wait_idle(s.engine());
    let generated = s.engine().last_stats().generated_tokens;
    assert!(
        generated < 480,
        "the request ran to its end ({generated} tokens)"
    );
}

/// The value of one exact series (name with labels) in a metrics text.
fn series(m: &str, name: &str) -> f64 {
    m.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("{name} missing in\n{m}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn vllm_named_metrics_for_routers() {
    let s = Server::start(cfg(), 4, 8);
    let mut b = chat_body(5);
    b["stream"] = json!(true);
    assert_eq!(post(s.addr, "/v1/chat/completions", b).status, 200);
    assert_eq!(
        post(
            s.addr,
            "/v1/completions",
            json!({"prompt": [5, 6], "max_tokens": 3})
        )
        .status,
        200
    );
    wait_idle(s.engine());
    let m = String::from_utf8(get(s.addr, "/metrics").body).unwrap();
    let l = "{engine=\"0\",model_name=\"synthetic\"}";
    assert_eq!(series(&m, &format!("vllm:num_requests_running{l}")), 0.0);
    assert_eq!(series(&m, &format!("vllm:num_requests_waiting{l}")), 0.0);
    assert_eq!(series(&m, &format!("vllm:kv_cache_usage_perc{l}")), 0.0);
    assert_eq!(series(&m, &format!("vllm:gpu_cache_usage_perc{l}")), 0.0);
    assert_eq!(series(&m, &format!("vllm:generation_tokens_total{l}")), 8.0);
    assert_eq!(
        series(&m, &format!("vllm:prompt_tokens_total{l}")),
        series(&m, "tl_prompt_tokens_total")
    );
    assert_eq!(
        series(&m, &format!("vllm:time_to_first_token_seconds_count{l}")),
        2.0
    );
    assert_eq!(
        series(&m, &format!("vllm:e2e_request_latency_seconds_count{l}")),
        2.0
    );
    assert_eq!(
        series(
            &m,
            "vllm:request_success_total{engine=\"0\",finished_reason=\"length\",model_name=\"synthetic\"}"
        ),
        2.0
    );
    assert!(series(&m, &format!("vllm:prefix_cache_queries_total{l}")) > 0.0);
    // KV usage is a fraction of the pool while a request holds blocks.
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": true});
    let conn = send_json(s.addr, "/v1/completions", &body);
    let t = Instant::now();
    loop {
        let m = String::from_utf8(get(s.addr, "/metrics").body).unwrap();
        let u = series(&m, &format!("vllm:kv_cache_usage_perc{l}"));
        if u > 0.0 {
            assert!(u <= 1.0, "{u}");
            assert_eq!(series(&m, &format!("vllm:num_requests_running{l}")), 1.0);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "KV usage never rose");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(conn);
    wait_idle(s.engine());
}

#[test]
fn router_probe_endpoints() {
    let mut s = Server::start_with(cfg(), 4, 8, false);
    let i = get(s.addr, "/get_server_info");
    assert_eq!(i.status, 200);
    assert_eq!(i.json()["status"], "loading");
    assert_error(&get(s.addr, "/get_model_info"), 503, None);
    assert_error(&get(s.addr, "/health_generate"), 503, None);
    assert_eq!(get(s.addr, "/get_load").json()["load"], 0);
    s.shutdown();

    let s = Server::start(cfg(), 4, 8);
    let v = get(s.addr, "/version");
    assert_eq!(v.status, 200);
    assert!(v.json()["version"].as_str().is_some_and(|v| !v.is_empty()));
    for path in ["/get_server_info", "/server_info"] {
        let j = get(s.addr, path).json();
        assert_eq!(j["status"], "ok", "{j}");
        assert_eq!(j["served_model_name"], "synthetic", "{j}");
        assert!(j["max_total_num_tokens"].as_u64().unwrap() > 0, "{j}");
        assert!(j["max_model_len"].as_u64().unwrap() > 0, "{j}");
    }
    let j = get(s.addr, "/get_model_info").json();
    assert_eq!(j["is_generation"], true, "{j}");
    assert!(j["model_type"].is_string(), "{j}");
    assert!(j.get("model_path").is_some(), "{j}");
    let h = get(s.addr, "/health_generate");
    assert_eq!(h.status, 200, "{}", String::from_utf8_lossy(&h.body));
    // Load: running + waiting, while a request runs.
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": true});
    let conn = send_json(s.addr, "/v1/completions", &body);
    let t = Instant::now();
    loop {
        let l = get(s.addr, "/get_load").json();
        if l["load"] == 1 {
            assert_eq!(l["num_reqs"], 1);
            assert_eq!(get(s.addr, "/load").json()["server_load"], 1);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "load never showed: {l}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(conn);
    wait_idle(s.engine());
    assert_eq!(get(s.addr, "/get_load").json()["load"], 0);
}

#[test]
fn tokenize_and_detokenize() {
    let s = Server::start(cfg(), 4, 8);
    let t = post(
        s.addr,
        "/tokenize",
        json!({"prompt": "hello world", "return_token_strs": true}),
    );
    assert_eq!(t.status, 200, "{}", String::from_utf8_lossy(&t.body));
    let j = t.json();
    let ids = j["tokens"].as_array().unwrap().clone();
    assert_eq!(j["count"], ids.len());
    assert!(!ids.is_empty() && j["max_model_len"].as_u64().unwrap() > 0);
    assert_eq!(j["token_strs"].as_array().unwrap().len(), ids.len());
    let d = post(s.addr, "/detokenize", json!({"tokens": ids}));
    assert_eq!(d.status, 200);
    assert!(
        d.json()["prompt"]
            .as_str()
            .unwrap()
            .ends_with("hello world"),
        "{}",
        d.json()
    );
    // No special tokens: the text alone.
    let plain = post(
        s.addr,
        "/tokenize",
        json!({"prompt": "hello world", "add_special_tokens": false}),
    )
    .json();
    let text = post(s.addr, "/detokenize", json!({"tokens": plain["tokens"]})).json();
    assert_eq!(text["prompt"], "hello world");
    // A conversation goes through the chat template: longer than its text.
    let c = post(
        s.addr,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "hello world"}]}),
    )
    .json();
    assert!(c["count"].as_u64().unwrap() > plain["count"].as_u64().unwrap());
    // Bad requests: clear errors.
    assert_error(&post(s.addr, "/tokenize", json!({})), 400, Some("prompt"));
    assert_error(
        &post(s.addr, "/tokenize", json!({"prompt": "a", "messages": []})),
        400,
        Some("prompt"),
    );
    assert_error(
        &post(s.addr, "/tokenize", json!({"prompt": 5})),
        400,
        Some("body"),
    );
    assert_error(
        &post(
            s.addr,
            "/tokenize",
            json!({"messages": [{"role": "robot", "content": "x"}]}),
        ),
        400,
        None,
    );
    assert_error(
        &post(
            s.addr,
            "/tokenize",
            json!({"prompt": "a", "model": "other"}),
        ),
        404,
        None,
    );
    assert_error(
        &request(s.addr, "POST", "/tokenize", &[], b"{not json"),
        400,
        Some("body"),
    );
    assert_error(
        &post(s.addr, "/detokenize", json!({"tokens": [1, -1]})),
        400,
        Some("tokens"),
    );
    assert_error(
        &post(s.addr, "/detokenize", json!({"tokens": [1u64 << 40]})),
        400,
        Some("tokens"),
    );
    assert_error(
        &post(s.addr, "/detokenize", json!({"tokens": "abc"})),
        400,
        Some("tokens"),
    );
}

#[test]
fn per_request_timeout_header() {
    let s = Server::start(cfg(), 4, 8);
    let body =
        json!({"prompt": [5, 6, 7], "max_tokens": 480, "temperature": 0, "ignore_eos": true});
    let b = body.to_string();
    for bad in ["abc", "0", "-1", "inf"] {
        let r = request(
            s.addr,
            "POST",
            "/v1/completions",
            &[("X-Request-Timeout", bad)],
            b.as_bytes(),
        );
        assert_error(&r, 400, Some("X-Request-Timeout"));
    }
    let r = request(
        s.addr,
        "POST",
        "/v1/completions",
        &[("X-Request-Timeout", "0.005")],
        b.as_bytes(),
    );
    let j = assert_error(&r, 504, None);
    assert_eq!(j["error"]["code"], "timeout");
    wait_idle(s.engine());
    let ok = request(
        s.addr,
        "POST",
        "/v1/completions",
        &[("X-Request-Timeout", "60")],
        json!({"prompt": [5, 6], "max_tokens": 2})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(ok.status, 200);
}

// ---------------------------------------------------------------------------
// /v1/embeddings

fn embedder() -> Arc<tl_model::encoder::Embedder> {
    use tl_model::synth::{synthesize_encoder, SynthArch};
    let p = std::env::temp_dir().join(format!("tl-server-embed-{}.gguf", std::process::id()));
    let spec = SynthSpec {
        arch: SynthArch::Bert,
        d_model: 64,
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 32,
        ffn: 128,
        context: 32,
        extra_vocab: 10,
        ..SynthSpec::default()
    };
    synthesize_encoder(&spec, tl_model::encoder::Pooling::Mean)
        .expect("synth")
        .write_file(&p)
        .expect("write");
    let e = tl_model::encoder::Embedder::load_on(&p, tl_core::Device::Cpu).expect("load");
    std::fs::remove_file(&p).ok();
    Arc::new(e)
}

fn embedding_server() -> (Server, Arc<tl_model::encoder::Embedder>) {
    let state = AppState::new(cfg()).expect("state");
    let e = embedder();
    state.set_embedder(e.clone());
    (Server::serve_state(state), e)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn embeddings_in_openai_shape() {
    let (s, e) = embedding_server();
    assert_eq!(get(s.addr, "/health").status, 200);
    let info = get(s.addr, "/get_model_info").json();
    assert_eq!(info["is_generation"], false);
    assert_eq!(info["model_type"], "bert");
    assert_eq!(info["pooling"], "mean");
    assert_eq!(get(s.addr, "/get_server_info").json()["status"], "ok");
    let texts = ["hello world", "the quick brown fox", "a"];
    let seqs: Vec<Vec<u32>> = texts.iter().map(|t| e.tokenize(t).unwrap()).collect();
    let want = e.embed(&seqs, true).unwrap();
    let n_tokens: usize = seqs.iter().map(Vec::len).sum();

    // An array of strings, batched: one vector per input, in order.
    let r = post(
        s.addr,
        "/v1/embeddings",
        json!({"model": "synthetic", "input": texts}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["object"], "list");
    assert_eq!(j["model"], "synthetic");
    assert_eq!(j["usage"]["prompt_tokens"], n_tokens);
    assert_eq!(j["usage"]["total_tokens"], n_tokens);
    let data = j["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let v = floats(&d["embedding"]);
        assert_eq!(v, want[i], "input {i}");
        let len: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((len - 1.0).abs() < 1e-5);
    }

    // One string; token arrays (one, and several) give the same vectors.
    let r = post(s.addr, "/v1/embeddings", json!({"input": texts[1]}));
    assert_eq!(r.status, 200);
    assert_eq!(floats(&r.json()["data"][0]["embedding"]), want[1]);
    let r = post(s.addr, "/v1/embeddings", json!({"input": seqs[0]}));
    assert_eq!(r.status, 200);
    assert_eq!(floats(&r.json()["data"][0]["embedding"]), want[0]);
    let r = post(
        s.addr,
        "/v1/embeddings",
        json!({"input": [seqs[2], seqs[0]]}),
    );
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(floats(&j["data"][0]["embedding"]), want[2]);
    assert_eq!(floats(&j["data"][1]["embedding"]), want[0]);
    assert_eq!(j["usage"]["prompt_tokens"], seqs[2].len() + seqs[0].len());

    // base64: the little-endian f32 bytes.
    let r = post(
        s.addr,
        "/v1/embeddings",
        json!({"input": texts[0], "encoding_format": "base64"}),
    );
    assert_eq!(r.status, 200);
    let b64 = r.json()["data"][0]["embedding"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = decode_base64(&b64);
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(v, want[0]);
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for ch in s.as_bytes().chunks(4) {
        let n = ch.iter().take_while(|&&c| c != b'=').count();
        let mut acc = 0u32;
        for (i, &c) in ch.iter().enumerate() {
            acc |= u32::from(if c == b'=' { 0 } else { val(c) }) << (18 - 6 * i);
        }
        let b = acc.to_be_bytes();
        out.extend_from_slice(&b[1..n]);
    }
    out
}

#[test]
fn embeddings_bad_requests_are_400s() {
    let (s, _e) = embedding_server();
    let bad = |body: Value, needle: &str| {
        let r = post(s.addr, "/v1/embeddings", body.clone());
        assert_eq!(
            r.status,
            400,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{body}: {msg}");
    };
    bad(json!({}), "'input' is required");
    bad(json!({"input": []}), "empty array");
    bad(json!({"input": 5}), "must be a string");
    bad(json!({"input": [{"a": 1}]}), "input[0]");
    bad(json!({"input": [[1, -2]]}), "input[0][1]");
    bad(json!({"input": [1, 99999]}), "outside the vocabulary");
    bad(json!({"input": [[]]}), "no tokens");
    bad(
        json!({"input": "x", "encoding_format": "binary"}),
        "encoding_format",
    );
    // Over the context (32 tokens): a clear 400 naming the input.
    let long = "word ".repeat(40);
    let r = post(s.addr, "/v1/embeddings", json!({"input": ["ok", long]}));
    assert_eq!(r.status, 400);
    let j = r.json();
    assert_eq!(j["error"]["code"], "context_length_exceeded");
    assert!(j["error"]["message"].as_str().unwrap().contains("input 1"));
    // Another model's name.
    let r = post(
        s.addr,
        "/v1/embeddings",
        json!({"model": "other", "input": "x"}),
    );
    assert_eq!(r.status, 404);
    // Generation on an embedding model.
    let r = post(
        s.addr,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/embeddings"));
}

#[test]
fn embeddings_on_a_text_generator_are_a_400() {
    let s = Server::start(cfg(), 2, 4);
    let r = post(s.addr, "/v1/embeddings", json!({"input": "hello"}));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["error"]["code"], "model_not_embedding");
    assert!(j["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not an embedding model"));
}
