#!/usr/bin/env python3
"""llama.cpp's logits on `tl synth` models of every architecture.

For each case (architecture, weight type, shape), writes the model with
`tl synth` (deterministic from its seed), evaluates a fixed token sequence
in llama.cpp (one batch, logits at every position) and stores every logit
in crates/tl-model/tests/fixtures/synth_logits.json. Alongside, llama.cpp
against itself with one token per batch (`self_max_abs`): how far its own
logits move from float order alone, the floor a tolerance can be set on.
The Rust test (tests/synth_vs_llama.rs) synthesizes the same model in
memory and compares.

    cargo build --release -p tl-cli
    ~/.cache/tensorlogic/llama-venv/bin/python scripts/make_synth_fixtures.py [--only ARCH,...]

`--only` evaluates just the cases of those architectures and keeps every
other case as the existing fixture has it (written back unchanged).
`tl` is taken from $CARGO_TARGET_DIR/release (default target/release).
"""
import argparse
import json
import os
import pathlib
import subprocess
import tempfile

import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/tl-model/tests/fixtures/synth_logits.json"
TL = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/tl"

SHAPE = {"layers": 2, "d_model": 256, "heads": 4, "kv_heads": 2, "head_dim": 64,
         "ffn": 512, "extra_vocab": 61, "context": 512}
CASES = [
    {"arch": "llama", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 11},
    {"arch": "llama", "weight_type": "Q4_0", "output_type": "Q8_0", "seed": 16, "rope_freqs": True,
     "qk_scale": 6.0},
    {"arch": "qwen2", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 19, "qk_scale": 6.0},
    {"arch": "qwen2", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 12},
    {"arch": "qwen3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 13},
    {"arch": "qwen3", "weight_type": "Q4_K", "output_type": "Q6_K", "seed": 14, "head_dim": 128},
    {"arch": "gemma3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 15},
    {"arch": "gemma2", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 21, "qk_scale": 6.0},
    {"arch": "phi3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 17},
    {"arch": "smollm3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 22, "qk_scale": 3.0,
     "layers": 4},
    {"arch": "qwen3moe", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 23, "ffn": 256,
     "experts": 8, "experts_used": 2},
    {"arch": "qwen3moe", "weight_type": "Q4_K", "output_type": "Q6_K", "seed": 24, "ffn": 256,
     "experts": 16, "experts_used": 4, "qk_scale": 3.0},
    {"arch": "qwen2moe", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 26, "ffn": 256,
     "experts": 8, "experts_used": 2},
    {"arch": "mixtral", "weight_type": "Q4_0", "output_type": "Q8_0", "seed": 25, "experts": 8,
     "experts_used": 2, "qk_scale": 3.0},
    {"arch": "granite", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 20, "qk_scale": 6.0},
    {"arch": "phi3", "weight_type": "Q4_K", "output_type": "Q6_K", "seed": 18, "heads": 2, "head_dim": 128},
    {"arch": "olmo2", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 27},
    {"arch": "olmo2", "weight_type": "Q4_K", "output_type": "Q6_K", "seed": 28, "heads": 2, "head_dim": 128},
    {"arch": "command-r", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 29, "qk_scale": 6.0},
    # 64 layers: llama.cpp's per-head Q/K LayerNorms exist only from there on.
    {"arch": "command-r", "weight_type": "Q4_0", "output_type": "Q8_0", "seed": 30, "layers": 64,
     "d_model": 128, "heads": 2, "kv_heads": 1, "ffn": 256},
    # gpt-oss: experts always MXFP4; a 32-token window on even layers (the
    # sequence is 160 tokens), sinks, YaRN. The second case has the real
    # top-4 of 8 and more query heads than the width holds (as gpt-oss).
    {"arch": "gpt-oss", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 31, "ffn": 256,
     "experts": 4, "experts_used": 2, "qk_scale": 3.0},
    {"arch": "gpt-oss", "weight_type": "F16", "output_type": "Q8_0", "seed": 32, "ffn": 128,
     "layers": 4, "heads": 8, "kv_heads": 2, "experts": 8, "experts_used": 4, "qk_scale": 6.0},
    # Gemma (1): pre-norms only, GeGLU, the query scaled by 1/sqrt(head_dim),
    # tied output.
    {"arch": "gemma", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 33, "qk_scale": 6.0},
    {"arch": "gemma", "weight_type": "Q4_K", "output_type": "Q6_K", "seed": 34, "heads": 2,
     "head_dim": 128},
    # Phi-3 LongRoPE: llama.cpp's context (512) within the original one
    # (short factors), then beyond it (long factors); a magnitude factor.
    {"arch": "phi3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 35, "qk_scale": 6.0,
     "long_rope": 4096, "rope_attn_factor": 1.19},
    {"arch": "phi3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 36, "qk_scale": 6.0,
     "long_rope": 256, "rope_attn_factor": 1.19},
    # gpt-oss with `attention.sliding_window_pattern` 3: layers 0, 1 and 3
    # windowed, 2 global.
    {"arch": "gpt-oss", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 41, "ffn": 256,
     "layers": 4, "experts": 4, "experts_used": 2, "qk_scale": 2.0, "swa_pattern": 3},
    # Linear RoPE scaling: on every llama layer; on gemma3's global layer
    # only (the sixth: its windowed layers rotate unscaled).
    {"arch": "llama", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 42, "qk_scale": 6.0,
     "rope_linear": 4.0},
    # Its logits reach 146 (the tied table without a soft-cap): the test's
    # floor of 2% of that (2.9) is set to 0.5% (bound_frac).
    {"arch": "gemma3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 43, "qk_scale": 6.0,
     "layers": 6, "rope_linear": 8.0, "bound_frac": 0.005},
    # YaRN outside gpt-oss.
    {"arch": "qwen2", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 37, "qk_scale": 6.0,
     "yarn": 4.0},
    {"arch": "llama", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 38, "qk_scale": 6.0,
     "yarn": 8.0, "rope_attn_factor": 1.1},
    {"arch": "qwen3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 39, "qk_scale": 6.0,
     "yarn": 4.0},
    # The rope.scaling.yarn_* keys. llama.cpp 0.3.36 reads them per
    # architecture: mistral3 the betas and the log multiplier (HF's
    # mscale_all_dim, stored as is), grok all, deepseek2 the multiplier;
    # the others ignore them. Mistral 3 as released (factor 16, betas 32/1,
    # multiplier 1, temperature 0.1 over the original context), then every
    # read key off its default; then qwen2 carrying all five keys, which
    # both llama.cpp and tl must ignore.
    {"arch": "mistral3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 44, "qk_scale": 6.0,
     "yarn": 16.0, "yarn_orig_ctx": 32, "attn_temp": 0.1,
     "yarn_key": ["yarn_beta_fast=32", "yarn_beta_slow=1", "yarn_log_multiplier=1"]},
    {"arch": "mistral3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 45, "qk_scale": 6.0,
     "yarn": 8.0, "yarn_orig_ctx": 4096,
     "yarn_key": ["yarn_beta_fast=8", "yarn_beta_slow=2", "yarn_log_multiplier=0.5"]},
    {"arch": "qwen2", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 46, "qk_scale": 6.0,
     "yarn": 4.0, "yarn_orig_ctx": 64,
     "yarn_key": ["yarn_beta_fast=4", "yarn_beta_slow=2", "yarn_log_multiplier=1",
                  "yarn_ext_factor=0.5", "yarn_attn_factor=2"]},
    # LongRoPE's factor set follows llama.cpp's runtime context (n_ctx,
    # rounded up to 256: its n_ctx_seq) against the original context
    # (1024), not the training one (512): short at 512 and at 1000 (1024
    # after rounding), long at 2048.
    {"arch": "phi3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 47, "qk_scale": 6.0,
     "long_rope": 1024, "n_ctx": 512},
    {"arch": "phi3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 47, "qk_scale": 6.0,
     "long_rope": 1024, "n_ctx": 1000},
    {"arch": "phi3", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 47, "qk_scale": 6.0,
     "long_rope": 1024, "n_ctx": 2048},
    # The ternary types: every matrix (token_embd included) TQ1_0 or TQ2_0.
    {"arch": "qwen2", "weight_type": "TQ1_0", "output_type": "Q8_0", "seed": 33},
    {"arch": "qwen2", "weight_type": "TQ2_0", "output_type": "TQ2_0", "seed": 34},
]
TOKENS = [1] + [3 + (i * 37 + 11) % 317 for i in range(159)]
# Rows stored: every 16th position and the last four (far positions make
# RoPE details such as frequency factors visible).
ROWS = [p for p in range(len(TOKENS)) if p % 16 == 15 or p >= len(TOKENS) - 4]


def logits(path, n_batch, n_ctx=512):
    # The YaRN betas and magnitude factor at -1: llama.cpp's own default
    # ("from the model"; llama-cpp-python's Llama would pass 32, 1 and 1,
    # overriding a file's `rope.scaling.yarn_*` values).
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                          logits_all=True, n_threads=2, verbose=False, yarn_beta_fast=-1.0,
                          yarn_beta_slow=-1.0, yarn_attn_factor=-1.0)
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    del llm
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated architectures to evaluate; the other cases "
                    "are kept from the existing fixture")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    old = {}
    if only is not None:
        prev = json.loads(OUT.read_text())
        if prev["tokens"] != TOKENS or prev["rows"] != ROWS:
            raise SystemExit("the existing fixture has other tokens or rows: regenerate it all")
        for c in prev["cases"]:
            spec = {k: v for k, v in c.items() if k not in ("self_max_abs", "logits")}
            old[json.dumps(spec, sort_keys=True)] = c
    fx = {"reference": f"llama-cpp-python {llama_cpp.__version__}", "tokens": TOKENS, "rows": ROWS,
          "cases": []}
    with tempfile.TemporaryDirectory() as d:
        for case in CASES:
            c = dict(SHAPE, **case)
            if only is not None and c["arch"] not in only:
                key = json.dumps(c, sort_keys=True)
                if key not in old:
                    raise SystemExit(f"no {c['arch']} {c['weight_type']} case in the existing "
                                     "fixture: regenerate it all")
                fx["cases"].append(old[key])
                continue
            path = pathlib.Path(d) / f"{c['arch']}-{c['weight_type']}.gguf"
            args = [str(TL), "synth", "-o", str(path)]
            for k, v in c.items():
                if k in ("bound_frac", "n_ctx"):  # the test's tolerance, llama.cpp's context
                    continue
                if v is True:
                    args.append(f"--{k.replace('_', '-')}")
                elif isinstance(v, list):
                    for x in v:
                        args += [f"--{k.replace('_', '-')}", str(x)]
                else:
                    args += [f"--{k.replace('_', '-')}", str(v)]
            subprocess.run(args, check=True, capture_output=True)
            n_ctx = c.get("n_ctx", 512)
            a = logits(path, 512, n_ctx)
            b = logits(path, 1, n_ctx)
            a, b = a[ROWS], b[ROWS]
            self_max = float(np.abs(a - b).max())
            c["self_max_abs"] = self_max
            c["logits"] = [[round(float(x), 5) for x in row] for row in a]
            fx["cases"].append(c)
            print(f"{c['arch']} {c['weight_type']} n_ctx {n_ctx}: |logit| max {np.abs(a).max():.3f}, "
                  f"llama.cpp batch 512 vs 1 max diff {self_max:.5f}")
    OUT.write_text(json.dumps(fx, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
