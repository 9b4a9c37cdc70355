#!/usr/bin/env python3
"""Checks that llama.cpp reads the split layout tl writes
(`GgufWriter::into_split`, the `split` example of tl-gguf): the Qwen test
model split into three parts, loaded by llama-cpp-python from its first
part, must give the logits of the whole file exactly.

    cargo build --release -p tl-gguf --example split
    ~/.cache/tensorlogic/venv/bin/python scripts/check_split_llama.py
"""
import os
import subprocess
import sys
import tempfile

import llama_cpp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(os.environ.get("TL_MODEL_DIR", os.path.expanduser("~/.cache/tensorlogic/models")),
                     "qwen2.5-coder-0.5b-instruct-q4.gguf")
SPLIT = os.path.join(ROOT, "target", "release", "examples", "split")
TOKENS = [1, 2, 3, 100, 200, 300, 400, 500, 600, 700]


def logits(path):
    llm = llama_cpp.Llama(path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)])
    del llm
    return out


def main():
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([SPLIT, MODEL, os.path.join(d, "qwen"), "3"], check=True,
                       stdout=subprocess.DEVNULL)
        whole = logits(MODEL)
        split = logits(os.path.join(d, "qwen-00001-of-00003.gguf"))
    diff = float(np.abs(whole - split).max())
    print(f"llama.cpp, split against whole: max |diff| {diff} over {whole.size} logits")
    return 0 if diff == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
