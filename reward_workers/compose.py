"""The compositional digits world's rewards: a GenEval-style detector and its held-out twin.

A 16×16 canvas is read as four 8×8 cells (0 top-left, 1 top-right, 2 bottom-left, 3
bottom-right); each cell is *empty* (an ink test) or the digit a classifier reads in it. The
prompt's metadata (samplers/compose.py writes it; the prompt datasets carry it) names the
constraints, each scored on its own:

- ``count``: the share of the named digits shown in exactly the required number of cells;
- ``identity``: the share of non-empty cells that show a named digit (0 on an empty canvas);
- ``position``: the relation holds (some cell of ``a`` lies left of / right of / above / below
  some cell of ``b``: a smaller / larger column or row), or every cell of the digit lies in the
  region (and there is one); 1 where the prompt asks no position (``position_asked`` 0).

``all`` is GenEval's all-or-nothing: every constraint fully met. The training reward
(``ComposeReward``) is the mean over the constraints the prompt asks (count, identity, and
position where asked): a graded signal where ``all`` would be 0 for most early samples.
``HeldoutComposeEvaluator`` scores ``all`` with another model family (the digits world's RBF
SVM) and another empty-cell test, for evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from reward_workers.base import RewardOutput, check_batch
from reward_workers.digits import (
    CLASSIFIER_FILE,
    HeldoutSVM,
    classifier_probs,
    load_classifier,
    load_split,
)

CELL = 8
GRID = 2
CELLS = ((0, 0), (0, 1), (1, 0), (1, 1))
EMPTY = -1
EMPTY_MEAN_INK = 0.1  # reward: a cell whose mean ink (pixels in [0, 1]) is below this is empty
EMPTY_BRIGHT_PIXELS = 6  # evaluator: a cell with fewer pixels above 0.5 than this is empty
# real digits: mean ink ≥ 0.22 and ≥ 13 pixels above 0.5 in every train image


def cells_of(images: np.ndarray) -> np.ndarray:
    """(N, 16, 16, C) uint8 canvases → (N, 4, 8, 8) uint8 cells (grey: the channel mean)."""
    if images.shape[1:3] != (CELL * GRID, CELL * GRID):
        raise ValueError(f"compose rewards take {CELL * GRID}×{CELL * GRID} canvases, got {images.shape}")
    grey = images.astype(np.float32).mean(-1).round().astype(np.uint8)
    return np.stack([grey[:, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] for r, c in CELLS], 1)


def detect(cells: np.ndarray, classify: Callable[[np.ndarray], np.ndarray],
           empty: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(N, 4) labels of (N, 4, 8, 8) cells: ``EMPTY`` where ``empty`` says so, else the classifier's digit."""
    flat = cells.reshape(-1, CELL, CELL)
    labels = np.asarray(classify(flat), dtype=np.int64)
    labels[np.asarray(empty(flat), dtype=bool)] = EMPTY
    return labels.reshape(cells.shape[0], len(CELLS))


def _relation_holds(labels: np.ndarray, a: int, rel: str, b: int) -> bool:
    pa = [CELLS[i] for i in np.flatnonzero(labels == a)]
    pb = [CELLS[i] for i in np.flatnonzero(labels == b)]
    test = {"left_of": lambda p, q: p[1] < q[1], "right_of": lambda p, q: p[1] > q[1],
            "above": lambda p, q: p[0] < q[0], "below": lambda p, q: p[0] > q[0]}[rel]
    return any(test(p, q) for p in pa for q in pb)


def _in_region(cell: int, where: str) -> bool:
    r, c = CELLS[cell]
    return {"top": r == 0, "bottom": r == 1, "left": c == 0, "right": c == 1}[where]


def check_metadata(meta: dict | None, where: str) -> dict:
    """The constraints of one prompt, checked; a ValueError naming ``where`` otherwise."""
    if not isinstance(meta, dict) or not isinstance(meta.get("counts"), list) or not meta["counts"]:
        raise ValueError(f"{where}: the compose reward needs the prompt's constraints as metadata "
                         "(a 'counts' list; see samplers/compose.py), got "
                         f"{str(meta)[:80] if meta is not None else 'none'}")
    return meta


def score_constraints(labels: np.ndarray, meta: dict) -> dict[str, float]:
    """Per-constraint scores of one canvas's (4,) labels against one prompt's metadata:
    ``count``, ``identity``, ``position``, ``position_asked``, ``all`` (see the module docstring)."""
    counts = [(int(c["digit"]), int(c["count"])) for c in meta["counts"]]
    count = float(np.mean([int((labels == d).sum()) == n for d, n in counts]))
    shown = labels[labels != EMPTY]
    named = {d for d, _ in counts}
    identity = float(np.mean([int(x) in named for x in shown])) if shown.size else 0.0
    rel, region = meta.get("relation"), meta.get("region")
    if rel is not None:
        position = float(_relation_holds(labels, int(rel["a"]), str(rel["rel"]), int(rel["b"])))
    elif region is not None:
        at = np.flatnonzero(labels == int(region["digit"]))
        position = float(at.size > 0 and all(_in_region(int(i), str(region["where"])) for i in at))
    else:
        position = 1.0
    asked = float(rel is not None or region is not None)
    return {"count": count, "identity": identity, "position": position, "position_asked": asked,
            "all": float(count == 1.0 and identity == 1.0 and position == 1.0)}


def score_batch(labels: np.ndarray, metadata: list[dict]) -> dict[str, np.ndarray]:
    """:func:`score_constraints` for N canvases, as (N,) arrays, plus ``mean`` (the training reward)."""
    rows = [score_constraints(lab, check_metadata(m, f"sample {i}")) for i, (lab, m) in
            enumerate(zip(labels, metadata, strict=True))]
    out = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}
    out["mean"] = (out["count"] + out["identity"] + out["position"] * out["position_asked"]) / (2 + out["position_asked"])
    return out


def _need_metadata(images: np.ndarray, prompts: list[str], metadata: list[dict] | None, who: str) -> list[dict]:
    check_batch(images, prompts)
    if metadata is None:
        raise ValueError(f"the {who} reward scores a prompt's constraints from its metadata: give the prompts "
                         "as a dataset (configs/datasets/compose_train.jsonl) so their metadata travels")
    if len(metadata) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")
    return metadata


class ComposeReward:
    """Reward = the mean over the prompt's constraints (count, identity, position where asked),
    cells read by the digits reward CNN and a mean-ink empty test.

    details: ``count``, ``identity``, ``position``, ``position_asked``, ``all`` (all-or-nothing)
    and ``cell0`` … ``cell3``, the label read in each cell (−1 empty)."""

    name = "compose"

    def __init__(self, path: Path | str = CLASSIFIER_FILE, empty_mean_ink: float = EMPTY_MEAN_INK) -> None:
        self.model = load_classifier(Path(path))
        self.empty_mean_ink = empty_mean_ink

    def labels(self, images: np.ndarray) -> np.ndarray:
        """(N, 4) labels of (N, 16, 16, C) canvases (−1 empty)."""
        return detect(cells_of(images), lambda x: classifier_probs(self.model, x).argmax(1),
                      lambda x: x.astype(np.float64).mean((1, 2)) / 255.0 < self.empty_mean_ink)

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        metadata = _need_metadata(images, prompts, metadata, "compose")
        labels = self.labels(images)
        scores = score_batch(labels, metadata)
        details = {k: v for k, v in scores.items() if k != "mean"}
        details |= {f"cell{i}": labels[:, i].astype(np.float64) for i in range(len(CELLS))}
        return RewardOutput(scores=scores["mean"], details=details)


class HeldoutComposeEvaluator:
    """Evaluation only: GenEval's all-or-nothing score, cells read by the RBF SVM of the digits
    world (another model family than the reward's CNN) and a bright-pixel empty test.

    ``heldout_accuracy``: its all-or-nothing accuracy on real compositions, canvases of held-out
    digits laid out as ``real_canvases`` gives them (1.0 would be a perfect reader)."""

    name = "heldout_compose"

    def __init__(self, real_canvases: tuple[np.ndarray, list[dict]] | None = None) -> None:
        split = load_split()
        self.svm = HeldoutSVM(split)
        self.heldout_accuracy = (float(self(real_canvases[0][..., None], [""] * len(real_canvases[1]),
                                            real_canvases[1]).scores.mean())
                                 if real_canvases is not None else None)

    def labels(self, images: np.ndarray) -> np.ndarray:
        return detect(cells_of(images), self.svm.predict,
                      lambda x: (x > 127).reshape(len(x), -1).sum(1) < EMPTY_BRIGHT_PIXELS)

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        metadata = _need_metadata(images, prompts, metadata, "held-out compose")
        scores = score_batch(self.labels(images), metadata)
        return RewardOutput(scores=scores["all"], details={k: v for k, v in scores.items() if k != "mean"})
