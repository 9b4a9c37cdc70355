#!/usr/bin/env python3
"""Replicas behind vllm-router, measured on loopback (docs/BENCHMARKS.md,
"Replicas behind a router").

  scripts/bench_router.py all            # everything below, one after another
  scripts/bench_router.py overhead       # 1-token requests: direct vs through the router
  scripts/bench_router.py throughput     # 1 replica direct, 1 and 3 behind the router
  scripts/bench_router.py prefix         # shared-prefix workload: cache_aware vs round_robin

Starts `tl serve` replicas (target/release/tl) and vllm-router
(scripts/setup_router.sh) on free loopback ports and stops them after each
case. Reports JSON lines. Standard library only.
"""
import argparse
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TL = os.path.join(ROOT, "target", "release", "tl")
MODELS = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tensorlogic", "models")
MODEL = os.environ.get("TL_MODEL", os.path.join(MODELS, "qwen2.5-coder-0.5b-instruct-q4.gguf"))
LOGS = os.path.join(ROOT, "target", "bench-router")
TOPICS = ["rivers", "prime numbers", "sorting", "the moon", "bread", "volcanoes", "chess",
          "bicycles", "owls", "compilers", "tea", "glaciers", "jazz", "bridges", "magnets", "deserts"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, what, timeout=300):
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            sys.exit(f"{what} exited; see {LOGS}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        if time.time() > deadline:
            sys.exit(f"{what} at {url} not healthy after {timeout} s")
        time.sleep(0.2)


class Cluster:
    def __init__(self, replicas, threads, router, policy="cache_aware", max_batch=16):
        os.makedirs(LOGS, exist_ok=True)
        self.procs, self.replicas = [], []
        for _ in range(replicas):
            port = free_port()
            log = open(os.path.join(LOGS, f"replica-{port}.log"), "wb")
            p = subprocess.Popen([TL, "serve", "-m", MODEL, "--port", str(port), "-t", str(threads),
                                  "--max-batch", str(max_batch)], stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(p)
            self.replicas.append(f"http://127.0.0.1:{port}")
        for u, p in zip(self.replicas, self.procs):
            wait_healthy(u, p, "tl serve")
        self.url = self.replicas[0]
        if router:
            port = free_port()
            log = open(os.path.join(LOGS, f"router-{port}.log"), "wb")
            p = subprocess.Popen([router, "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                                  *self.replicas, "--policy", policy, "--prometheus-port", str(free_port()),
                                  "--worker-startup-check-interval", "1"],
                                 stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(p)
            self.url = f"http://127.0.0.1:{port}"
            wait_healthy(self.url, p, "vllm-router")

    def stop(self):
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def post(url, path, body, timeout=600):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {data[:200]!r}")
    return json.loads(data)


def metric_sum(url, name):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m and m.group(1) == name:
            total += float(m.group(3))
    return total


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def drive(url, bodies, clients):
    """Sends every body (chat) with `clients` at a time; returns stats."""
    lat, toks, errors = [], 0, 0
    lock = threading.Lock()
    it = iter(list(enumerate(bodies)))

    def worker():
        nonlocal toks, errors
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                return
            t = time.time()
            try:
                r = post(url, "/v1/chat/completions", nxt[1])
                with lock:
                    lat.append(time.time() - t)
                    toks += r["usage"]["completion_tokens"]
            except Exception as e:
                with lock:
                    errors += 1
                print("error:", e, file=sys.stderr)

    t0 = time.time()
    ts = [threading.Thread(target=worker) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.time() - t0
    return {"requests": len(bodies), "errors": errors, "wall_s": round(wall, 2),
            "req_per_s": round(len(lat) / wall, 3), "gen_tok_per_s": round(toks / wall, 2),
            "p50_s": round(pct(lat, 50), 3), "p99_s": round(pct(lat, 99), 3)}


def chat(content, max_tokens, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return {"messages": msgs, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def overhead(router, n):
    """Sequential 1-token requests and GET /v1/models: direct vs routed."""
    c = Cluster(1, 2, router)
    try:
        rep = c.replicas[0]
        body = chat("Hi", 1)
        out = {}
        for name, url in (("direct", rep), ("router", c.url)):
            for _ in range(3):
                post(url, "/v1/chat/completions", body)
            lat = []
            for _ in range(n):
                t = time.time()
                post(url, "/v1/chat/completions", body)
                lat.append(time.time() - t)
            mlat = []
            for _ in range(n):
                t = time.time()
                urllib.request.urlopen(url + "/v1/models", timeout=10).read()
                mlat.append(time.time() - t)
            out[name] = {"gen1_mean_ms": round(statistics.mean(lat) * 1e3, 2),
                         "gen1_p50_ms": round(pct(lat, 50) * 1e3, 2),
                         "models_mean_ms": round(statistics.mean(mlat) * 1e3, 3)}
        out["router_overhead_gen1_ms"] = round(out["router"]["gen1_p50_ms"] - out["direct"]["gen1_p50_ms"], 2)
        out["router_overhead_models_ms"] = round(out["router"]["models_mean_ms"] - out["direct"]["models_mean_ms"], 3)
        return out
    finally:
        c.stop()


def throughput(router, n, clients, max_tokens):
    rng = random.Random(0)
    bodies = [chat(f"Write about {rng.choice(TOPICS)}.", max_tokens) for _ in range(n)]
    out = {}
    cases = [("1 replica, direct", 1, 2, False), ("1 replica, router", 1, 2, True),
             ("3 replicas, router", 3, 1, True)]
    for name, reps, threads, routed in cases:
        c = Cluster(reps, threads, router if routed else None)
        try:
            drive(c.url, bodies[:clients], clients)  # warm-up
            out[name] = drive(c.url, bodies, clients)
        finally:
            c.stop()
    return out


def prefix(router, n, clients, groups):
    """`groups` long system prompts, each shared by n/groups requests, in
    random order: the prefix cache hit rate summed over the replicas."""
    rng = random.Random(1)
    systems = [(f"You are assistant number {g}. " + " ".join(rng.choice(TOPICS) for _ in range(120)))
               for g in range(groups)]
    bodies = [chat(f"Question {i}: say one word.", 2, system=systems[i % groups]) for i in range(n)]
    rng.shuffle(bodies)
    out = {}
    for policy in ("cache_aware", "round_robin"):
        c = Cluster(3, 1, router, policy=policy)
        try:
            r = drive(c.url, bodies, clients)
            q = sum(metric_sum(u, "vllm:prefix_cache_queries_total") for u in c.replicas)
            h = sum(metric_sum(u, "vllm:prefix_cache_hits_total") for u in c.replicas)
            r["prefix_queried_tokens"], r["prefix_hit_tokens"] = q, h
            r["prefix_hit_rate"] = round(h / q, 4) if q else None
            out[policy] = r
        finally:
            c.stop()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["all", "overhead", "throughput", "prefix"])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--groups", type=int, default=6)
    args = ap.parse_args()
    if not os.path.exists(TL):
        sys.exit(f"{TL} missing: cargo build --release -p tl-cli")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup_router.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"vllm-router could not be installed:\n{r.stderr}")
    router = r.stdout.strip().splitlines()[-1]
    if args.what in ("all", "overhead"):
        print(json.dumps({"overhead": overhead(router, 30)}), flush=True)
    if args.what in ("all", "throughput"):
        print(json.dumps({"throughput": throughput(router, args.requests, args.clients, args.max_tokens)}), flush=True)
    if args.what in ("all", "prefix"):
        print(json.dumps({"prefix": prefix(router, args.requests, args.clients, args.groups)}), flush=True)


if __name__ == "__main__":
    main()
