#!/usr/bin/env python3
"""Load test for `tl serve` (loopback only, bounded in count and time).

Spawns `tl serve` on a free loopback port (or targets --url on 127.0.0.1),
runs C concurrent streaming clients, each sending chat requests until its
request count or the time limit is reached, and reports aggregate generated
tokens/s, p50/p99 time-to-first-token and inter-token latency, errors, and
(for a spawned server) peak and final RSS and KV blocks left in use.

  scripts/loadtest.py --model MODEL.gguf --sweep 1,8 --requests 4 --max-tokens 64
  scripts/loadtest.py --model MODEL.gguf --clients 16 --duration 600 --disconnect 0.25

--disconnect F makes that share of requests hang up mid-stream (after a
random number of tokens), to check that cancellation frees their blocks.

Speculative decoding by batch size (a code-editing workload whose answers
copy the prompt, greedy, stopping at end of text; the server speculates at
any batch size, each request opts in or out):

  scripts/loadtest.py --model MODEL.gguf --sweep 1,2,4,8 --requests 3 --max-tokens 96 \
      --workload code-edit --serve-arg=--spec=ngram --serve-arg=--spec-max-batch=64 --speculative on

A draft model drafting in the server, on code generation:

  scripts/loadtest.py --model 1.5B.gguf --sweep 1,4 --requests 2 --max-tokens 96 --workload code-gen \
      --serve-arg=--spec=draft --serve-arg=--draft-model=0.5B.gguf --serve-arg=--spec-max-batch=64 \
      --speculative on

Against llama-server on the same model and GPU (its own port; mixed prompt
lengths of about 30 to 1,000 tokens; JSON for scripts/plot_load.py):

  scripts/loadtest.py --model M.gguf --llama-server /tmp/llamacpp/build/bin/llama-server \
      --max-batch 64 --sweep 1,16,64,128 --workload mixed --json
Standard library only.
"""
import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ["rivers", "prime numbers", "sorting algorithms", "the moon", "bread", "volcanoes",
          "chess", "bicycles", "owls", "compilers", "tea", "glaciers", "jazz", "bridges",
          "magnets", "deserts"]
# Code-editing requests (answers mostly copy the code: prompt lookup's case).
CODE = ("def summarize(values, weights=None):\n    total = 0.0\n    count = 0\n"
        "    for i, v in enumerate(values):\n        w = 1.0 if weights is None else weights[i]\n"
        "        total += v * w\n        count += 1\n    if count == 0:\n        return 0.0\n"
        "    return total / count\n")
# Code-generation requests (new code: a draft model's case).
CODEGEN = ["a Python function `is_prime(n)`", "a Python class `LRUCache` with O(1) `get` and `put`",
           "a Rust function that merges two sorted slices", "a Python function that parses a CSV line with quotes",
           "a binary search in C", "a Python function `flatten(nested)` for nested lists",
           "a JavaScript debounce function", "a Python function that counts word frequencies in a file"]
RENAMES = [("total", "acc"), ("count", "n"), ("values", "xs"), ("weights", "ws"), ("w", "weight"),
           ("v", "value"), ("i", "idx"), ("total", "running_sum")]


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def metric(url, name):
    """A gauge or counter of the server's /metrics (NaN where it has none)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[-1])
    except Exception:
        pass
    return float("nan")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft, self.itl = [], []
        self.tokens = 0
        self.ok = self.errors = self.disconnects = self.rejected = 0
        self.error_samples = []


def one_request(host, port, body, stats, hang_up_after, deadline):
    conn = http.client.HTTPConnection(host, port, timeout=max(5, deadline - time.time() + 60))
    t0 = time.time()
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            data = r.read()
            with stats.lock:
                if r.status in (429, 503):
                    stats.rejected += 1
                else:
                    stats.errors += 1
                    stats.error_samples.append(f"{r.status} {data[:200]!r}")
            return
        first, last, n, usage = None, None, 0, None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            j = json.loads(data)
            if "error" in j:
                with stats.lock:
                    stats.errors += 1
                    stats.error_samples.append(str(j["error"])[:200])
                return
            if j.get("usage"):
                usage = j["usage"]
            for c in j.get("choices", []):
                if c.get("delta", {}).get("content"):
                    now = time.time()
                    with stats.lock:
                        if first is None:
                            first = now
                            stats.ttft.append(now - t0)
                        else:
                            stats.itl.append(now - last)
                    last = now
                    n += 1
            if hang_up_after is not None and n >= hang_up_after:
                with stats.lock:
                    stats.disconnects += 1
                    stats.tokens += n
                conn.sock.shutdown(socket.SHUT_RDWR)
                return
        with stats.lock:
            stats.ok += 1
            stats.tokens += usage["completion_tokens"] if usage else n
    except Exception as e:  # a broken connection counts as an error
        with stats.lock:
            stats.errors += 1
            stats.error_samples.append(repr(e)[:200])
    finally:
        conn.close()


def run(url, clients, requests, duration, max_tokens, disconnect, seed, model,
        workload="chat", speculative=None, temperature=0.0, top_p=1.0):
    u = urllib.parse.urlparse(url)
    host, port = u.hostname, u.port
    assert host in ("127.0.0.1", "localhost", "::1"), "load tests target loopback only"
    stats = Stats()
    deadline = time.time() + duration
    rng = random.Random(seed)

    def client(ci):
        r = random.Random(rng.random() + ci)
        k = 0
        while k < requests and time.time() < deadline:
            topic = TOPICS[(ci + k) % len(TOPICS)]
            if workload == "mixed":
                # Prompts of about 30 to 1,000 tokens.
                words = r.choice([20, 80, 250, 500])
                notes = " ".join(r.choice(TOPICS).split()[0] for _ in range(words))
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": True,
                        "messages": [{"role": "user", "content":
                                      f"Summarize these notes (request {k}): {notes}"}]}
            elif workload == "code-edit":
                a, b = RENAMES[(ci + k) % len(RENAMES)]
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content":
                                      f"Rename `{a}` to `{b}` in this function; output only the code.\n"
                                      f"```python\n{CODE}```"}]}
            elif workload == "code-gen":
                task = CODEGEN[(ci + k) % len(CODEGEN)]
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content":
                                      f"Write {task}, with type hints; output only the code."}]}
            else:
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": True,
                        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": f"Tell me about {topic} (request {k})."}]}
            body["temperature"] = temperature
            if top_p < 1.0:
                body["top_p"] = top_p
            if speculative is not None:
                body["speculative"] = speculative
            hang = r.randint(1, max(1, max_tokens - 1)) if r.random() < disconnect else None
            one_request(host, port, body, stats, hang, deadline)
            k += 1

    t0 = time.time()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.time() - t0
    return stats, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file: spawn `tl serve` on it")
    ap.add_argument("--url", help="an already running server on loopback")
    ap.add_argument("--tl", default=os.path.join(ROOT, "target", "release", "tl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--sweep", help="comma-separated client counts, run one after another")
    ap.add_argument("--requests", type=int, default=4, help="requests per client (upper bound)")
    ap.add_argument("--duration", type=float, default=300, help="seconds (upper bound)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--disconnect", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature of every request (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workload", choices=["chat", "code-edit", "code-gen", "mixed"], default="chat")
    ap.add_argument("--llama-server", metavar="PATH",
                    help="spawn this llama-server on --model instead of `tl serve` "
                         "(-np MAX_BATCH, continuous batching, all layers on the GPU, flash attention)")
    ap.add_argument("--llama-ctx", type=int, default=4096, help="llama-server context per slot")
    ap.add_argument("--speculative", choices=["on", "off"],
                    help="send \"speculative\": true/false with every request")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra argument for the spawned `tl serve` (repeatable)")
    a = ap.parse_args()
    if a.requests * max(a.clients, 1) > 100000 or a.duration > 3600:
        sys.exit("loadtest: refusing more than 100000 requests or 1 hour")
    proc, peak = None, [0]
    if a.model:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log = open(os.path.join(ROOT, "target", f"loadtest-server-{port}.log"), "wb")
        if a.llama_server:
            # Flash attention is spelled `-fa on` by newer llama-servers and
            # `-fa` by older ones: try both.
            base = [a.llama_server, "-m", a.model, "--port", str(port), "--host", "127.0.0.1",
                    "-np", str(a.max_batch), "-c", str(a.max_batch * a.llama_ctx), "-ngl", "99",
                    "-cb", "--no-warmup"]
            tries = [base + ["-fa", "on"] + a.serve_arg, base + ["-fa"] + a.serve_arg]
        else:
            tries = [[a.tl, "serve", "-m", a.model, "--port", str(port), "-t", str(a.threads),
                      "--max-batch", str(a.max_batch), "--max-queue", "256"] + a.serve_arg]
        for cmd in tries:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            ready = False
            for _ in range(1200):
                if proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            ready = True
                            break
                except Exception:
                    time.sleep(0.1)
            if ready:
                break
            proc.kill()
            proc.wait(30)
        else:
            sys.exit("loadtest: server did not become ready (log: " + log.name + ")")
    elif a.url:
        url = a.url
    else:
        sys.exit("loadtest: --model or --url")
    with urllib.request.urlopen(url + "/v1/models") as r:
        model = json.loads(r.read())["data"][0]["id"]
    rss_samples = []
    stop = threading.Event()

    def sampler():
        while not stop.wait(5):
            rss_samples.append((time.time(), rss_kib(proc.pid)))

    if proc:
        threading.Thread(target=sampler, daemon=True).start()
    results = []
    try:
        for c in ([int(x) for x in a.sweep.split(",")] if a.sweep else [a.clients]):
            spec = None if a.speculative is None else a.speculative == "on"
            spec0 = metric(url, "tl_spec_drafted_tokens_total"), metric(url, "tl_spec_accepted_tokens_total")
            busy0 = metric(url, "tl_engine_step_microseconds_total"), metric(url, "tl_engine_forward_microseconds_total")
            st, wall = run(url, c, a.requests, a.duration, a.max_tokens, a.disconnect, a.seed, model,
                           a.workload, spec, a.temperature, a.top_p)
            res = {
                "clients": c, "wall_s": round(wall, 2), "ok": st.ok, "errors": st.errors,
                "rejected": st.rejected, "disconnects": st.disconnects, "tokens": st.tokens,
                "tok_per_s": round(st.tokens / wall, 2), "req_per_s": round(st.ok / wall, 3),
                "ttft_p50_s": round(pct(st.ttft, 50), 4), "ttft_p99_s": round(pct(st.ttft, 99), 4),
                "itl_p50_s": round(pct(st.itl, 50), 4), "itl_p99_s": round(pct(st.itl, 99), 4),
                "error_samples": st.error_samples[:5],
            }
            time.sleep(0.5)
            drafted = metric(url, "tl_spec_drafted_tokens_total") - spec0[0]
            accepted = metric(url, "tl_spec_accepted_tokens_total") - spec0[1]
            res["spec_drafted"], res["spec_accepted"] = drafted, accepted
            # tl only: the engine's busy time and the share of it outside
            # the model's forward (scheduling, outputs: the host's part).
            busy = metric(url, "tl_engine_step_microseconds_total") - busy0[0]
            fwd = metric(url, "tl_engine_forward_microseconds_total") - busy0[1]
            res["engine_busy_s"] = round(busy / 1e6, 3) if busy == busy else None
            res["host_share"] = round(1 - fwd / busy, 4) if busy == busy and busy > 0 else None
            res["kv_blocks_used_after"] = metric(url, "tl_kv_blocks_used")
            res["requests_running_after"] = metric(url, "tl_requests_running")
            res["server_5xx"] = sum(1 for e in st.error_samples if e[:1] == "5")
            results.append(res)
            if not a.json:
                print(f"clients={c:3d} ok={st.ok} err={st.errors} 429/503={st.rejected} hangups={st.disconnects} "
                      f"tokens={st.tokens} wall={wall:.1f}s -> {res['tok_per_s']:.2f} tok/s "
                      f"{res['req_per_s']:.2f} req/s | "
                      f"TTFT p50 {res['ttft_p50_s']:.3f}s p99 {res['ttft_p99_s']:.3f}s | "
                      f"ITL p50 {res['itl_p50_s'] * 1000:.1f}ms p99 {res['itl_p99_s'] * 1000:.1f}ms | "
                      f"KV blocks used after: {res['kv_blocks_used_after']:.0f} | "
                      f"spec drafted {drafted:.0f} accepted {accepted:.0f}", flush=True)
                for e in st.error_samples[:5]:
                    print("  error:", e)
    finally:
        stop.set()
        if proc:
            rss_samples.append((time.time(), rss_kib(proc.pid)))
            proc.terminate()
            proc.wait(60)
    out = {"results": results}
    if rss_samples:
        vals = [r for _, r in rss_samples]
        n = len(vals)
        out["rss_mib"] = {"first": round(vals[0] / 1024, 1), "peak": round(max(vals) / 1024, 1),
                          "last": round(vals[-1] / 1024, 1),
                          "first_quarter_mean": round(statistics.mean(vals[: max(1, n // 4)]) / 1024, 1),
                          "last_quarter_mean": round(statistics.mean(vals[-max(1, n // 4):]) / 1024, 1),
                          "samples": n}
        if a.sweep and len(results) >= 2:
            out["ratio_last_to_first"] = round(results[-1]["tok_per_s"] / results[0]["tok_per_s"], 2)
    print(json.dumps(out, indent=1) if a.json else json.dumps({k: v for k, v in out.items() if k != "results"}))


if __name__ == "__main__":
    main()
