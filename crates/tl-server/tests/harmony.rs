//! gpt-oss's harmony replies over real HTTP: `reasoning_content`,
//! `content` and `tool_calls`, whole and streamed.
//!
//! The model is a `tl synth` gpt-oss whose vocabulary gets harmony's
//! tokens and whose weights are then set so that greedy decoding writes a
//! fixed script: every layer's output (attention output and expert down
//! projections, with their biases) is zero, so the residual stream is the
//! token's embedding and the logits depend on the last token alone; the
//! script's tokens each have their own embedding direction and the output
//! row of each script token points at its predecessor's (the first at the
//! one direction every other token shares). A marker the script uses twice
//! (`<|channel|>`, `<|message|>`) is two vocabulary entries of the same
//! text. Nothing in the server or the engine knows of this: it samples and
//! reads the reply back as it would gpt-oss's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tl_engine::{Engine, EngineConfig, SchedulerConfig};
use tl_gguf::{Array, GgmlType, GgufFile, GgufWriter, Value as Gv};
use tl_model::llm::Llm;
use tl_model::synth::{synthesize, SynthArch, SynthSpec};
use tl_server::{AppState, ServerConfig};

/// A minimal harmony chat template: each message as
/// `<|start|>ROLE<|message|>TEXT<|end|>`, then `<|start|>assistant`.
const TEMPLATE: &str = "{%- for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{%- endfor %}{%- if add_generation_prompt %}<|start|>assistant{%- endif %}";

/// Harmony's markers: user-defined (written out in the text) but for
/// `<|return|>` and `<|call|>`, which end the generation.
fn marker_type(t: &str) -> i32 {
    if t == "<|return|>" || t == "<|call|>" {
        3
    } else {
        4
    }
}

/// Writes the scripted model: `script` is the reply, one vocabulary entry
/// per piece (SentencePiece text: `▁` is a space).
fn scripted_model(name: &str, script: &[&str]) -> std::path::PathBuf {
    let spec = SynthSpec {
        arch: SynthArch::GptOss,
        n_layers: 1,
        d_model: 64,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 32,
        ffn: 64,
        n_expert: 4,
        n_expert_used: 2,
        seed: 5,
        ..Default::default()
    };
    let base = GgufFile::from_bytes(synthesize(&spec).unwrap().to_bytes().unwrap()).unwrap();
    let md = &base.metadata;
    let Some(Array::String(mut tokens)) = md.opt_array("tokenizer.ggml.tokens").unwrap().cloned()
    else {
        panic!("tokens")
    };
    let Some(Array::F32(mut scores)) = md.opt_array("tokenizer.ggml.scores").unwrap().cloned()
    else {
        panic!("scores")
    };
    let Some(Array::I32(mut types)) = md.opt_array("tokenizer.ggml.token_type").unwrap().cloned()
    else {
        panic!("types")
    };
    let mut push = |t: &str, ty: i32| {
        tokens.push(t.to_string());
        scores.push(0.0);
        types.push(ty);
        tokens.len() - 1
    };
    // Every marker once (the template's and the end tokens), then the
    // script's pieces, each its own entry.
    for m in [
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|channel|>",
        "<|constrain|>",
        "<|return|>",
        "<|call|>",
    ] {
        push(m, marker_type(m));
    }
    let ids: Vec<usize> = script
        .iter()
        .map(|p| {
            if p.starts_with("<|") {
                push(p, marker_type(p))
            } else {
                push(p, 1)
            }
        })
        .collect();
    let vocab = tokens.len();
    let d = spec.d_model;
    assert!(script.len() < d, "one direction per piece");
    // Embedding: direction 0 for every token, i + 1 for piece i.
    let mut embd = vec![0f32; vocab * d];
    for t in 0..vocab {
        embd[t * d] = 1.0;
    }
    for (i, &t) in ids.iter().enumerate() {
        embd[t * d] = 0.0;
        embd[t * d + i + 1] = 1.0;
    }
    // Output: piece 0 follows any other token, piece i + 1 piece i.
    let mut out = vec![0f32; vocab * d];
    for (i, &t) in ids.iter().enumerate() {
        out[t * d + i] = 1.0;
    }
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut w = GgufWriter::new();
    w.metadata = md.clone();
    w.set("tokenizer.ggml.tokens", Gv::Array(Array::String(tokens)));
    w.set("tokenizer.ggml.scores", Gv::Array(Array::F32(scores)));
    w.set("tokenizer.ggml.token_type", Gv::Array(Array::I32(types)));
    w.set("tokenizer.chat_template", Gv::String(TEMPLATE.into()));
    for t in &base.tensors {
        let zeroed = [
            "attn_output.weight",
            "attn_output.bias",
            "ffn_down_exps.weight",
            "ffn_down_exps.bias",
        ]
        .iter()
        .any(|s| t.name.ends_with(s));
        match t.name.as_str() {
            "token_embd.weight" => w
                .add_tensor(
                    &t.name,
                    vec![d as u64, vocab as u64],
                    GgmlType::F32,
                    bytes(&embd),
                )
                .unwrap(),
            "output.weight" => w
                .add_tensor(
                    &t.name,
                    vec![d as u64, vocab as u64],
                    GgmlType::F32,
                    bytes(&out),
                )
                .unwrap(),
            "output_norm.weight" => w
                .add_tensor(&t.name, t.dims.clone(), GgmlType::F32, bytes(&vec![1.0; d]))
                .unwrap(),
            _ if zeroed => {
                let n = base.tensor_data(t).len();
                w.add_tensor(&t.name, t.dims.clone(), t.ty, vec![0u8; n])
                    .unwrap()
            }
            _ => w
                .add_tensor(&t.name, t.dims.clone(), t.ty, base.tensor_data(t).to_vec())
                .unwrap(),
        }
    }
    let p = std::env::temp_dir().join(format!("tl-harmony-{name}-{}.gguf", std::process::id()));
    w.write_file(&p).unwrap();
    p
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(llm: Arc<Llm>) -> Server {
        let state = AppState::new(ServerConfig {
            model_id: "gpt-oss-synthetic".into(),
            ..Default::default()
        })
        .expect("state");
        let engine = Engine::start(
            llm,
            EngineConfig {
                scheduler: SchedulerConfig {
                    max_batch: 4,
                    max_batch_tokens: 256,
                    ..Default::default()
                },
                kv_bytes: 8 << 20,
                gpu_memory_utilization: None,
                max_queue: 8,
            },
        )
        .expect("engine");
        state.set_engine(Arc::new(engine));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (atx, arx) = std::sync::mpsc::channel();
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
                tl_server::serve(l, state, async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
            });
        });
        Server {
            addr: arx.recv().expect("addr"),
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// POSTs `body` as JSON; the status and the body (de-chunked).
fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let b = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            out.extend_from_slice(&chunk[..n]);
            if n == 0 {
                break;
            }
        }
    } else {
        r.read_to_end(&mut out).unwrap();
    }
    (status, String::from_utf8(out).unwrap())
}

fn chat(stream: bool, tools: bool) -> Value {
    let mut b = json!({
        "model": "gpt-oss-synthetic",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": stream,
    });
    if tools {
        b["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}]);
    }
    b
}

/// What a streamed reply adds up to: reasoning, content, the calls
/// (name, arguments, id) merged by index, and the finish reason.
struct Streamed {
    reasoning: String,
    content: String,
    calls: Vec<(String, String, String)>,
    finish: String,
}

fn streamed(body: &str) -> Streamed {
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let mut s = Streamed {
        reasoning: String::new(),
        content: String::new(),
        calls: Vec::new(),
        finish: String::new(),
    };
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let d = &c["delta"];
        if let Some(t) = d["reasoning_content"].as_str() {
            s.reasoning.push_str(t);
        }
        if let Some(t) = d["content"].as_str() {
            s.content.push_str(t);
        }
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().expect("index") as usize;
            if s.calls.len() <= i {
                s.calls.resize(i + 1, Default::default());
            }
            let call = &mut s.calls[i];
            if let Some(n) = tc["function"]["name"].as_str() {
                call.0.push_str(n);
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                call.1.push_str(a);
            }
            if let Some(id) = tc["id"].as_str() {
                call.2.push_str(id);
            }
        }
        if let Some(f) = c["finish_reason"].as_str() {
            assert!(s.finish.is_empty(), "two finish reasons: {body}");
            s.finish = f.to_string();
        }
    }
    s
}

#[test]
fn reasoning_then_final_answer() {
    let path = scripted_model(
        "final",
        &[
            "<|channel|>",
            "analysis",
            "<|message|>",
            "The▁user▁asks▁about▁Paris.",
            "<|end|>",
            "<|start|>",
            "assistant",
            "<|channel|>",
            "final",
            "<|message|>",
            "It▁is▁sunny▁in▁Paris.",
            "<|return|>",
        ],
    );
    let s = Server::start(Arc::new(Llm::load(&path).expect("load")));
    let _ = std::fs::remove_file(&path);

    let (status, body) = post(s.addr, "/v1/chat/completions", &chat(false, false));
    assert_eq!(status, 200, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    let c = &j["choices"][0];
    assert_eq!(c["message"]["role"], "assistant", "{j}");
    assert_eq!(
        c["message"]["reasoning_content"], "The user asks about Paris.",
        "{j}"
    );
    assert_eq!(c["message"]["content"], "It is sunny in Paris.", "{j}");
    assert!(
        c["message"]["tool_calls"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{j}"
    );
    assert_eq!(c["finish_reason"], "stop", "{j}");

    let (status, body) = post(s.addr, "/v1/chat/completions", &chat(true, false));
    assert_eq!(status, 200, "{body}");
    let st = streamed(&body);
    assert_eq!(st.reasoning, "The user asks about Paris.", "{body}");
    assert_eq!(st.content, "It is sunny in Paris.", "{body}");
    assert!(st.calls.is_empty(), "{body}");
    assert_eq!(st.finish, "stop", "{body}");
    // No marker leaks into any part.
    assert!(!body.contains("<|"), "{body}");
}

#[test]
fn reasoning_then_tool_call() {
    let path = scripted_model(
        "call",
        &[
            "<|channel|>",
            "analysis",
            "<|message|>",
            "Need▁the▁weather▁tool.",
            "<|end|>",
            "<|start|>",
            "assistant",
            "<|channel|>",
            "commentary▁to=functions.get_weather▁",
            "<|constrain|>",
            "json",
            "<|message|>",
            "{\"city\":\"Paris\"}",
            "<|call|>",
        ],
    );
    let s = Server::start(Arc::new(Llm::load(&path).expect("load")));
    let _ = std::fs::remove_file(&path);

    let (status, body) = post(s.addr, "/v1/chat/completions", &chat(false, true));
    assert_eq!(status, 200, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    let c = &j["choices"][0];
    assert_eq!(
        c["message"]["reasoning_content"], "Need the weather tool.",
        "{j}"
    );
    assert!(
        c["message"]["content"].is_null() || c["message"]["content"] == "",
        "{j}"
    );
    let calls = c["message"]["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1, "{j}");
    assert_eq!(calls[0]["type"], "function", "{j}");
    assert_eq!(calls[0]["function"]["name"], "get_weather", "{j}");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}), "{j}");
    assert!(
        calls[0]["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{j}"
    );
    assert_eq!(c["finish_reason"], "tool_calls", "{j}");

    let (status, body) = post(s.addr, "/v1/chat/completions", &chat(true, true));
    assert_eq!(status, 200, "{body}");
    let st = streamed(&body);
    assert_eq!(st.reasoning, "Need the weather tool.", "{body}");
    assert_eq!(st.content, "", "{body}");
    assert_eq!(st.calls.len(), 1, "{body}");
    assert_eq!(st.calls[0].0, "get_weather", "{body}");
    let args: Value = serde_json::from_str(&st.calls[0].1).unwrap();
    assert_eq!(args, json!({"city": "Paris"}), "{body}");
    assert!(!st.calls[0].2.is_empty(), "{body}");
    assert_eq!(st.finish, "tool_calls", "{body}");
    assert!(!body.contains("<|"), "{body}");
}
