#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Programs whose model is on the GPU: `linear` by the model's weights and
//! `attention` over its caches run there (tl-model's device operations, the
//! forward's kernels). The same program runs on a CPU copy of the model
//! and on a CUDA copy side by side, and their results are compared.
//!
//! On a machine without a GPU (CI) the GPU tests print why they are
//! skipped and pass; `scripts/gpu_check.sh` runs them on the GPU machine.
//! What a machine without a GPU can check, it checks: asking for CUDA there
//! is a clear error, and a device name that is no device is one too.
//!
//! Tolerance: as in tl-model's CUDA tests (tests/cuda.rs), the two devices
//! compute the same products in another order and precision (8-bit
//! activations in 32-value blocks on the GPU against the CPU's own block
//! grouping; f16 activations and weights through cuBLAS past 64 rows; the
//! query kept in f32 by the GPU's attention, rounded to f16 by the CPU's),
//! and random-weight models amplify rounding through the layers, so the
//! bound is on the whole row: the largest difference under 5% of the row's
//! largest magnitude, and the greedy pick equal on at least 7 of 9 steps. A
//! wrong layout, scale or block table gives differences of the row's own
//! size.

use tl_gguf::GgmlType;
use tl_lang::run_source;
use tl_model::synth::{synthesize, SynthArch, SynthSpec};

fn gpu_or_skip(test: &str) -> bool {
    match tl_cuda::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            false
        }
    }
}

fn synth_file(tag: &str, s: &SynthSpec) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tl-cuda-lang-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{tag}.gguf"));
    let bytes = synthesize(s).expect("synth").to_bytes().expect("bytes");
    std::fs::write(&p, bytes).unwrap();
    p
}

const PROGRAM: &str = r#"
fn layer(m: model, cache: kv_cache, x: f32[t, d], l: int, pos: int) -> f32[t, d] {
    let c = m.config;
    let b = m.blk[l];
    let n = dim(x, 0);
    let positions = i32(arange(n) + pos);
    let h = rms_norm(x, b.attn_norm.weight, c.rms_eps);
    // (tl synth writes the biases as [1, n] matrices.)
    let q = linear(h, b.attn_q.weight, reshape(b.attn_q.bias, c.n_heads * c.head_dim));
    let k = linear(h, b.attn_k.weight, reshape(b.attn_k.bias, c.n_kv_heads * c.head_dim));
    let v = linear(h, b.attn_v.weight, reshape(b.attn_v.bias, c.n_kv_heads * c.head_dim));
    let q3 = rope(reshape(q, n, c.n_heads, c.head_dim), positions, c.rope_base, "neox");
    let k3 = rope(reshape(k, n, c.n_kv_heads, c.head_dim), positions, c.rope_base, "neox");
    let a = attention(q3, k3, reshape(v, n, c.n_kv_heads, c.head_dim), cache, l, pos);
    let x1 = x + linear(reshape(a, n, c.n_heads * c.head_dim), b.attn_output.weight);
    let h2 = rms_norm(x1, b.ffn_norm.weight, c.rms_eps);
    let g = linear(h2, b.ffn_gate.weight);
    let u = linear(h2, b.ffn_up.weight);
    return x1 + linear(silu(g) * u, b.ffn_down.weight);
}

fn head(m: model, x: f32[t, d]) -> f32[v] {
    let last = rms_norm(x[dim(x, 0) - 1], m.output_norm.weight, m.config.rms_eps);
    return linear(last, m.output.weight);
}

let c = load_model(PATH, "cpu");
let g = load_model(PATH, "cuda");

// One product alone at 1, 5 and 70 rows: the 8-row GEMVs, the tensor-core
// or GEMV path of small batches, and cuBLAS past 64 rows.
let x1 = embedding(c.token_embd.weight, i32([5]));
let x5 = embedding(c.token_embd.weight, i32([5, 9, 77, 100, 3]));
let x70 = embedding(c.token_embd.weight, i32(arange(70) + 4));
let y1 = linear(x1, c.blk[0].ffn_up.weight);
let nq = c.config.n_heads * c.config.head_dim;
let y5 = linear(x5, c.blk[1].attn_q.weight, reshape(c.blk[1].attn_q.bias, nq));
let y70 = linear(x70, c.blk[0].ffn_gate.weight);
print("linear", 1, max(abs(y1 - linear(x1, g.blk[0].ffn_up.weight))) / max(abs(y1)));
print("linear", 5, max(abs(y5 - linear(x5, g.blk[1].attn_q.weight, reshape(g.blk[1].attn_q.bias, nq)))) / max(abs(y5)));
print("linear", 70, max(abs(y70 - linear(x70, g.blk[0].ffn_gate.weight))) / max(abs(y70)));

// The whole forward: a 20-token prompt (crossing a KV block), then 8
// decode steps fed fixed tokens, so the two runs see the same inputs.
let cc = kv_cache(c, 64);
let cg = kv_cache(g, 64);
let ids = i32(arange(20) * 7 + 11);
let xc = embedding(c.token_embd.weight, ids);
let xg = embedding(g.token_embd.weight, ids);
for l in 0..c.config.n_layers {
    xc = layer(c, cc, xc, l, 0);
    xg = layer(g, cg, xg, l, 0);
}
let lc = head(c, xc);
let lg = head(g, xg);
print("step", 0, max(abs(lc - lg)) / max(abs(lc)), argmax(lc), argmax(lg));
let pos = 20;
for s in 1..9 {
    let t = i32([s * 37 + 5]);
    xc = embedding(c.token_embd.weight, t);
    xg = embedding(g.token_embd.weight, t);
    for l in 0..c.config.n_layers {
        xc = layer(c, cc, xc, l, pos);
        xg = layer(g, cg, xg, l, pos);
    }
    lc = head(c, xc);
    lg = head(g, xg);
    print("step", s, max(abs(lc - lg)) / max(abs(lc)), argmax(lc), argmax(lg));
    pos = pos + 1;
}
"#;

fn run_case(tag: &str, s: &SynthSpec, device: &str) {
    let p = synth_file(tag, s);
    let src = PROGRAM
        .replace("PATH", &format!("{:?}", p.display().to_string()))
        .replace("\"cuda\"", &format!("{device:?}"));
    let out = match run_source("cuda.tl", &src) {
        Ok(o) => o,
        Err((o, e)) => panic!("{tag}: {o}\n{e}"),
    };
    eprintln!("{tag}:\n{out}");
    let (mut steps, mut agree) = (0, 0);
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.first() {
            Some(&"linear") => {
                let rel: f32 = f[2].parse().unwrap();
                assert!(
                    rel <= 0.05,
                    "{tag}: linear at {} rows: rel diff {rel}",
                    f[1]
                );
            }
            Some(&"step") => {
                let rel: f32 = f[2].parse().unwrap();
                assert!(rel <= 0.05, "{tag}: step {}: logits rel diff {rel}", f[1]);
                steps += 1;
                agree += usize::from(f[3] == f[4]);
            }
            _ => {}
        }
    }
    assert_eq!(steps, 9, "{tag}: every step reported");
    assert!(
        agree >= 7,
        "{tag}: greedy picks equal on {agree} of 9 steps"
    );
}

#[test]
fn programs_run_linear_and_attention_on_the_gpu() {
    // Without a GPU the comparison still runs, CPU against CPU, so that
    // the program and the checks stay valid where CI runs them.
    let device = if gpu_or_skip("programs_run_linear_and_attention_on_the_gpu") {
        "cuda"
    } else {
        eprintln!("(running the program with both copies on the CPU instead)");
        "cpu"
    };
    for (tag, ty, hd) in [
        ("q8_0-hd64", GgmlType::Q8_0, 64),
        ("q4_k-hd128", GgmlType::Q4_K, 128),
    ] {
        let s = SynthSpec {
            arch: SynthArch::Qwen2,
            weight_type: ty,
            output_type: ty,
            head_dim: hd,
            n_layers: 3,
            seed: 9,
            ..Default::default()
        };
        run_case(tag, &s, device);
    }
}

#[test]
fn cuda_without_a_gpu_and_unknown_devices_are_clear_errors() {
    let p = synth_file("cpu-only", &SynthSpec::default());
    let path = format!("{:?}", p.display().to_string());
    let bad = run_source("d.tl", &format!("let m = load_model({path}, \"tpu\");"));
    let (_, e) = bad.expect_err("an unknown device is an error");
    assert!(e.contains("load_model") && e.contains("tpu"), "{e}");
    if tl_cuda::probe().is_ok() {
        eprintln!("SKIPPED the no-GPU half: this machine has a GPU");
        return;
    }
    let r = run_source("d.tl", &format!("let m = load_model({path}, \"cuda\");"));
    let (_, e) = r.expect_err("CUDA without a GPU is an error");
    assert!(e.contains("CUDA not available"), "{e}");
}
