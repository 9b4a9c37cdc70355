#!/usr/bin/env python3
"""Per-position comparison of tl's logits with the llama.cpp fixtures.

For each fixture case, runs `examples/dump_logits` (all logits of prompt +
reference continuation, one batch) and prints the largest |logit difference|
on the reference top-5 with its position, the mean, and the positions where
the top-1 differs (with the reference's top-2 margin there).

    cargo build --release -p tl-model --example dump_logits
    python3 scripts/compare_forward.py qwen|gemma

Needs only numpy (the fixtures hold the reference logits). With
TL_DUMP_ONE_BY_ONE=1 in the environment, tl's logits come from one token
per forward call (the decode path) instead of one batch. `qwen_portable`
or `gemma_portable` compares with the portable llama.cpp build's fixtures;
with TL_NUMERICS=reference tl runs its reference numerics (every
difference is then 0).
"""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.environ.get(
    "TL_MODEL_DIR",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tensorlogic", "models"),
)
DUMP = os.path.join(ROOT, "target", "release", "examples", "dump_logits")


def main():
    key = sys.argv[1]
    fx = json.load(open(os.path.join(ROOT, "crates", "tl-model", "tests", "fixtures", f"forward_{key}.json")))
    path = os.path.join(MODEL_DIR, fx["model"])
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tl_logits_{key}.bin")
    n_all = n_dis = 0
    total = 0.0
    worst = (0.0, None)
    for ci, case in enumerate(fx["cases"]):
        ids = case["prompt_ids"] + case["greedy"]
        subprocess.run([DUMP, path, out, ",".join(map(str, ids))], check=True)
        ours = np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)
        ds, dis = [], []
        for i, row in enumerate(case["teacher_forced_top"]):
            d = float(np.abs(ours[i][row["ids"]] - np.array(row["logits"])).max())
            ds.append(d)
            if int(np.argmax(ours[i])) != row["ids"][0]:
                dis.append((i, round(row["logits"][0] - row["logits"][1], 3)))
        j = int(np.argmax(ds))
        if ds[j] > worst[0]:
            worst = (ds[j], (ci, j))
        n_all += len(ds)
        n_dis += len(dis)
        total += sum(ds)
        print(f"case {ci}: prompt {len(case['prompt_ids'])} tokens, max {ds[j]:.3f} at {j}, mean {np.mean(ds):.3f}, top-1 differs at (position, ref margin) {dis}")
    print(f"{key}: top-1 differs at {n_dis}/{n_all}; mean {total / n_all:.3f}; largest {worst[0]:.3f} at (case, position) {worst[1]}")


if __name__ == "__main__":
    main()
