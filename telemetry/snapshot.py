"""The Grafana dashboard drawn as a PNG straight from Prometheus, without a Grafana server.

    python -m telemetry.snapshot --prometheus http://127.0.0.1:9090 --start UNIX --end UNIX \\
        --out docs/images/dashboard.png [--dashboard deploy/grafana/fmrl-dashboard.json] [--step 5]

Each panel of the dashboard JSON (title, gridPos on Grafana's 24-column grid, targets' expr
and legendFormat, fieldConfig.defaults.unit) is queried through ``/api/v1/query_range`` over
[start, end] and every returned series drawn as a line, so a run's dashboard can go into a
report or a README as it looked, from the same queries a Grafana would run. Only the
standard library talks to Prometheus; matplotlib draws.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "fmrl-dashboard.json"
HIDDEN_LABELS = {"__name__", "job", "instance"}
BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
# inches per grid unit (Grafana: 24 columns, rows of 30 px) and for the title line
UNIT_W, UNIT_H, TITLE_H = 0.85, 0.36, 0.8
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]


def prometheus_api(prometheus_url: str, path: str, **params: object) -> dict:
    """``/api/v1/<path>``'s ``data`` (a GET with ``params``); a refused query raises, with Prometheus's reason."""
    url = f"{prometheus_url.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # a bad query: Prometheus explains in the body
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {params.get('query', path)!r}: {body.get('errorType')}: "
                           f"{body.get('error')}")
    return body["data"]


def query_range(prometheus_url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """The ``result`` of a range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
    return prometheus_api(prometheus_url, "query_range", query=expr, start=start, end=end, step=step)["result"]


def legend(metric: dict[str, str], legend_format: str | None, expr: str) -> str:
    if legend_format:
        return re.sub(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", lambda m: metric.get(m[1], ""), legend_format)
    shown = {k: v for k, v in metric.items() if k not in HIDDEN_LABELS}
    if shown:
        return ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
    return metric.get("__name__", expr)


def _layout(panels: list[dict]) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) per panel: its gridPos, or 3 columns in panel order if any lacks one."""
    if all("gridPos" in p for p in panels):
        return [tuple(int(p["gridPos"].get(k, d)) for k, d in (("x", 0), ("y", 0), ("w", 8), ("h", 8)))
                for p in panels]
    return [(8 * (i % 3), 8 * (i // 3), 8, 8) for i in range(len(panels))]


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Panels with queries, including those inside collapsed rows."""
    out = []
    for p in dashboard.get("panels", []):
        out += [p] if p.get("targets") else [q for q in p.get("panels", []) if q.get("targets")]
    return out


def _line(values: list[list], start: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Minutes since start and values, with a NaN wherever samples are missing (a gap, not a line)."""
    t = np.array([float(v[0]) for v in values])
    y = np.array([float(v[1]) for v in values])
    gaps = np.nonzero(np.diff(t) > 1.5 * step)[0] + 1
    t, y = np.insert(t, gaps, np.nan), np.insert(y, gaps, np.nan)
    return (t - start) / 60.0, y


def render_dashboard(prometheus_url: str, start: float, end: float, out: str | Path,
                     dashboard: str | Path = DASHBOARD, step: float = 5.0,
                     rate_interval: str = "1m") -> dict[str, int]:
    """Draw ``dashboard``'s panels over [start, end] (unix seconds) into the PNG ``out``;
    returns the number of series drawn per panel title."""
    board = json.loads(Path(dashboard).read_text())
    step = max(step, (end - start) / 10_000)  # Prometheus refuses more than 11,000 points a series
    panels = dashboard_panels(board)
    boxes = _layout(panels)
    rows = max((y + h for _, y, _, h in boxes), default=8)
    width, height = 24 * UNIT_W + 0.3, rows * UNIT_H + TITLE_H
    fig = Figure(figsize=(width, height), facecolor=BG)
    span = f"{_utc(start)} – {_utc(end)} UTC ({(end - start) / 60:.1f} min)"
    fig.text(0.15 / width, 1 - 0.4 / height, f"{board.get('title', 'dashboard')}    {span}", color=TEXT,
             fontsize=15, va="center")
    counts: dict[str, int] = {}
    for panel, (x, y, w, h) in zip(panels, boxes, strict=True):
        w_in, h_in = max(w * UNIT_W - 0.8, 0.3), max(h * UNIT_H - 0.85, 0.3)  # less the ticks and title
        left, top = 0.15 + x * UNIT_W + 0.6, TITLE_H + y * UNIT_H + 0.35
        ax = fig.add_axes((left / width, 1 - (top + h_in) / height, w_in / width, h_in / height),
                          facecolor=PANEL)
        title = panel.get("title", "")
        n = 0
        for target in panel["targets"]:
            expr = target.get("expr")
            if not expr or target.get("hide"):
                continue
            expr = expr.replace("${__rate_interval}", rate_interval).replace("$__rate_interval", rate_interval)
            for series in query_range(prometheus_url, expr, start, end, step):
                t, v = _line(series["values"], start, step)
                # a value seen in one or two steps (a run's final evaluation) is a point, not a line
                ax.plot(t, v, lw=1.4, color=COLORS[n % len(COLORS)], marker="o" if len(series["values"]) <= 2 else None,
                        label=legend(series["metric"], target.get("legendFormat"), expr))
                n += 1
        counts[title] = counts.get(title, 0) + n
        _style(ax, title, panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), end - start, n)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=BG)
    return counts


def _style(ax: Axes, title: str, unit: str | None, duration: float, n: int) -> None:
    ax.set_title(title, color=TEXT, fontsize=10, loc="left")
    ax.set_xlim(0, max(duration / 60.0, 1e-3))
    ax.tick_params(colors=TEXT, labelsize=8)
    ax.grid(color=GRID, lw=0.6)
    for side in ax.spines.values():
        side.set_color(GRID)
    if unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif unit and unit not in ("none", "short"):
        ax.set_ylabel(unit, color=TEXT, fontsize=8)
    ax.set_xlabel("minutes since start", color=TEXT, fontsize=8)
    if n:
        ax.legend(fontsize=7, loc="upper left", facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT,
                  ncols=1 + (n > 4))
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color=TEXT, fontsize=12)


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m telemetry.snapshot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    ap.add_argument("--start", type=float, help="unix seconds (default: an hour before --end)")
    ap.add_argument("--end", type=float, help="unix seconds (default: now)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--dashboard", default=str(DASHBOARD), help="a Grafana dashboard JSON")
    ap.add_argument("--step", type=float, default=5.0, help="seconds between points")
    ap.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for")
    args = ap.parse_args(argv)
    end = time.time() if args.end is None else args.end
    start = end - 3600 if args.start is None else args.start
    if not (math.isfinite(start) and start < end):
        ap.error("--start must be before --end")
    try:
        counts = render_dashboard(args.prometheus, start, end, args.out, args.dashboard, args.step, args.rate_interval)
    except (urllib.error.URLError, RuntimeError) as e:
        ap.exit(1, f"{ap.prog}: {args.prometheus}: {e}\n")
    print(f"{args.out}: {sum(counts.values())} series in {sum(1 for n in counts.values() if n)}/{len(counts)} panels")


if __name__ == "__main__":
    main()
