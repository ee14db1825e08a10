"""What a run leaves for people: the before/after grid, the reward curve, the summary table."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from services.evaluation import Evaluation  # noqa: E402


def _mosaic(images: np.ndarray, columns: int, scale: int = 6, pad: int = 3) -> np.ndarray:
    """(P, n, H, W, C) uint8 → one image, a row per prompt, pixels upscaled ``scale``× (no
    interpolation blur) and separated by gutters: gray (H', W') for one channel, RGB for three."""
    p, _, h, w, c = images.shape
    rgb = c == 3
    hs, ws = h * scale, w * scale
    shape = (p * (hs + pad) + pad, columns * (ws + pad) + pad) + ((3,) if rgb else ())
    out = np.full(shape, 200 if rgb else 60, dtype=np.uint8)
    block = np.ones((scale, scale, 1) if rgb else (scale, scale), dtype=np.uint8)
    for i in range(p):
        for j in range(columns):
            y, x = pad + i * (hs + pad), pad + j * (ws + pad)
            cell = images[i, j] if rgb else images[i, j].mean(-1).astype(np.uint8)
            out[y:y + hs, x:x + ws] = np.kron(cell, block)
    return out


def _grid_panel(ax, ev: Evaluation, columns: int, title: str, labels: bool = True) -> None:  # noqa: ANN001 - an Axes
    """One labelled row of ``columns`` samples per prompt of ``ev`` on ``ax``."""
    scale = max(1, 48 // ev.images.shape[2])
    m = _mosaic(ev.images, columns, scale)
    ax.imshow(m, interpolation="nearest", **({} if m.ndim == 3 else {"cmap": "gray_r", "vmin": 0, "vmax": 255}))
    h = ev.images.shape[2] * scale + 3
    ax.set_yticks([3 + h * i + (h - 3) / 2 for i in range(len(ev.prompts))])
    ax.set_yticklabels(ev.prompts if labels else [""] * len(ev.prompts), fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)


def _save(fig, path: Path, dpi: int = 110) -> Path:  # noqa: ANN001 - a Figure
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def sample_grid(before: Evaluation, after: Evaluation, path: Path, columns: int = 8) -> Path:
    """Side-by-side grids, one labelled row per prompt: before (left) and after (right)."""
    columns = min(columns, before.images.shape[1])
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 2 * 0.42 * columns, 0.5 + 0.42 * len(before.prompts)))
    for ax, ev, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        _grid_panel(ax, ev, columns, f"{title} (v{ev.version}) reward {ev.reward:.3f}", labels=ax is axes[0])
    return _save(fig, path)


def eval_grid(ev: Evaluation, path: Path, columns: int = 8) -> Path:
    """One labelled row of samples per prompt."""
    columns = min(columns, ev.images.shape[1])
    fig, ax = plt.subplots(figsize=(2.2 + 0.42 * columns, 0.5 + 0.42 * len(ev.prompts)))
    _grid_panel(ax, ev, columns, f"reward {ev.reward:.3f}, diversity {ev.diversity:.3f}")
    return _save(fig, path)


def reward_curve(metrics_path: Path, path: Path, probability: bool = True) -> Path:
    """Training reward per iteration (and a moving average) and the before/after evaluations,
    read from metrics.jsonl. ``probability``: the reward is the digits classifier's
    probability, so the axis ends at 1 and the target p + (1 − p)/2 above the base p is drawn;
    otherwise (CLIP, sums of rewards) the axis fits the data."""
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
    ax.set_ylabel("reward (prob. of prompted digit)" if probability else "training reward Σ wᵢ·rᵢ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


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


def _curves(train: list[dict], path: Path) -> Path:
    """Three panels from the training rows: each reward component, batch diversity against the
    training reward (coloured by iteration), and the W2 bound (when the objective reports it)."""
    it = np.array([r["iteration"] for r in train])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(it, [r["reward_mean"] for r in train], lw=1.5, label="training reward Σ wᵢ·rᵢ")
    for key in sorted({k for r in train for k in r if k.startswith("reward/")}):
        ax.plot(it, [r.get(key, np.nan) for r in train], lw=1, alpha=0.8, label=key)
    ax.set_xlabel("iteration")
    ax.set_title("rewards per component", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    div = np.array([r.get("diversity", np.nan) for r in train], dtype=float)
    sc = ax.scatter([r["reward_mean"] for r in train], div, c=it, cmap="viridis", s=12)
    fig.colorbar(sc, ax=ax, label="iteration")
    ax.set_xlabel("training reward")
    ax.set_ylabel("batch diversity (mean pairwise distance)")
    ax.set_title("diversity against reward", fontsize=10)
    ax.grid(alpha=0.3)
    ax = axes[2]
    if any("w2" in r for r in train):
        ax.plot(it, [r.get("w2", np.nan) for r in train], color="tab:purple", lw=1.5)
        ax.set_ylabel("mean ‖v_θ − v_ref‖² per element")
    else:
        ax.text(0.5, 0.5, "this objective reports no W2 term", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration")
    ax.set_title("W2 bound (ORW-CFM-W2, Thm 3)", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi=100)


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
    curves = _curves(train, run_dir / "report_curves.png") if train else None
    parts = [f"<h1>fmrl run {html.escape(run_dir.name)}</h1>",
             f"<pre>{html.escape(table)}</pre>",
             "<h2>Before / after (CFG-free, fixed noise)</h2>", _img(run_dir / "samples_before_after.png"),
             "<h2>Training reward</h2>", _img(run_dir / "reward_curve.png")]
    if curves is not None:
        parts += ["<h2>Rewards, diversity, W2</h2>", _img(curves)]
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    parts += ["<h2>Summary</h2>", f"<pre>{html.escape(json.dumps(summary, indent=2))}</pre>",
              "<h2>Config</h2>", f"<pre>{html.escape(config)}</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>fmrl " + html.escape(run_dir.name) +
            "</title><style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}img{max-width:100%}"
            "pre{background:#f4f4f4;padding:1em;overflow-x:auto}</style></head><body>" + "\n".join(parts) +
            "</body></html>\n")
    (run_dir / "report.html").write_text(page)
    return run_dir / "report.html"
