#!/usr/bin/env python3
"""tl's forward intermediates against llama.cpp's, op by op.

    VENV/bin/python scripts/capture_llama_tensors.py MODEL.gguf /tmp/ref IDS
    cargo build --release -p tl-model --example dump_logits
    TL_DUMP_TENSORS=/tmp/ours target/release/examples/dump_logits MODEL.gguf /tmp/logits.bin IDS
    python3 scripts/compare_tensors.py /tmp/ref /tmp/ours N_LAYERS /tmp/logits.bin

For each named tensor (embeddings, then per layer the attention norm, Q/K/V
after the matmul and after bias/norm/rope, the attention output, the FFN
input, norm, gate, up, activation and output, the layer output), prints how
many elements differ in their bits and the largest difference. The first
line with differences is the first op whose arithmetic differs. llama.cpp
computes only the rows that need logits in its last layer; those rows are
compared there. Needs numpy.
"""
import json
import os
import sys

import numpy as np


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    ref, ours, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logits = sys.argv[4] if len(sys.argv) > 4 else None
    by = {}
    for e in json.load(open(os.path.join(ref, "index.json"))):
        by.setdefault(e["name"], []).append(e)

    def R(name, k=-1):
        es = by.get(name)
        return np.fromfile(os.path.join(ref, es[k]["file"]), dtype=np.float32) if es else None

    def T(name):
        p = os.path.join(ours, name + ".bin")
        return np.fromfile(p, dtype=np.float32) if os.path.exists(p) else None

    def cmp(label, a, b):
        if a is None or b is None:
            print(f"{label:26s} not in {'llama.cpp' if a is None else 'tl'}'s dump")
            return
        if b.size > a.size:  # llama.cpp's pruned last layer: the last rows
            b = b[-a.size:]
        if a.size != b.size:
            print(f"{label:26s} sizes {a.size} and {b.size}")
            return
        ne = int((a.view(np.uint32) != b.view(np.uint32)).sum())
        d = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        print(f"{label:26s} bits differ {ne:7d}/{a.size:<7d} max |diff| {d:.3e}")

    cmp("embd", R("inp_scaled") if "inp_scaled" in by else R("embd"), T("embd"))
    for L in range(layers):
        cmp(f"attn_norm-{L}", R(f"attn_norm-{L}"), T(f"attn_norm-{L}"))
        for nm in ["Qcur", "Kcur", "Vcur"]:
            cmp(f"{nm}-matmul-{L}", R(f"{nm}-{L}", 0), T(f"{nm}-matmul-{L}"))
        for nm in ["Kcur", "Vcur"]:
            cmp(f"{nm}-{L}", R(f"{nm}-{L}", -1), T(f"{nm}-{L}"))
        cmp(f"kqv_out-{L}", R(f"kqv_out-{L}"), T(f"kqv_out-{L}"))
        cmp(f"ffn_inp-{L}", R(f"ffn_inp-{L}") if f"ffn_inp-{L}" in by else R(f"sa_out-{L}"), T(f"ffn_inp-{L}"))
        for nm in ["ffn_norm", "ffn_gate", "ffn_up"]:
            cmp(f"{nm}-{L}", R(f"{nm}-{L}"), T(f"{nm}-{L}"))
        act = R(f"ffn_swiglu-{L}") if f"ffn_swiglu-{L}" in by else R(f"ffn_geglu-{L}")
        cmp(f"ffn_act-{L}", act, T(f"ffn_act-{L}"))
        cmp(f"ffn_out-{L}", R(f"ffn_out-{L}"), T(f"ffn_out-{L}"))
        cmp(f"l_out-{L}", R(f"l_out-{L}"), T(f"l_out-{L}"))
    cmp("result_norm", R("result_norm"), T("result_norm"))
    if logits:
        cmp("logits", R("result_output"), np.fromfile(logits, dtype=np.float32))


if __name__ == "__main__":
    main()
