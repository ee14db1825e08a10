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


def sample_grid(before: Evaluation, after: Evaluation, path: Path, columns: int = 8) -> Path:
    """Side-by-side grids, one labelled row per prompt: before (left) and after (right)."""
    columns = min(columns, before.images.shape[1])
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 2 * 0.42 * columns, 0.5 + 0.42 * len(before.prompts)))
    for ax, ev, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        scale = max(1, 48 // ev.images.shape[2])
        m = _mosaic(ev.images, columns, scale)
        if m.ndim == 3:
            ax.imshow(m, interpolation="nearest")
        else:
            ax.imshow(m, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        h = ev.images.shape[2] * scale + 3
        ax.set_yticks([3 + h * i + (h - 3) / 2 for i in range(len(ev.prompts))])
        ax.set_yticklabels(ev.prompts if ax is axes[0] else [""] * len(ev.prompts), fontsize=8)
        ax.set_xticks([])
        ax.set_title(f"{title} (v{ev.version}) reward {ev.reward:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
