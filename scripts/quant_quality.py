#!/usr/bin/env python3
"""The quantization quality and speed table: docs/QUANTIZATION.md.

For each test model:
  1. base = `tl quantize MODEL base.gguf F16 --allow-requantize`: an F16 file
     dequantized from the original (the original's function, up to F16
     rounding of the dequantized weights); every type is quantized from it;
  2. per file type: `tl quantize base.gguf T.gguf TYPE`, and llama.cpp's
     quantizer (llama-cpp-python's llama_model_quantize) on the same input
     and type: the table says whether the two files are byte-identical;
  3. `tl perplexity -m T.gguf -f TEXT --kl-divergence-base base.lp`, where
     base.lp holds the base's log-probabilities (`tl perplexity -m base.gguf
     --save-logprobs base.lp`, run once): perplexity, ln(PPL/PPL_base), mean
     and p99 KL divergence from the base, top-1 agreement;
  4. `tl bench -m T.gguf -p 256 -n 64`: prompt and generation tok/s.

Run with the reference environment (llama-cpp-python as ../shared/MODELS.md
builds it):
  ~/.cache/tensorlogic/venv/bin/python scripts/quant_quality.py --tl target/release/tl
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

from llama_quantize_ref import reference_quantize, sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.environ.get("TL_MODEL_DIR", os.path.expanduser("~/.cache/tensorlogic/models"))
TEXT = os.path.join(ROOT, "crates", "tl-model", "tests", "fixtures", "kv_ppl_text.txt")
MODELS = ["qwen2.5-coder-0.5b-instruct-q4.gguf", "gemma-3-270m-q4_k_m.gguf"]
# The file types of the table (Q2_K_S is left out: it needs an importance
# matrix; F32 would repeat F16).
TYPES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M",
         "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def measure(tl, model, base_lp, text, chunk):
    out = run([tl, "perplexity", "-m", model, "-f", text, "--chunk", str(chunk),
               "--kl-divergence-base", base_lp])
    ppl = float(re.search(r"perplexity: ([0-9.]+)", out).group(1))
    m = re.search(r"ln\(ppl/base\): ([-+0-9.]+); KL divergence: mean ([0-9.]+), p99 ([0-9.]+), "
                  r"max ([0-9.]+); same top token: ([0-9.]+)%", out)
    bench = json.loads(run([tl, "bench", "-m", model, "-p", "256", "-n", "64", "-r", "2", "--json"]))
    pp = next(b["tokens_per_s"] for b in bench if b["test"].startswith("pp"))
    tg = next(b["tokens_per_s"] for b in bench if b["test"].startswith("tg"))
    return {"ppl": ppl, "ln_ratio": float(m.group(1)), "kl_mean": float(m.group(2)),
            "kl_p99": float(m.group(3)), "kl_max": float(m.group(4)), "top1": float(m.group(5)),
            "size_mib": os.path.getsize(model) / 2**20, "pp": pp, "tg": tg}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tl", default=os.path.join(ROOT, "target", "release", "tl"))
    ap.add_argument("--work", default="/tmp/tl-quant-quality")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "QUANTIZATION.md"))
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "quantization.json"))
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the Markdown from the JSON of an earlier run")
    args = ap.parse_args()
    if args.render_only:
        with open(args.json) as f:
            d = json.load(f)
        render(args, d["results"], d["commit"], d["date"], d.get("cpu", "unknown CPU"), d.get("note"))
        return
    os.makedirs(args.work, exist_ok=True)
    commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
    results = {}
    for model in MODELS:
        src = os.path.join(MODEL_DIR, model)
        base = os.path.join(args.work, "base-f16.gguf")
        run([args.tl, "quantize", src, base, "F16", "--allow-requantize"])
        base_lp = os.path.join(args.work, "base.lp")
        run([args.tl, "perplexity", "-m", base, "-f", TEXT, "--chunk", str(args.chunk),
             "--save-logprobs", base_lp])
        rows = {}
        for ftype in TYPES:
            mine = os.path.join(args.work, f"{ftype}.gguf")
            ref = os.path.join(args.work, f"{ftype}-ref.gguf")
            run([args.tl, "quantize", base, mine, ftype])
            reference_quantize(base, ref, ftype)
            same = sha256_file(mine) == sha256_file(ref)
            os.remove(ref)
            r = measure(args.tl, mine, base_lp, TEXT, args.chunk)
            r["identical_to_llama_cpp"] = same
            rows[ftype] = r
            os.remove(mine)
            print(f"{model} {ftype}: {r}", file=sys.stderr, flush=True)
        results[model] = rows
        os.remove(base)
        os.remove(base_lp)
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu = f"{cpu}, {os.cpu_count()} threads ({platform.machine()})"
    date = str(datetime.date.today())
    with open(args.json, "w") as f:
        json.dump({"commit": commit, "date": date, "cpu": cpu, "results": results}, f, indent=1)
        f.write("\n")
    render(args, results, commit, date, cpu)


def render(args, results, commit, date, cpu, note=None):
    lines = [
        "# Quantization: quality and speed per type",
        "",
        f"Produced by `scripts/quant_quality.py` on {date}, commit {commit}, "
        f"{cpu}. Raw figures: "
        "`docs/quantization.json`.",
        "",
        "Method. Each test model is first written as F16 (`tl quantize MODEL base.gguf F16 "
        "--allow-requantize`: its weights dequantized, so the base computes the original's "
        "function up to F16 rounding), and every type is quantized from that base, without an "
        "importance matrix. Perplexity is llama.cpp's (non-overlapping chunks of "
        f"{args.chunk}, the second half of each scored) on "
        "`crates/tl-model/tests/fixtures/kv_ppl_text.txt`; KL is KL(base ‖ type) of the "
        "next-token distributions at the same positions (`tl perplexity "
        "--kl-divergence-base` against the base's saved log-probabilities), in nats; top-1 is how often both models' most likely token "
        "agree. \"= llama.cpp\" says whether llama.cpp's quantizer (`llama_model_quantize`, "
        "llama-cpp-python 0.3.36) writes the very same file from the same base and type — when "
        "it does, llama-quantize's output has these same figures. Speed: `tl bench -p 256 -n 64` "
        "(CPU, prompt and generation tok/s, batch 1).",
        "",
        "Reading it. The test models are themselves quantized files (Qwen: Q5_0, Q8_0, Q6_K and "
        "Q4_K tensors; Gemma: Q5_0, Q4_K, Q8_0, Q6_K), so the F16 base holds weights that already "
        "lie on those types' grids: a type whose grid contains a tensor's values (Q4_K for a "
        "tensor that was Q4_K, Q5_0 for one that was Q5_0) requantizes it almost losslessly, and "
        "such a type can come out ahead of one with more bits (Q4_K_M against Q5_K_M on Qwen). "
        "On an F16 original the order would follow the bits. No importance matrix is used "
        "(`tl imatrix` is not written yet), so the low-bit rows are the no-imatrix figures.",
        "",
    ]
    if note:
        lines += [note, ""]
    for model, rows in results.items():
        base = rows["F16"]["ppl"]
        lines += [f"## {model}", "", f"Base (F16) perplexity {base:.4f}.", "",
                  "| type | MiB | PPL | ln(PPL/base) | mean KL | p99 KL | top-1 | = llama.cpp | pp tok/s | tg tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---:|"]
        for ftype, r in rows.items():
            lines.append(
                f"| {ftype} | {r['size_mib']:.1f} | {r['ppl']:.4f} | {r['ln_ratio']:+.4f} | "
                f"{r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {r['top1']:.2f}% | "
                f"{'yes' if r['identical_to_llama_cpp'] else 'NO'} | {r['pp']:.1f} | {r['tg']:.1f} |")
        lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
