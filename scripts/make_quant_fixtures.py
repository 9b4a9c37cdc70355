#!/usr/bin/env python3
"""Write the golden fixtures for the GGML block formats in tl-core.

The reference is `gguf.quants` (gguf-py 0.19.0), whose numpy code dequantizes
every block type (IQ4_NL, IQ4_XS, the grid types IQ3_XXS to IQ1_M, MXFP4 and the
ternary TQ1_0/TQ2_0 included) and quantizes F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/MXFP4/
TQ1_0/TQ2_0 exactly like
ggml's `dequantize_row_*` / `quantize_row_*_ref`. The Rust test
`crates/tl-core/tests/quant_fixtures.rs` replays these files without Python.

Three kinds of fixture, one JSON file each, in crates/tl-core/tests/fixtures/quant/:
  dequant_random_<TYPE>.json  random blocks (scale fields finite, |x| <= 2)
  dequant_<model>_<TYPE>.json the first blocks of a real tensor of a model
  quantize_<TYPE>.json        f32 input and the bytes gguf.quants makes of it

Every number is stored as the hex of its little-endian bytes so that the
comparison is bit for bit (NaN payloads and signed zeros included).

snapshot_k_quants.json in the same folder is not written by this script: it
holds the output of ggml's C K-quant reference quantizers, which gguf-py lacks
(see `k_quant_quantize_matches_ggml_c_reference` in the test).

Run with the project's Python environment (gguf + numpy):
  /root/.cache/tensorlogic/venv/bin/python scripts/make_quant_fixtures.py
"""
import argparse
import json
import os
import sys

import numpy as np
import gguf
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "crates", "tl-core", "tests", "fixtures", "quant")
MODEL_DIR = os.environ.get("TL_MODEL_DIR", os.path.expanduser("~/.cache/tensorlogic/models"))
MODELS = {
    "qwen": "qwen2.5-coder-0.5b-instruct-q4.gguf",
    "gemma": "gemma-3-270m-q4_k_m.gguf",
}

# Byte offsets of the f16 scale fields inside one block (ggml-common.h).
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_NL: [0],
    T.IQ4_XS: [0],
    T.IQ3_XXS: [0],
    T.IQ3_S: [0],
    T.IQ2_XXS: [0],
    T.IQ2_XS: [0],
    T.IQ2_S: [0],
    T.IQ1_S: [0],
    T.IQ1_M: [],
    T.TQ1_0: [52],
    T.TQ2_0: [64],
}
# IQ1_M keeps its f16 super-block scale in the top nibbles of the four u16
# of `scales` (at this byte offset).
IQ1_M_SCALES = 48
# Random blocks per type: more of the small 32-value blocks, fewer super-blocks.
RANDOM_BLOCKS = {32: 16, 256: 4}
# Scalar types have one value per "block"; use enough of them to hit edge cases.
RANDOM_SCALARS = 256


def hexs(a: np.ndarray) -> str:
    return np.ascontiguousarray(a).tobytes().hex()


WRITTEN: list[str] = []


def write(name: str, obj: dict) -> None:
    path = os.path.join(OUT_DIR, name)
    WRITTEN.append(path)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def dequant_fixture(ty: T, source: str, raw: np.ndarray) -> dict:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    values = quants.dequantize(raw, ty).astype(np.float32, copy=False).reshape(-1)
    block, size = GGML_QUANT_SIZES[ty]
    assert raw.size % size == 0 and values.size == raw.size // size * block
    return {
        "kind": "dequantize",
        "type": ty.name,
        "source": source,
        "n_values": int(values.size),
        "bytes": hexs(raw),
        "values_f32": hexs(values.astype("<f4")),
    }


def random_f16_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(-2.0, 2.0, size=n).astype(np.float16)


def random_blocks(rng: np.random.Generator, ty: T) -> np.ndarray:
    if ty == T.F32:
        v = rng.standard_normal(RANDOM_SCALARS).astype(np.float32) * np.float32(3.0)
        v[:4] = [0.0, -0.0, np.inf, -np.inf]
        v[4] = np.float32(1e-42)  # subnormal
        return v.view(np.uint8)
    if ty == T.F16:
        bits = rng.integers(0, 1 << 16, size=RANDOM_SCALARS, dtype=np.uint16)
        # NaN payload handling differs between conversion routines and carries
        # no information for a weight, so keep every exponent finite...
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits).astype(np.uint16)
        # ...except for the infinities, and add zeros and subnormals on purpose.
        bits[:6] = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x83FF]
        return bits.view(np.uint8)
    if ty == T.BF16:
        # bf16 -> f32 is a shift, exact for every pattern, NaNs included.
        bits = rng.integers(0, 1 << 16, size=RANDOM_SCALARS, dtype=np.uint16)
        bits[:6] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001]
        return bits.view(np.uint8)
    block, size = GGML_QUANT_SIZES[ty]
    n_blocks = RANDOM_BLOCKS[block]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[ty]:
        scales = random_f16_scales(rng, n_blocks)
        # One subnormal and one zero scale to cover the f16 edge cases.
        scales[0] = np.uint16(0x0123).view(np.float16)
        scales[1] = np.float16(0.0)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    if ty == T.IQ1_M:
        bits = random_f16_scales(rng, n_blocks).view(np.uint16)
        bits[0] = 0x0123
        bits[1] = 0
        sc = raw[:, IQ1_M_SCALES:IQ1_M_SCALES + 8].copy().view("<u2")
        for k in range(4):
            nib = (bits.astype(np.uint16) >> (4 * k)) & 0xF
            sc[:, k] = (sc[:, k] & 0x0FFF) | (nib << 12)
        raw[:, IQ1_M_SCALES:IQ1_M_SCALES + 8] = sc.view(np.uint8)
    return raw.reshape(-1)


def random_mxfp4_blocks(rng: np.random.Generator) -> np.ndarray:
    """MXFP4 blocks: random codes under random E8M0 exponents, the first
    blocks at the edges (the two subnormal scales, 2^-1, 2^0, and the top two,
    where 12 * 2^126 overflows to inf)."""
    n_blocks = RANDOM_BLOCKS[32]
    raw = rng.integers(0, 256, size=(n_blocks, 17), dtype=np.uint8)
    raw[:7, 0] = [0, 1, 127, 128, 254, 255, 2]
    return raw.reshape(-1)


def real_tensor_fixtures(model: str, path: str) -> list[tuple[str, dict]]:
    reader = gguf.GGUFReader(path)
    done = set()
    out = []
    for t in reader.tensors:
        ty = t.tensor_type
        if ty in done:
            continue
        done.add(ty)
        block, size = GGML_QUANT_SIZES[ty]
        n_blocks = 256 if block == 1 else 32 if block == 32 else 8
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)[: n_blocks * size]
        fx = dequant_fixture(ty, f"{model}:{t.name}", raw)
        out.append((f"dequant_{model}_{ty.name}.json", fx))
    return out


def quantize_inputs(rng: np.random.Generator, block: int) -> np.ndarray:
    """Blocks meant to hit every branch of the reference quantizers."""
    rows = []
    for scale in [1.0, 1e-3, 37.5, 1e4]:
        rows.append(rng.standard_normal(block) * scale)
    rows.append(rng.uniform(-1, 1, block))
    rows.append(rng.uniform(0.5, 3.0, block))  # all positive: min > 0
    rows.append(-rng.uniform(0.5, 3.0, block))  # all negative: max < 0
    rows.append(np.zeros(block))  # d == 0
    rows.append(np.full(block, 0.75))  # max == min
    z = np.zeros(block)
    z[block // 3] = -1e-30  # tiny amax, scale underflows in f16
    rows.append(z)
    # Values that land on .5 after scaling: ties for roundf/trunc(x + 0.5).
    ties = (np.arange(block) - block // 2) * 0.5
    ties[0] = -8.0
    rows.append(ties)
    ties2 = np.arange(block, dtype=np.float64) / 2.0 - 7.75
    rows.append(ties2)
    rows.append(rng.standard_normal(block) * np.where(rng.random(block) < 0.1, 100.0, 0.01))
    x = np.concatenate(rows).astype(np.float32)
    # Large values: f16 overflow to inf for F16, exact ties for BF16.
    x[3] = np.float32(70000.0)
    x[5] = np.float32(65520.0)
    x[7] = np.uint32(0x3F808000).view(np.float32)
    x[9] = np.uint32(0x3F818000).view(np.float32)
    x[11] = np.float32(-1e-40)
    return x


def quantize_fixture(rng: np.random.Generator, ty: T) -> dict:
    block, _ = GGML_QUANT_SIZES[ty]
    x = quantize_inputs(rng, max(block, 32))
    if ty == T.BF16:
        x = np.concatenate([x, np.array([np.nan, -np.nan], dtype=np.float32),
                            np.uint32([0x7F800001, 0xFFC12345]).view(np.float32),
                            np.array([np.inf, -np.inf, 3.4e38], dtype=np.float32)]).astype(np.float32)
    if ty == T.F16:
        x = np.concatenate([x, np.array([np.inf, -np.inf, 6.1e-5, 3e-8, 65504.0, 65519.0],
                                        dtype=np.float32)]).astype(np.float32)
    assert x.size % block == 0
    with np.errstate(over="ignore"):  # F16 overflow to inf is one of the cases
        q = np.asarray(quants.quantize(x, ty)).reshape(-1).view(np.uint8)
    return {
        "kind": "quantize",
        "type": ty.name,
        "source": "generated",
        "n_values": int(x.size),
        "input_f32": hexs(x.astype("<f4")),
        "bytes": hexs(q),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    for ty in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
               T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
        write(f"dequant_random_{ty.name}.json", dequant_fixture(ty, "random", random_blocks(rng, ty)))

    for model, file in MODELS.items():
        path = os.path.join(MODEL_DIR, file)
        if not os.path.exists(path):
            print(f"missing model {path}: run scripts/fetch_models.py", file=sys.stderr)
            return 1
        for name, fx in real_tensor_fixtures(model, path):
            write(name, fx)

    for ty in [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]:
        write(f"quantize_{ty.name}.json", quantize_fixture(rng, ty))

    # The IQ4 types, from a generator of their own so that the fixtures
    # above keep their bytes.
    rng_iq = np.random.default_rng(args.seed + 1)
    for ty in [T.IQ4_NL, T.IQ4_XS]:
        write(f"dequant_random_{ty.name}.json", dequant_fixture(ty, "random", random_blocks(rng_iq, ty)))

    # The grid types, again from a generator of their own.
    rng_grid = np.random.default_rng(args.seed + 2)
    for ty in [T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M]:
        write(f"dequant_random_{ty.name}.json", dequant_fixture(ty, "random", random_blocks(rng_grid, ty)))
    # MXFP4, from a generator of its own for the same reason.
    rng_mx = np.random.default_rng(args.seed + 2)
    write("dequant_random_MXFP4.json", dequant_fixture(T.MXFP4, "random", random_mxfp4_blocks(rng_mx)))
    write("quantize_MXFP4.json", quantize_fixture(rng_mx, T.MXFP4))
    # The ternary types, from a generator of their own. Random TQ2_0 bytes
    # include the two-bit field 3 (the value 2), which ggml's quantizer never
    # writes but its dequantizer reads.
    rng_tq = np.random.default_rng(args.seed + 3)
    for ty in [T.TQ1_0, T.TQ2_0]:
        write(f"dequant_random_{ty.name}.json", dequant_fixture(ty, "random", random_blocks(rng_tq, ty)))
        write(f"quantize_{ty.name}.json", quantize_fixture(rng_tq, ty))

    total = sum(os.path.getsize(p) for p in WRITTEN)
    print(f"wrote {len(WRITTEN)} fixtures, {total} bytes, to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
