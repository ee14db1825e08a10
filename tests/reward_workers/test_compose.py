"""The compose reward: per-constraint scores of hand-built canvases, all-or-nothing, exact numbers."""

import numpy as np
import pytest

from reward_workers.compose import (
    EMPTY,
    ComposeReward,
    HeldoutComposeEvaluator,
    score_batch,
    score_constraints,
)
from reward_workers.digits import classifier_probs, load_split
from reward_workers.registry import build_reward
from samplers import compose

E = EMPTY
THREE_LEFT_OF_SEVEN = compose.spec_metadata(compose.Spec("relation", 3, 7, rel="left_of"))
TWO_FIVES = compose.spec_metadata(compose.Spec("count", 5, n=2))
NINE_AT_TOP = compose.spec_metadata(compose.Spec("region", 9, where="top"))
FOUR_AND_TWO = compose.spec_metadata(compose.Spec("pair", 4, 2))

# (labels of cells 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right; metadata;
#  count, identity, position, position asked, all, training reward = mean of the asked constraints)
CASES = [
    ([3, 7, E, E], THREE_LEFT_OF_SEVEN, 1, 1, 1, 1, 1, 1.0),
    ([E, 3, E, 7], THREE_LEFT_OF_SEVEN, 1, 1, 0, 1, 0, 2 / 3),       # same column: not left of
    ([E, E, 3, 7], THREE_LEFT_OF_SEVEN, 1, 1, 1, 1, 1, 1.0),
    ([3, 7, 5, E], THREE_LEFT_OF_SEVEN, 1, 2 / 3, 1, 1, 0, (1 + 2 / 3 + 1) / 3),  # an extra five: 8/9
    ([3, E, E, 3], THREE_LEFT_OF_SEVEN, 0, 1, 0, 1, 0, 1 / 3),      # two threes (≠ 1), no seven (≠ 1)
    ([5, E, E, 5], TWO_FIVES, 1, 1, 1, 0, 1, 1.0),
    ([5, E, 5, 5], TWO_FIVES, 0, 1, 1, 0, 0, 0.5),                  # three fives: count fails
    ([5, E, 6, E], TWO_FIVES, 0, 0.5, 1, 0, 0, 0.25),
    ([E, 9, E, E], NINE_AT_TOP, 1, 1, 1, 1, 1, 1.0),
    ([E, E, 9, E], NINE_AT_TOP, 1, 1, 0, 1, 0, 2 / 3),
    ([E, E, E, E], FOUR_AND_TWO, 0, 0, 1, 0, 0, 0.0),               # empty canvas: nothing named is there
    ([4, 4, 2, E], FOUR_AND_TWO, 0.5, 1, 1, 0, 0, 0.75),
]


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_constraints_by_hand(case):
    labels, meta, count, identity, position, asked, all_, reward = case
    s = score_constraints(np.array(labels), meta)
    assert s == {"count": count, "identity": identity, "position": position, "position_asked": asked, "all": all_}
    assert score_batch(np.array([labels]), [meta])["mean"][0] == pytest.approx(reward, abs=1e-12)


@pytest.fixture(scope="module")
def readers() -> tuple[ComposeReward, HeldoutComposeEvaluator]:
    return ComposeReward(), HeldoutComposeEvaluator()


def _clear_digits(reward: ComposeReward, evaluator: HeldoutComposeEvaluator) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digit images that both readers (the CNN and the SVM) read as their label."""
    split = load_split()
    cnn = classifier_probs(reward.model, split.heldout_images).argmax(1)
    ok = (cnn == split.heldout_labels) & (evaluator.svm.predict(split.heldout_images) == split.heldout_labels)
    return split.heldout_images[ok], split.heldout_labels[ok]


def _canvas(cells: list, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    c = compose.render([None if x == E else x for x in cells], images, labels, np.random.default_rng(0))
    return c[..., None]


def test_reward_and_evaluator_on_built_canvases(readers):
    reward, evaluator = readers
    images, labels = _clear_digits(reward, evaluator)
    canvases = np.stack([_canvas(c[0], images, labels) for c in CASES])
    meta = [c[1] for c in CASES]
    prompts = ["p"] * len(CASES)
    out = reward(canvases, prompts, meta)
    want_labels = np.array([c[0] for c in CASES], dtype=np.float64)
    got_labels = np.stack([out.details[f"cell{i}"] for i in range(4)], 1)
    assert (got_labels == want_labels).all()  # every cell read right, empty cells as empty
    by_hand = score_batch(want_labels.astype(np.int64), meta)
    np.testing.assert_array_equal(out.scores, by_hand["mean"])
    for k in ("count", "identity", "position", "position_asked", "all"):
        np.testing.assert_array_equal(out.details[k], by_hand[k])
    np.testing.assert_array_equal(out.details["all"], [1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0])
    held = evaluator(canvases, prompts, meta)
    np.testing.assert_array_equal(held.scores, out.details["all"])  # the same canvases, another reader


def test_registered_and_needs_metadata():
    reward = build_reward("compose")
    assert reward.name == "compose"
    blank = np.zeros((1, 16, 16, 1), np.uint8)
    with pytest.raises(ValueError, match="metadata"):
        reward(blank, ["two fives"])
    with pytest.raises(ValueError, match="constraints"):
        reward(blank, ["two fives"], [{"task": "count"}])
    with pytest.raises(ValueError, match="16×16"):
        reward(np.zeros((1, 8, 8, 1), np.uint8), ["two fives"], [TWO_FIVES])
