#!/usr/bin/env python3
"""Golden fixtures for the forward pass, made with llama.cpp (llama-cpp-python).

For each real model and each prompt: the prompt's token ids, llama.cpp's
greedy 32-token continuation, and under teacher forcing (prompt +
continuation) the top-5 logits at every position. Also the perplexity of a
fixed text computed the way llama.cpp's perplexity tool does (non-overlapping
chunks of CTX tokens, BOS at each chunk start when the model adds one, the
second half of each chunk scored).

The reference settings are llama-cpp-python's defaults for a CPU user: f16
KV cache, no flash attention, n_batch = n_ubatch = 512 (each prompt, and
each teacher-forced sequence, is one batch), 2 threads.

Alongside, llama.cpp against itself with another batch shape
(`self_consistency`): the same greedy decoding and teacher forcing with
n_batch = n_ubatch = 1, i.e. the prompt fed one token at a time. Nothing
changes but the float summation order of ggml's kernels (which kernel a
matmul or attention product uses depends on the number of tokens in the
batch), so this measures how far llama.cpp's own output moves from float
order alone: the floor any other implementation can be held to.

Run with the reference venv (see docs/BENCHMARKS.md / MODELS):
    ~/.cache/tensorlogic/llama-venv/bin/python scripts/make_forward_fixtures.py
Writes crates/tl-model/tests/fixtures/forward_<model>.json.

With `--portable`, run with a llama-cpp-python built for the x86-64
baseline (every GGML_AVX*/FMA/F16C/SSE42 option and GGML_LLAMAFILE off, see
docs/FIDELITY.md), it writes forward_<model>_portable.json instead: the same
cases, greedy continuations, top-5 logits and perplexity from llama.cpp's
portable CPU code, whose float order is fixed by its C source rather than
by the SIMD kernels a build picks. tl's reference numerics
(`TL_NUMERICS=reference`) must reproduce those bit for bit. The portable
fixture records both batch shapes too (n_batch = 512 and 1), which agree
there exactly.
"""
import json
import math
import os
import sys

import numpy as np
import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "crates", "tl-model", "tests", "fixtures")
MODEL_DIR = os.environ.get(
    "TL_MODEL_DIR",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tensorlogic", "models"),
)
MODELS = {
    "qwen": "qwen2.5-coder-0.5b-instruct-q4.gguf",
    "gemma": "gemma-3-270m-q4_k_m.gguf",
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "Here is a list of five fruits:\n1.",
    "Q: What is 17 times 23?\nA:",
    "The three laws of thermodynamics are",
    "import numpy as np\n\n# Compute the mean of each row\n",
    "In 1969, astronauts first",
    "SELECT name, COUNT(*) FROM orders",
    "Photosynthesis is the process by which",
]
N_GEN = 32
TOPK = 5
PPL_CTX = 128
PPL_TEXT_FILE = os.path.join(OUT, "perplexity_text.txt")


def greedy(llm, prompt_ids, n):
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        logits = llm.scores[llm.n_tokens - 1]
        tok = int(np.argmax(logits))
        out.append(tok)
        if tok == llm.token_eos():
            break
        llm.eval([tok])
    return out


def teacher_forced_topk(llm, ids):
    llm.reset()
    llm.eval(ids)
    rows = []
    for i in range(len(ids)):
        logits = np.asarray(llm.scores[i], dtype=np.float32)
        top = np.argsort(-logits, kind="stable")[:TOPK]
        rows.append({"ids": [int(t) for t in top], "logits": [float(logits[t]) for t in top]})
    return rows


def self_consistency(path, cases):
    """Each case's greedy continuation and teacher-forced top-1 from llama.cpp
    with n_batch = n_ubatch = 1 (one token per decode call)."""
    llm = Llama(model_path=path, n_ctx=512, n_batch=1, n_ubatch=1, n_threads=2, flash_attn=False, logits_all=True, verbose=False)
    for case in cases:
        ids = case["prompt_ids"]
        cont = greedy(llm, ids, N_GEN)
        llm.reset()
        llm.eval(ids + case["greedy"])
        n = len(ids) + len(case["greedy"])
        top1 = [int(np.argmax(llm.scores[i])) for i in range(n)]
        # Logits at the reference's top-5 ids, to measure llama.cpp's own movement.
        at_ref = [[float(llm.scores[i][t]) for t in row["ids"]] for i, row in zip(range(n), case["teacher_forced_top"])]
        case["llama_cpp_n_batch_1"] = {"greedy": cont, "teacher_forced_top1": top1, "logits_at_reference_top": at_ref}
    del llm


def perplexity(llm, text, n_ctx, add_bos):
    toks = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    n_chunk = len(toks) // n_ctx
    first = n_ctx // 2
    nll = 0.0
    count = 0
    for c in range(n_chunk):
        batch = list(toks[c * n_ctx:(c + 1) * n_ctx])
        if add_bos:
            batch[0] = llm.token_bos()
        llm.reset()
        llm.eval(batch)
        for j in range(first, n_ctx - 1):
            logits = np.asarray(llm.scores[j], dtype=np.float64)
            m = logits.max()
            lse = m + math.log(np.exp(logits - m).sum())
            nll += lse - logits[toks[c * n_ctx + j + 1]]
            count += 1
    return {"ctx": n_ctx, "chunks": n_chunk, "token_ids": [int(t) for t in toks], "scored": count, "ppl": math.exp(nll / count)}


def main():
    args = sys.argv[1:]
    portable = "--portable" in args
    args = [a for a in args if a != "--portable"]
    which = args or list(MODELS)
    if portable:
        info = llama_cpp.llama_print_system_info().decode()
        if "AVX" in info or "SSE3" in info or "LLAMAFILE" in info:
            sys.exit(f"--portable needs a llama.cpp built without SIMD; this one has: {info}")
    text = open(PPL_TEXT_FILE, encoding="utf-8").read()
    for key in which:
        path = os.path.join(MODEL_DIR, MODELS[key])
        llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, flash_attn=False, logits_all=True, verbose=False)
        add_bos = llm._model.add_bos_token() if hasattr(llm._model, "add_bos_token") else key == "gemma"
        cases = []
        for p in PROMPTS:
            ids = llm.tokenize(p.encode("utf-8"), add_bos=add_bos, special=False)
            cont = greedy(llm, ids, N_GEN)
            tf = teacher_forced_topk(llm, ids + cont)
            cases.append({"prompt": p, "prompt_ids": ids, "greedy": cont, "teacher_forced_top": tf})
            print(key, repr(p[:30]), llm.detokenize(cont).decode("utf-8", "replace")[:60].replace("\n", "\\n"), file=sys.stderr)
        ppl = perplexity(llm, text, PPL_CTX, add_bos)
        print(key, "perplexity", ppl, file=sys.stderr)
        del llm
        self_consistency(path, cases)
        same = sum(c["llama_cpp_n_batch_1"]["greedy"] == c["greedy"] for c in cases)
        agree = sum(
            t == row["ids"][0]
            for c in cases
            for t, row in zip(c["llama_cpp_n_batch_1"]["teacher_forced_top1"], c["teacher_forced_top"])
        )
        total = sum(len(c["teacher_forced_top"]) for c in cases)
        print(key, f"llama.cpp n_batch=1 vs 512: greedy {same}/{len(cases)}, teacher-forced top-1 {agree}/{total}", file=sys.stderr)
        build = "portable x86-64 build (no SIMD, no FMA, no llamafile)" if portable else "AVX-512 build"
        out = {
            "model": MODELS[key],
            "reference": f"llama.cpp via llama-cpp-python 0.3.36 ({build}), f16 KV cache, no flash attention, n_batch=n_ubatch=512, 2 threads",
            "add_bos": bool(add_bos),
            "n_gen": N_GEN,
            "cases": cases,
            "perplexity": ppl,
        }
        name = f"forward_{key}_portable.json" if portable else f"forward_{key}.json"
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
