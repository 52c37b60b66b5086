#!/usr/bin/env python3
"""Draws benches/netns.sh's table as an SVG chart (no plotting library needed): TCP Gbit/s
through the tunnel, and ping RTT median/p99 while TCP fills the link, one bar group per
implementation. usage: chart.py TABLE.txt OUT.svg [title]"""
import sys

rows = []
with open(sys.argv[1]) as f:
    header = f.readline().split()
    for line in f:
        cells = line.split()
        if len(cells) == len(header):
            rows.append(dict(zip(header, cells)))
title = sys.argv[3] if len(sys.argv) > 3 else "Head-to-head"


def num(v):
    try:
        return float(v)
    except ValueError:
        return 0.0


W, row_h, left = 900, 30, 190
panel_w = (W - left - 40) // 2
H = 90 + row_h * len(rows) + 40
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="10" y="22" font-size="15" font-weight="bold">{title}</text>']
panels = [("TCP through the tunnel, Gbit/s (higher is better)", "tcp_Gbps", None, "#2b6cb0"),
          ("ping RTT under TCP load, ms: median, p99 (lower is better)", "load_med_us", "load_p99_us", "#c05621")]
for p, (label, key, key2, colour) in enumerate(panels):
    x0 = left + p * (panel_w + 20)
    values = [num(r.get(key, "0")) for r in rows] + [num(r.get(key2, "0")) for r in rows if key2]
    top = max(values + [1e-9])
    scale = (panel_w - 60) / top
    out.append(f'<text x="{x0}" y="50">{label}</text>')
    for i, r in enumerate(rows):
        y = 70 + i * row_h
        v = num(r.get(key, "0"))
        if key2:
            v2 = num(r.get(key2, "0"))
            out.append(f'<rect x="{x0}" y="{y}" width="{v2 * scale:.1f}" height="{row_h - 8}" fill="{colour}" opacity="0.35"/>')
            out.append(f'<rect x="{x0}" y="{y}" width="{v * scale:.1f}" height="{row_h - 8}" fill="{colour}"/>')
            out.append(f'<text x="{x0 + max(v, v2) * scale + 4:.1f}" y="{y + 16}">{v / 1000:.2f} / {v2 / 1000:.2f}</text>')
        else:
            out.append(f'<rect x="{x0}" y="{y}" width="{v * scale:.1f}" height="{row_h - 8}" fill="{colour}"/>')
            out.append(f'<text x="{x0 + v * scale + 4:.1f}" y="{y + 16}">{v:.2f}</text>')
        if p == 0:
            out.append(f'<text x="10" y="{y + 16}">{r["impl"]}</text>')
out.append(f'<text x="10" y="{H - 12}" fill="#555">{sys.argv[1]}</text>')
out.append('</svg>')
with open(sys.argv[2], "w") as f:
    f.write("\n".join(out) + "\n")
