"""Evaluation during training and the reward-hacking watch: each image statistic on tiny arrays
with the arithmetic in a comment, the drift ratio, the schedule of evaluations, what an
evaluation writes (row, tracker scalars, npz) and that a resume keeps the evaluations before
its checkpoint."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from services.checkpoints import metrics_upto
from services.config import load_config
from services.evaluation import (
    Evaluation,
    brightness,
    colour_entropy,
    drift_ratios,
    edge_density,
    eval_due,
    evaluation_of,
    image_stats,
    jpeg_bytes,
    saturation,
)
from services.loggers import eval_row, eval_scalars


def grey(*rows):
    """One (1, H, W, 1) uint8 greyscale image from rows of pixel values."""
    return np.array(rows, np.uint8)[None, ..., None]


def test_brightness_is_the_mean_luma():
    # (0 + 255 + 255 + 255) / 4 / 255 = 0.75
    assert brightness(grey([0, 255], [255, 255])) == pytest.approx(0.75)
    # pure red: 0.299 · 1; pure green: 0.587 · 1 → mean 0.443
    rgb = np.array([[[[255, 0, 0], [0, 255, 0]]]], np.uint8)
    assert brightness(rgb) == pytest.approx((0.299 + 0.587) / 2)


def test_saturation_is_zero_for_grey_and_the_hsv_mean_for_colour():
    assert saturation(grey([0, 255], [128, 7])) == 0.0
    # (255,0,0): 1; (100,100,100): 0; black: 0 (max 0); (200,100,100): (200 − 100)/200 = 0.5 → 1.5/4
    rgb = np.array([[[[255, 0, 0], [100, 100, 100]], [[0, 0, 0], [200, 100, 100]]]], np.uint8)
    assert saturation(rgb) == pytest.approx(0.375)


def test_edge_density_counts_pixels_with_a_large_gradient():
    # luma [[0,1,1]]×3: of the 2×2 pixels with a right and a lower neighbour, the left column
    # has gx = 1 (an edge), the middle gx = gy = 0 → 2/4
    assert edge_density(grey([0, 255, 255], [0, 255, 255], [0, 255, 255])) == pytest.approx(0.5)
    # a step of 51/255 = 0.2 is under the 0.25 threshold: no edges
    assert edge_density(grey([0, 51], [0, 51])) == 0.0
    # a diagonal step: gx = 0.2, gy = 0.2 at the corner → |g| = 0.283 > 0.25 → 1 of 1
    assert edge_density(grey([0, 51], [51, 51])) == 1.0


def test_colour_entropy_is_the_bits_of_the_quantised_histogram():
    assert colour_entropy(grey([9, 9], [9, 9])) == 0.0  # one colour
    assert colour_entropy(grey([0, 0], [255, 255])) == pytest.approx(1.0)  # two, half each
    # 0, 64, 128, 192 fall in levels 0, 2, 4, 6 of 8: four equally likely → 2 bits
    assert colour_entropy(grey([0, 64], [128, 192])) == pytest.approx(2.0)
    # red and green (same level count, different colours) half each: 1 bit; a flat image 0 → mean 0.5
    two = np.zeros((2, 2, 2, 3), np.uint8)
    two[0, 0, :, 0] = 255
    two[0, 1, :, 1] = 255
    two[1] = 30
    assert colour_entropy(two) == pytest.approx(0.5)


def test_jpeg_bytes_is_pils_size_at_the_fixed_quality():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    flat = np.full((2, 16, 16, 1), 128, np.uint8)

    def size(img):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0]).save(buf, "JPEG", quality=75)
        return len(buf.getvalue())

    assert jpeg_bytes(noise) == pytest.approx((size(noise[0]) + size(noise[1])) / 2)
    assert jpeg_bytes(flat) < jpeg_bytes(noise)  # noise does not compress
    rgb = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    assert jpeg_bytes(rgb) > 0


def test_drift_is_the_factor_either_way_and_one_for_two_zeros():
    d = drift_ratios({"a": 2.0, "b": 0.5, "c": 0.0, "d": 3.0}, {"a": 1.0, "b": 1.0, "c": 0.0})
    assert d["a"] == pytest.approx(2.0) and d["b"] == pytest.approx(2.0) and d["c"] == 1.0
    assert "d" not in d  # no base to compare with


def test_evaluations_are_due_every_k_iterations_but_not_after_the_last():
    assert [k for k in range(11) if eval_due(0, k, 10)] == []
    assert [k for k in range(11) if eval_due(3, k, 10)] == [3, 6, 9]
    assert [k for k in range(11) if eval_due(5, k, 10)] == [5]  # 10: the final evaluation
    assert [k for k in range(5) if eval_due(1, k, 4)] == [1, 2, 3]


def _evaluation(iteration=0, base=None, bright=0):
    images = np.zeros((2, 3, 8, 8, 1), np.uint8)
    images[:, 1] = 255
    images[1, 2, 2:6, 3:5] = 128 + bright
    return evaluation_of(3, ["a handwritten zero", "a handwritten one"], images, np.linspace(0.1, 0.6, 6), 0.75,
                         iteration=iteration, eval_scores={"digits_classifier": 0.35, "jpeg": -0.2}, base=base,
                         seconds=1.5)


def test_an_evaluation_row_holds_its_rewards_stats_and_drift(tmp_path):
    base = _evaluation()
    ev = _evaluation(iteration=20, base=base, bright=100)
    assert base.drift == {} and set(ev.drift) == {*image_stats(ev.images[0]), "diversity"}
    assert ev.drift["brightness"] > 1 and ev.drift["saturation"] == 1.0
    row = eval_row("iteration", ev)
    assert row["kind"] == "eval" and row["when"] == "iteration" and row["iteration"] == 20
    assert row["eval_reward/jpeg"] == -0.2 and row["eval_reward/heldout_svm"] == 0.75
    assert row["watch/brightness"] == ev.stats["brightness"] and row["seconds"] == 1.5
    assert row["drift/brightness"] == ev.drift["brightness"]
    json.dumps(row, allow_nan=False)  # plain JSON numbers
    assert eval_scalars(ev)["eval/eval_reward/digits_classifier"] == 0.35
    ev.save(tmp_path / "e.npz")
    back = Evaluation.load(tmp_path / "e.npz")
    assert (back.iteration, back.scores, back.stats, back.drift) == (ev.iteration, ev.scores, ev.stats, ev.drift)
    # an 'eval_before.npz' written before these fields existed still loads (a resumed run's base)
    old = {k: v for k, v in json.loads(str(np.load(tmp_path / "e.npz")["meta"])).items()
           if k not in ("iteration", "scores", "stats", "drift", "seconds")}
    np.savez_compressed(tmp_path / "old.npz", images=ev.images, meta=np.array(json.dumps(old)))
    assert Evaluation.load(tmp_path / "old.npz").stats == {}


def test_a_resume_keeps_the_evaluations_before_its_checkpoint(tmp_path):
    rows = [{"kind": "eval", "when": "before", "iteration": 0}]
    for i in range(6):
        rows.append({"kind": "train", "iteration": i})
        if (i + 1) % 2 == 0:
            rows.append({"kind": "eval", "when": "iteration", "iteration": i + 1})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = [json.loads(x) for x in metrics_upto(tmp_path / "metrics.jsonl", 4)]
    # the checkpoint at 4 follows iteration 3's row and the evaluation after 4 iterations
    assert [(r["kind"], r["iteration"]) for r in kept] == [
        ("eval", 0), ("train", 0), ("train", 1), ("eval", 2), ("train", 2), ("train", 3), ("eval", 4)]


def test_eval_settings_are_validated():
    cfg = load_config(None, ["eval.every=5", 'eval.rewards=[{"kind": "digits_classifier"}, {"kind": "clip"}]'])
    assert cfg.eval.every == 5 and [c.label for c in cfg.eval.rewards] == ["digits_classifier", "clip"]
    assert load_config(None, []).eval.every == 0 and load_config(None, []).eval.rewards is None
    for bad in (["eval.every=-1"], ["eval.rewards=[]"], ["eval.watch_factor=1"],
                ['eval.rewards=[{"kind": "clip"}, {"kind": "clip"}]']):
        with pytest.raises(Exception, match="eval"):
            load_config(None, bad)
