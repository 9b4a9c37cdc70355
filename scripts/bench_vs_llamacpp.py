#!/usr/bin/env python3
"""Side-by-side throughput of `tl bench` and llama.cpp on the same GGUF file,
same thread count, same prompt and generation lengths, runs interleaved.

    ~/.cache/tensorlogic/llama-venv/bin/python scripts/bench_vs_llamacpp.py \
        MODEL.gguf [-p 512] [-n 128] [-t 2] [-r 3]

llama.cpp is measured through llama-cpp-python (built without AMX; see
MODELS.md): pp = one `eval` of P prompt tokens (n_batch = P) after a
warm-up `eval` of the same prompt (`tl bench` warms up the same way), tg = N
single-token `eval` calls after one BOS token, as llama-bench does. Prints a
table with both figures and the ratio tl / llama.cpp, plus peak RSS of each
measured in a fresh subprocess.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TL = os.path.join(ROOT, "target", "release", "tl")


def llama_once(model, p, n, threads):
    """One llama.cpp measurement in a child process (fresh RSS)."""
    code = f"""
import time, json, resource
from llama_cpp import Llama
llm = Llama(model_path={model!r}, n_ctx={max(p, 1) + n + 8}, n_batch={max(p, 1)}, n_ubatch={max(p, 1)},
            n_threads={threads}, n_threads_batch={threads}, verbose=False)
vocab = llm.n_vocab()
toks = [1000 + (i * 7919) % (vocab - 1000) for i in range({p})]
out = {{}}
if {p} > 0:
    llm.reset(); llm.eval(toks); llm.reset()  # warm-up with the whole prompt, as llama-bench does
    t0 = time.perf_counter(); llm.eval(toks); out["pp"] = {p} / (time.perf_counter() - t0)
if {n} > 0:
    llm.reset(); llm.eval([llm.token_bos() if llm.token_bos() >= 0 else 1000])
    tok = 1000
    t0 = time.perf_counter()
    for _ in range({n}):
        llm.eval([tok])
    out["tg"] = {n} / (time.perf_counter() - t0)
out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def tl_once(model, p, n, threads):
    res = {}
    r = subprocess.run(
        [TL, "bench", "-m", model, "-p", str(p), "-n", str(n), "-t", str(threads), "-r", "1", "--json"],
        capture_output=True, text=True, check=True,
    )
    for row in json.loads(r.stdout):
        res["pp" if row["test"].startswith("pp") else "tg"] = row["tokens_per_s"]
        res["rss_mib"] = row.get("peak_rss_mib") or float("nan")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-r", type=int, default=3)
    a = ap.parse_args()
    if not os.path.exists(TL):
        sys.exit(f"{TL} missing: cargo build --release -p tl-cli")
    tl_runs, ll_runs = [], []
    for i in range(a.r):
        ll_runs.append(llama_once(a.model, a.p, a.n, a.t))
        tl_runs.append(tl_once(a.model, a.p, a.n, a.t))
        print(f"rep {i + 1}: llama.cpp {ll_runs[-1]}  tl {tl_runs[-1]}", file=sys.stderr)
    print(f"model: {os.path.basename(a.model)}, threads {a.t}, reps {a.r}, {time.strftime('%Y-%m-%d')}")
    print("| test | llama.cpp t/s | tl t/s | tl / llama.cpp |")
    print("| --- | ---: | ---: | ---: |")
    for key, name in (("pp", f"pp{a.p}"), ("tg", f"tg{a.n}")):
        if key not in ll_runs[0]:
            continue
        ll = [r[key] for r in ll_runs]
        tl = [r[key] for r in tl_runs]
        fmt = lambda v: f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"
        print(f"| {name} | {fmt(ll)} | {fmt(tl)} | {statistics.mean(tl) / statistics.mean(ll):.2f}× |")
    print(f"| peak RSS MiB | {max(r['rss_mib'] for r in ll_runs):.0f} | {max(r['rss_mib'] for r in tl_runs):.0f} | |")


if __name__ == "__main__":
    main()
