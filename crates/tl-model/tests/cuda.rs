#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The CUDA executor held to the CPU one on synthetic models of every
//! architecture and weight type: ragged prefill batches crossing KV block
//! boundaries, then batched decode steps (the CUDA-graph path), logits
//! compared row by row, greedy tokens compared.
//!
//! On a machine without a GPU (CI) every test prints why it is skipped and
//! passes; `scripts/gpu_check.sh` runs them on the GPU machine.
//!
//! Tolerance: the two devices compute the same arithmetic in a different
//! order and precision — the GPU's prefill products run on f16 activations
//! and f16-dequantized weights (cuBLAS) where the CPU quantizes activations
//! to 8 bits, the GPU's attention keeps the query in f32 where the CPU
//! rounds it to f16 — so logits differ by rounding, amplified through the
//! layers. Random weights make these models chaotic (no trained margins), so
//! the bound is on the whole row: the largest difference must stay under
//! 5% of the row's largest magnitude (a wrong kernel — a swapped nibble, a
//! wrong scale, a wrong block table — gives differences of the row's own
//! size), and greedy tokens must agree on at least 80% of decode steps.

use tl_core::Device;
use tl_gguf::{GgmlType, GgufFile};
use tl_model::kv::{BlockManager, KvType, SeqKv};
use tl_model::model::{ForwardState, Logits, Model, SeqBatch};
use tl_model::sampler::{pick, DeviceDraw};
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

fn spec(arch: SynthArch, ty: GgmlType, out: GgmlType, hd: usize) -> SynthSpec {
    SynthSpec {
        arch,
        weight_type: ty,
        output_type: out,
        head_dim: hd,
        n_layers: 3,
        seed: 5,
        ..Default::default()
    }
}

fn load(s: &SynthSpec, dev: Device) -> Model {
    let bytes = synthesize(s).expect("synth").to_bytes().expect("bytes");
    Model::from_file_on(GgufFile::from_bytes(bytes).expect("parses"), dev).expect("loads")
}

/// Largest |a - b| over a row, relative to the row's largest |a|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn argmax(r: &[f32]) -> usize {
    let mut b = 0;
    for (i, &v) in r.iter().enumerate() {
        if v > r[b] {
            b = i;
        }
    }
    b
}

struct Side {
    m: Model,
    cache: tl_model::kv::KvCache,
    blocks: BlockManager,
    st: ForwardState,
    seqs: Vec<SeqKv>,
}

impl Side {
    fn new(s: &SynthSpec, dev: Device, n_seqs: usize) -> Side {
        Self::with_cache(s, dev, n_seqs, 2048)
    }

    fn with_cache(s: &SynthSpec, dev: Device, n_seqs: usize, tokens: usize) -> Side {
        Self::with_kv(s, dev, n_seqs, tokens, KvType::F16)
    }

    fn with_kv(s: &SynthSpec, dev: Device, n_seqs: usize, tokens: usize, ty: KvType) -> Side {
        let mut m = load(s, dev);
        m.set_kv_type(ty).expect("kv type");
        let cache = m.new_cache(tokens).expect("cache");
        let blocks = BlockManager::new(cache.n_blocks);
        Side {
            m,
            cache,
            blocks,
            st: ForwardState::default(),
            seqs: (0..n_seqs).map(|_| SeqKv::new()).collect(),
        }
    }

    /// One step: `toks[i]` appended to sequence `i`, run by `f` (one of the
    /// model's forwards) over the batch; the sequences advance after it.
    fn run<T>(
        &mut self,
        toks: &[Vec<u32>],
        which: Logits,
        f: impl FnOnce(&Model, &mut tl_model::kv::KvCache, &[SeqBatch], &mut ForwardState) -> T,
    ) -> T {
        for (kv, t) in self.seqs.iter_mut().zip(toks) {
            kv.reserve(&mut self.blocks, t.len()).expect("reserve");
        }
        let batch: Vec<SeqBatch> = self
            .seqs
            .iter()
            .zip(toks)
            .map(|(kv, t)| SeqBatch {
                tokens: t,
                pos: kv.len,
                kv,
                logits: which,
            })
            .collect();
        let out = f(&self.m, &mut self.cache, &batch, &mut self.st);
        drop(batch);
        for (kv, t) in self.seqs.iter_mut().zip(toks) {
            kv.len += t.len();
        }
        out
    }

    /// One step returning the logits rows `which` selects.
    fn step(&mut self, toks: &[Vec<u32>], which: Logits) -> Vec<f32> {
        self.run(toks, which, |m, c, b, st| {
            m.forward(c, b, st).expect("forward").to_vec()
        })
    }

    /// One step returning each sequence's pick made on the device.
    fn step_sampled(&mut self, toks: &[Vec<u32>], draws: &[DeviceDraw]) -> Vec<u32> {
        self.run(toks, Logits::Last, |m, c, b, st| {
            m.forward_sampled(c, b, st, draws).expect("forward")
        })
    }

    /// One step returning each sequence's greedy token.
    fn step_greedy(&mut self, toks: &[Vec<u32>]) -> Vec<u32> {
        self.run(toks, Logits::Last, |m, c, b, st| {
            m.forward_greedy(c, b, st).expect("forward")
        })
    }
}

/// With `TL_DUMP_TENSORS=DIR` set, the intermediates of the last forward
/// are in DIR: moves them to `DIR/<side>` for a stage-by-stage comparison.
fn stash_dump(side: &str) -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(std::env::var_os("TL_DUMP_TENSORS")?);
    let to = dir.join(side);
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to).ok()?;
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        if e.path().extension().is_some_and(|x| x == "bin") {
            std::fs::rename(e.path(), to.join(e.file_name())).ok()?;
        }
    }
    Some(to)
}

fn read_f32(p: &std::path::Path) -> Option<Vec<f32>> {
    let b = std::fs::read(p).ok()?;
    Some(
        b.chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Prints, in forward order, each dumped stage's largest difference
/// relative to the CPU tensor's largest magnitude: the first stage that
/// jumps is the kernel to look at. (The CUDA executor defers the FFN
/// residual into the next norm, so its `ffn_out`/`l_out` are expected to
/// differ; `ffn_inp` and `attn_norm` of the next layer must not.)
fn stage_report(cpu: &std::path::Path, gpu: &std::path::Path, layers: usize) {
    let mut names = vec!["embd".to_string()];
    for l in 0..layers {
        for n in [
            "attn_norm",
            "Qcur",
            "kqv_out",
            "attn_out",
            "ffn_inp",
            "ffn_norm",
            "ffn_act",
            "ffn_out",
            "l_out",
        ] {
            names.push(format!("{n}-{l}"));
        }
    }
    names.push("result_norm".into());
    for n in names {
        let f = format!("{n}.bin");
        let (Some(a), Some(b)) = (read_f32(&cpu.join(&f)), read_f32(&gpu.join(&f))) else {
            continue;
        };
        if a.len() != b.len() {
            eprintln!("    stage {n:<14} length cpu {} gpu {}", a.len(), b.len());
            continue;
        }
        let nan = b.iter().filter(|v| !v.is_finite()).count();
        eprintln!(
            "    stage {n:<14} rel diff {:.5}{}",
            rel_diff(&a, &b),
            if nan > 0 {
                format!(" ({nan} non-finite)")
            } else {
                String::new()
            }
        );
    }
}

/// Prefill three ragged prompts (5, 17 and 40 tokens: inside a block, just
/// past one, across several), then 24 decode steps of the three together.
/// Returns a description of the first failed check.
fn compare(s: &SynthSpec) -> Result<(), String> {
    compare_with(s, false)
}

/// [`compare`] with the grouped mixture-of-experts prompt path on or off.
fn compare_with(s: &SynthSpec, moe_grouped: bool) -> Result<(), String> {
    let label = format!(
        "{:?} {} / {} hd {} d {} ffn {} layers {}{}",
        s.arch,
        s.weight_type,
        s.output_type,
        s.head_dim,
        s.d_model,
        s.ffn,
        s.n_layers,
        if moe_grouped {
            " (experts grouped)"
        } else {
            ""
        }
    );
    let vocab = s.vocab();
    let mut cpu = Side::new(s, Device::Cpu, 3);
    let mut gpu = Side::new(s, Device::Cuda(0), 3);
    gpu.m.set_moe_grouped(moe_grouped);
    let prompts: Vec<Vec<u32>> = [5usize, 17, 40]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|j| (3 + (i * 31 + j * 17) % (vocab - 3)) as u32)
                .collect()
        })
        .collect();
    // Two prefill chunks: 62 rows (the quantized products, 8 rows a launch)
    // and then 90 (dequantized weights and cuBLAS).
    let more: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            (0..30)
                .map(|j| (3 + (i * 13 + j * 29 + 7) % (vocab - 3)) as u32)
                .collect()
        })
        .collect();
    let mut last = Vec::new();
    for (chunk, toks) in [&prompts, &more].into_iter().enumerate() {
        let a = cpu.step(toks, Logits::All);
        let dump_cpu = stash_dump("cpu");
        let b = gpu.step(toks, Logits::All);
        let dump_gpu = stash_dump("gpu");
        if a.len() != b.len() {
            return Err(format!("{label}: logits rows {} vs {}", a.len(), b.len()));
        }
        let mut worst = 0f32;
        for (ra, rb) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)) {
            worst = worst.max(rel_diff(ra, rb));
        }
        let rows = a.len() / vocab;
        eprintln!("{label}: prefill chunk {chunk} ({rows} rows) max rel diff {worst:.4}");
        if let (Some(c), Some(g)) = (&dump_cpu, &dump_gpu) {
            stage_report(c, g, s.n_layers);
        }
        if worst.is_nan() || worst >= 0.05 {
            return Err(format!(
                "{label}: prefill chunk {chunk} logits differ by {worst}"
            ));
        }
        last = a;
    }
    // Decode: the CPU's argmax feeds both, so the sequences stay equal.
    let a = last;
    let mut next: Vec<Vec<u32>> = (0..3)
        .map(|i| vec![argmax(&a[((i + 1) * 30 - 1) * vocab..][..vocab]) as u32])
        .collect();
    let (mut agree, mut steps, mut worst) = (0, 0, 0f32);
    for step in 0..24 {
        let la = cpu.step(&next, Logits::Last);
        let dc = if step == 0 {
            stash_dump("cpu-decode")
        } else {
            None
        };
        let (lb, ids) = if step % 2 == 0 {
            let lb = gpu.step(&next, Logits::Last);
            if let (Some(c), Some(g)) = (&dc, stash_dump("gpu-decode")) {
                eprintln!("{label}: decode step 0 stages");
                stage_report(c, &g, s.n_layers);
            }
            let ids = lb
                .chunks_exact(vocab)
                .map(|r| argmax(r) as u32)
                .collect::<Vec<_>>();
            (Some(lb), ids)
        } else {
            (None, gpu.step_greedy(&next))
        };
        for (j, ra) in la.chunks_exact(vocab).enumerate() {
            if let Some(lb) = &lb {
                let d = rel_diff(ra, &lb[j * vocab..(j + 1) * vocab]);
                if step == 0 && d >= 0.05 {
                    eprintln!("{label}: decode step 0 seq {j} rel diff {d:.4}");
                }
                worst = worst.max(d);
            }
            steps += 1;
            agree += usize::from(argmax(ra) as u32 == ids[j]);
        }
        next = la
            .chunks_exact(vocab)
            .map(|r| vec![argmax(r) as u32])
            .collect();
    }
    eprintln!("{label}: decode max rel diff {worst:.4}, greedy agreement {agree}/{steps}");
    if worst.is_nan() || worst >= 0.05 {
        return Err(format!("{label}: decode logits differ by {worst}"));
    }
    if agree * 5 < steps * 4 {
        return Err(format!("{label}: greedy agreement {agree}/{steps}"));
    }
    Ok(())
}

#[test]
fn cuda_matches_cpu_on_every_architecture_and_weight_type() {
    if !gpu_or_skip("cuda_matches_cpu_on_every_architecture_and_weight_type") {
        return;
    }
    let cases = [
        (SynthArch::Qwen2, GgmlType::Q8_0, GgmlType::Q8_0, 64),
        (SynthArch::Qwen2, GgmlType::Q4_0, GgmlType::Q8_0, 64),
        (SynthArch::Qwen2, GgmlType::Q5_0, GgmlType::Q6_K, 128),
        (SynthArch::Qwen2, GgmlType::Q4_K, GgmlType::Q6_K, 128),
        (SynthArch::Qwen2, GgmlType::Q6_K, GgmlType::Q8_0, 64),
        (SynthArch::Llama, GgmlType::Q4_0, GgmlType::Q4_0, 64),
        (SynthArch::Llama, GgmlType::F16, GgmlType::F16, 128),
        (SynthArch::Llama, GgmlType::Q4_1, GgmlType::Q5_1, 64),
        (SynthArch::Llama, GgmlType::Q5_K, GgmlType::Q3_K, 64),
        (SynthArch::Llama, GgmlType::Q2_K, GgmlType::BF16, 64),
        (SynthArch::Gemma3, GgmlType::Q4_K, GgmlType::Q4_K, 256),
        (SynthArch::Gemma3, GgmlType::Q8_0, GgmlType::Q8_0, 64),
        (SynthArch::Qwen3, GgmlType::Q8_0, GgmlType::Q8_0, 128),
        (SynthArch::Phi3, GgmlType::Q4_K, GgmlType::Q6_K, 64),
        (SynthArch::Gemma, GgmlType::Q8_0, GgmlType::Q8_0, 64),
        // Attention and final soft-capping, every other layer windowed.
        (SynthArch::Gemma2, GgmlType::Q8_0, GgmlType::Q8_0, 128),
        // Embedding, attention, residual and logit scales.
        (SynthArch::Granite, GgmlType::Q4_K, GgmlType::Q6_K, 64),
        // Post-norms only, Q/K normed over the whole projection.
        (SynthArch::Olmo2, GgmlType::Q8_0, GgmlType::Q8_0, 64),
        // LayerNorm, attention and FFN in parallel, a logit scale.
        (SynthArch::CommandR, GgmlType::Q4_0, GgmlType::Q8_0, 64),
        // Mixtures of experts: softmax top-k renormalised (qwen3moe,
        // mixtral), not renormalised with a gated shared expert
        // (qwen2moe); experts of every decode kernel family and f16.
        (SynthArch::Qwen3Moe, GgmlType::Q8_0, GgmlType::Q8_0, 64),
        (SynthArch::Qwen3Moe, GgmlType::Q4_K, GgmlType::Q6_K, 128),
        (SynthArch::Mixtral, GgmlType::Q4_0, GgmlType::Q8_0, 64),
        (SynthArch::Mixtral, GgmlType::F16, GgmlType::F16, 64),
        (SynthArch::Qwen2Moe, GgmlType::Q5_K, GgmlType::Q8_0, 64),
        // gpt-oss: sinks, attention and expert biases, a biased router
        // with a softmax over the selected experts, swiglu_oai, YaRN,
        // windowed even layers, MXFP4 experts (f16 on the device).
        (SynthArch::GptOss, GgmlType::Q8_0, GgmlType::Q8_0, 64),
    ];
    // Wider shapes, so the decode products split long rows over 2 and 4
    // warps (rows of ≥ 1536 and ≥ 3072 values) as on full-size models.
    let wide = [
        (
            SynthArch::Qwen2,
            GgmlType::Q8_0,
            GgmlType::Q8_0,
            64,
            1024,
            4864,
        ),
        (
            SynthArch::Qwen2,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            128,
            1536,
            4608,
        ),
        (
            SynthArch::Llama,
            GgmlType::F16,
            GgmlType::Q4_0,
            128,
            512,
            2048,
        ),
    ];
    let all = cases
        .iter()
        .map(|&(a, t, o, hd)| (a, t, o, hd, 0, 0))
        .chain(wide);
    // Every case runs (a failing one does not hide the others), then the
    // failures are listed together.
    let mut failed = Vec::new();
    for (arch, ty, out, hd, d, ffn) in all {
        let mut s = spec(arch, ty, out, hd);
        if d > 0 {
            (s.d_model, s.ffn, s.n_layers) = (d, ffn, 2);
        }
        match std::panic::catch_unwind(|| compare(&s)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push(format!("{arch:?} {ty} / {out} hd {hd}: panicked")),
        }
    }
    // Command-R of 64 layers: a LayerNorm weight per Q/K head (the layer
    // count is what turns them on, as in llama.cpp).
    let mut deep = spec(SynthArch::CommandR, GgmlType::Q8_0, GgmlType::Q8_0, 64);
    deep.n_layers = 64;
    match std::panic::catch_unwind(|| compare(&deep)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failed.push(e),
        Err(_) => failed.push("CommandR of 64 layers: panicked".to_string()),
    }
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Prompt steps of a mixture of experts with the (token, expert) pairs
/// grouped per expert (`Model::set_moe_grouped`): every MoE case of
/// `cuda_matches_cpu_on_every_architecture_and_weight_type` again (its
/// 90-row chunk takes the grouped path: experts' rows of up to 64 on the
/// 8-bit products), and a 400-token prompt (experts' rows past 64 on the
/// prompt products), logits held to the CPU's with `compare`'s bound.
#[test]
fn cuda_moe_grouped_prefill_matches_cpu() {
    if !gpu_or_skip("cuda_moe_grouped_prefill_matches_cpu") {
        return;
    }
    let mut failed = Vec::new();
    for (arch, ty, out, hd) in [
        (SynthArch::Qwen3Moe, GgmlType::Q8_0, GgmlType::Q8_0, 64),
        (SynthArch::Qwen3Moe, GgmlType::Q4_K, GgmlType::Q6_K, 128),
        (SynthArch::Mixtral, GgmlType::Q4_0, GgmlType::Q8_0, 64),
        (SynthArch::Mixtral, GgmlType::F16, GgmlType::F16, 64),
        (SynthArch::Qwen2Moe, GgmlType::Q5_K, GgmlType::Q8_0, 64),
        (SynthArch::GptOss, GgmlType::Q8_0, GgmlType::Q8_0, 64),
    ] {
        let s = spec(arch, ty, out, hd);
        match std::panic::catch_unwind(|| compare_with(&s, true)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push(format!("{arch:?} {ty}: panicked (grouped)")),
        }
        let vocab = s.vocab();
        let mut cpu = Side::new(&s, Device::Cpu, 1);
        let mut gpu = Side::new(&s, Device::Cuda(0), 1);
        gpu.m.set_moe_grouped(true);
        let toks = vec![(0..400)
            .map(|j| (3 + (j * 37 + 11) % (vocab - 3)) as u32)
            .collect::<Vec<u32>>()];
        let a = cpu.step(&toks, Logits::All);
        let b = gpu.step(&toks, Logits::All);
        let worst = a
            .chunks_exact(vocab)
            .zip(b.chunks_exact(vocab))
            .fold(0f32, |w, (ra, rb)| w.max(rel_diff(ra, rb)));
        eprintln!("{arch:?} {ty} grouped, 400-token prompt: max rel diff {worst:.4}");
        if worst.is_nan() || worst >= 0.05 {
            failed.push(format!(
                "{arch:?} {ty}: 400-token grouped prompt differs by {worst}"
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Long contexts, where decode attention splits each (token, head) pair's
/// keys over several blocks and merges them (flash-decoding): two
/// sequences prefilled to 1,800 and 700 tokens in chunks of 300, then
/// decode steps of both together, their logits held to the CPU's with the
/// tolerance of `compare`; and a batch of one, where the split is widest.
#[test]
fn cuda_long_context_decode_matches_cpu() {
    if !gpu_or_skip("cuda_long_context_decode_matches_cpu") {
        return;
    }
    let mut failed = Vec::new();
    // Query/KV head groupings: none (4/4), 2 (4/2), 4 (4/1), 7 (14/2,
    // Qwen2.5-0.5B's), 16 (16/1) and 6 (12/2, Qwen2.5-1.5B's).
    for (arch, ty, hd, heads, kv_heads) in [
        (SynthArch::Qwen2, GgmlType::Q8_0, 64, 4, 2),
        (SynthArch::Qwen2, GgmlType::Q8_0, 64, 14, 2),
        (SynthArch::Llama, GgmlType::Q8_0, 64, 4, 4),
        (SynthArch::Llama, GgmlType::Q4_0, 64, 16, 1),
        (SynthArch::Qwen2, GgmlType::Q4_K, 128, 12, 2),
        (SynthArch::Gemma3, GgmlType::Q8_0, 256, 4, 1),
    ] {
        let mut s = spec(arch, ty, GgmlType::Q8_0, hd);
        s.context = 4096;
        s.n_heads = heads;
        s.n_kv_heads = kv_heads;
        let label = format!("{arch:?} {ty} hd {hd} heads {heads}/{kv_heads}");
        let vocab = s.vocab();
        for lens in [vec![1800usize, 700], vec![2500]] {
            let n = lens.len();
            let mut cpu = Side::with_cache(&s, Device::Cpu, n, 4096);
            let mut gpu = Side::with_cache(&s, Device::Cuda(0), n, 4096);
            let toks: Vec<Vec<u32>> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    (0..len)
                        .map(|j| (3 + (i * 7 + j * 31) % (vocab - 3)) as u32)
                        .collect()
                })
                .collect();
            let mut done = vec![0usize; n];
            let mut last = Vec::new();
            // A sequence whose prompt is in takes one filler token a step
            // until the longer one's is.
            while done.iter().zip(&lens).any(|(d, l)| d < l) {
                let chunk: Vec<Vec<u32>> = toks
                    .iter()
                    .zip(&done)
                    .map(|(t, &d)| {
                        if d < t.len() {
                            t[d..(d + 300).min(t.len())].to_vec()
                        } else {
                            vec![5]
                        }
                    })
                    .collect();
                last = cpu.step(&chunk, Logits::Last);
                gpu.step(&chunk, Logits::Last);
                for (d, c) in done.iter_mut().zip(&chunk) {
                    *d += c.len();
                }
            }
            let mut next: Vec<Vec<u32>> = last
                .chunks_exact(vocab)
                .map(|r| vec![argmax(r) as u32])
                .collect();
            let mut worst = 0f32;
            for _ in 0..6 {
                let a = cpu.step(&next, Logits::Last);
                let b = gpu.step(&next, Logits::Last);
                for (ra, rb) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)) {
                    worst = worst.max(rel_diff(ra, rb));
                }
                next = a
                    .chunks_exact(vocab)
                    .map(|r| vec![argmax(r) as u32])
                    .collect();
            }
            let ctx: Vec<usize> = cpu.seqs.iter().map(|k| k.len).collect();
            eprintln!("{label}: contexts {ctx:?}: decode max rel diff {worst:.4}");
            if worst.is_nan() || worst >= 0.05 {
                failed.push(format!(
                    "{label} contexts {ctx:?}: decode logits differ by {worst}"
                ));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Wide decode batches: 11, 37 and 64 sequences (captured graphs padded to
/// 16, 40 and 64 rows; products on the tensor-core kernels), each step's
/// logits and greedy picks held to the CPU's with the tolerance of
/// `compare`. The padding rows must write no KV: the sequences then keep
/// decoding, so a stray write into another sequence's blocks would show.
/// Each weight kind the tensor-core kernels unpack is covered.
#[test]
fn cuda_wide_decode_batches_match_cpu() {
    if !gpu_or_skip("cuda_wide_decode_batches_match_cpu") {
        return;
    }
    let mut failed = Vec::new();
    for (ty, out, n) in [
        (GgmlType::Q8_0, GgmlType::Q8_0, 11usize),
        (GgmlType::Q4_0, GgmlType::Q6_K, 37),
        (GgmlType::Q5_0, GgmlType::Q4_K, 64),
        (GgmlType::Q4_1, GgmlType::Q5_K, 11),
        (GgmlType::Q5_1, GgmlType::Q8_0, 37),
        (GgmlType::Q4_K, GgmlType::Q6_K, 37),
        (GgmlType::Q5_K, GgmlType::Q4_0, 11),
        (GgmlType::Q6_K, GgmlType::Q6_K, 64),
    ] {
        let s = spec(SynthArch::Qwen2, ty, out, 64);
        let label = format!("{ty} / {out}, {n} sequences");
        let vocab = s.vocab();
        let mut cpu = Side::new(&s, Device::Cpu, n);
        let mut gpu = Side::new(&s, Device::Cuda(0), n);
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                (0..1 + i % 5)
                    .map(|j| (3 + (i * 37 + j * 11) % (vocab - 3)) as u32)
                    .collect()
            })
            .collect();
        let a = cpu.step(&prompts, Logits::Last);
        gpu.step(&prompts, Logits::Last);
        let mut next: Vec<Vec<u32>> = a
            .chunks_exact(vocab)
            .map(|r| vec![argmax(r) as u32])
            .collect();
        let (mut worst, mut agree, mut steps) = (0f32, 0usize, 0usize);
        for step in 0..8 {
            let a = cpu.step(&next, Logits::Last);
            let ids: Vec<u32> = if step % 2 == 0 {
                let b = gpu.step(&next, Logits::Last);
                for (ra, rb) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)) {
                    worst = worst.max(rel_diff(ra, rb));
                }
                b.chunks_exact(vocab).map(|r| argmax(r) as u32).collect()
            } else {
                gpu.step_greedy(&next)
            };
            for (ra, &id) in a.chunks_exact(vocab).zip(&ids) {
                steps += 1;
                agree += usize::from(argmax(ra) as u32 == id);
            }
            next = a
                .chunks_exact(vocab)
                .map(|r| vec![argmax(r) as u32])
                .collect();
        }
        eprintln!("{label}: decode max rel diff {worst:.4}, greedy agreement {agree}/{steps}");
        if worst.is_nan() || worst >= 0.05 || agree * 5 < steps * 4 {
            failed.push(format!(
                "{label}: rel diff {worst}, greedy agreement {agree}/{steps}"
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Quantized KV caches (q8_0, q4_0, fp8): the GPU's writer and attention
/// against the CPU's on the same file and type, prefill in chunks then
/// greedy decode, three head sizes. Both quantize the same function of
/// K/V (the bytes are the same for the same inputs — the CPU's encoder is
/// checked against llama.cpp's blocks); the inputs differ by the two
/// backends' float order, which can move a value across a quantization
/// boundary now and then, so the bound is the long-context test's.
#[test]
fn cuda_quantized_kv_matches_cpu() {
    if !gpu_or_skip("cuda_quantized_kv_matches_cpu") {
        return;
    }
    let mut failed = Vec::new();
    for ty in [KvType::Q8_0, KvType::Q4_0, KvType::Fp8] {
        for (arch, hd) in [
            (SynthArch::Qwen2, 64),
            (SynthArch::Llama, 128),
            (SynthArch::Gemma3, 256),
        ] {
            let s = spec(arch, GgmlType::Q8_0, GgmlType::Q8_0, hd);
            let vocab = s.vocab();
            let label = format!("{ty} {arch:?} hd {hd}");
            let mut cpu = Side::with_kv(&s, Device::Cpu, 2, 2048, ty);
            let mut gpu = Side::with_kv(&s, Device::Cuda(0), 2, 2048, ty);
            let prompt: Vec<Vec<u32>> = (0..2)
                .map(|i| {
                    (0..300)
                        .map(|j| (3 + (i * 11 + j * 17) % (vocab - 3)) as u32)
                        .collect()
                })
                .collect();
            let mut worst = 0f32;
            let mut last = Vec::new();
            for c in 0..2 {
                let chunk: Vec<Vec<u32>> = prompt
                    .iter()
                    .map(|p| p[c * 150..(c + 1) * 150].to_vec())
                    .collect();
                last = cpu.step(&chunk, Logits::Last);
                let b = gpu.step(&chunk, Logits::Last);
                for (ra, rb) in last.chunks_exact(vocab).zip(b.chunks_exact(vocab)) {
                    worst = worst.max(rel_diff(ra, rb));
                }
            }
            let mut next: Vec<Vec<u32>> = last
                .chunks_exact(vocab)
                .map(|r| vec![argmax(r) as u32])
                .collect();
            for _ in 0..8 {
                let a = cpu.step(&next, Logits::Last);
                let b = gpu.step(&next, Logits::Last);
                for (ra, rb) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)) {
                    worst = worst.max(rel_diff(ra, rb));
                }
                next = a
                    .chunks_exact(vocab)
                    .map(|r| vec![argmax(r) as u32])
                    .collect();
            }
            eprintln!("{label}: prefill + decode max rel diff {worst:.4}");
            if worst.is_nan() || worst >= 0.05 {
                failed.push(format!("{label}: logits differ by {worst}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Sampling on the device against its host reference (`sampler::pick`,
/// whose distribution a CPU test holds to the sampler's): the same logits
/// (two identical GPU sides fed the same tokens: one returns the rows, one
/// picks on the device) and the same uniform draw give the same token, for
/// greedy with penalties, plain temperature, top-k, top-p, min-p, their
/// mixes and ties, on a 40,000-token vocabulary (40 logits a thread).
/// The two can differ only where u · total falls within rounding of a
/// cumulative boundary (sums in another order) or top-p's fixed-point
/// mass (2^-40 of the largest probability) decides a boundary token:
/// at most 1 in 100 picks may differ, and none does in practice.
#[test]
fn cuda_sampling_matches_the_host_pick() {
    if !gpu_or_skip("cuda_sampling_matches_the_host_pick") {
        return;
    }
    let mut s = spec(SynthArch::Qwen2, GgmlType::Q8_0, GgmlType::Q8_0, 64);
    s.extra_vocab = 40_000;
    let vocab = s.vocab();
    let n = 8;
    let mut a = Side::new(&s, Device::Cuda(0), n);
    let mut b = Side::new(&s, Device::Cuda(0), n);
    let mut toks: Vec<Vec<u32>> = (0..n)
        .map(|i| (0..9).map(|j| (3 + i * 977 + j * 131) as u32).collect())
        .collect();
    let base = DeviceDraw {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        u: 0.5,
        penalties: Vec::new(),
    };
    let pens = vec![(5u32, 2u32), (977, 1), (1200, 3)];
    let variants = [
        DeviceDraw {
            temperature: 0.0,
            repeat_penalty: 1.3,
            presence_penalty: 0.5,
            penalties: pens.clone(),
            ..base.clone()
        },
        base.clone(),
        DeviceDraw {
            temperature: 0.7,
            top_k: 40,
            ..base.clone()
        },
        DeviceDraw {
            top_p: 0.9,
            ..base.clone()
        },
        DeviceDraw {
            temperature: 1.5,
            top_k: 1000,
            top_p: 0.5,
            min_p: 0.05,
            ..base.clone()
        },
        DeviceDraw {
            min_p: 0.1,
            frequency_penalty: 0.3,
            penalties: pens.clone(),
            ..base.clone()
        },
        DeviceDraw {
            top_k: 1,
            ..base.clone()
        },
        DeviceDraw {
            temperature: 0.3,
            top_p: 0.99,
            top_k: 5000,
            ..base.clone()
        },
    ];
    let (mut same, mut total) = (0usize, 0usize);
    for step in 0..12 {
        let draws: Vec<DeviceDraw> = (0..n)
            .map(|i| DeviceDraw {
                u: ((step * 8 + i) as f64 * 0.618_033_988_7).fract(),
                ..variants[(i + step) % variants.len()].clone()
            })
            .collect();
        let rows = a.step(&toks, Logits::Last);
        let ids = b.step_sampled(&toks, &draws);
        for (i, d) in draws.iter().enumerate() {
            let mut row = rows[i * vocab..(i + 1) * vocab].to_vec();
            let want = pick(&mut row, d);
            total += 1;
            if want == ids[i] {
                same += 1;
            } else {
                eprintln!("step {step} row {i}: device {} host {want} ({d:?})", ids[i]);
            }
        }
        // Both sides go on with the host's greedy choice.
        toks = rows
            .chunks_exact(vocab)
            .map(|r| vec![argmax(r) as u32])
            .collect();
    }
    eprintln!("device sampling: {same}/{total} picks equal to the host's");
    assert!(same * 100 >= total * 99, "{same}/{total}");
}

/// The sampling kernel on rows with ties: logits from a handful of values,
/// so the top-k and top-p boundaries fall inside runs of equal logits,
/// which both sides keep in token order (first ids first); and a
/// 151,936-token row (Qwen2.5's vocabulary). Every pick must equal the
/// host's (ties make the boundaries exact, not rounding-sensitive).
#[test]
fn cuda_sampling_keeps_ties_in_token_order() {
    if !gpu_or_skip("cuda_sampling_keeps_ties_in_token_order") {
        return;
    }
    for vocab in [5000usize, 151_936] {
        let levels = [2.0f32, 1.0, 1.0, 0.5, 0.0, -1.0, 0.5, 1.0];
        let rows = 64;
        let mut logits = Vec::with_capacity(rows * vocab);
        let mut draws = Vec::new();
        for r in 0..rows {
            for i in 0..vocab {
                logits
                    .push(levels[(i * 7 + r * 3 + i / 13) % levels.len()] * (1.0 + (r % 3) as f32));
            }
            draws.push(DeviceDraw {
                temperature: [0.5f32, 1.0, 2.0][r % 3],
                top_k: [0i32, 3, 100, 4000][r % 4],
                top_p: [1.0f32, 0.3, 0.8][(r / 4) % 3],
                min_p: if r % 5 == 0 { 0.3 } else { 0.0 },
                repeat_penalty: 1.0,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                u: ((r as f64 + 0.5) * 0.754_877_666).fract(),
                penalties: Vec::new(),
            });
        }
        let t0 = std::time::Instant::now();
        let got = tl_model::model::sample_rows_on(Device::Cuda(0), &logits, vocab, &draws)
            .expect("device sampling");
        let dt = t0.elapsed();
        let want =
            tl_model::model::sample_rows_on(Device::Cpu, &logits, vocab, &draws).expect("host");
        let bad: Vec<_> = (0..rows).filter(|&r| got[r] != want[r]).collect();
        for &r in &bad {
            eprintln!(
                "vocab {vocab} row {r}: device {} host {} ({:?})",
                got[r], want[r], draws[r]
            );
        }
        eprintln!("vocab {vocab}: {rows} rows sampled in {dt:?} (first call includes setup)");
        assert!(bad.is_empty(), "{} of {rows} picks differ", bad.len());
    }
}

/// Grammar masks applied by the sampling kernel: rows of Qwen2.5's
/// vocabulary, each with a mask (dense, sparse, a single token, the last
/// word partly set) or none, greedy and sampled draws with penalties on
/// masked tokens; every pick equals the host's (mask, then the CPU
/// sampler) and lies inside its mask.
#[test]
fn cuda_sampling_applies_grammar_masks() {
    if !gpu_or_skip("cuda_sampling_applies_grammar_masks") {
        return;
    }
    let vocab = 151_936usize;
    let words = vocab.div_ceil(32);
    let rows = 24;
    let mut logits = Vec::with_capacity(rows * vocab);
    let mut draws = Vec::new();
    let mut masks = Vec::new();
    for r in 0..rows {
        for i in 0..vocab {
            let x = ((i as u64 * 2_654_435_761 + r as u64 * 97) % 10_007) as f32;
            logits.push(x / 1000.0 - 5.0);
        }
        let mask = match r % 6 {
            0 => None,
            1 => Some(
                (0..words)
                    .map(|w| if w % 3 == 0 { u32::MAX } else { 0 })
                    .collect(),
            ),
            2 => Some(
                (0..words)
                    .map(|w| 0x0101_0101u32.rotate_left(w as u32))
                    .collect(),
            ),
            3 => {
                let mut m = vec![0u32; words];
                let t = 1000 + 37 * r;
                m[t / 32] |= 1 << (t % 32);
                Some(m)
            }
            4 => {
                let mut m = vec![0u32; words];
                m[words - 1] = u32::MAX;
                m[5] = 0x8000_0001;
                Some(m)
            }
            _ => Some(
                (0..words)
                    .map(|w| (w as u32).wrapping_mul(0x9E37_79B9))
                    .collect(),
            ),
        };
        masks.push(mask);
        draws.push(DeviceDraw {
            temperature: [0.0f32, 0.7, 1.5][r % 3],
            top_k: [0i32, 40, 0, 500][r % 4],
            top_p: [1.0f32, 0.9][r % 2],
            min_p: 0.0,
            repeat_penalty: 1.1,
            presence_penalty: 0.2,
            frequency_penalty: 0.0,
            u: ((r as f64 + 0.5) * 0.754_877_666).fract(),
            penalties: vec![(7, 2), (1000 + 37 * r as u32, 1), (151_935, 3)],
        });
    }
    let got =
        tl_model::model::sample_rows_masked_on(Device::Cuda(0), &logits, vocab, &draws, &masks)
            .expect("device sampling");
    let want = tl_model::model::sample_rows_masked_on(Device::Cpu, &logits, vocab, &draws, &masks)
        .expect("host");
    for r in 0..rows {
        if let Some(m) = &masks[r] {
            let t = want[r] as usize;
            assert!(
                m[t / 32] >> (t % 32) & 1 == 1,
                "row {r}: host pick {t} outside its mask"
            );
        }
    }
    let bad: Vec<_> = (0..rows).filter(|&r| got[r] != want[r]).collect();
    for &r in &bad {
        eprintln!(
            "row {r}: device {} host {} ({:?})",
            got[r], want[r], draws[r]
        );
    }
    assert!(
        bad.is_empty(),
        "{} of {rows} masked picks differ",
        bad.len()
    );
}

#[test]
fn cuda_model_too_large_fails_before_allocating() {
    if !gpu_or_skip("cuda_model_too_large_fails_before_allocating") {
        return;
    }
    // A KV cache larger than the card names both sizes.
    let m = load(
        &spec(SynthArch::Qwen2, GgmlType::Q8_0, GgmlType::Q8_0, 64),
        Device::Cuda(0),
    );
    let err = m.new_cache_blocks(1 << 40).err().expect("too large");
    let msg = err.to_string();
    assert!(
        msg.contains("out of GPU memory") && msg.contains("free"),
        "{msg}"
    );
}

#[test]
fn cuda_device_out_of_range_is_a_clear_error() {
    if !gpu_or_skip("cuda_device_out_of_range_is_a_clear_error") {
        return;
    }
    let s = spec(SynthArch::Qwen2, GgmlType::Q8_0, GgmlType::Q8_0, 64);
    let bytes = synthesize(&s).expect("synth").to_bytes().expect("bytes");
    let err = Model::from_file_on(
        GgufFile::from_bytes(bytes).expect("parses"),
        Device::Cuda(99),
    )
    .err()
    .expect("no such device");
    assert!(err.to_string().contains("cuda:99"), "{err}");
}

/// RoPE scaling on the GPU against the CPU: YaRN (qwen2; llama with a
/// magnitude factor), LongRoPE's short factors with a magnitude factor and
/// its long factors (phi3), linear scaling of
/// gemma3's global layers only, a magnitude factor alone (gemma3), and
/// mistral3's YaRN keys and attention temperature.
#[test]
fn cuda_matches_cpu_with_rope_scaling() {
    if !gpu_or_skip("cuda_matches_cpu_with_rope_scaling") {
        return;
    }
    let mut failed = Vec::new();
    for (arch, yarn, linear, long_rope, attn) in [
        (SynthArch::Qwen2, 4.0, 0.0, 0, 1.0),
        (SynthArch::Llama, 8.0, 0.0, 0, 1.1),
        (SynthArch::Phi3, 0.0, 0.0, 4096, 1.19),
        (SynthArch::Phi3, 0.0, 0.0, 256, 1.0),
        (SynthArch::Gemma3, 0.0, 8.0, 0, 1.0),
        (SynthArch::Gemma3, 0.0, 0.0, 0, 1.1),
    ] {
        let mut s = spec(arch, GgmlType::Q8_0, GgmlType::Q8_0, 64);
        (
            s.yarn_factor,
            s.linear_factor,
            s.long_rope_ctx,
            s.rope_attn_factor,
        ) = (yarn, linear, long_rope, attn);
        s.qk_scale = 2.5;
        if let Err(e) = compare(&s) {
            failed.push(e);
        }
    }
    // mistral3's YaRN keys (betas 8/2 over an original context of 4096,
    // log multiplier 0.5): the same RoPE arguments, other values.
    let mut s = spec(SynthArch::Mistral3, GgmlType::Q8_0, GgmlType::Q8_0, 64);
    s.yarn_factor = 8.0;
    s.yarn_orig_ctx = 4096;
    s.rope_scaling_keys = vec![
        ("yarn_beta_fast".into(), 8.0),
        ("yarn_beta_slow".into(), 2.0),
        ("yarn_log_multiplier".into(), 0.5),
    ];
    s.qk_scale = 2.5;
    if let Err(e) = compare(&s) {
        failed.push(e);
    }
    // mistral3's attention temperature: the query grows with its position
    // past each multiple of the original context (32 here, so the prompts'
    // positions reach factors up to 1 + 0.1 ln 6).
    let mut s = spec(SynthArch::Mistral3, GgmlType::Q8_0, GgmlType::Q8_0, 64);
    (s.yarn_factor, s.yarn_orig_ctx, s.attn_temp_scale) = (8.0, 32, 0.1);
    s.qk_scale = 2.5;
    if let Err(e) = compare(&s) {
        failed.push(e);
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
