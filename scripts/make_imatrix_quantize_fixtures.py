#!/usr/bin/env python3
"""Write the fixtures of `tl quantize --imatrix`: what llama.cpp's quantizer
writes with an importance matrix.

The reference is `llama_model_quantize` of the llama.cpp that
llama-cpp-python 0.3.36 vendors, called through llama-cpp-python with an
importance matrix (`llama_model_quantize_params.imatrix`, the C array of
`llama_model_imatrix_data` that llama-quantize builds) and the key
overrides llama-quantize adds for one (`quantize.imatrix.file`, `.dataset`,
`.entries_count`, `.chunks_count`). What llama-quantize's `load_imatrix`
and `prepare_imatrix` (tools/quantize/quantize.cpp) do before that, reading
the file, dividing the sums by the counts and applying
`--include-weights`/`--exclude-weights`, is done here the same way, in
float32.

The importance matrices are not stored: their values come from a
deterministic generator (splitmix64, exact f64 arithmetic, rounded to f32)
over the input's tensor list, which the Rust test
`crates/tl-cli/tests/quantize_imatrix.rs` reimplements; it writes the same
values into its own GGUF or legacy `.dat` file and runs `tl quantize
--imatrix` with the same file name (relative, from the file's folder, since
the name goes into the output's metadata). Per case this script records the
type and the SHA-256 (first 48 bits) of every output tensor and the SHA-256
of the whole output file.

Matrices: "gguf-full" has an entry for every weight matrix, "gguf-partial"
lacks the attn_k ones (those are quantized without weights), both give
token_embd an entry of the wrong size (ignored for token_embd, as in
llama.cpp) and, in MoE models, an expert that saw no token (weights 1);
"dat-partial" is "gguf-partial" in the legacy format.

Run with the reference environment (llama-cpp-python, gguf, numpy):
  ~/.cache/tensorlogic/venv/bin/python scripts/make_imatrix_quantize_fixtures.py \\
      --tl target/release/tl
"""
import argparse
import ctypes
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGUFReader, GGUFWriter

from llama_quantize_ref import FTYPES as FTYPES_NO_IMATRIX, FTYPES_IMATRIX, sha256_file
from make_quantize_fixtures import SYNTH, tensors_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "tl-cli", "tests", "fixtures", "quantize_imatrix.json")

GGUF_DATASET, GGUF_CHUNKS, GGUF_CHUNK_SIZE = "calibration.txt", 42, 512
DAT_DATASET, DAT_CHUNKS = "wiki.train.raw", 7

# (model, imatrix kind, file types, flags)
CASES = [
    ("qwen2_f32", "gguf-partial",
     ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
      "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"], []),
    ("qwen2_f32", "gguf-full", ["Q2_K_S"], []),
    ("qwen2_f32", "gguf-partial", ["Q4_K_M"], ["--exclude-weights", "ffn_down"]),
    ("qwen2_f32", "gguf-partial", ["Q4_K_M"],
     ["--include-weights", "attn_q", "--include-weights", "output"]),
    ("llama_f16", "dat-partial", ["Q4_K_M", "Q5_0", "Q2_K"], []),
    ("mixtral_f16", "gguf-partial", ["Q4_K_M", "Q3_K_S", "Q4_0"], []),
    # The IQ4 quantizers with importance weights; llama_f16's 384-wide rows
    # take IQ4_XS's fallback to IQ4_NL.
    ("qwen2_f32", "gguf-partial", ["IQ4_NL", "IQ4_XS"], []),
    ("llama_f16", "dat-partial", ["IQ4_XS"], []),
    ("mixtral_f16", "gguf-partial", ["IQ4_XS"], []),
    # The grid types: every IQ mix with a matrix that has every weight
    # matrix (IQ3_XXS, IQ2_* and IQ1_* tensors need their entry); without
    # the attn_k entries only where attn_k gets no such type. llama_f16's
    # 384-wide rows fall back to IQ4_NL; mixtral has 8 experts.
    ("qwen2_f32", "gguf-full",
     ["IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
      "IQ1_S", "IQ1_M"], []),
    ("qwen2_f32", "gguf-partial", ["IQ3_S", "IQ3_M"], []),
    ("llama_f16", "dat-partial", ["IQ3_XXS", "IQ2_XS", "IQ1_M"], []),
    ("mixtral_f16", "gguf-full", ["IQ3_XXS", "IQ2_S", "IQ1_S"], []),
    ("gemma3_f32", "gguf-full", ["IQ3_XS", "IQ2_M"], []),
]

# llama_ftype numbers: those of make_quantize_fixtures.py plus the mixes
# that need an importance matrix.
FTYPES = {**FTYPES_NO_IMATRIX, **FTYPES_IMATRIX}

MASK = (1 << 64) - 1


class Rng:
    def __init__(self, seed):
        self.s = seed & MASK

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform(self):
        return (self.next() >> 40) / 16777216.0


def f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0]


def raw_entries(model_path, partial):
    """name -> (sums as f32 list of n_cols * n_exp, counts list), over the
    input's weight matrices sorted by name."""
    r = GGUFReader(model_path)
    tensors = sorted(((t.name, [int(d) for d in t.shape]) for t in r.tensors))
    rng = Rng(0x1A7E1C)
    out = {}
    for name, dims in tensors:
        if not name.endswith(".weight") or len(dims) < 2 or dims[1] <= 1:
            continue
        if partial and "attn_k." in name:
            continue
        n_cols = dims[0]
        n_exp = dims[2] if len(dims) >= 3 else 1
        if name == "token_embd.weight":
            n_cols, n_exp = 7, 1
        counts = []
        for j in range(n_exp):
            c = 1 + rng.next() % 500
            if n_exp > 1 and j == 2:
                c = 0
            counts.append(c)
        sums = []
        for j in range(n_exp):
            for _ in range(n_cols):
                u = rng.uniform()
                sums.append(f32((u * u * 20.0 + 0.001) * max(counts[j], 1)))
        out[name] = (sums, counts)
    return out


def write_gguf_imatrix(path, raw):
    w = GGUFWriter(path, arch=None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [GGUF_DATASET])
    w.add_uint32("imatrix.chunk_count", GGUF_CHUNKS)
    w.add_uint32("imatrix.chunk_size", GGUF_CHUNK_SIZE)
    for name in sorted(raw):
        sums, counts = raw[name]
        n_exp = len(counts)
        w.add_tensor(name + ".in_sum2", np.array(sums, dtype=np.float32).reshape(n_exp, -1))
        w.add_tensor(name + ".counts", np.array(counts, dtype=np.float32).reshape(n_exp, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_dat_imatrix(path, raw):
    b = bytearray(struct.pack("<i", len(raw)))
    for name in sorted(raw):
        sums, counts = raw[name]
        nb = name.encode()
        b += struct.pack("<i", len(nb)) + nb + struct.pack("<ii", counts[0], len(sums))
        b += struct.pack(f"<{len(sums)}f", *sums)
    ds = DAT_DATASET.encode()
    b += struct.pack("<ii", DAT_CHUNKS, len(ds)) + ds
    with open(path, "wb") as f:
        f.write(b)


def normalized(raw, legacy):
    """quantize.cpp load_imatrix: the weights, in float32."""
    out = {}
    for name, (sums, counts) in raw.items():
        s = np.array(sums, dtype=np.float32)
        if legacy:
            ncall = counts[0]
            out[name] = s / np.float32(ncall) if ncall > 0 else s
        else:
            ne0 = len(sums) // len(counts)
            e = np.empty_like(s)
            for j, c in enumerate(counts):
                run = slice(j * ne0, (j + 1) * ne0)
                e[run] = s[run] / np.float32(c) if c > 0 else np.float32(1.0)
            out[name] = e
    return out


def filtered(entries, flags):
    """quantize.cpp prepare_imatrix."""
    inc = [flags[i + 1] for i, f in enumerate(flags) if f == "--include-weights"]
    exc = [flags[i + 1] for i, f in enumerate(flags) if f == "--exclude-weights"]
    if exc:
        entries = {k: v for k, v in entries.items() if not any(x in k for x in exc)}
    if inc:
        entries = {k: v for k, v in entries.items() if any(x in k for x in inc)}
    return entries


def reference_quantize_imatrix(inp, out, ftype, entries, file_name, dataset, chunks):
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = 2
    p.ftype = FTYPES[ftype]
    keep = []
    if entries:
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, w) in enumerate(entries.items()):
            w = np.ascontiguousarray(w, dtype=np.float32)
            keep.append(w)
            arr[i].name = name.encode()
            arr[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = len(w)
        arr[len(entries)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        kvs = [("quantize.imatrix.file", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, file_name)]
        if dataset:
            kvs.append(("quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, dataset))
        kvs.append(("quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT,
                    len(entries)))
        if chunks > 0:
            kvs.append(("quantize.imatrix.chunks_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT,
                        chunks))
        ov = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
        for i, (k, tag, v) in enumerate(kvs):
            ov[i].key = k.encode()
            ov[i].tag = tag
            if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
                ov[i].value.val_str = v.encode()[:127]
            else:
                ov[i].value.val_i64 = v
        ov[len(kvs)].key = b""
        keep.append(ov)
        p.kv_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({inp}, {ftype}) with an imatrix failed: {rc}")


def main():
    import llama_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("--tl", default=os.path.join(ROOT, "target", "release", "tl"))
    args = ap.parse_args()
    fixtures = {"reference": f"llama-cpp-python {llama_cpp.__version__} llama_model_quantize",
                "gguf": {"dataset": GGUF_DATASET, "chunk_count": GGUF_CHUNKS,
                         "chunk_size": GGUF_CHUNK_SIZE},
                "dat": {"dataset": DAT_DATASET, "chunk_count": DAT_CHUNKS},
                "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model, kind, ftypes, flags in CASES:
            inp = os.path.join(tmp, model + ".gguf")
            if model not in fixtures["models"]:
                subprocess.run([args.tl, "synth", *SYNTH[model], "-o", inp], check=True,
                               stdout=subprocess.DEVNULL)
                fixtures["models"][model] = {"synth_args": SYNTH[model],
                                             "input_sha256": sha256_file(inp), "cases": []}
            fmt, part = kind.split("-")
            raw = raw_entries(inp, part == "partial")
            legacy = fmt == "dat"
            file_name = "imatrix." + fmt
            # The file as llama-quantize would read it (not read back here:
            # the values are the generator's), written for a look by hand.
            (write_dat_imatrix if legacy else write_gguf_imatrix)(
                os.path.join(tmp, file_name), raw)
            entries = filtered(normalized(raw, legacy), flags)
            meta = fixtures["dat" if legacy else "gguf"]
            for ftype in ftypes:
                out = os.path.join(tmp, "out.gguf")
                reference_quantize_imatrix(inp, out, ftype, entries, file_name,
                                           meta["dataset"], meta["chunk_count"])
                tensors = {k: [v[0], v[1][:12]] for k, v in tensors_of(out).items()}
                fixtures["models"][model]["cases"].append({
                    "ftype": ftype, "imatrix": kind, "flags": flags,
                    "file_sha256": sha256_file(out), "tensors": tensors})
                os.remove(out)
                print(f"{model} {kind} {ftype} {flags}", file=sys.stderr)
    with open(OUT, "w") as f:
        json.dump(fixtures, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
