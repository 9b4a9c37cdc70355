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
import os
import sys

import llama_cpp
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The same models, paths and perplexity computation as the forward fixtures.
from make_forward_fixtures import MODEL_DIR, MODELS, OUT, perplexity  # noqa: E402

CTX = 256
TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


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
            r = perplexity(llm, text, CTX, add_bos)
            rec["token_ids"], rec["add_bos"] = r["token_ids"], bool(add_bos)
            rec["chunks"], rec["scored"] = r["chunks"], r["scored"]
            rec["ppl"][tname] = r["ppl"]
            print(f"{key} {tname}: ppl {r['ppl']:.4f} ({r['chunks']} chunks, {r['scored']} scored)", flush=True)
            del llm
        out["models"][key] = rec
    with open(os.path.join(OUT, "kv_quant_ppl.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
