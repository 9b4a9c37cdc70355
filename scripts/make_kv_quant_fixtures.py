#!/usr/bin/env python3
"""Perplexity of each KV cache type, from llama.cpp (llama-cpp-python), for
the KV-quantization test and docs/BENCHMARKS.md.

For each real model: the token ids of crates/tl-model/tests/fixtures/
kv_ppl_text.txt and llama.cpp's perplexity of it (non-overlapping chunks of
CTX tokens, BOS at each chunk start when the model adds one, the second half
of each chunk scored: llama.cpp's perplexity tool) with the KV cache in f16,
q8_0 and q4_0 (`-ctk T -ctv T`). Quantized V needs flash attention in
llama.cpp, so every run (f16 included) has it on: the deltas are the cache
type's alone. llama.cpp has no FP8 cache type.

Run with the reference venv (docs/BENCHMARKS.md, "KV cache quantization"):
    ~/.cache/tensorlogic/llama-venv/bin/python scripts/make_kv_quant_fixtures.py
Writes crates/tl-model/tests/fixtures/kv_quant_ppl.json.
"""
import json
import math
import os

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
CTX = 256
TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def perplexity(llm, toks, n_ctx, add_bos):
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
    return n_chunk, count, math.exp(nll / count)


def main():
    with open(os.path.join(OUT, "kv_ppl_text.txt"), encoding="utf-8") as f:
        text = f.read()
    out = {
        "reference": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, flash attention on, "
        f"n_batch = n_ubatch = {CTX}, 2 threads; -ctk/-ctv per type",
        "ctx": CTX,
        "models": {},
    }
    for key, name in MODELS.items():
        path = os.path.join(MODEL_DIR, name)
        rec = {"file": name, "ppl": {}}
        for tname, t in TYPES.items():
            llm = Llama(model_path=path, n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, n_threads=2,
                        flash_attn=True, type_k=t, type_v=t, logits_all=True, verbose=False)
            add_bos = llm._model.add_bos_token() if hasattr(llm._model, "add_bos_token") else key == "gemma"
            toks = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
            rec["token_ids"] = [int(x) for x in toks]
            rec["add_bos"] = bool(add_bos)
            chunks, scored, ppl = perplexity(llm, toks, CTX, add_bos)
            rec["chunks"], rec["scored"] = chunks, scored
            rec["ppl"][tname] = ppl
            print(f"{key} {tname}: ppl {ppl:.4f} ({chunks} chunks, {scored} scored)", flush=True)
            del llm
        out["models"][key] = rec
    with open(os.path.join(OUT, "kv_quant_ppl.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
