#!/usr/bin/env python3
"""Draw a `pykvm run --memory-log` timeline: one panel per node, size / committed / host memory over time.

    python3 scripts/memory_chart.py memory.jsonl -o memory.svg     (or memory.png with matplotlib)

Each panel shows the node's size (what the guest may use), its committed memory (from the
guest's reports), the host memory its memfds really hold, and a marker for every balancer
decision (B balloon, U un-balloon, H hot-add). Writes a PNG with matplotlib when it is
installed and the output ends in .png; otherwise an SVG drawn here, so no new dependency.
"""

from __future__ import annotations

import argparse
import json
import sys
from html import escape

MIB = 1 << 20
SERIES = (("size", "#1f77b4", "size"), ("committed", "#2ca02c", "committed"), ("host_bytes", "#d62728", "host memory"))
MARKS = {"balloon": ("B", "#9467bd"), "unballoon": ("U", "#8c564b"), "hotadd": ("H", "#ff7f0e")}


def load(path: str) -> dict[int, dict]:
    """Per node: {"t": [...], series name: [(t, MiB)], "marks": [(t, letter, colour)]}."""
    nodes: dict[int, dict] = {}
    for line in open(path, encoding="utf-8"):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        n = e.get("node")
        if not isinstance(n, int) or not isinstance(e.get("t"), (int, float)):
            continue
        d = nodes.setdefault(n, {"size": [], "committed": [], "host_bytes": [], "marks": []})
        t = float(e["t"])
        if isinstance(e.get("size"), int):
            d["size"].append((t, e["size"] / MIB))
        if isinstance(e.get("host_bytes"), int):
            d["host_bytes"].append((t, e["host_bytes"] / MIB))
        if e.get("event") == "report" and isinstance(e.get("committed"), int):
            d["committed"].append((t, e["committed"] * 4096 / MIB))
        if e.get("event") in MARKS:
            d["marks"].append((t, *MARKS[e["event"]]))
    return nodes


def svg(nodes: dict[int, dict], title: str) -> str:
    """The chart as SVG text."""
    w, ph, pad_l, pad_r, pad_t, gap = 900, 220, 70, 150, 40, 50
    h = pad_t + len(nodes) * (ph + gap) + 10
    ts = [t for d in nodes.values() for k in ("size", "committed", "host_bytes") for t, _ in d[k]] or [0.0, 1.0]
    t0, t1 = min(ts), max(max(ts), min(ts) + 1e-3)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="16">{escape(title)}</text>']
    for i, (n, d) in enumerate(sorted(nodes.items())):
        y0 = pad_t + i * (ph + gap)
        vals = [v for k in ("size", "committed", "host_bytes") for _, v in d[k]] or [1.0]
        vmax = max(vals) * 1.1 or 1.0
        x = lambda t: pad_l + (t - t0) / (t1 - t0) * (w - pad_l - pad_r)  # noqa: E731
        y = lambda v: y0 + ph - v / vmax * ph  # noqa: E731
        out.append(f'<rect x="{pad_l}" y="{y0}" width="{w - pad_l - pad_r}" height="{ph}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{pad_l}" y="{y0 - 6}" font-size="14">node {n}</text>')
        for k in range(5):
            v = vmax * k / 4
            out.append(f'<text x="{pad_l - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f} MiB</text>')
            out.append(f'<line x1="{pad_l}" x2="{w - pad_r}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        for k in range(6):
            t = t0 + (t1 - t0) * k / 5
            out.append(f'<text x="{x(t):.1f}" y="{y0 + ph + 16}" text-anchor="middle">{t:.1f}s</text>')
        for key, colour, label in SERIES:
            pts = d[key]
            if not pts:
                continue
            path, last = [], None
            for t, v in pts:                       # steps: a value holds until the next one
                if last is not None:
                    path.append(f"{x(t):.1f},{y(last):.1f}")
                path.append(f"{x(t):.1f},{y(v):.1f}")
                last = v
            path.append(f"{x(t1):.1f},{y(last):.1f}")
            dash = ' stroke-dasharray="6,4"' if key == "host_bytes" else ""   # committed often lies under it
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{" ".join(path)}"/>')
        for t, letter, colour in d["marks"]:
            out.append(f'<text x="{x(t):.1f}" y="{y0 + 12}" fill="{colour}" text-anchor="middle" '
                       f'font-weight="bold">{letter}</text>')
        for j, (key, colour, label) in enumerate(SERIES):
            ly = y0 + 20 + j * 18
            out.append(f'<line x1="{w - pad_r + 10}" x2="{w - pad_r + 30}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                       f'stroke-width="3"/><text x="{w - pad_r + 36}" y="{ly + 4}">{label}</text>')
        ly = y0 + 20 + len(SERIES) * 18
        out.append(f'<text x="{w - pad_r + 10}" y="{ly + 4}">B balloon U unballoon</text>')
        out.append(f'<text x="{w - pad_r + 10}" y="{ly + 22}">H hot-add</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def png(nodes: dict[int, dict], title: str, path: str) -> None:
    """The same chart with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(nodes), 1, figsize=(10, 2.8 * len(nodes)), sharex=True, squeeze=False)
    for ax, (n, d) in zip(axes[:, 0], sorted(nodes.items())):
        for key, colour, label in SERIES:
            if d[key]:
                ax.step(*zip(*d[key]), where="post", color=colour, label=label)
        for t, letter, colour in d["marks"]:
            ax.annotate(letter, (t, 1), xycoords=("data", "axes fraction"), color=colour, ha="center", va="top")
        ax.set_ylabel(f"node {n} (MiB)")
        ax.legend(loc="upper left", fontsize="small")
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    """Read the log, write the chart."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("-o", "--output", default="memory.svg")
    ap.add_argument("--title", default="pykvm dynamic memory per node")
    args = ap.parse_args(argv)
    nodes = load(args.log)
    if not nodes:
        print(f"{args.log}: no node events", file=sys.stderr)
        return 1
    if args.output.endswith(".png"):
        try:
            png(nodes, args.title, args.output)
            return 0
        except ImportError:
            args.output = args.output[:-4] + ".svg"
            print(f"matplotlib is not installed: writing {args.output} instead", file=sys.stderr)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(svg(nodes, args.title))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
