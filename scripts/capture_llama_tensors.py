#!/usr/bin/env python3
"""Every f32 intermediate tensor of one llama.cpp forward, written to files,
for `scripts/compare_tensors.py` to set beside tl's (`TL_DUMP_TENSORS`).

    VENV/bin/python scripts/capture_llama_tensors.py MODEL.gguf OUTDIR 1,2,3

Runs the token ids as one batch (n_batch = n_ubatch = 512, f16 KV cache, no
flash attention, 2 threads: the fixture settings) with llama.cpp's graph
callback. Each contiguous f32 tensor goes to OUTDIR/NAME.K.bin (K counts the
tensors of that name in graph order); OUTDIR/index.json lists them with
their shapes. Reads `struct ggml_tensor` fields at the offsets of ggml's
header for 64-bit targets (type @0, ne @16, nb @48, data @248, name @256).
"""
import ctypes
import json
import os
import sys

import numpy as np
import llama_cpp as L


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    model_path, outdir, ids = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
    os.makedirs(outdir, exist_ok=True)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    if not model:
        sys.exit(f"cannot load {model_path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = 512
    cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = 2
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    seen, index = {}, []

    @L.ggml_backend_sched_eval_callback
    def cb(t, ask, _ud):
        if ask:
            return True
        p = ctypes.cast(t, ctypes.c_void_p).value
        ty = ctypes.c_int.from_address(p).value
        ne = [ctypes.c_int64.from_address(p + 16 + 8 * i).value for i in range(4)]
        nb = [ctypes.c_size_t.from_address(p + 48 + 8 * i).value for i in range(4)]
        data = ctypes.c_void_p.from_address(p + 248).value
        name = ctypes.string_at(p + 256).split(b"\0")[0].decode()
        n = ne[0] * ne[1] * ne[2] * ne[3]
        contiguous = nb[0] == 4 and nb[1] == 4 * ne[0] and nb[2] == nb[1] * ne[1] and nb[3] == nb[2] * ne[2]
        if ty != 0 or not data or not contiguous:
            return True
        arr = np.ctypeslib.as_array((ctypes.c_float * n).from_address(data)).copy()
        k = seen.get(name, 0)
        seen[name] = k + 1
        fn = f"{name}.{k}.bin"
        arr.tofile(os.path.join(outdir, fn))
        index.append({"name": name, "k": k, "ne": ne, "file": fn})
        return True

    cp.cb_eval = cb
    ctx = L.llama_init_from_model(model, cp)
    arr = (L.llama_token * len(ids))(*ids)
    rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids)))
    if rc != 0:
        sys.exit(f"llama_decode returned {rc}")
    with open(os.path.join(outdir, "index.json"), "w") as f:
        json.dump(index, f, indent=0)
    print(f"{len(index)} tensors in {outdir}")


if __name__ == "__main__":
    main()
