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
  4. `tl bench -m T.gguf -p 256 -n 64`: prompt and generation tok/s;
  5. with an importance matrix (`--imatrix`, or `--imatrix-only` to add
     these rows to an earlier run's JSON): `tl imatrix -m base.gguf -f
     CALIBRATION` (README.md: text other than the perplexity text), then per
     low-bit type `tl quantize --imatrix` and llama.cpp's quantizer with the
     same importance values (llama_model_quantize's imatrix array), their
     files compared, and step 3 on tl's (`--imatrix-types T,..` with
     `--imatrix-only`: only those rows, the others kept; `--models`: only
     those models).

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
         "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
         "TQ2_0", "TQ1_0", "MXFP4_MOE", "MXFP4_MOE --pure"]
# The types measured again with an importance matrix (the low-bit ones,
# where it matters; Q2_K_S, IQ3_XS, IQ3_XXS and the IQ2/IQ1 types need one).
IMATRIX_TYPES = ["Q4_K_M", "Q3_K_M", "Q2_K", "Q2_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS",
                 "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
CALIBRATION = os.path.join(ROOT, "README.md")
IMATRIX_CTX = 512
IMATRIX_CHUNKS = 4


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def imatrix_weights(path):
    """quantize.cpp load_imatrix on a GGUF imatrix file: per tensor, the
    sums of squares over each expert's count (1 where a count is 0)."""
    import numpy as np
    from gguf import GGUFReader

    r = GGUFReader(path)
    t = {x.name: np.array(x.data, dtype=np.float32).reshape(-1) for x in r.tensors}
    out = {}
    for name, sums in t.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = t[base + ".counts"]
        ne0 = len(sums) // len(counts)
        w = np.empty_like(sums)
        for j, c in enumerate(counts):
            run_ = slice(j * ne0, (j + 1) * ne0)
            w[run_] = sums[run_] / np.float32(c) if c > 0 else np.float32(1.0)
        out[base] = w
    chunks = int(r.fields["imatrix.chunk_count"].parts[-1][0])
    return out, chunks


def imatrix_rows(args, tl, base, base_lp, model, types=IMATRIX_TYPES, bench=True):
    from make_imatrix_quantize_fixtures import reference_quantize_imatrix

    im = os.path.join(args.work, "imatrix.gguf")
    run([tl, "imatrix", "-m", base, "-f", CALIBRATION, "-o", im, "-c", str(IMATRIX_CTX),
         "--chunks", str(IMATRIX_CHUNKS)])
    weights, chunks = imatrix_weights(im)
    rows = {}
    for ftype in types:
        mine = os.path.join(args.work, f"{ftype}-imatrix.gguf")
        ref = os.path.join(args.work, f"{ftype}-imatrix-ref.gguf")
        run([tl, "quantize", "--imatrix", im, base, mine, ftype])
        reference_quantize_imatrix(base, ref, ftype, weights, im, os.path.basename(CALIBRATION),
                                   chunks)
        same = tensor_data(mine) == tensor_data(ref)
        os.remove(ref)
        r = measure(tl, mine, base_lp, TEXT, args.chunk, bench=bench)
        r["identical_to_llama_cpp"] = same
        rows[ftype] = r
        os.remove(mine)
        print(f"{model} {ftype} imatrix: {r}", file=sys.stderr, flush=True)
    os.remove(im)
    return rows


def tensor_data(path):
    """Every tensor's name, type and bytes: what the quantizers decide (the
    imatrix file name in the metadata differs between the two runs)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    return [(t.name, int(t.tensor_type), bytes(t.data.tobytes())) for t in r.tensors]


def measure(tl, model, base_lp, text, chunk, bench=True):
    out = run([tl, "perplexity", "-m", model, "-f", text, "--chunk", str(chunk),
               "--kl-divergence-base", base_lp])
    ppl = float(re.search(r"perplexity: ([0-9.]+)", out).group(1))
    m = re.search(r"ln\(ppl/base\): ([-+0-9.]+); KL divergence: mean ([0-9.]+), p99 ([0-9.]+), "
                  r"max ([0-9.]+); same top token: ([0-9.]+)%", out)
    pp = tg = None
    if bench:
        bench = json.loads(run([tl, "bench", "-m", model, "-p", "256", "-n", "64", "-r", "2",
                                "--json"]))
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
    ap.add_argument("--imatrix", action="store_true",
                    help="also measure IMATRIX_TYPES with an importance matrix")
    ap.add_argument("--imatrix-only", action="store_true",
                    help="measure only the importance-matrix rows, into the earlier run's JSON")
    ap.add_argument("--imatrix-types",
                    help="with --imatrix-only: comma-separated file types to measure (again) "
                         "with an importance matrix, keeping the JSON's other rows")
    ap.add_argument("--models",
                    help="comma-separated model files to measure (default: all of MODELS)")
    ap.add_argument("--types",
                    help="comma-separated file types to measure again (or add), into the "
                         "earlier run's JSON")
    args = ap.parse_args()
    models = MODELS
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.types:
        with open(args.json) as f:
            d = json.load(f)
        os.makedirs(args.work, exist_ok=True)
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        for model in models:
            base, base_lp = make_base(args, model)
            rows = d["results"][model]
            for ftype in types:
                rows[ftype] = measure_type(args, base, base_lp, model, ftype)
            order = {t: i for i, t in enumerate(TYPES)}
            d["results"][model] = dict(sorted(rows.items(), key=lambda kv: order.get(kv[0], 99)))
            os.remove(base)
            os.remove(base_lp)
        commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
        d["note"] = (f"rows {', '.join(types)} measured {datetime.date.today()}, commit {commit}; "
                     + (d.get("note") or "")).strip("; ")
        with open(args.json, "w") as f:
            json.dump(d, f, indent=1)
            f.write("\n")
        render(args, d["results"], d["commit"], d["date"], d.get("cpu", "unknown CPU"),
               d.get("note"), d)
        return
    if args.render_only or args.imatrix_only:
        with open(args.json) as f:
            d = json.load(f)
        if args.imatrix_only:
            os.makedirs(args.work, exist_ok=True)
            commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
            types = IMATRIX_TYPES
            if args.imatrix_types:
                types = [t.strip() for t in args.imatrix_types.split(",") if t.strip()]
            else:
                d["imatrix"] = {}
            for model in models:
                base, base_lp = make_base(args, model)
                rows = d.setdefault("imatrix", {}).get(model, {})
                rows.update(imatrix_rows(args, args.tl, base, base_lp, model, types))
                order = {t: i for i, t in enumerate(IMATRIX_TYPES)}
                d["imatrix"][model] = dict(sorted(rows.items(),
                                                  key=lambda kv: order.get(kv[0], 99)))
                os.remove(base)
                os.remove(base_lp)
            if args.imatrix_types:
                d["note"] = (f"importance-matrix rows {', '.join(types)} of "
                             f"{', '.join(models)} measured {datetime.date.today()}, commit "
                             f"{commit}; " + (d.get("note") or "")).strip("; ")
            else:
                d["imatrix_commit"] = commit
                d["imatrix_date"] = str(datetime.date.today())
            with open(args.json, "w") as f:
                json.dump(d, f, indent=1)
                f.write("\n")
        render(args, d["results"], d["commit"], d["date"], d.get("cpu", "unknown CPU"),
               d.get("note"), d)
        return
    os.makedirs(args.work, exist_ok=True)
    commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
    results = {}
    with_imatrix = {}
    for model in MODELS:
        base, base_lp = make_base(args, model)
        rows = {}
        for ftype in TYPES:
            rows[ftype] = measure_type(args, base, base_lp, model, ftype)
        results[model] = rows
        if args.imatrix:
            with_imatrix[model] = imatrix_rows(args, args.tl, base, base_lp, model)
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
    d = {"commit": commit, "date": date, "cpu": cpu, "results": results}
    if args.imatrix:
        d.update(imatrix=with_imatrix, imatrix_commit=commit, imatrix_date=date)
    with open(args.json, "w") as f:
        json.dump(d, f, indent=1)
        f.write("\n")
    render(args, results, commit, date, cpu, None, d)


def measure_type(args, base, base_lp, model, ftype):
    """One row of the main table: tl's and llama.cpp's files of `ftype` from
    the base compared, and tl's measured."""
    # A row name may carry llama-quantize flags after the type
    # ("MXFP4_MOE --pure"); both quantizers get them.
    name, *flags = ftype.split()
    mine = os.path.join(args.work, f"{name}.gguf")
    ref = os.path.join(args.work, f"{name}-ref.gguf")
    run([args.tl, "quantize", base, mine, name, *flags])
    reference_quantize(base, ref, name, flags)
    same = sha256_file(mine) == sha256_file(ref)
    os.remove(ref)
    r = measure(args.tl, mine, base_lp, TEXT, args.chunk)
    r["identical_to_llama_cpp"] = same
    os.remove(mine)
    print(f"{model} {ftype}: {r}", file=sys.stderr, flush=True)
    return r


def make_base(args, model):
    """The F16 base of a model and its saved log-probabilities."""
    src = os.path.join(MODEL_DIR, model)
    base = os.path.join(args.work, "base-f16.gguf")
    run([args.tl, "quantize", src, base, "F16", "--allow-requantize"])
    base_lp = os.path.join(args.work, "base.lp")
    run([args.tl, "perplexity", "-m", base, "-f", TEXT, "--chunk", str(args.chunk),
         "--save-logprobs", base_lp])
    return base, base_lp


def speed(x):
    return f"{x:.1f}" if x is not None else "—"


def render(args, results, commit, date, cpu, note=None, d=None):
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
        "it does, llama-quantize's output has these same figures. Speed: `tl bench -p 256 -n 64 "
        "-r 2` (CPU, prompt and generation tok/s, batch 1, tl's default threads: both cores), "
        "measured on a shared 2-core machine, so the speed columns are rough.",
        "",
        "Reading it. The test models are themselves quantized files (Qwen: Q5_0, Q8_0, Q6_K and "
        "Q4_K tensors; Gemma: Q5_0, Q4_K, Q8_0, Q6_K), so the F16 base holds weights that already "
        "lie on those types' grids: a type whose grid contains a tensor's values (Q4_K for a "
        "tensor that was Q4_K, Q5_0 for one that was Q5_0) requantizes it almost losslessly, and "
        "such a type can come out ahead of one with more bits (Q4_K_M against Q5_K_M on Qwen). "
        "On an F16 original the order would follow the bits. The main tables use no importance "
        "matrix; the second table of each model repeats the low-bit types with one.",
        "",
    ]
    im = (d or {}).get("imatrix")
    if im:
        lines += [
            f"With an importance matrix (measured {d.get('imatrix_date')}, commit "
            f"{d.get('imatrix_commit')}): `tl imatrix -m base.gguf -f README.md -c {IMATRIX_CTX} "
            f"--chunks {IMATRIX_CHUNKS}` (calibration text other than the perplexity text), then "
            "`tl quantize --imatrix`; \"= llama.cpp\" compares every tensor's type and bytes with "
            "llama.cpp's quantizer given the same importance values (`llama_model_quantize` with "
            "its imatrix array). \"KL without\" is the same type's mean KL from the main table; "
            "speed as in the main tables (— where a row was measured before these columns "
            "were added).",
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
        if im and model in im:
            lines += [f"With an importance matrix ({model}):", "",
                      "| type | MiB | PPL | ln(PPL/base) | mean KL | KL without | p99 KL | top-1 | = llama.cpp | pp tok/s | tg tok/s |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|"]
            for ftype, r in im[model].items():
                without = rows.get(ftype, {}).get("kl_mean")
                wo = f"{without:.5f}" if without is not None else "—"
                lines.append(
                    f"| {ftype} | {r['size_mib']:.1f} | {r['ppl']:.4f} | {r['ln_ratio']:+.4f} | "
                    f"{r['kl_mean']:.5f} | {wo} | {r['kl_p99']:.4f} | {r['top1']:.2f}% | "
                    f"{'yes' if r['identical_to_llama_cpp'] else 'NO'} | {speed(r.get('pp'))} | "
                    f"{speed(r.get('tg'))} |")
            lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
