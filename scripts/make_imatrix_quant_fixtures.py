#!/usr/bin/env python3
"""Write the fixture of tl-core's importance-weighted quantizers
(`tl_core::quant::quantize_weighted`): what ggml's `ggml_quantize_chunk`
makes of the same rows, with and without an importance matrix.

The reference is `ggml_quantize_chunk` of the libggml-base.so that
llama-cpp-python 0.3.36 ships (the llama.cpp it vendors), called through
ctypes. It is the function llama-quantize calls for every tensor; with an
importance matrix it runs `quantize_row_*_impl` of ggml-quants.c, without one
it runs `quantize_row_*_ref` (Q8_0, F16 and BF16 ignore the matrix).

Inputs are not stored: each case's rows and importance matrix come from a
small deterministic generator (splitmix64, uniform floats made of 24 exact
bits, only +, -, * and / in f64, then rounded to f32) that the Rust test
`crates/tl-core/tests/imatrix_quant.rs` reimplements operation for operation.
What is stored per case is the SHA-256 of the output bytes (its first
128 bits), so the fixture
stays a few tens of KB; the test also checks the SHA-256 of the generated
inputs, so a generator drift shows as such rather than as a quantizer
difference.

Run with the reference environment:
  ~/.cache/tensorlogic/venv/bin/python scripts/make_imatrix_quant_fixtures.py
(or with TL_LIBGGML_BASE=path/to/libggml-base.so of the same llama-cpp-python
build and any Python 3).

The grid types IQ2_XXS, IQ2_XS and IQ1_S have no case without an importance
matrix: ggml_quantize_chunk refuses them.
"""
import ctypes
import glob
import hashlib
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "tl-core", "tests", "fixtures", "imatrix_quant.json")

# ggml_type numbers (ggml.h).
TYPES = {
    "F16": 1, "BF16": 30, "Q8_0": 8, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
    # The grid types, after the others so that their cases keep their seeds.
    "IQ3_XXS": 18, "IQ3_S": 21, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ2_S": 22,
    "IQ1_S": 19, "IQ1_M": 29,
    # The ternary types (their quantizers ignore the importance matrix).
    "TQ1_0": 34, "TQ2_0": 35,
}
# ggml_quantize_requires_imatrix: no case without an importance matrix.
NEED_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}
DISTS = ["normal", "uniform", "outliers", "positive", "tiny", "mixed"]
IMATRICES = ["none", "varied", "sparse"]
ROWS = 4
N_PER_ROW = [256, 512]

MASK = (1 << 64) - 1


class Rng:
    """splitmix64; `uniform` is 24 random bits over 2^24, exact in f32."""

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

    def normal(self):
        # Irwin-Hall: the sum of four uniforms, centred; close enough to a
        # bell for weights and free of libm functions.
        return (self.uniform() + self.uniform() + self.uniform() + self.uniform() - 2.0) * 1.7


def f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0]


def row_values(rng, dist, r, n):
    if dist == "mixed":
        dist = ["normal", "outliers", "zero", "positive"][r % 4]
    out = []
    for _ in range(n):
        if dist == "normal":
            v = rng.normal()
        elif dist == "uniform":
            v = rng.uniform() * 2.0 - 1.0
        elif dist == "outliers":
            v = rng.normal() * 0.02
            if rng.next() % 53 == 0:
                v = v * 400.0
        elif dist == "positive":
            v = rng.uniform() * 3.0 + 0.5
        elif dist == "tiny":
            v = rng.normal() * 1e-18
        elif dist == "zero":
            v = 0.0
        else:
            raise ValueError(dist)
        out.append(f32(v))
    return out


def imatrix_values(rng, kind, n):
    if kind == "none":
        return None
    out = []
    for _ in range(n):
        u = rng.uniform()
        w = u * u * 50.0 + 0.01
        if rng.next() % 17 == 0:
            w = w * 1000.0
        if kind == "sparse" and rng.next() % 4 == 0:
            w = 0.0
        out.append(f32(w))
    return out


def seed_of(ti, di, ii, n):
    return (ti * 1000003 + di * 10007 + ii * 101 + n) ^ 0x5EED


def pack(vals):
    return struct.pack(f"<{len(vals)}f", *vals)


def load_ggml():
    libs = glob.glob(os.environ.get("TL_LIBGGML_BASE") or os.path.expanduser(
        "~/.cache/tensorlogic/venv/lib/python3*/site-packages/llama_cpp/lib/libggml-base.so"))
    if not libs:
        sys.exit("libggml-base.so of llama-cpp-python not found")
    lib = ctypes.CDLL(libs[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def quantize(lib, ty, rows, n, imatrix):
    src = ctypes.create_string_buffer(pack(rows), len(rows) * 4)
    size = lib.ggml_row_size(ty, n) * (len(rows) // n)
    dst = ctypes.create_string_buffer(size)
    im = None
    if imatrix is not None:
        im = ctypes.create_string_buffer(pack(imatrix), len(imatrix) * 4)
    got = lib.ggml_quantize_chunk(ty, src, dst, 0, len(rows) // n, n,
                                  ctypes.cast(im, ctypes.c_void_p) if im is not None else None)
    if got != size:
        sys.exit(f"ggml_quantize_chunk wrote {got} bytes, expected {size}")
    return dst.raw


def main():
    lib = load_ggml()
    cases = []
    for ti, (tname, ty) in enumerate(TYPES.items()):
        for di, dist in enumerate(DISTS):
            for ii, kind in enumerate(IMATRICES):
                if kind == "none" and tname in NEED_IMATRIX:
                    continue
                for n in N_PER_ROW:
                    seed = seed_of(ti, di, ii, n)
                    rng = Rng(seed)
                    rows = []
                    for r in range(ROWS):
                        rows += row_values(rng, dist, r, n)
                    imatrix = imatrix_values(rng, kind, n)
                    out = quantize(lib, ty, rows, n, imatrix)
                    inputs = hashlib.sha256(pack(rows) + (pack(imatrix) if imatrix else b""))
                    cases.append({
                        "type": tname, "dist": dist, "imatrix": kind, "n_per_row": n,
                        "rows": ROWS, "seed": seed,
                        "input_sha256": inputs.hexdigest()[:16],
                        "sha256": hashlib.sha256(out).hexdigest()[:32],
                    })
    try:
        import llama_cpp
        version = llama_cpp.__version__
    except ImportError:
        # TL_LIBGGML_BASE names the library of a llama-cpp-python build.
        version = os.environ.get("TL_LLAMA_CPP_PYTHON_VERSION", "0.3.36")
    fixture = {
        "reference": f"llama-cpp-python {version} libggml-base ggml_quantize_chunk",
        "cases": cases,
    }
    with open(OUT, "w") as f:
        # One case per line: small, and a changed case is a one-line diff.
        f.write('{"reference":%s,"cases":[\n' % json.dumps(fixture["reference"]))
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
