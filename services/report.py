"""What a run leaves for people: the before/after grid, the reward curve, the summary table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from services.evaluation import Evaluation  # noqa: E402

PAD = 3  # px of gutter around each sample
GAP = 24  # px between the before and after panels
MARGIN = 8  # px around the whole picture
MIN_CELL = 48  # samples smaller than this are enlarged by an integer factor (nearest: pixels stay square)
MAX_PANEL_WIDTH = 4096  # px of samples in one panel's row before they are shrunk by an integer factor


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a sample grid goes, in pixels of the PNG.

    Samples are drawn at their native size (``zoom`` 1), enlarged ``zoom``× when tiny (the
    digits world's 8×8), or shrunk 1/``shrink`` when a panel's row would pass
    ``MAX_PANEL_WIDTH``; the title states which. The prompt labels take a column of their own
    left of the first panel and each title is wrapped to its panel's width, so no text
    overlaps another text or a sample.
    """

    cell_h: int  # px of one drawn sample
    cell_w: int
    zoom: int
    shrink: int
    rows: int  # prompts
    columns: int  # samples per prompt
    panels: int
    font_px: int
    line_h: int
    label_w: int  # px of the prompt column (its text and a gap)
    title_h: int  # px above the samples for the (wrapped) titles
    panel_w: int  # px of one panel: its samples, or its title's longest word if wider
    mosaic_w: int  # px of one panel's samples and gutters
    mosaic_h: int
    titles: tuple[str, ...]  # each panel's title, ending in the scale the samples are drawn at

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture."""
        width = 2 * MARGIN + self.label_w + self.panels * self.panel_w + (self.panels - 1) * GAP
        return width, 2 * MARGIN + self.title_h + self.mosaic_h

    def panel_x(self, panel: int) -> int:
        return MARGIN + self.label_w + panel * (self.panel_w + GAP)

    def cell_origin(self, panel: int, row: int, column: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of sample ``column`` of prompt ``row`` in ``panel``."""
        x = self.panel_x(panel) + (self.panel_w - self.mosaic_w) // 2 + PAD + column * (self.cell_w + PAD)
        return x, MARGIN + self.title_h + PAD + row * (self.cell_h + PAD)



def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from matplotlib import font_manager

    try:  # matplotlib (a dependency) ships DejaVu Sans
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), px)
    except OSError:
        return ImageFont.load_default(px)


def _text_w(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> int:
    return int(np.ceil(font.getlength(text)))


def _wrap(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px, broken between words (a single word wider
    than ``width`` keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_w(font, f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _clip_lines(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, lines: list[str], width: int,
                most: int) -> list[str]:
    """At most ``most`` lines (≥ 1), each no wider than ``width`` px; cut text ends in '…'."""
    most = max(1, most)
    kept = lines[:most]
    cut = len(lines) > most
    out = []
    for i, line in enumerate(kept):
        last = i == len(kept) - 1
        if _text_w(font, line) <= width and not (last and cut):
            out.append(line)
            continue
        while line and _text_w(font, line + "…") > width:
            line = line[:-1]
        out.append(line.rstrip() + "…")
    return out


def grid_layout(height: int, width: int, rows: int, columns: int, titles: list[str], prompts: list[str],
                max_panel_width: int = MAX_PANEL_WIDTH) -> GridLayout:
    """The layout of ``len(titles)`` panels of ``rows`` × ``columns`` samples of
    ``height`` × ``width`` px, the ``prompts`` labelling the rows; each title gets the scale
    the samples are drawn at appended."""
    zoom = max(1, -(-MIN_CELL // max(height, width)))  # ceil: the smallest integer reaching MIN_CELL
    shrink = 1
    if zoom == 1:
        while columns * (width // shrink) > max_panel_width and width // (shrink + 1) >= MIN_CELL:
            shrink += 1
    cell_h, cell_w = height * zoom // shrink, width * zoom // shrink
    scale = f"shown ×{zoom}" if zoom > 1 else f"shown at 1/{shrink}" if shrink > 1 else "1:1"
    titles = [f"{t} · {height}×{width} px {scale}" for t in titles]
    font_px = int(np.clip(cell_h // 16, 12, 28))
    font = _font(font_px)
    line_h = int(round(font_px * 1.3))
    mosaic_w, mosaic_h = columns * (cell_w + PAD) + PAD, rows * (cell_h + PAD) + PAD
    longest_word = max((_text_w(font, w) for t in titles for w in t.split()), default=0)
    panel_w = max(mosaic_w, longest_word + 2 * PAD)
    lines = max(len(_wrap(font, t, panel_w)) for t in titles)
    label_w = min(max((_text_w(font, p) for p in prompts), default=0), 22 * font_px) + font_px
    return GridLayout(cell_h=cell_h, cell_w=cell_w, zoom=zoom, shrink=shrink, rows=rows, columns=columns,
                      panels=len(titles), font_px=font_px, line_h=line_h, label_w=label_w,
                      title_h=lines * line_h + font_px // 2, panel_w=panel_w, mosaic_w=mosaic_w, mosaic_h=mosaic_h,
                      titles=tuple(titles))


def _cells(images: np.ndarray, layout: GridLayout) -> np.ndarray:
    """(P, n, H, W, C) uint8 → (P, n, cell_h, cell_w, 3) as drawn: one channel as dark ink on
    light (the digits), enlarged by repeating pixels or shrunk by area averaging."""
    x = images if images.shape[-1] == 3 else np.repeat(255 - images.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    if layout.zoom > 1:
        x = x.repeat(layout.zoom, axis=2).repeat(layout.zoom, axis=3)
    if layout.shrink > 1:
        p, n = x.shape[:2]
        out = np.empty((p, n, layout.cell_h, layout.cell_w, 3), dtype=np.uint8)
        for i in range(p):
            for j in range(n):
                out[i, j] = np.asarray(Image.fromarray(x[i, j]).resize(
                    (layout.cell_w, layout.cell_h), Image.Resampling.BOX))
        x = out
    return x


def render_grid(panels: list[tuple[Evaluation, str]], columns: int,
                max_panel_width: int = MAX_PANEL_WIDTH) -> tuple[Image.Image, GridLayout]:
    """Panels side by side, each a titled mosaic of the first ``columns`` samples of every prompt
    of its evaluation (one row per prompt, labelled once at the left), samples at native size
    (see :class:`GridLayout`). The evaluations share their prompts and image size."""
    first = panels[0][0]
    p, n, h, w, _ = first.images.shape
    columns = min(columns, n)
    layout = grid_layout(h, w, p, columns, [t for _, t in panels], list(first.prompts), max_panel_width)
    font = _font(layout.font_px)
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    for k, ((ev, _), title) in enumerate(zip(panels, layout.titles, strict=True)):
        x0 = layout.panel_x(k) + (layout.panel_w - layout.mosaic_w) // 2
        draw.rectangle([x0, MARGIN + layout.title_h, x0 + layout.mosaic_w - 1,
                        MARGIN + layout.title_h + layout.mosaic_h - 1], fill=(200, 200, 200))
        cells = _cells(ev.images[:, :columns], layout)
        for i in range(p):
            for j in range(columns):
                canvas.paste(Image.fromarray(cells[i, j]), layout.cell_origin(k, i, j))
        for li, line in enumerate(_wrap(font, title, layout.panel_w)):
            draw.text((layout.panel_x(k), MARGIN + li * layout.line_h), line, fill="black", font=font)
    text_w = layout.label_w - layout.font_px
    fits = max(1, (layout.cell_h + PAD) // layout.line_h)
    for i, prompt in enumerate(first.prompts):
        lines = _clip_lines(font, _wrap(font, prompt, text_w), text_w, fits)
        _, y = layout.cell_origin(0, i, 0)
        top = y + (layout.cell_h - len(lines) * layout.line_h) // 2
        for li, line in enumerate(lines):
            draw.text((MARGIN, top + li * layout.line_h), line, fill="black", font=font)
    return canvas, layout


def _save_png(image: Image.Image, path: Path) -> Path:
    image.save(path, format="PNG", optimize=False)
    return path


def sample_grid(before: Evaluation, after: Evaluation, path: Path, columns: int = 8) -> Path:
    """Side-by-side grids, one labelled row per prompt: before (left) and after (right)."""
    image, _ = render_grid([(before, f"before (v{before.version}) reward {before.reward:.3f}"),
                            (after, f"after (v{after.version}) reward {after.reward:.3f}")], columns)
    return _save_png(image, path)


def eval_grid(ev: Evaluation, path: Path, columns: int = 8) -> Path:
    """One labelled row of samples per prompt."""
    image, _ = render_grid([(ev, f"reward {ev.reward:.3f}, diversity {ev.diversity:.3f}")], columns)
    return _save_png(image, path)


def _save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _integer_ticks(axis: Axis) -> None:
    """Iterations are whole numbers: no 2.5 on an iteration axis, however short the run."""
    axis.set_major_locator(MaxNLocator(integer=True))


def reward_curve(metrics_path: Path, path: Path, probability: bool = True) -> Path:
    """Training reward per iteration (and a moving average) and the before/after evaluations,
    read from metrics.jsonl. ``probability``: the reward is the digits classifier's
    probability, so the axis ends at 1 and the target p + (1 − p)/2 above the base p is drawn;
    otherwise (CLIP, sums of rewards) the axis fits the data."""
    return _save(reward_curve_figure(metrics_path, probability), path)


def reward_curve_figure(metrics_path: Path, probability: bool = True) -> Figure:
    """The figure of :func:`reward_curve`, unsaved."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    evals = {r["when"]: r["reward"] for r in rows if r.get("kind") == "eval"}
    it = np.array([r["iteration"] for r in train])
    rew = np.array([r["reward_mean"] for r in train])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(it, rew, color="tab:blue", alpha=0.35, lw=1, label="batch mean reward")
    if len(rew) >= 5:
        k = max(3, len(rew) // 20)
        smooth = np.convolve(rew, np.ones(k) / k, mode="valid")
        ax.plot(it[k - 1:], smooth, color="tab:blue", lw=2, label=f"moving average ({k})")
    if "before" in evals:
        p = evals["before"]
        ax.axhline(p, color="tab:red", ls=":", lw=1.2, label=f"eval before {p:.3f}")
        if probability:
            ax.axhline(p + (1 - p) / 2, color="tab:green", ls="-.", lw=1,
                       label=f"target p+(1-p)/2 = {p + (1 - p) / 2:.3f}")
    if "after" in evals:
        ax.axhline(evals["after"], color="tab:red", ls="--", lw=1.2, label=f"eval after {evals['after']:.3f}")
    low = min([*rew.tolist(), *evals.values()], default=0.0)
    if probability:
        ax.set_ylim(max(0.0, np.floor((low - 0.05) * 10) / 10), 1.0)
    ax.set_xlabel("iteration")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("reward (prob. of prompted digit)" if probability else "training reward Σ wᵢ·rᵢ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def summary_table(before: Evaluation, after: Evaluation) -> str:
    """The closing table: overall and per-prompt figures, before → after."""
    lines = [
        f"{'':28s} {'before':>8s}    {'after':>8s}",
        f"{'reward (CFG-free)':28s} {before.reward:8.3f} -> {after.reward:8.3f}",
        *([f"{'held-out classifier acc.':28s} {before.accuracy:8.3f} -> {after.accuracy:8.3f}"]
          if before.accuracy is not None and after.accuracy is not None else []),
        f"{'diversity (mean pairwise)':28s} {before.diversity:8.3f} -> {after.diversity:8.3f}",
        "",
        f"{'prompt':28s} {'reward':>19s}   {'diversity':>19s}",
    ]
    for i, p in enumerate(before.prompts):
        lines.append(
            f"{p[:28]:28s} {before.per_prompt_reward[i]:8.3f} -> {after.per_prompt_reward[i]:6.3f}"
            f"   {before.per_prompt_diversity[i]:8.3f} -> {after.per_prompt_diversity[i]:6.3f}"
        )
    return "\n".join(lines)


def _curves(train: list[dict], path: Path, w2_anchor: str) -> Path:
    return _save(curves_figure(train, w2_anchor), path, dpi=100)


def w2_anchor(config: dict) -> str:
    """The policy a run's logged W2 term measures the distance to: "old" where AC-Flow anchors
    it at the rollout policy π_old, else "ref" (the frozen reference)."""
    a = config.get("algorithm") or {}
    return "old" if a.get("name") == "ac_flow" and (a.get("ac_flow") or {}).get("anchor") == "rollout" else "ref"


def curves_figure(train: list[dict], w2_anchor: str = "ref") -> Figure:
    """Three panels from the training rows: each reward component, batch diversity against the
    training reward (coloured by iteration), and the W2 term (when the objective reports it),
    the distance to π_ref (ORW-CFM-W2's bound) or, with ``w2_anchor="old"``, to π_old."""
    it = np.array([r["iteration"] for r in train])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(it, [r["reward_mean"] for r in train], lw=1.5, label="training reward Σ wᵢ·rᵢ")
    for key in sorted({k for r in train for k in r if k.startswith("reward/")}):
        ax.plot(it, [r.get(key, np.nan) for r in train], lw=1, alpha=0.8, label=key)
    ax.set_xlabel("iteration")
    _integer_ticks(ax.xaxis)
    ax.set_title("rewards per component", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    div = np.array([r.get("diversity", np.nan) for r in train], dtype=float)
    sc = ax.scatter([r["reward_mean"] for r in train], div, c=it, cmap="viridis", s=12)
    _integer_ticks(fig.colorbar(sc, ax=ax, label="iteration").ax.yaxis)
    ax.set_xlabel("training reward")
    ax.set_ylabel("batch diversity (mean pairwise distance)")
    ax.set_title("diversity against reward", fontsize=10)
    ax.grid(alpha=0.3)
    ax = axes[2]
    if any("w2" in r for r in train):
        ax.plot(it, [r.get("w2", np.nan) for r in train], color="tab:purple", lw=1.5)
        ax.set_ylabel(f"mean ‖v_θ − v_{w2_anchor}‖² per element")
    else:
        ax.text(0.5, 0.5, "this objective reports no W2 term", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration")
    _integer_ticks(ax.xaxis)
    ax.set_title("W2 bound (ORW-CFM-W2, Thm 3)" if w2_anchor == "ref" else "W2 trust region (to π_old)", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def eval_curves_figure(evals: list[dict]) -> Figure:
    """Three panels from metrics.jsonl's eval rows (before, every eval.every iterations, after)
    against the iterations trained: each eval reward (the unseen ones and the held-out
    classifier's accuracy included), diversity, and the reward-hacking watch's drift of each
    image statistic from the base policy's (1: none)."""
    evals = sorted(evals, key=lambda r: r.get("iteration", 0))
    it = np.array([r.get("iteration", 0) for r in evals])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))

    def lines(ax: plt.Axes, prefix: str, label: str = "{}") -> None:
        for key in sorted({k for r in evals for k in r if k.startswith(prefix)}):
            ax.plot(it, [r.get(key, np.nan) for r in evals], marker="o", ms=3, lw=1.2,
                    label=label.format(key.removeprefix(prefix)))

    ax = axes[0]
    ax.plot(it, [r["reward"] for r in evals], marker="o", ms=3, lw=1.8, color="black", label="training reward Σ wᵢ·rᵢ")
    lines(ax, "eval_reward/")
    ax.set_title("evaluation rewards (CFG-free, fixed noise)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(it, [r["diversity"] for r in evals], marker="o", ms=3, color="tab:green")
    ax.set_ylabel("mean pairwise distance")
    ax.set_title("evaluation diversity", fontsize=10)
    ax = axes[2]
    ax.axhline(1.0, color="grey", lw=0.8)
    for r in evals:  # the base policy's own evaluation: no drift by definition
        if r.get("when") == "before":
            r.update({k: 1.0 for k in {k for e in evals for k in e if k.startswith("drift/")}} | {
                k: r[k] for k in r if k.startswith("drift/")})
    lines(ax, "drift/")
    ax.set_ylabel("max/min against the base policy")
    ax.set_title("reward-hacking watch: drift of image statistics", fontsize=10)
    if any(k.startswith("drift/") for r in evals for k in r):
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("iterations trained")
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    return fig


def _img(path: Path) -> str:
    import base64

    return f'<img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def write_report(run_dir: Path, summary: dict, table: str) -> Path:
    """report.html: one self-contained page (pictures embedded, no network) with the summary,
    the reward curve, rewards per component, diversity against reward, the W2 bound and the
    before/after grids."""
    import html

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    curves = _curves(train, run_dir / "report_curves.png", w2_anchor(yaml.safe_load(config) or {})) if train else None
    evals = [r for r in rows if r.get("kind") == "eval" and "iteration" in r]
    eval_curves = _save(eval_curves_figure(evals), run_dir / "report_eval_curves.png", dpi=100) if evals else None
    parts = [f"<h1>fmrl run {html.escape(run_dir.name)}</h1>",
             f"<pre>{html.escape(table)}</pre>",
             "<h2>Before / after (CFG-free, fixed noise)</h2>", _img(run_dir / "samples_before_after.png"),
             "<h2>Training reward</h2>", _img(run_dir / "reward_curve.png")]
    if curves is not None:
        parts += ["<h2>Rewards, diversity, W2</h2>", _img(curves)]
    if eval_curves is not None:
        parts += ["<h2>Evaluations during training: rewards, diversity, reward-hacking watch</h2>",
                  _img(eval_curves)]
    parts += ["<h2>Summary</h2>", f"<pre>{html.escape(json.dumps(summary, indent=2))}</pre>",
              "<h2>Config</h2>", f"<pre>{html.escape(config)}</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>fmrl " + html.escape(run_dir.name) +
            "</title><style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}img{max-width:100%}"
            "pre{background:#f4f4f4;padding:1em;overflow-x:auto}</style></head><body>" + "\n".join(parts) +
            "</body></html>\n")
    (run_dir / "report.html").write_text(page)
    return run_dir / "report.html"
