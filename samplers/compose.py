"""The compositional digits world: a GenEval in miniature on a 2×2 canvas of digits.

A canvas is 16×16 pixels, one channel, four cells of 8×8 (cell 0 top-left, 1 top-right,
2 bottom-left, 3 bottom-right), each empty (background, 0) or one scikit-learn digit. A prompt
states counts, identities and relative positions ("a three left of a seven", "two fives",
"a single nine at the top"); what it asks travels with it as metadata (:func:`spec_metadata`),
the structured constraints the compose reward (reward_workers/compose.py) checks:

    {"task": "count" | "relation" | "region" | "pair",
     "counts": [{"digit": d, "count": n}, ...],           # exactly n cells show d
     "relation": {"a": d1, "rel": "left_of" | "right_of" | "above" | "below", "b": d2} | null,
     "region": {"digit": d, "where": "top" | "bottom" | "left" | "right"} | null}

and every non-empty cell shows a digit the prompt names (identity). Training prompts use
``TRAIN_TEMPLATES``; ``EVAL_PHRASINGS`` are other wordings of the same constraints, for
evaluation only. The policy is the digits world's SD3 transformer on the larger canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samplers.digits import DIGIT_WORDS, DIGITS_TRANSFORMER_CONFIG, to_pixels, to_uint8  # noqa: F401 - the world's pixel maps

ASSETS = Path(__file__).resolve().parent / "assets"
POLICY_FILE = ASSETS / "compose_policy.safetensors"
CELL = 8
GRID = 2
IMAGE_SHAPE = (1, CELL * GRID, CELL * GRID)
CELLS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) of cell 0 … 3
TASKS = ("count", "relation", "region", "pair")
RELATIONS = ("left_of", "right_of", "above", "below")
REGIONS = ("top", "bottom", "left", "right")
MAX_COUNT = 3

#: 16 patches of 4×4 pixels (a cell is 2×2 patches), 4 joint-attention blocks of width 64
#: (0.63 M parameters): the digits world's transformer at the digits world's cost per step
#: (patch 2, 64 tokens, measured 3× slower a step on the 2-core build machine, would not fit a
#: training run in 10 minutes there).
COMPOSE_TRANSFORMER_CONFIG: dict[str, object] = {**DIGITS_TRANSFORMER_CONFIG, "sample_size": CELL * GRID, "patch_size": 4}

_PLURALS = {"six": "sixes"}
_COUNT_WORDS = {1: "a single", 2: "two", 3: "three"}
_REL_TRAIN = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}
_REL_EVAL = {"left_of": "to the left of", "right_of": "to the right of", "above": "placed over",
             "below": "placed under"}
_WHERE_TRAIN = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}
_WHERE_EVAL = {"top": "in the upper row", "bottom": "in the lower row", "left": "in the left column",
               "right": "in the right column"}


def plural(digit: int) -> str:
    word = DIGIT_WORDS[digit]
    return _PLURALS.get(word, word + "s")


@dataclass(frozen=True)
class Spec:
    """What a prompt asks: a task and its digits (``a``, ``b``), count ``n``, relation or region."""

    task: str
    a: int
    b: int | None = None
    n: int = 1
    rel: str | None = None
    where: str | None = None


def _words(s: Spec, train: bool) -> dict[str, str]:
    w = {"a": DIGIT_WORDS[s.a], "A": str(s.a), "pl": plural(s.a) if s.n > 1 else DIGIT_WORDS[s.a],
         "cnt": _COUNT_WORDS[s.n], "num": str(s.n)}
    if s.b is not None:
        w |= {"b": DIGIT_WORDS[s.b], "B": str(s.b)}
    if s.rel is not None:
        w["rel"] = (_REL_TRAIN if train else _REL_EVAL)[s.rel]
    if s.where is not None:
        w["where"] = (_WHERE_TRAIN if train else _WHERE_EVAL)[s.where]
    return w


#: training wordings, two per task ({cnt}: "a single", "two", "three")
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "count": ("{cnt} {pl}", "{cnt} handwritten {pl}"),
    "relation": ("a {a} {rel} a {b}", "a handwritten {a} {rel} a handwritten {b}"),
    "region": ("a single {a} {where}", "one handwritten {a} {where}"),
    "pair": ("a {a} and a {b}", "a handwritten {a} and a handwritten {b}"),
}
#: held-out wordings of the same constraints: numerals, other relation and region words
EVAL_PHRASINGS: dict[str, tuple[str, ...]] = {
    "count": ("exactly {num} of the digit {A}", "the digit {A}, {num} times"),
    "relation": ("the digit {A} {rel} the digit {B}", "a sketch of {a} {rel} {b}"),
    "region": ("the digit {A} alone {where}", "only a {a}, {where}"),
    "pair": ("the digits {A} and {B} together", "both a {a} and a {b}"),
}


def prompt_of(spec: Spec, template: int = 0, train: bool = True) -> str:
    """The prompt of ``spec`` in a training template (``train``) or a held-out phrasing."""
    table = TRAIN_TEMPLATES if train else EVAL_PHRASINGS
    text = table[spec.task][template].format(**_words(spec, train))
    if not train and spec.task == "count" and spec.n == 1:
        text = text.replace("1 times", "once")
    return text


def spec_metadata(spec: Spec) -> dict[str, object]:
    """The constraints of ``spec`` as the JSON object the compose reward reads (module docstring)."""
    if spec.task == "count":
        counts = [{"digit": spec.a, "count": spec.n}]
    elif spec.task in ("relation", "pair"):
        counts = [{"digit": spec.a, "count": 1}, {"digit": spec.b, "count": 1}]
    else:
        counts = [{"digit": spec.a, "count": 1}]
    return {"task": spec.task, "counts": counts,
            "relation": {"a": spec.a, "rel": spec.rel, "b": spec.b} if spec.task == "relation" else None,
            "region": {"digit": spec.a, "where": spec.where} if spec.task == "region" else None}


def all_specs() -> list[Spec]:
    """Every spec of the grammar: 30 counts, 360 relations, 40 regions, 45 pairs (475)."""
    out = [Spec("count", d, n=n) for d in range(10) for n in range(1, MAX_COUNT + 1)]
    out += [Spec("relation", a, b, rel=r) for a in range(10) for b in range(10) if a != b for r in RELATIONS]
    out += [Spec("region", d, where=w) for d in range(10) for w in REGIONS]
    out += [Spec("pair", a, b) for a in range(10) for b in range(a + 1, 10)]
    return out


def random_spec(rng: np.random.Generator) -> Spec:
    """A spec drawn task first (uniformly), then its digits, count, relation or region."""
    task = TASKS[int(rng.integers(len(TASKS)))]
    a, b = (int(x) for x in rng.choice(10, 2, replace=False))
    if task == "count":
        return Spec(task, a, n=int(rng.integers(1, MAX_COUNT + 1)))
    if task == "relation":
        return Spec(task, a, b, rel=RELATIONS[int(rng.integers(len(RELATIONS)))])
    if task == "region":
        return Spec(task, a, where=REGIONS[int(rng.integers(len(REGIONS)))])
    return Spec(task, a, b)


def _in_region(cell: int, where: str) -> bool:
    r, c = CELLS[cell]
    return {"top": r == 0, "bottom": r == 1, "left": c == 0, "right": c == 1}[where]


def layout(spec: Spec, rng: np.random.Generator) -> list[int | None]:
    """A random assignment of digits to the four cells that satisfies ``spec`` (others empty)."""
    cells: list[int | None] = [None] * len(CELLS)
    if spec.task == "count":
        for i in rng.choice(len(CELLS), spec.n, replace=False):
            cells[int(i)] = spec.a
    elif spec.task == "relation":
        ra, rb, ca, cb = (int(x) for x in rng.integers(0, GRID, 4))
        if spec.rel in ("left_of", "right_of"):
            ca, cb = (0, 1) if spec.rel == "left_of" else (1, 0)
        else:
            ra, rb = (0, 1) if spec.rel == "above" else (1, 0)
        cells[CELLS.index((ra, ca))] = spec.a
        cells[CELLS.index((rb, cb))] = spec.b
    elif spec.task == "region":
        choices = [i for i in range(len(CELLS)) if _in_region(i, spec.where or "")]
        cells[choices[int(rng.integers(len(choices)))]] = spec.a
    else:
        i, j = (int(x) for x in rng.choice(len(CELLS), 2, replace=False))
        cells[i], cells[j] = spec.a, spec.b
    return cells


def render(cells: list[int | None], images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
           pools: list[np.ndarray] | None = None) -> np.ndarray:
    """A (16, 16) uint8 canvas: each cell a random image of its digit from ``images`` (N, 8, 8)
    uint8 with ``labels`` (N,), or background; ``pools``: each digit's indices, if known."""
    canvas = np.zeros(IMAGE_SHAPE[1:], np.uint8)
    for cell, digit in enumerate(cells):
        if digit is not None:
            pool = np.flatnonzero(labels == digit) if pools is None else pools[digit]
            r, c = CELLS[cell]
            canvas[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = images[pool[int(rng.integers(len(pool)))]]
    return canvas


def training_set(n: int, images: np.ndarray, labels: np.ndarray, seed: int = 0
                 ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``n`` random compositions described by true training prompts: canvases (n, 16, 16) uint8,
    the distinct prompts, and each canvas's index into them (n,)."""
    rng = np.random.default_rng(seed)
    canvases = np.zeros((n, *IMAGE_SHAPE[1:]), np.uint8)
    index: dict[str, int] = {}
    ids = np.zeros(n, np.int64)
    pools = [np.flatnonzero(labels == d) for d in range(10)]
    for i in range(n):
        spec = random_spec(rng)
        prompt = prompt_of(spec, int(rng.integers(len(TRAIN_TEMPLATES[spec.task]))))
        canvases[i] = render(layout(spec, rng), images, labels, rng, pools)
        ids[i] = index.setdefault(prompt, len(index))
    return canvases, list(index), ids


def eval_specs(seed: int = 1) -> list[Spec]:
    """The 40 specs of the evaluation sets (10 counts, 16 relations, 8 regions, 6 pairs), fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    by_task = {t: [s for s in all_specs() if s.task == t] for t in TASKS}
    take = {"count": 10, "relation": 16, "region": 8, "pair": 6}
    out = []
    for t in TASKS:
        idx = sorted(int(i) for i in rng.choice(len(by_task[t]), take[t], replace=False))
        out += [by_task[t][i] for i in idx]
    return out
