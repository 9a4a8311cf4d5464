"""Inline SVG line charts for the HTML reports: no image files, no plotting library, readable offline."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    color: str = PALETTE[0]
    width: float = 1.5
    opacity: float = 1.0
    dashed: bool = False
    markers: bool = False
    errs: list[float | None] | None = None  # standard errors: a bar of +- err at each point that has one
    line: bool = True  # False: points only (a metric measured a few times is not a curve)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """log10 of round values between 10^lo and 10^hi: the powers of ten, or 1-2-5 steps within a decade or two."""
    decades = range(math.floor(lo), math.ceil(hi) + 1)
    steps = (1,) if hi - lo >= 2 else (1, 2, 5)
    return [math.log10(m) + k for k in decades for m in steps if lo <= math.log10(m) + k <= hi]


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


class Frame:
    """The plot area of one chart: data ranges mapped to pixels, with the axes, ticks, grid and labels drawn."""

    left, right, top, bottom = 64, 16, 28, 44

    def __init__(self, width: int, height: int, xs: list[float], ys: list[float], log_x: bool = False,
                 pad_x: bool = False) -> None:
        self.pw, self.ph = width - self.left - self.right, height - self.top - self.bottom
        self.log_x = log_x and min(xs) > 0
        xs = [math.log10(x) for x in xs] if self.log_x else xs
        self.x0, self.x1 = min(xs), max(xs)
        self.y0, self.y1 = min(ys), max(ys)
        pad = (self.y1 - self.y0) * 0.05 or abs(self.y0) * 0.05 or 1.0
        self.y0, self.y1 = self.y0 - pad, self.y1 + pad
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        if pad_x:  # points and error bars clear of the frame
            margin = (self.x1 - self.x0) * 0.05
            self.x0, self.x1 = self.x0 - margin, self.x1 + margin

    def px(self, x: float) -> float:
        x = math.log10(x) if self.log_x else x
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.pw

    def py(self, y: float) -> float:
        return self.top + (1 - (y - self.y0) / (self.y1 - self.y0)) * self.ph

    def axes(self, width: int, height: int, xlabel: str, ylabel: str) -> list[str]:
        left, top, pw, ph = self.left, self.top, self.pw, self.ph
        parts = []
        for t in nice_ticks(self.y0, self.y1):
            if self.y0 <= t <= self.y1:
                y = self.py(t)
                parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                             f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
        for t in log_ticks(self.x0, self.x1) if self.log_x else nice_ticks(self.x0, self.x1, 6):
            if self.x0 <= t <= self.x1:  # on a log axis: ticks at log10(x), labelled with x
                x = left + (t - self.x0) / (self.x1 - self.x0) * pw
                parts.append(f'<line y1="{top}" y2="{top + ph}" x1="{x:.1f}" x2="{x:.1f}" class="grid"/>'
                             f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">'
                             f'{fmt(round(10 ** t, 9) if self.log_x else t)}</text>')
        parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
        parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
        if ylabel:
            parts.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
                         f'{html.escape(ylabel)}</text>')
        return parts

    def legend(self, entries: list[tuple[str, str, bool]]) -> list[str]:
        """(label, color, dashed) entries in the top right corner."""
        parts = []
        for i, (label, color, dashed) in enumerate(entries):
            y = self.top + 12 + 16 * i
            x = self.left + self.pw
            dash = ' stroke-dasharray="6 4"' if dashed else ""
            parts.append(f'<line x1="{x - 170}" x2="{x - 150}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" '
                         f'stroke-width="2"{dash}/><text x="{x - 144}" y="{y}">{html.escape(label)}</text>')
        return parts


def _open(title: str, width: int, height: int) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" class="chart" role="img" aria-label="{html.escape(title)}">',
            f'<text x="{width / 2}" y="18" text-anchor="middle" class="title">{html.escape(title)}</text>']


def line_chart(series: list[Series], title: str, xlabel: str = "step", ylabel: str = "",
               width: int = 640, height: int = 300, log_x: bool = False) -> str:
    """An <svg> with axes, round ticks, a grid, the lines (points with standard-error bars where a series has
    `errs`) and a legend; empty series are skipped. Each series is one `<g class="series">`."""
    series = [s for s in series if s.xs]
    parts = _open(title, width, height)
    if not series:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys]
    ys += [y + sign * e for s in series for y, e in zip(s.ys, s.errs or ()) if e is not None for sign in (-1, 1)]
    f = Frame(width, height, xs, ys, log_x, pad_x=any(s.errs or not s.line for s in series))
    parts += f.axes(width, height, xlabel, ylabel)
    for s in series:
        parts.append(f'<g class="series" data-label="{html.escape(s.label)}">')
        points = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in zip(s.xs, s.ys))
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        if s.line:
            parts.append(f'<polyline points="{points}" fill="none" stroke="{s.color}" stroke-width="{s.width}" '
                         f'stroke-opacity="{s.opacity}"{dash}/>')
        for x, y, e in zip(s.xs, s.ys, s.errs or ()):
            if e is None:
                continue
            cx, lo, hi = f.px(x), f.py(y - e), f.py(y + e)
            parts.append(f'<path d="M{cx:.1f},{lo:.1f}V{hi:.1f}M{cx - 4:.1f},{lo:.1f}h8M{cx - 4:.1f},{hi:.1f}h8" '
                         f'stroke="{s.color}" stroke-width="1.2" class="errbar"/>')
        if s.markers or not s.line or s.errs or len(s.xs) == 1:
            parts += [f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3" fill="{s.color}"/>'
                      for x, y in zip(s.xs, s.ys)]
        parts.append("</g>")
    if len(series) > 1:  # one series: the title says what it is
        parts += f.legend([(s.label, s.color, s.dashed) for s in series])
    parts.append("</svg>")
    return "".join(parts)


def stacked_area_chart(xs: list[float], shares: dict[str, list[float]], title: str, xlabel: str = "step",
                       ylabel: str = "share", width: int = 640, height: int = 300) -> str:
    """Shares (summing to 1 at each x) stacked from the bottom, one filled band per label; the top edge of each
    band is a `<polyline>` inside its `<g class="series">`, so its share over x can be read back."""
    parts = _open(title, width, height)
    f = Frame(width, height, xs, [0.0, 1.0])
    f.y0, f.y1 = 0.0, 1.0
    parts += f.axes(width, height, xlabel, ylabel)
    below = [0.0] * len(xs)
    entries = []
    for i, (label, values) in enumerate(shares.items()):
        color = PALETTE[i % len(PALETTE)]
        above = [b + v for b, v in zip(below, values)]
        top = [f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in zip(xs, above)]
        bottom = [f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in zip(reversed(xs), reversed(below))]
        parts.append(f'<g class="series" data-label="{html.escape(label)}">'
                     f'<polygon points="{" ".join(top + bottom)}" fill="{color}" fill-opacity="0.55"/>'
                     f'<polyline points="{" ".join(top)}" fill="none" stroke="{color}" stroke-width="1.5"/></g>')
        entries.append((label, color, False))
        below = above
    parts += f.legend(entries)
    parts.append("</svg>")
    return "".join(parts)

