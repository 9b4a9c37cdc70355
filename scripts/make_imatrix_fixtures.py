#!/usr/bin/env python3
"""llama.cpp's importance-matrix sums, for `tl imatrix` to be held to.

Runs llama.cpp's own forward (llama-cpp-python) with a graph callback that
does what `collect_imatrix` of llama.cpp's tools/imatrix/imatrix.cpp does:
for every MUL_MAT whose weight is named `blk.*` or `output.weight` and whose
input has at least 16 rows, the squares of the input (src1) rows summed per
column in f32, and the row count; for every MUL_MAT_ID (experts), each
(token, chosen expert) row added to that expert's sums and count. The
chunks are evaluated as llama-imatrix evaluates them: the text tokenized
with BOS, cut into chunks of CTX tokens, each chunk's first token replaced
by BOS, the KV cache cleared before each chunk, logits at every position
(so the last layer and the output projection see every row). The
perplexity of each chunk's second half is computed as llama-imatrix does.

Cases: `tl synth` models (a dense llama and a qwen3moe, fixed token ids)
and, when present, gemma-3-270m Q4_K_M over the start of
crates/tl-model/tests/fixtures/kv_ppl_text.txt.

Stored per tensor (crates/tl-model/tests/fixtures/imatrix_ref.json): the
counts, per matrix the sum of all its column sums, and the column sums at
every `stride`-th column (at most 32 per matrix).

    cargo build --release -p tl-cli
    ~/.cache/tensorlogic/venv/bin/python scripts/make_imatrix_fixtures.py

Differences from running llama-imatrix itself: llama-imatrix evaluates
n_batch / CTX chunks per decode call (several sequences per batch), which
changes only the order in which rows are summed, not which rows are; here
one chunk per call (n_batch = n_ubatch = CTX, f16 KV cache, no flash
attention, 2 threads).
"""
import ctypes
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import llama_cpp as L
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/tl-model/tests/fixtures/imatrix_ref.json"
TL = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/tl"
GEMMA = pathlib.Path.home() / ".cache/tensorlogic/models/gemma-3-270m-q4_k_m.gguf"
TEXT = ROOT / "crates/tl-model/tests/fixtures/kv_ppl_text.txt"

SHAPE = {"layers": 2, "d_model": 256, "heads": 4, "kv_heads": 2, "head_dim": 64,
         "ffn": 512, "extra_vocab": 61, "context": 512}
SYNTH = [
    {"arch": "llama", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 11},
    {"arch": "qwen3moe", "weight_type": "Q8_0", "output_type": "Q8_0", "seed": 23, "ffn": 256,
     "experts": 8, "experts_used": 2},
]
SYNTH_CTX, SYNTH_CHUNKS = 64, 3
SYNTH_TOKENS = [3 + (i * 37 + 11) % 317 for i in range(SYNTH_CTX * SYNTH_CHUNKS)]
GEMMA_CTX, GEMMA_CHUNKS = 128, 3

GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID = 29, 30  # enum ggml_op of this ggml.h


def tensor(p):
    """The fields of `struct ggml_tensor` (ggml.h, 64-bit): type @0, ne @16,
    nb @48, op @80, src[10] @152, data @248, name @256."""
    return {
        "type": ctypes.c_int.from_address(p).value,
        "ne": [ctypes.c_int64.from_address(p + 16 + 8 * i).value for i in range(4)],
        "nb": [ctypes.c_size_t.from_address(p + 48 + 8 * i).value for i in range(4)],
        "op": ctypes.c_int.from_address(p + 80).value,
        "src": [ctypes.c_void_p.from_address(p + 152 + 8 * i).value for i in range(10)],
        "data": ctypes.c_void_p.from_address(p + 248).value,
        "name": ctypes.string_at(p + 256).split(b"\0")[0].decode(),
    }


def strided(t):
    """A tensor's f32 data as an array of shape ne[::-1] (strides honoured)."""
    ne, nb = t["ne"], t["nb"]
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + 4
    buf = (ctypes.c_uint8 * span).from_address(t["data"])
    return np.lib.stride_tricks.as_strided(
        np.frombuffer(buf, dtype=np.float32 if t["type"] == 0 else np.int32),
        shape=tuple(reversed(ne)), strides=tuple(reversed(nb))).copy()


class Collector:
    def __init__(self, process_output=True):
        self.stats = {}
        self.process_output = process_output

    def wants(self, name):
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def __call__(self, tp, ask, _ud):
        t = tensor(ctypes.cast(tp, ctypes.c_void_p).value)
        if t["op"] not in (GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID):
            return False
        src0, src1 = tensor(t["src"][0]), tensor(t["src"][1])
        if ask:
            if t["op"] == GGML_OP_MUL_MAT_ID:
                return True
            return src1["ne"][1] >= 16 and src1["type"] == 0 and self.wants(src0["name"])
        x = strided(src1)  # [ne3, ne2, ne1, ne0]
        name = src0["name"]
        if t["op"] == GGML_OP_MUL_MAT_ID:
            ids = strided(tensor(t["src"][2]))[0, 0]  # [n_tokens, n_used]
            n_as, ne0 = src0["ne"][2], src1["ne"][0]
            v, c = self.stats.setdefault(
                name, (np.zeros((n_as, ne0), np.float32), np.zeros(n_as, np.int64)))
            x = x[0]  # [n_tokens, ne1, ne0]
            for idx in range(ids.shape[1]):
                for row in range(ids.shape[0]):
                    ex = int(ids[row, idx])
                    xr = x[row, idx % x.shape[1]]
                    v[ex] += xr * xr
                    c[ex] += 1
        else:
            assert src0["ne"][2] == 1 and src0["ne"][3] == 1
            rows = x.reshape(-1, x.shape[-1])
            v, c = self.stats.setdefault(
                name, (np.zeros((1, rows.shape[1]), np.float32), np.zeros(1, np.int64)))
            for r in rows:  # f32, row after row, as llama.cpp's loop
                v[0] += r * r
            c[0] += rows.shape[0]
        return True


def run(model_path, tokens, ctx, n_chunks, bos, collector, n_ubatch=None):
    """llama-imatrix's compute loop; returns the running perplexity after
    each chunk."""
    model = L.llama_model_load_from_file(str(model_path).encode(), L.llama_model_default_params())
    assert model, model_path
    cp = L.llama_context_default_params()
    cp.n_ctx = ctx
    cp.n_batch = ctx
    cp.n_ubatch = n_ubatch or ctx
    cp.n_threads = cp.n_threads_batch = 2
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cb = L.ggml_backend_sched_eval_callback(collector)
    cp.cb_eval = cb
    lctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(ctx, 0, 1)
    nll, count, ppls = 0.0, 0, []
    for i in range(n_chunks):
        chunk = list(tokens[i * ctx:(i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        L.llama_memory_clear(L.llama_get_memory(lctx), True)
        batch.n_tokens = ctx
        for k, tok in enumerate(chunk):
            batch.token[k] = tok
            batch.pos[k] = k
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = 0
            batch.logits[k] = 1
        assert L.llama_decode(lctx, batch) == 0
        logits = np.ctypeslib.as_array(L.llama_get_logits(lctx), shape=(ctx, n_vocab))
        for j in range(ctx // 2, ctx - 1):
            row = logits[j].astype(np.float32)
            m = row.max()
            s = np.exp((row - m).astype(np.float32)).astype(np.float64).sum()
            nll += -(float(row[tokens[i * ctx + j + 1]] - m) - np.log(s))
            count += 1
        ppls.append(float(np.exp(nll / count)))
    L.llama_batch_free(batch)
    L.llama_free(lctx)
    L.llama_model_free(model)
    return ppls


def summary(stats):
    out = {}
    for name in sorted(stats):
        v, c = stats[name]
        cols = v.shape[1]
        stride = max(1, cols // 32)
        out[name] = {
            "counts": [int(n) for n in c],
            "cols": cols,
            "stride": stride,
            "total": [float(f"{float(r.astype(np.float64).sum()):.8g}") for r in v],
            "sample": [[float(f"{float(x):.8g}") for x in r[::stride]] for r in v],
        }
    return out


def self_diff(a, b):
    """Largest relative difference between two collections, by the Rust
    test's measure: per sampled column relative to the larger of the column
    and the matrix's mean column; per matrix total."""
    col = total = 0.0
    for name, (v, _) in a.items():
        w = b[name][0]
        for r, q in zip(v.astype(np.float64), w.astype(np.float64)):
            stride = max(1, len(r) // 32)
            mean = r.sum() / len(r)
            d = np.abs(r - q)[::stride] / np.maximum(np.abs(r[::stride]), mean)
            col = max(col, float(d.max()))
            total = max(total, abs(r.sum() - q.sum()) / abs(r.sum()))
    return col, total


def main():
    L.llama_backend_init()
    fx = {"reference": f"llama-cpp-python {L.__version__}", "cases": []}
    with tempfile.TemporaryDirectory() as d:
        for case in SYNTH:
            c = dict(SHAPE, **case)
            path = pathlib.Path(d) / f"{c['arch']}.gguf"
            args = [str(TL), "synth", "-o", str(path)]
            for k, v in c.items():
                args += [f"--{k.replace('_', '-')}", str(v)]
            subprocess.run(args, check=True, capture_output=True)
            model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
            vocab = L.llama_model_get_vocab(model)
            bos = L.llama_vocab_bos(vocab) if L.llama_vocab_get_add_bos(vocab) else None
            L.llama_model_free(model)
            col = Collector(process_output=True)
            ppls = run(path, SYNTH_TOKENS, SYNTH_CTX, SYNTH_CHUNKS, bos, col)
            c.update(kind="synth", ctx=SYNTH_CTX, chunks=SYNTH_CHUNKS, tokens=SYNTH_TOKENS, bos=bos,
                     ppl=ppls, tensors=summary(col.stats))
            fx["cases"].append(c)
            print(f"synth {c['arch']}: {len(col.stats)} tensors, ppl {ppls}")
    if GEMMA.exists():
        text = TEXT.read_text()
        if text.endswith("\n"):
            text = text[:-1]
        model = L.llama_model_load_from_file(str(GEMMA).encode(), L.llama_model_default_params())
        vocab = L.llama_model_get_vocab(model)
        raw = text.encode()
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
        assert n > 0
        tokens = list(buf[:n])
        add_bos = L.llama_vocab_get_add_bos(vocab)
        bos = L.llama_vocab_bos(vocab) if add_bos else None
        L.llama_model_free(model)
        col = Collector(process_output=False)
        ppls = run(GEMMA, tokens, GEMMA_CTX, GEMMA_CHUNKS, bos, col)
        # llama.cpp against itself: the same chunks in ubatches of 32 rows
        # (other kernels, another summation order; the same rows summed).
        col32 = Collector(process_output=False)
        run(GEMMA, tokens, GEMMA_CTX, GEMMA_CHUNKS, bos, col32, n_ubatch=32)
        self_col, self_total = self_diff(col.stats, col32.stats)
        fx["cases"].append({"kind": "gemma-3-270m-q4_k_m", "ctx": GEMMA_CTX, "chunks": GEMMA_CHUNKS,
                            "n_tokens": len(tokens), "ppl": ppls, "self_col": self_col,
                            "self_total": self_total, "tensors": summary(col.stats)})
        print(f"gemma-3-270m: llama.cpp ubatch 128 vs 32: column {self_col:.3e}, total {self_total:.3e}")
        print(f"gemma-3-270m: {len(tokens)} tokens, {len(col.stats)} tensors, ppl {ppls}")
    OUT.write_text(json.dumps(fx, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    sys.exit(main())
