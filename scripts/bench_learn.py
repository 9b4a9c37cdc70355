#!/usr/bin/env python3
"""Training-step time of TensorLogic programs against the same models in
PyTorch on the CPU, measured side by side in one run.

Models (the sizes, batches, optimizer and step counts of the examples):

  mlp          examples/mlp_classifier.tl: 2 -> 16 -> 2 perceptron, 400
               rows in batches of 32, 60 epochs (780 steps), AdamW,
               cosine schedule, gradient clipping
  transformer  examples/tiny_transformer.tl: 2 blocks, width 32, 2 heads
               of 16, MLP 128, context 32, vocabulary 128; 71 sequences in
               batches of 16, 60 epochs (300 steps), AdamW, cosine schedule

For TensorLogic the example runs under `tl run -t THREADS`, with a clock
read around its `learn` block (the script inserts the two lines into a
temporary copy); PyTorch runs the same loop (shuffled minibatches, forward,
backward, clipping where the example clips, optimizer and schedule step)
with torch.set_num_threads(THREADS). Each side runs RUNS times, alternated;
the fastest run of each (the machine may be shared: the minimum is the least disturbed) and their ratio are printed (ratio > 1: TensorLogic faster),
then every run. With --base OTHER_TL, that binary runs the same example
right after each run of the first (before/after comparisons under the same
load).

    ~/.cache/tensorlogic/torch-venv/bin/python scripts/bench_learn.py \
        [--threads 2] [--runs 3] [--only mlp|transformer]
"""

import argparse
import math
import os
import pathlib
import re
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
TL = os.environ.get("TL", str(ROOT / "target/release/tl"))


def timed_copy(example: pathlib.Path, out: pathlib.Path):
    """The example with `clock()` read around its learn block."""
    lines = example.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("learn {"))
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    lines.insert(end + 1, 'print("learn seconds =", clock() - bench_t0);')
    lines.insert(start, "let bench_t0 = clock();")
    out.write_text("\n".join(lines) + "\n")


def run_tl(example: str, threads: int, tl: str = TL) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / pathlib.Path(example).name
        timed_copy(ROOT / example, path)
        out = subprocess.run(
            [tl, "run", "-t", str(threads), str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return float(re.search(r"learn seconds = ([0-9.e+-]+)", out).group(1))


def cosine_lr(base, warmup, total):
    def f(step):
        if step < warmup:
            return base * (step + 1) / warmup
        t = (step - warmup) / max(1, total - 1 - warmup)
        return 0.5 * base * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def train(params, batches, loss_fn, lr, wd, warmup, total, clip=None):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = cosine_lr(lr, warmup, total)
    step = 0
    t0 = time.perf_counter()
    for xb, yb in batches():
        for g in opt.param_groups:
            g["lr"] = sched(step)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(xb, yb)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        step += 1
    return time.perf_counter() - t0, step


def epochs_of(n, batch, epochs, gen, *data):
    def it():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, batch):
                idx = perm[s : s + batch]
                yield tuple(d[idx] for d in data)

    return it


def torch_mlp():
    g = torch.Generator().manual_seed(0)
    n = 400
    x = torch.rand(n, 2, generator=g) * 2 - 1
    y = F.one_hot((x[:, 0] * x[:, 1] > 0).long(), 2).float()
    w1 = torch.nn.init.kaiming_normal_(torch.empty(16, 2)).requires_grad_()
    b1 = torch.zeros(16, requires_grad=True)
    w2 = torch.nn.init.xavier_uniform_(torch.empty(2, 16)).requires_grad_()
    b2 = torch.zeros(2, requires_grad=True)

    def loss(xb, tb):
        h = torch.relu(xb @ w1.T + b1)
        logits = h @ w2.T + b2
        return -(tb * torch.log_softmax(logits, -1)).sum() / len(tb)

    steps = math.ceil(n / 32) * 60
    return train(
        [w1, b1, w2, b2],
        epochs_of(n, 32, 60, g, x, y),
        loss,
        lr=0.02,
        wd=0.0001,
        warmup=20,
        total=steps,
        clip=5.0,
    )


def torch_transformer():
    src = (ROOT / "examples/tiny_transformer.tl").read_text()
    text = re.search(r'let text = "(.*)";', src).group(1).encode()
    V, T, C, H, E, Fw = 128, 32, 32, 2, 16, 128
    stride = 4
    ids = torch.tensor(list(text))
    nseq = (len(ids) - T - 1) // stride + 1
    X = torch.stack([ids[i * stride : i * stride + T] for i in range(nseq)])
    Y = F.one_hot(
        torch.stack([ids[i * stride + 1 : i * stride + T + 1] for i in range(nseq)]), V
    ).float()
    mask = torch.triu(torch.full((T, T), -1e9), diagonal=1)
    g = torch.Generator().manual_seed(0)

    def normal(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).requires_grad_()

    def block_params():
        return dict(
            n1w=torch.ones(C, requires_grad=True),
            n1b=torch.zeros(C, requires_grad=True),
            wq=normal(H, E, C),
            wk=normal(H, E, C),
            wv=normal(H, E, C),
            wo=normal(C, H, E),
            n2w=torch.ones(C, requires_grad=True),
            n2b=torch.zeros(C, requires_grad=True),
            w1=normal(Fw, C),
            b1=torch.zeros(Fw, requires_grad=True),
            w2=normal(C, Fw),
            b2=torch.zeros(C, requires_grad=True),
        )

    tok, pos = normal(V, C), normal(T, C)
    blocks = [block_params(), block_params()]
    nfw, nfb = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    out = normal(V, C)
    params = [tok, pos, nfw, nfb, out] + [p for b in blocks for p in b.values()]
    scale = 1.0 / math.sqrt(E)

    def attention(x, p):
        q = torch.einsum("kja,nia->nikj", p["wq"], x)
        k = torch.einsum("kja,nia->nikj", p["wk"], x)
        v = torch.einsum("kja,nia->nikj", p["wv"], x)
        s = torch.einsum("nikj,nskj->nkis", q, k) * scale + mask
        a = torch.softmax(s, -1)
        o = torch.einsum("nkis,nskj->nikj", a, v)
        return torch.einsum("akj,nikj->nia", p["wo"], o)

    def block(x, p):
        h = x + attention(F.layer_norm(x, (C,), p["n1w"], p["n1b"], 1e-5), p)
        m = F.linear(F.layer_norm(h, (C,), p["n2w"], p["n2b"], 1e-5), p["w1"], p["b1"])
        return h + F.linear(F.gelu(m, approximate="tanh"), p["w2"], p["b2"])

    def loss(xb, yb):
        x = tok[xb] + pos
        for p in blocks:
            x = block(x, p)
        logits = F.linear(F.layer_norm(x, (C,), nfw, nfb, 1e-5), out)
        return -(yb * torch.log_softmax(logits, -1)).sum() / (xb.shape[0] * xb.shape[1])

    steps = math.ceil(nseq / 16) * 60
    return train(
        params,
        epochs_of(nseq, 16, 60, g, X, Y),
        loss,
        lr=0.003,
        wd=0.01,
        warmup=20,
        total=steps,
    )


MODELS = {
    "mlp": ("examples/mlp_classifier.tl", torch_mlp),
    "transformer": ("examples/tiny_transformer.tl", torch_transformer),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=sorted(MODELS))
    ap.add_argument(
        "--base",
        help="another tl binary, run alternated with the first (before/after)",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, best of {a.runs} runs")
    for name, (example, fn) in MODELS.items():
        if a.only and name != a.only:
            continue
        tl_s, base_s, pt_s, steps = [], [], [], 0
        for _ in range(a.runs):
            tl_s.append(run_tl(example, a.threads))
            if a.base:
                base_s.append(run_tl(example, a.threads, a.base))
            secs, steps = fn()
            pt_s.append(secs)
        tl_ms = min(tl_s) / steps * 1e3
        pt_ms = min(pt_s) / steps * 1e3
        ms = lambda xs: ", ".join(f"{x / steps * 1e3:.3f}" for x in xs)
        print(
            f"{name}: {steps} steps; tl {tl_ms:.3f} ms/step, torch {pt_ms:.3f} ms/step, "
            f"ratio (torch time / tl time) {pt_ms / tl_ms:.2f}"
        )
        print(f"  all runs, ms/step: tl {ms(tl_s)}; torch {ms(pt_s)}")
        if a.base:
            b_ms = min(base_s) / steps * 1e3
            print(
                f"  base {a.base}: {b_ms:.3f} ms/step (runs {ms(base_s)}), "
                f"ratio (torch time / base time) {pt_ms / b_ms:.2f}, base / tl {b_ms / tl_ms:.2f}"
            )


if __name__ == "__main__":
    main()
