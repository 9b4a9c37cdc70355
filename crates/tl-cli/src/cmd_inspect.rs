//! `tl inspect MODEL.gguf`: what a model file holds, for people and scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use tl_gguf::{GgufFile, Value};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The GGUF file.
    pub model: PathBuf,
    /// List every tensor (name, type, shape, offset).
    #[arg(long)]
    pub tensors: bool,
    /// Print every metadata key (long arrays elided).
    #[arg(long)]
    pub metadata: bool,
    /// Machine-readable JSON output.
    #[arg(long)]
    pub json: bool,
}

struct Summary {
    architecture: String,
    name: Option<String>,
    hyper: Vec<(String, String, serde_json::Value)>,
    tokenizer_model: Option<String>,
    tokenizer_pre: Option<String>,
    vocab_size: Option<usize>,
    chat_template: bool,
    per_type: BTreeMap<String, (usize, u64)>,
    total_bytes: u64,
    n_params: u64,
}

fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::String(s) => json!(s),
        Value::Bool(b) => json!(b),
        Value::F32(f) => json!(f),
        Value::F64(f) => json!(f),
        Value::Array(a) => json!({"array_of": format!("{:?}", a.elem_type()), "len": a.len()}),
        other => other
            .as_i64()
            .map(|i| json!(i))
            .or_else(|| other.as_u64().map(|u| json!(u)))
            .unwrap_or(serde_json::Value::Null),
    }
}

fn summarize(f: &GgufFile) -> Summary {
    let m = &f.metadata;
    let architecture = m
        .opt_str("general.architecture")
        .ok()
        .flatten()
        .unwrap_or("(none)")
        .to_string();
    let prefix = format!("{architecture}.");
    let hyper = m
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(&prefix)
                .map(|short| (short.to_string(), v.display_short(8), to_json(v)))
        })
        .collect();
    let mut per_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut total_bytes = 0;
    let mut n_params = 0;
    for t in &f.tensors {
        let e = per_type.entry(t.ty.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.size;
        total_bytes += t.size;
        n_params += t.n_elements();
    }
    Summary {
        architecture,
        name: m.opt_str("general.name").ok().flatten().map(str::to_string),
        hyper,
        tokenizer_model: m
            .opt_str("tokenizer.ggml.model")
            .ok()
            .flatten()
            .map(str::to_string),
        tokenizer_pre: m
            .opt_str("tokenizer.ggml.pre")
            .ok()
            .flatten()
            .map(str::to_string),
        vocab_size: m
            .opt_array("tokenizer.ggml.tokens")
            .ok()
            .flatten()
            .map(|a| a.len()),
        chat_template: m.contains("tokenizer.chat_template"),
        per_type,
        total_bytes,
        n_params,
    }
}

fn human_bytes(b: u64) -> String {
    let mib = b as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.2} MiB")
    }
}

/// Why tl cannot run the file (empty when it can): the model's
/// architecture, shapes and tensor types, then the tokenizer.
fn blockers(f: &GgufFile) -> Vec<String> {
    let mut why = Vec::new();
    let checked = if tl_model::encoder::is_encoder(f) {
        tl_model::encoder::Encoder::check_file(f)
    } else {
        tl_model::model::Model::check_file(f)
    };
    if let Err(e) = checked {
        why.push(format!("model: {e}"));
    }
    if let Err(e) = tl_tokenizer::Tokenizer::from_gguf(f) {
        why.push(format!("tokenizer: {e}"));
    }
    why
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let f =
        GgufFile::open(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let s = summarize(&f);
    let blockers = blockers(&f);
    if args.json {
        let mut out = json!({
            "file": args.model.display().to_string(),
            "gguf_version": f.version,
            "alignment": f.alignment,
            "architecture": s.architecture,
            "name": s.name,
            "hyper_parameters": s.hyper.iter().map(|(k, _, v)| (k.clone(), v.clone())).collect::<serde_json::Map<_, _>>(),
            "tokenizer": {"model": s.tokenizer_model, "pre": s.tokenizer_pre, "vocab_size": s.vocab_size},
            "chat_template": s.chat_template,
            "tensor_count": f.tensors.len(),
            "split_parts": f.parts.iter().map(|p| p.path.display().to_string()).collect::<Vec<_>>(),
            "tensor_types": s.per_type.iter().map(|(k, (n, b))| (k.clone(), json!({"count": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "parameters": s.n_params,
            "total_bytes": s.total_bytes,
            "runnable": blockers.is_empty(),
            "not_runnable_because": blockers,
        });
        if args.tensors {
            out["tensors"] = f
                .tensors
                .iter()
                .map(|t| {
                    let (part, offset) = f.tensor_location(t);
                    let mut j = json!({"name": t.name, "type": t.ty.name(), "dims": t.dims, "offset": offset, "bytes": t.size});
                    if !f.parts.is_empty() {
                        j["part"] = json!(part + 1);
                    }
                    j
                })
                .collect();
        }
        if args.metadata {
            out["metadata"] = f
                .metadata
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.display_short(16))))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("file:          {}", args.model.display());
    println!("gguf version:  {} (alignment {})", f.version, f.alignment);
    if !f.parts.is_empty() {
        println!("split:         {} parts", f.parts.len());
        for p in &f.parts {
            println!("  {}", p.path.display());
        }
    }
    println!("architecture:  {}", s.architecture);
    if blockers.is_empty() {
        if tl_model::encoder::is_encoder(&f) {
            println!("runs in tl:    yes (embedding model: tl embed, /v1/embeddings)");
        } else {
            println!("runs in tl:    yes");
        }
    } else {
        println!("runs in tl:    no");
        for b in &blockers {
            println!("  - {b}");
        }
    }
    println!("name:          {}", s.name.as_deref().unwrap_or("(none)"));
    println!(
        "tokenizer:     {} (pre: {}), vocab {}",
        s.tokenizer_model.as_deref().unwrap_or("(none)"),
        s.tokenizer_pre.as_deref().unwrap_or("(none)"),
        s.vocab_size.map(|v| v.to_string()).unwrap_or("?".into())
    );
    println!(
        "chat template: {}",
        if s.chat_template { "present" } else { "absent" }
    );
    println!("hyper-parameters:");
    for (k, v, _) in &s.hyper {
        println!("  {k:<40} {v}");
    }
    println!(
        "tensors:       {} ({} parameters, {})",
        f.tensors.len(),
        s.n_params,
        human_bytes(s.total_bytes)
    );
    for (ty, (n, b)) in &s.per_type {
        println!("  {ty:<8} {n:>5} tensors  {:>12}", human_bytes(*b));
    }
    if args.metadata {
        println!("metadata:");
        for (k, v) in f.metadata.iter() {
            println!("  {k:<40} {}", v.display_short(8));
        }
    }
    if args.tensors {
        let split = !f.parts.is_empty();
        println!(
            "{:<40} {:<8} {:<24} {:>12} {:>12}{}",
            "name",
            "type",
            "dims",
            "offset",
            "bytes",
            if split { "  part" } else { "" }
        );
        for t in &f.tensors {
            let (part, offset) = f.tensor_location(t);
            println!(
                "{:<40} {:<8} {:<24} {:>12} {:>12}{}",
                t.name,
                t.ty.name(),
                format!("{:?}", t.dims),
                offset,
                t.size,
                if split {
                    format!("  {:>4}", part + 1)
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}
