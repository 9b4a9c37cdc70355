"""Fixtures for the end-to-end tests: the release `tl` binary and real
models (scripts/fetch_models.py), servers started on free loopback ports."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TL = os.path.join(ROOT, "target", "release", "tl")
MODEL_DIR = os.environ.get(
    "TL_MODEL_DIR",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tensorlogic", "models"),
)
QWEN = os.path.join(MODEL_DIR, "qwen2.5-coder-0.5b-instruct-q4.gguf")
QWEN_ID = "qwen2.5-coder-0.5b-instruct-q4"
OUT = os.path.join(ROOT, "target", "e2e")


def wait_healthy(proc, url, log_path, name, timeout, not_ready, step):
    """Polls `url`/health until it answers 200; fails if `proc` exits first
    (with its log) or after `timeout` seconds (with `not_ready()`)."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"{name} exited: {open(log_path).read()}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        assert time.time() < deadline, not_ready()
        time.sleep(step)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, model=QWEN, port=None, threads=2, env=None):
        assert os.path.exists(TL), f"{TL} is missing: build with cargo build --release -p tl-cli"
        assert os.path.exists(model), f"{model} is missing: run scripts/fetch_models.py"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        os.makedirs(OUT, exist_ok=True)
        self.log_path = os.path.join(OUT, f"server-{self.port}.log")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [TL, "serve", "-m", model, "--port", str(self.port), "-t", str(threads), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        wait_healthy(self.proc, self.url, self.log_path, "tl serve", 120,
                     lambda: "server not ready in 120 s", 0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server():
    s = Server("--max-batch", "8")
    yield s
    s.stop()
    assert s.proc.returncode == 0, open(s.log_path).read()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
