"""Evaluation of a policy version: reward, held-out classifier accuracy, diversity, the
``eval.rewards`` scores, and the reward-hacking watch's image statistics and their drift."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integers (run seed, iteration, prompt index, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def eval_plan(cfg: Any, prompts: list[str] | None = None) -> tuple[list[str], list[int]]:  # noqa: ANN401
    """What every evaluation samples (the run's and ``fmrl eval``'s alike): ``prompts`` (default:
    eval.dataset's, eval.split_from_train's, else the run's distinct training prompts; see
    services/datasets.py) and each prompt's noise seed from ``cfg.eval.seed``."""
    if prompts is None:
        from services.datasets import load_prompts  # it imports seed_for from here

        prompts = list(load_prompts(cfg).eval.prompts)
    return prompts, [seed_for(cfg.eval.seed, i) for i in range(len(prompts))]


def eval_metadata(cfg: Any) -> list[dict] | None:  # noqa: ANN401
    """The evaluation prompts' dataset metadata (eval_plan's order), handed to the rewards with
    each prompt's samples by a run and by ``fmrl eval`` alike; None when no dataset gives any."""
    if cfg.rollout.dataset is None and cfg.eval.dataset is None:
        return None
    from services.datasets import load_prompts  # it imports seed_for from here

    return list(load_prompts(cfg).eval.metadata)


def heldout_evaluator(cfg: Any) -> Any | None:  # noqa: ANN401
    """The world's evaluation-only reader, which never feeds training: the digits world's RBF SVM
    (accuracy: it reads the prompted digit), the compose world's ``HeldoutComposeEvaluator``
    (accuracy: all-or-nothing compositional accuracy, from each prompt's metadata), else None.
    Called as ``reader(images, prompts, metadata)``; its ``heldout_accuracy`` is on real images."""
    if cfg.policy.kind == "digits":
        from reward_workers.digits import HeldoutSVM

        return HeldoutSVM()
    if cfg.policy.kind == "compose":
        from services.pretrain_compose import heldout_evaluator as compose_reader

        return compose_reader()
    return None


def eval_due(every: int, done: int, iterations: int) -> bool:
    """Whether the run evaluates between batches after ``done`` trained iterations: every
    ``every`` (0: never), except after the last, which the final evaluation measures."""
    return every > 0 and done % every == 0 and 0 < done < iterations


@dataclass(frozen=True)
class Evaluation:
    """CFG-free samples of one policy version and what they score.

    images: (P, n, H, W, C) uint8, n samples of each of P prompts.
    reward: mean reward over all samples; accuracy: fraction the held-out classifier
    reads as the prompted digit (digits world only, else None); diversity: mean over prompts of the mean pairwise
    Euclidean distance between samples of that prompt (pixels in [0, 1]).
    iteration: the iterations trained before it (0 before training, run.iterations after).
    scores: each ``eval.rewards`` component's mean over the samples (by its label; an optional
    one that did not answer is absent), and ``heldout_svm``, the accuracy, where there is one.
    stats: the watch's image statistics (:func:`image_stats`); drift: each of them and the
    diversity against the base policy's evaluation (:func:`drift_ratios`; empty for the base).
    seconds: the evaluation's wall time (sampling and scoring).
    """

    version: int
    prompts: tuple[str, ...]
    images: np.ndarray
    reward: float
    accuracy: float | None
    diversity: float
    per_prompt_reward: tuple[float, ...]
    per_prompt_diversity: tuple[float, ...]
    iteration: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def headline(self) -> dict[str, float | None]:
        """The three figures the summary reports."""
        return {"reward": self.reward, "accuracy": self.accuracy, "diversity": self.diversity}

    def figures(self) -> dict[str, float]:
        """Every number of the evaluation under the names metrics.jsonl and the trackers use:
        the headline, ``eval_reward/<label>``, ``watch/<stat>``, ``drift/<stat>``, ``seconds``."""
        out = {k: v for k, v in self.headline().items() if v is not None}
        out |= {f"eval_reward/{k}": v for k, v in self.scores.items()}
        out |= {f"watch/{k}": v for k, v in self.stats.items()}
        out |= {f"drift/{k}": v for k, v in self.drift.items()}
        return {**out, "seconds": self.seconds}

    def save(self, path: Path) -> None:
        """One .npz: the images and the figures (a resumed run reports the original 'before')."""
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "images"}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, images=self.images, meta=np.array(json.dumps(meta)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Evaluation:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            images = f["images"]
        tuples = {k: tuple(meta[k]) for k in ("prompts", "per_prompt_reward", "per_prompt_diversity")}
        return cls(images=images, **{**meta, **tuples})


def mean_pairwise_distance(images: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of n images (n, ...) with pixels scaled to [0, 1]."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    n = len(x)
    if n < 2:
        raise ValueError("diversity needs at least two samples")
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    iu = np.triu_indices(n, k=1)
    return float(np.sqrt(d2[iu]).mean())


def evaluation_of(version: int, prompts: list[str], images: np.ndarray, scores: np.ndarray,
                  accuracy: float | None, *, iteration: int = 0, eval_scores: dict[str, float] | None = None,
                  base: Evaluation | None = None, seconds: float = 0.0) -> Evaluation:
    """The figures of n samples of each of P prompts: images (P, n, H, W, C) uint8, scores (P·n,);
    ``eval_scores`` the ``eval.rewards`` means, ``base`` the evaluation drift is measured from."""
    n = images.shape[1]
    per_reward = scores.reshape(len(prompts), n).mean(1)
    per_div = [mean_pairwise_distance(images[i]) for i in range(len(prompts))]
    diversity = float(np.mean(per_div))
    stats = image_stats(images.reshape(-1, *images.shape[2:]))
    drift = {} if base is None or not base.stats else drift_ratios(
        {**stats, "diversity": diversity}, {**base.stats, "diversity": base.diversity})
    return Evaluation(
        version=version, prompts=tuple(prompts), images=images, reward=float(scores.mean()), accuracy=accuracy,
        diversity=diversity, per_prompt_reward=tuple(float(x) for x in per_reward),
        per_prompt_diversity=tuple(float(x) for x in per_div), iteration=iteration,
        scores={**(eval_scores or {}), **({"heldout_svm": accuracy} if accuracy is not None else {})},
        stats=stats, drift=drift, seconds=seconds,
    )


# ---- the reward-hacking watch -------------------------------------------------------------------
EDGE_THRESHOLD = 0.25  # gradient magnitude (pixels in [0, 1]) above which a pixel counts as an edge
ENTROPY_LEVELS = 8  # levels per channel of the colour histogram (8³ = 512 colours, 8 greys)
JPEG_QUALITY = 75  # PIL's default; fixed so sizes compare across evaluations
DRIFT_EPS = 1e-6  # keeps the ratio of two zeros (a greyscale world's saturation) at 1
WATCH_STATS = ("brightness", "saturation", "edge_density", "colour_entropy", "jpeg_bytes")


def _grey(images: np.ndarray) -> np.ndarray:
    """(N, H, W) luma in [0, 1] of (N, H, W, C) uint8 images (ITU-R 601 weights for RGB)."""
    x = images.astype(np.float64) / 255.0
    if x.shape[-1] == 1:
        return x[..., 0]
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def brightness(images: np.ndarray) -> float:
    """Mean luma in [0, 1]."""
    return float(_grey(images).mean())


def saturation(images: np.ndarray) -> float:
    """Mean HSV saturation (max − min) / max per pixel (0 where max is 0); 0 for greyscale."""
    if images.shape[-1] == 1:
        return 0.0
    x = images[..., :3].astype(np.float64)
    hi, lo = x.max(-1), x.min(-1)
    return float(np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0).mean())


def edge_density(images: np.ndarray, threshold: float = EDGE_THRESHOLD) -> float:
    """Share of pixels whose luma gradient (forward differences right and down, over the
    (H−1)×(W−1) pixels that have both) has magnitude above ``threshold``."""
    g = _grey(images)
    gx = g[:, :-1, 1:] - g[:, :-1, :-1]
    gy = g[:, 1:, :-1] - g[:, :-1, :-1]
    return float((np.sqrt(gx * gx + gy * gy) > threshold).mean())


def colour_entropy(images: np.ndarray, levels: int = ENTROPY_LEVELS) -> float:
    """Mean over images of the entropy (bits) of the image's histogram of colours, each channel
    quantised to ``levels`` levels: 0 for a flat image, falls as backgrounds vanish or colours merge."""
    q = (images.astype(np.int64) * levels) // 256  # (N, H, W, C) levels
    code = np.zeros(q.shape[:-1], np.int64)
    for c in range(q.shape[-1]):
        code = code * levels + q[..., c]
    out = []
    for img in code.reshape(len(code), -1):
        p = np.bincount(img) / img.size
        p = p[p > 0]
        out.append(float(-(p * np.log2(p)).sum()) + 0.0)
    return float(np.mean(out))


def jpeg_bytes(images: np.ndarray, quality: int = JPEG_QUALITY) -> float:
    """Mean size in bytes of each image saved by PIL as a JPEG at ``quality``."""
    from PIL import Image

    sizes = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img[..., :3]).save(buf, "JPEG", quality=quality)
        sizes.append(buf.tell())
    return float(np.mean(sizes))


def image_stats(images: np.ndarray) -> dict[str, float]:
    """The watch's statistics of (N, H, W, C) uint8 samples, by name (``WATCH_STATS``)."""
    return {"brightness": brightness(images), "saturation": saturation(images), "edge_density": edge_density(images),
            "colour_entropy": colour_entropy(images), "jpeg_bytes": jpeg_bytes(images)}


def drift_ratios(stats: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Each statistic's drift from the base: (max(x, b) + ε) / (min(x, b) + ε), ε = 1e-6 — 1 when
    unchanged, f when it moved a factor f either way (above or below the base)."""
    return {k: (max(v, base[k]) + DRIFT_EPS) / (min(v, base[k]) + DRIFT_EPS) for k, v in stats.items() if k in base}
