#!/usr/bin/env python3
"""Prompt-lookup speculative decoding in llama.cpp (llama-cpp-python's
`LlamaPromptLookupDecoding`) beside `tl bench --spec ngram`, on one prompt
file, greedy, interleaved: plain and lookup runs alternate, then tl's bench
runs the same comparison. Decode tok/s counts the tokens after the first
over the time after the first (prefill excluded), as `tl bench --spec` does.

  python scripts/bench_spec_llamacpp.py MODEL.gguf examples/prompts/code_edit.txt -n 120 -r 3

Needs llama-cpp-python (`pip install llama-cpp-python`).
"""
import argparse
import os
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("prompt_file")
    ap.add_argument("-n", type=int, default=120)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("--num-pred-tokens", type=int, default=10, help="llama.cpp lookup draft length")
    ap.add_argument("--max-ngram", type=int, default=2, help="llama.cpp lookup n-gram size")
    ap.add_argument("--spec-k", type=int, default=8, help="tl's --spec-k")
    ap.add_argument("--tl", default=os.path.join(ROOT, "target", "release", "tl"))
    a = ap.parse_args()
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    text = open(a.prompt_file).read()
    common = dict(model_path=a.model, n_ctx=1024, n_threads=a.t, n_threads_batch=a.t, verbose=False)
    plain = Llama(**common)
    look = Llama(**common, draft_model=LlamaPromptLookupDecoding(
        max_ngram_size=a.max_ngram, num_pred_tokens=a.num_pred_tokens))
    ids = plain.tokenize(text.encode(), add_bos=False, special=True)

    def run(llm):
        llm.reset()
        t0 = time.time()
        first, toks = None, []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.time()
            if llm.token_eos() == tok or tok in (151645, 151643):
                break
            toks.append(tok)
            if len(toks) >= a.n:
                break
        end = time.time()
        return toks, (len(toks) - 1) / max(end - first, 1e-9), first - t0

    want, _, _ = run(plain)
    run(look)
    rp, rl, same = [], [], True
    for _ in range(a.r):
        t, s, _ = run(plain)
        rp.append(s)
        same &= t == want
        t, s, _ = run(look)
        rl.append(s)
        same &= t == want
    mp, ml = statistics.mean(rp), statistics.mean(rl)
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    print(f"llama.cpp: {len(want)} tokens | plain {mp:.2f} ± {sd(rp):.2f} t/s | prompt lookup "
          f"(n-gram {a.max_ngram}, {a.num_pred_tokens} drafts) {ml:.2f} ± {sd(rl):.2f} t/s | "
          f"{ml / mp:.2f}x | output identical: {same}", flush=True)
    del plain, look
    out = subprocess.run([a.tl, "bench", "-m", a.model, "--spec", "ngram", "--spec-k", str(a.spec_k),
                          "--prompt-file", a.prompt_file, "-n", str(a.n), "-r", str(a.r), "-t", str(a.t)],
                         capture_output=True, text=True)
    print("tl:", next((l for l in out.stdout.splitlines() if l.startswith("| ") and "---" not in l
                       and "model" not in l), out.stderr.strip()))


if __name__ == "__main__":
    main()
