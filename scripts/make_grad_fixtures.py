#!/usr/bin/env python3
"""Writes crates/tl-lang/tests/fixtures/grad_fixtures.json: gradients from
PyTorch autograd, and parameters after a few optimizer steps, for programs
that crates/tl-lang/tests/fixtures.rs runs in TensorLogic.

Each case pairs a TensorLogic program body with the same computation in
PyTorch. Inputs are drawn from a seeded generator and rounded to f32, so
both sides start from identical numbers; PyTorch computes in float64, so
the fixtures are the exact answer up to float64 rounding, and the Rust
test states how far TensorLogic's f32 arithmetic may be from it.

Setup (CPU PyTorch in its own virtual environment):

    python3 -m venv ~/.cache/tensorlogic/torch-venv
    ~/.cache/tensorlogic/torch-venv/bin/pip install torch \
        --index-url https://download.pytorch.org/whl/cpu   # or plain PyPI
    ~/.cache/tensorlogic/torch-venv/bin/python scripts/make_grad_fixtures.py
"""

import json
import math
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(20261207)
DT = torch.float64


def rand(*shape, positive=False, scale=1.0):
    x = (torch.rand(*shape, dtype=torch.float32) * 2 - 1) * scale
    if positive:
        x = x.abs() + 0.5
    return x.to(DT)


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def tensor_json(t):
    return {"shape": list(t.shape), "data": flat(t)}


def objective(o):
    # The same reduction on every case: the gradient reaching `o` differs
    # from element to element.
    return 0.5 * (o * o).sum() + 0.3 * o.sum()


CASES = []


def case(name, body, params, consts, fn, tol=None):
    """`body` is TensorLogic code computing `o` from the learnable `params`
    and the constant tensors `consts`; `fn(**params, **consts)` is the same
    in PyTorch. `tol`: the relative error the Rust test allows, where not
    its default (the case says why)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = objective(fn(**leaves, **consts))
    loss.backward()
    CASES.append(
        {
            "name": name,
            "body": body,
            "params": {k: tensor_json(v) for k, v in params.items()},
            "consts": {k: tensor_json(v) for k, v in consts.items()},
            "loss": float(loss.detach()),
            "grads": {k: flat(v.grad) for k, v in leaves.items()},
            **({"tol": tol} if tol is not None else {}),
        }
    )


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


case(
    "mlp_equations_cross_entropy",
    """fn net(x: f32[n, 3], w1: f32[h, 3], b1: f32[h], w2: f32[k, h], b2: f32[k]) -> f32[n, k] {
    H[s, i] = tanh(w1[i, j] x[s, j] + b1[i]);
    return linear(H, w2, b2);
}
let o = -log_softmax(net(x, w1, b1, w2, b2)) * t;""",
    {"w1": rand(5, 3), "b1": rand(5), "w2": rand(4, 5), "b2": rand(4)},
    {"x": rand(6, 3), "t": F.one_hot(torch.arange(6) % 4, 4).to(DT)},
    lambda w1, b1, w2, b2, x, t: -F.log_softmax(
        F.linear(torch.tanh(x @ w1.T + b1), w2, b2), -1
    )
    * t,
)

case(
    "einsum_diagonal_outer_division",
    """d[i] = A[i, i];
O[i, j] = u[i] v[j] / (d[i] * d[i] + 1.0);
let o = O;""",
    {"A": rand(4, 4), "u": rand(4), "v": rand(3)},
    {},
    lambda A, u, v: torch.outer(u, v) / (torch.diagonal(A) ** 2 + 1.0)[:, None],
)

case(
    "soft_rule_with_temperature",
    """P[x, z] = sigmoid(E[x, z] + E[x, y] E[y, z], 0.5);
let o = P - target;""",
    {"E": rand(5, 5)},
    {"target": (torch.rand(5, 5) > 0.5).to(DT)},
    lambda E, target: torch.sigmoid((E + E @ E) / 0.5) - target,
)

case(
    "norms_softmax_activations",
    """let h = layer_norm(x, g, b, 1e-5);
let r = rms_norm(gelu(h) + silu(x), g, 1e-6);
let o = softmax(r * 2.0) + sigmoid(r) * sqrt(abs(x) + 1.0) + exp(-relu(r));""",
    {"x": rand(3, 6), "g": rand(6, positive=True), "b": rand(6)},
    {},
    lambda x, g, b: (
        lambda h: (
            lambda r: torch.softmax(r * 2.0, -1)
            + torch.sigmoid(r) * torch.sqrt(x.abs() + 1.0)
            + torch.exp(-torch.relu(r))
        )(rms(F.gelu(h, approximate="tanh") + F.silu(x), g, 1e-6))
    )(F.layer_norm(x, (6,), g, b, 1e-5)),
)

case(
    "indexing_reductions_matmul",
    """let m = matmul(a, b);
let o = m[1, 0..2] * max(m) + m[0, ..] * min(a) + transpose(b)[2, 1] * mean(a[.., .., 1..3]) - sum(reshape(a, 3, 4)[2, ..]);""",
    {"a": rand(2, 2, 3), "b": rand(3, 4)},
    {},
    lambda a, b: (
        lambda m: m[1, 0:2] * m.max()
        + m[0, :] * a.min()
        + b.T[2, 1] * a[:, :, 1:3].mean()
        - a.reshape(3, 4)[2, :].sum()
    )(a @ b),
)

case(
    "embedding_and_log",
    """let e = embedding(table, [3, 0, 3, 1]);
let o = log(e * e + 1.0) / (1.0 + sum(e));""",
    {"table": rand(5, 3)},
    {},
    lambda table: (
        lambda e: torch.log(e * e + 1.0) / (1.0 + e.sum())
    )(table[torch.tensor([3, 0, 3, 1])]),
)

# --- Optimizer steps -------------------------------------------------------

OPT = []
X = rand(4, 3)
Y = rand(4, 2)
W0 = rand(3, 2)
B0 = rand(2)
OBJ = """fn obj(x: f32[4, 3], y: f32[4, 2], w: f32[3, 2], b: f32[2]) -> float {
    Z[s, k] = x[s, j] w[j, k] + b[k];
    let e = tanh(Z) - y;
    return mean(e * e) + 0.1 * sum(w * w * w);
}"""


def torch_obj(w, b):
    e = torch.tanh(X @ w + b) - Y
    return (e * e).mean() + 0.1 * (w * w * w).sum()


def opt_case(name, settings, make, steps, clip=None, lr_lambda=None):
    w = W0.clone().requires_grad_(True)
    b = B0.clone().requires_grad_(True)
    opt = make([w, b])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch_obj(w, b)
        losses.append(float(loss.detach()))
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([w, b], clip)
        opt.step()
        if sched:
            sched.step()
    OPT.append(
        {
            "name": name,
            "settings": settings,
            "epochs": steps,
            "losses": losses,
            "w": flat(w),
            "b": flat(b),
        }
    )


opt_case(
    "sgd_momentum",
    "optimizer = sgd(lr = 0.1, momentum = 0.9);",
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    5,
)
opt_case(
    "sgd_nesterov_weight_decay",
    "optimizer = sgd(lr = 0.05, momentum = 0.8, nesterov = true, weight_decay = 0.01);",
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    5,
)
opt_case(
    "adam",
    "optimizer = adam(lr = 0.05, betas = [0.8, 0.99], eps = 1e-6);",
    lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99), eps=1e-6),
    5,
)
opt_case(
    "adam_l2",
    "optimizer = adam(lr = 0.02, weight_decay = 0.1);",
    lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.1),
    4,
)
opt_case(
    "adamw_clipped",
    "optimizer = adamw(lr = 0.05, weight_decay = 0.05);\n    clip_norm = 0.1;",
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.05),
    5,
    clip=0.1,
)
STEPS, WARM = 6, 2


def cosine(t):
    # TensorLogic's `cosine(warmup = 2, min_lr = 0.0)` as a factor of lr.
    if t < WARM:
        return (t + 1) / WARM
    p = min((t - WARM) / max(STEPS - WARM, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * p))


opt_case(
    "adamw_cosine_warmup",
    "optimizer = adamw(lr = 0.1);\n    schedule = cosine(warmup = 2);",
    lambda p: torch.optim.AdamW(p, lr=0.1),
    STEPS,
    lr_lambda=cosine,
)

# The cached `attention` builtin over a real model's KV cache (Qwen2.5
# 0.5B: 14 query heads over 2 KV heads of 64, scale 1/8), three tokens at
# position 0. The cache holds K and V in f16 and the kernel rounds the
# queries to f16, so the reference rounds them too, with gradients passing
# through the rounding (straight-through, as TensorLogic differentiates
# it). Drawn after every other case, so theirs stay as they were.
QWEN = "~/.cache/tensorlogic/models/qwen2.5-coder-0.5b-instruct-q4.gguf"


def r16(x):
    return x + (x.float().half().double() - x).detach()


def cached_attention(q, k, v, scale=0.125):
    t, nh, _ = q.shape
    group = nh // k.shape[1]
    qe = r16(q)
    ke = r16(k).repeat_interleave(group, dim=1)
    ve = r16(v).repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", qe, ke) * scale
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    p = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
    return torch.einsum("hij,jhd->ihd", p, ve)


case(
    "cached_attention_qwen2",
    f"""let model = load_model("{QWEN}");
let cache = kv_cache(model, 16);
let o = attention(q, k, v, cache, 3, 0);""",
    {"q": rand(3, 14, 64, scale=3.0), "k": rand(3, 2, 64), "v": rand(3, 2, 64)},
    {},
    cached_attention,
    # The kernel's forward sums in f32 and rounds as llama.cpp does (f16
    # operands; relative rounding 2^-11 ≈ 4.9e-4); the outputs, and through
    # the objective's gradient the VJPs, carry that. Measured worst
    # relative errors: loss 6.1e-6, d/dq 2.2e-4, d/dk 1.0e-3, d/dv 2.5e-4.
    tol=2e-3,
)

# Drawn last, so the cases above keep their inputs.
def rope_torch(x, pos, base, neox):
    """RoPE of x[t, h, d] at positions `pos`: neox pairs (i, i + d/2),
    normal pairs (2i, 2i + 1); angle pos * base^(-2i/d)."""
    t, h, d = x.shape
    i = torch.arange(d // 2, dtype=DT)
    ang = torch.tensor(pos, dtype=DT)[:, None] * base ** (-2.0 * i / d)
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([a * c - b * s, a * s + b * c], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * c - b * s, a * s + b * c], -1).reshape(t, h, d)

case(
    "rope_neox_and_normal",
    """let o = rope(x, [0, 3, 9], 100.0) * 1.5 + rope(x * 2.0, [1, 2, 5], 10.0, "normal");""",
    {"x": rand(3, 2, 8)},
    {},
    lambda x: rope_torch(x, [0, 3, 9], 100.0, True) * 1.5
    + rope_torch(x * 2.0, [1, 2, 5], 10.0, False),
)


out = {
    "generator": "scripts/make_grad_fixtures.py",
    "torch": torch.__version__,
    "cases": CASES,
    "optimizer": {
        "objective": OBJ,
        "x": tensor_json(X),
        "y": tensor_json(Y),
        "w0": tensor_json(W0),
        "b0": tensor_json(B0),
        "runs": OPT,
    },
}
path = pathlib.Path(__file__).resolve().parent.parent / "crates/tl-lang/tests/fixtures/grad_fixtures.json"
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path} ({len(CASES)} gradient cases, {len(OPT)} optimizer runs)")
