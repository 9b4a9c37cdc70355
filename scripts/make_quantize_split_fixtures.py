#!/usr/bin/env python3
"""Write the split-output fixtures of `tl quantize`: what llama.cpp's
quantizer writes with `--keep-split`, and a check that llama.cpp loads the
split files `tl quantize` writes.

The reference is llama.cpp's `llama_model_quantize` (the llama.cpp that
llama-cpp-python 0.3.36 vendors) with `keep_split` set, as llama-quantize
--keep-split calls it. The input is the synthetic qwen2_f32 model of
make_quantize_fixtures.py (`tl synth`, fixed seed) split into three parts
by tl-gguf's `split` example (gguf-split's layout). For each file type in
FTYPES this script records the SHA-256 of each part llama.cpp writes, and
checks that the parts' tensors, joined, are byte for byte the tensors
llama.cpp writes for the unsplit input (it stops otherwise). It also
records llama.cpp's output for --keep-split on the unsplit input (one file,
PREFIX-00001-of-00001.gguf).

Then it runs `tl quantize` itself with --keep-split, --split-max-tensors
and --split-max-size, loads each split output in llama-cpp-python from its
first part and compares the logits with those of tl's unsplit output of the
same type: they must be identical (it stops otherwise; the fixture records
the comparisons). The Rust test `crates/tl-cli/tests/quantize.rs` checks
tl's parts against the recorded hashes without Python.

    cargo build --release -p tl-cli -p tl-gguf --example split
    ~/.cache/tensorlogic/venv/bin/python scripts/make_quantize_split_fixtures.py
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGUFReader

from llama_quantize_ref import FTYPES, reference_version, sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "tl-cli", "tests", "fixtures", "quantize_split.json")
SYNTH_ARGS = ["--arch", "qwen2", "--layers", "8", "--d-model", "256", "--heads", "8",
              "--kv-heads", "2", "--head-dim", "32", "--ffn", "512",
              "--weight-type", "F32", "--output-type", "F32", "--seed", "11"]
PARTS = 3
FTYPES_SPLIT = ["Q4_K_M", "IQ4_XS", "TQ1_0", "Q8_0"]
# tl's own split outputs loaded in llama.cpp: (flags, type).
TL_SPLITS = [(["--keep-split"], "Q4_K_M"), (["--split-max-tensors", "40"], "Q4_K_M"),
             (["--split-max-size", "1M"], "Q8_0")]
TOKENS = [1, 2, 3, 100, 200, 300, 10, 20, 30, 40]


def part_path(prefix, i, n):
    return f"{prefix}-{i + 1:05d}-of-{n:05d}.gguf"


def keep_split(inp, prefix, ftype):
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = 2
    p.ftype = FTYPES[ftype]
    p.keep_split = True
    if llama_cpp.llama_model_quantize(inp.encode(), prefix.encode(), ctypes.byref(p)) != 0:
        sys.exit(f"llama_model_quantize --keep-split {ftype} failed")


def quantize(inp, out, ftype):
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = 2
    p.ftype = FTYPES[ftype]
    if llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p)) != 0:
        sys.exit(f"llama_model_quantize {ftype} failed")


def tensors(paths):
    """name -> (type, bytes) over the files `paths`."""
    out = {}
    for path in paths:
        r = GGUFReader(path)
        for t in r.tensors:
            out[t.name] = (int(t.tensor_type), bytes(t.data.tobytes()))
    return out


def logits(path):
    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)])
    del llm
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tl", default=os.path.join(ROOT, "target", "release", "tl"))
    ap.add_argument("--split", default=os.path.join(ROOT, "target", "release", "examples", "split"))
    args = ap.parse_args()
    fx = {"reference": reference_version() + " (keep_split)", "synth_args": SYNTH_ARGS,
          "parts": PARTS, "keep_split": {}, "tl_splits_loaded_by_llama_cpp": []}
    with tempfile.TemporaryDirectory() as tmp:
        whole = os.path.join(tmp, "in.gguf")
        subprocess.run([args.tl, "synth", *SYNTH_ARGS, "-o", whole], check=True,
                       stdout=subprocess.DEVNULL)
        prefix = os.path.join(tmp, "in")
        subprocess.run([args.split, whole, prefix, str(PARTS)], check=True,
                       stdout=subprocess.DEVNULL)
        first = part_path(prefix, 0, PARTS)
        fx["input_sha256"] = sha256_file(whole)
        fx["input_parts_sha256"] = [sha256_file(part_path(prefix, i, PARTS)) for i in range(PARTS)]
        for ftype in FTYPES_SPLIT:
            out = os.path.join(tmp, f"ref-{ftype}")
            keep_split(first, out, ftype)
            parts = [part_path(out, i, PARTS) for i in range(PARTS)]
            unsplit = os.path.join(tmp, f"ref-{ftype}.gguf")
            quantize(whole, unsplit, ftype)
            if tensors(parts) != tensors([unsplit]):
                sys.exit(f"llama.cpp's --keep-split parts of {ftype} hold other tensors than "
                         "its unsplit output")
            fx["keep_split"][ftype] = [sha256_file(p) for p in parts]
            for p in parts + [unsplit]:
                os.remove(p)
        # --keep-split on a file of one part: one file, no split keys.
        one = os.path.join(tmp, "one")
        keep_split(whole, one, "Q4_K_M")
        fx["keep_split_unsplit_input"] = {"ftype": "Q4_K_M",
                                          "sha256": sha256_file(part_path(one, 0, 1))}
        for flags, ftype in TL_SPLITS:
            mine = os.path.join(tmp, f"tl-{ftype}.gguf")
            subprocess.run([args.tl, "quantize", first, mine, ftype], check=True,
                           capture_output=True)
            pre = os.path.join(tmp, "tl-split")
            r = subprocess.run([args.tl, "quantize", first, pre, ftype, *flags], check=True,
                               capture_output=True, text=True)
            n = int(r.stderr.split(" parts, ")[0].rsplit(" ", 1)[1]) if " parts, " in r.stderr \
                else 1
            parts = [part_path(pre, i, n) for i in range(n)]
            diff = float(np.abs(logits(mine) - logits(parts[0])).max())
            if diff != 0.0:
                sys.exit(f"llama.cpp: tl's {flags} {ftype} parts give other logits than tl's "
                         f"unsplit file (max |diff| {diff})")
            fx["tl_splits_loaded_by_llama_cpp"].append(
                {"flags": flags, "ftype": ftype, "parts": n, "max_abs_logit_diff": diff})
            print(f"{flags} {ftype}: {n} parts, llama.cpp logits equal to the unsplit file's",
                  file=sys.stderr)
            for p in parts + [mine]:
                os.remove(p)
    with open(OUT, "w") as f:
        json.dump(fx, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
