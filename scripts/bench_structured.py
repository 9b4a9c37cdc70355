#!/usr/bin/env python3
"""Structured output through `tl serve`: constrained against unconstrained
output tokens/s at C concurrent requests, and what the grammar masks cost
(per mask, and their share of the engine's step time), with the masks
computed while the forward runs (--mask-threads 1) or after it (0).

  scripts/bench_structured.py --model M.gguf --clients 1,16 --mask-threads 1,0 \
      --max-tokens 48

Each configuration spawns its own server (loopback, free port). Each of C
clients sends one chat request at once ("List N fruits with ids as JSON"),
greedy: constrained to a JSON schema (an array of {name, id} objects), or
unconstrained with ignore_eos; both stop at --max-tokens. The mask figures
are read from the server's /metrics deltas. Standard library only.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = {"type": "array", "minItems": 30, "maxItems": 30,
          "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                      "id": {"type": "integer", "minimum": 0}},
                    "required": ["name", "id"], "additionalProperties": False}}
FRUITS = ["fruits", "vegetables", "birds", "rivers", "cities", "trees", "fish", "metals",
          "planets", "flowers", "insects", "spices", "cheeses", "islands", "dances", "tools"]


def metrics(url):
    out = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            k, v = line.rsplit(" ", 1)
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def post(url, body):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def spawn(a, mask_threads):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(ROOT, "target", f"bench-structured-{port}.log"), "wb")
    cmd = [a.tl, "serve", "-m", a.model, "--port", str(port), "-t", str(a.threads),
           "--max-batch", "16", "--mask-threads", str(mask_threads)] + a.server_arg
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(1200):
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except Exception:
            time.sleep(0.1)
    proc.kill()
    sys.exit("bench_structured: server did not start (log: " + log.name + ")")


def run(url, clients, constrained, max_tokens):
    def body(i):
        b = {"messages": [{"role": "user", "content":
                           f"List 30 {FRUITS[i % len(FRUITS)]} with ids as JSON."}],
             "max_tokens": max_tokens, "temperature": 0}
        if constrained:
            b["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": "list", "schema": SCHEMA}}
        else:
            b["ignore_eos"] = True
        return b

    # Warm the prompt cache and the grammar's token trie.
    post(url, dict(body(0), max_tokens=2))
    m0 = metrics(url)
    out = [None] * clients

    def client(i):
        out[i] = post(url, body(i))

    t0 = time.time()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.time() - t0
    m1 = metrics(url)
    d = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
    toks = sum(r["usage"]["completion_tokens"] for r in out)
    masks = d.get("tl_engine_masks_total", 0)
    step = d.get("tl_engine_step_microseconds_total", 0)
    return {
        "clients": clients, "constrained": constrained, "tokens": toks, "wall_s": wall,
        "tok_s": toks / wall, "forced": d.get("tl_forced_tokens_total", 0),
        "steps": d.get("tl_engine_steps_total", 0), "masks": masks,
        "mask_us_per_mask": d.get("tl_engine_mask_microseconds_total", 0) / masks if masks else 0,
        "mask_us_per_token": d.get("tl_engine_mask_microseconds_total", 0) / toks if toks else 0,
        "mask_share_of_work": d.get("tl_engine_mask_microseconds_total", 0) / step if step else 0,
        "mask_share_of_step": d.get("tl_engine_mask_wait_microseconds_total", 0) / step if step else 0,
        "step_ms": step / 1000 / max(1, d.get("tl_engine_steps_total", 0)),
        "forward_share": d.get("tl_engine_forward_microseconds_total", 0) / step if step else 0,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tl", default=os.path.join(ROOT, "target", "release", "tl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `tl serve` argument (repeatable), e.g. --server-arg=--device=cuda")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--mask-threads", default="1,0")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--unconstrained", choices=["on", "off"], default="on")
    a = ap.parse_args()
    rows = []
    for mt in [int(x) for x in a.mask_threads.split(",")]:
        proc, url = spawn(a, mt)
        try:
            for c in [int(x) for x in a.clients.split(",")]:
                kinds = [True, False] if a.unconstrained == "on" else [True]
                for constrained in kinds:
                    r = run(url, c, constrained, a.max_tokens)
                    r["mask_threads"] = mt
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print("| mask threads | clients | run | output tok/s | steps | step ms | masks "
          "| µs per mask | mask µs per output token | mask work / step time "
          "| masks on the step's path / step time |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        kind = "constrained" if r["constrained"] else "unconstrained"
        print(f"| {r['mask_threads']} | {r['clients']} | {kind} | {r['tok_s']:.1f} | "
              f"{r['steps']:.0f} | {r['step_ms']:.1f} | {r['masks']:.0f} | "
              f"{r['mask_us_per_mask']:.0f} | {r['mask_us_per_token']:.0f} | "
              f"{100 * r['mask_share_of_work']:.1f}% | "
              f"{100 * r['mask_share_of_step']:.1f}% |")


if __name__ == "__main__":
    main()
