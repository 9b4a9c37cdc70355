#!/usr/bin/env python3
"""Plots `scripts/loadtest.py --json` results of several servers against
concurrency: output tokens/s (left) and p99 inter-token latency (right), as
one SVG. Standard library only.

  scripts/plot_load.py tl=load-tl.json llama-server=load-llama.json -o docs/load.svg --title "..."
"""
import argparse
import json
import math

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def panel(x0, y0, w, h, series, key, scale, ylabel, xs):
    out = []
    ymax = max((r[key] * scale for _, rs in series for r in rs if not math.isnan(r[key])), default=1) * 1.1
    lx = [math.log2(x) for x in xs]
    xmin, xmax = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

    def px(x):
        return x0 + (math.log2(x) - xmin) / (xmax - xmin) * w

    def py(y):
        return y0 + h - y / ymax * h

    out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
    for i in range(6):
        v = ymax * i / 5
        y = py(v)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:,.0f}</text>')
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{y0 + h + 16}" font-size="11" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 34}" font-size="12" text-anchor="middle">concurrent streams</text>')
    out.append(f'<text x="{x0}" y="{y0 - 8}" font-size="13">{ylabel}</text>')
    for i, (name, rs) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        pts = [(px(r["clients"]), py(r[key] * scale)) for r in rs if not math.isnan(r[key])]
        out.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                   % (c, " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)))
        for a, b in pts:
            out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>')
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("series", nargs="+", help="NAME=FILE.json")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    series = []
    for s in a.series:
        name, path = s.split("=", 1)
        with open(path) as f:
            series.append((name, json.load(f)["results"]))
    xs = sorted({r["clients"] for _, rs in series for r in rs})
    W, H = 900, 380
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" font-size="15" text-anchor="middle">{a.title}</text>']
    svg += panel(80, 60, 340, 250, series, "tok_per_s", 1.0, "output tokens/s", xs)
    svg += panel(530, 60, 340, 250, series, "itl_p99_s", 1000.0, "p99 inter-token latency (ms)", xs)
    for i, (name, _) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        svg.append(f'<rect x="{90 + i * 160}" y="{H - 22}" width="12" height="12" fill="{c}"/>')
        svg.append(f'<text x="{108 + i * 160}" y="{H - 12}" font-size="12">{name}</text>')
    svg.append("</svg>")
    with open(a.out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
