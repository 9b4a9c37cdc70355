#!/usr/bin/env python3
"""Decode tokens/s against batch size and threads, from `tl bench --json`,
drawn as an SVG (standard library only).

    python3 scripts/plot_batch.py MODEL.gguf [-o docs/batch_scaling.svg]
        [--batch 1,2,4,8,16] [--threads 1,2] [-n 32] [-r 2]

Each thread count runs in its own `tl bench` process (the pool size is
fixed per process); every batch size decodes `-n` steps of that many
sequences together. The table is printed as well.
"""
import argparse
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TL = os.path.join(ROOT, "target", "release", "tl")
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def measure(model, threads, batches, n, reps):
    out = subprocess.run(
        [TL, "bench", "-m", model, "-p", "16", "-n", str(n), "-r", str(reps), "-t", str(threads),
         "--batch", ",".join(map(str, batches)), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = [r for r in json.loads(out) if r["test"].startswith("tg")]
    return {r["batch"]: (r["tokens_per_s"], r["stddev"]) for r in rows}, rows[0]["model"]


def svg(series, batches, title, path):
    w, h, left, right, top, bottom = 640, 420, 70, 150, 40, 60
    ymax = max(v for s in series.values() for v, _ in s.values()) * 1.1
    xs = {b: left + (w - left - right) * i / max(1, len(batches) - 1) for i, b in enumerate(batches)}
    y = lambda v: top + (h - top - bottom) * (1 - v / ymax)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    for i in range(6):
        v = ymax * i / 5
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    for b, x in xs.items():
        parts.append(f'<text x="{x:.1f}" y="{h - bottom + 18}" text-anchor="middle">{b}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 15}" text-anchor="middle">sequences decoded together (batch)</text>')
    parts.append(f'<text x="18" y="{(top + h - bottom) / 2}" text-anchor="middle" transform="rotate(-90 18 {(top + h - bottom) / 2})">generated tokens/s (all sequences)</text>')
    for i, (label, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        pts = " ".join(f"{xs[b]:.1f},{y(s[b][0]):.1f}" for b in batches if b in s)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        for b in batches:
            if b in s:
                parts.append(f'<circle cx="{xs[b]:.1f}" cy="{y(s[b][0]):.1f}" r="3.5" fill="{c}"/>')
        ly = top + 20 * i + 10
        parts.append(f'<line x1="{w - right + 15}" x2="{w - right + 40}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        parts.append(f'<text x="{w - right + 46}" y="{ly + 4}">{label}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-o", default=os.path.join(ROOT, "docs", "batch_scaling.svg"))
    ap.add_argument("--batch", default="1,2,4,8,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=2)
    a = ap.parse_args()
    batches = [int(x) for x in a.batch.split(",")]
    series, name = {}, ""
    print("| threads | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("| ---: | " + " | ".join("---:" for _ in batches) + " |")
    for t in [int(x) for x in a.threads.split(",")]:
        s, name = measure(a.model, t, batches, a.n, a.r)
        series[f"{t} thread{'s' if t > 1 else ''}"] = s
        print(f"| {t} | " + " | ".join(f"{s[b][0]:.1f} ± {s[b][1]:.1f}" for b in batches) + " |")
    svg(series, batches, f"{name}: decode throughput vs batch size", a.o)
    print(f"wrote {a.o}")


if __name__ == "__main__":
    main()
