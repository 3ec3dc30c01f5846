"""Charts as server-side SVG (no script, no library): the funnel's steps as horizontal bars,
and the steps by day as grouped columns. Every chart has a title and a description for screen
readers, and the page shows the same numbers in a table."""

from __future__ import annotations

from html import escape
from typing import Any

from markupsafe import Markup

# Colour-blind-safe (Okabe-Ito), each at least 3:1 against white.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#8C6D00", "#56606B", "#7A3E9D")


def funnel_bars(steps: list[tuple[str, int]], *, chart_id: str, title: str) -> Markup:
    """One horizontal bar per step, its count and its share of the first step."""
    width, row, label_w = 640, 34, 190
    height = row * len(steps) + 10
    top = max((n for _, n in steps), default=0) or 1
    first = steps[0][1] if steps else 0
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="{chart_id}-t {chart_id}-d" preserveAspectRatio="xMinYMin meet">',
             f'<title id="{chart_id}-t">{escape(title)}</title>',
             f'<desc id="{chart_id}-d">'
             + escape("; ".join(f"{name}: {n}" for name, n in steps)) + "</desc>"]
    for i, (name, n) in enumerate(steps):
        y = 5 + i * row
        bar = int((width - label_w - 120) * n / top)
        share = f"{100 * n / first:.0f}%" if first else "-"
        parts.append(f'<text x="0" y="{y + 21}" class="axis">{escape(name)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 4}" width="{max(bar, 1)}" height="{row - 10}" '
                     f'fill="{PALETTE[0]}"></rect>')
        parts.append(f'<text x="{label_w + bar + 8}" y="{y + 21}" class="value">{n} ({share})</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def columns_by_day(days: list[str], series: list[tuple[str, list[int]]], *, chart_id: str, title: str) -> Markup:
    """Grouped columns: for each day, one column per series, with a legend."""
    width, height, left, bottom, top_pad = 720, 260, 44, 40, 10
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    top = max((v for _, values in series for v in values), default=0) or 1
    group_w = plot_w / max(len(days), 1)
    bar_w = max(group_w * 0.8 / max(len(series), 1), 1.0)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height + 24 * ((len(series) + 3) // 4)}" role="img" '
             f'aria-labelledby="{chart_id}-t {chart_id}-d" preserveAspectRatio="xMinYMin meet">',
             f'<title id="{chart_id}-t">{escape(title)}</title>',
             f'<desc id="{chart_id}-d">' + escape("; ".join(
                 f"{day}: " + ", ".join(f"{name} {values[i]}" for name, values in series)
                 for i, day in enumerate(days))) + "</desc>",
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{width - 10}" y2="{top_pad + plot_h}" '
             'stroke="#464c55"></line>',
             f'<text x="{left - 6}" y="{top_pad + 10}" class="axis" text-anchor="end">{top}</text>',
             f'<text x="{left - 6}" y="{top_pad + plot_h}" class="axis" text-anchor="end">0</text>']
    label_every = max(1, len(days) // 8)
    for d, day in enumerate(days):
        x0 = left + d * group_w + group_w * 0.1
        for s, (_, values) in enumerate(series):
            h = plot_h * values[d] / top
            parts.append(f'<rect x="{x0 + s * bar_w:.1f}" y="{top_pad + plot_h - h:.1f}" width="{bar_w:.1f}" '
                         f'height="{max(h, 0):.1f}" fill="{PALETTE[s % len(PALETTE)]}"></rect>')
        if d % label_every == 0:
            parts.append(f'<text x="{left + d * group_w + group_w / 2:.1f}" y="{top_pad + plot_h + 18}" '
                         f'class="axis" text-anchor="middle">{escape(day[5:])}</text>')
    for s, (name, _) in enumerate(series):
        x, y = left + (s % 4) * 165, height + 4 + 24 * (s // 4)
        parts.append(f'<rect x="{x}" y="{y}" width="14" height="14" fill="{PALETTE[s % len(PALETTE)]}"></rect>')
        parts.append(f'<text x="{x + 20}" y="{y + 12}" class="axis">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def as_int(value: Any) -> int:
    return int(value or 0)
