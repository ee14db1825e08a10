"""The run's pictures: sample grids at native resolution (or an integer scale the title
states), titles and labels that overlap nothing, whole numbers on iteration axes."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services import report
from services.evaluation import Evaluation
from services.report import GAP, MARGIN, PAD


def _evaluation(images: np.ndarray, version: int, prompts: tuple[str, ...]) -> Evaluation:
    p = images.shape[0]
    return Evaluation(version=version, prompts=prompts, images=images, reward=0.25 + version / 1000,
                      accuracy=None, diversity=0.5, per_prompt_reward=(0.25,) * p, per_prompt_diversity=(0.5,) * p)


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _white(region: np.ndarray) -> bool:
    return bool((region == 255).all())


def _assert_text_stays_in_its_place(png: np.ndarray, layout: report.GridLayout) -> None:
    """Read from the pixels: the labels end before the first panel, the titles end at their
    panel's edge (the gaps between panels are blank from top to bottom) and above the samples."""
    text_end = MARGIN + layout.label_w - layout.font_px
    assert _white(png[:, text_end:layout.panel_x(0)])
    for k in range(layout.panels - 1):
        assert _white(png[:, layout.panel_x(k) + layout.panel_w:layout.panel_x(k + 1)])
    top = MARGIN + layout.title_h
    band = png[top - max(2, layout.font_px // 4):top, layout.panel_x(0):]
    assert _white(band)  # the last title line ends above the samples


def test_a_512px_sample_is_drawn_at_512px(tmp_path: Path) -> None:
    prompts = ("a photo of an astronaut riding a horse on the surface of mars, highly detailed, dramatic light",
               "a cat")
    before = _evaluation(_noise((2, 3, 512, 512, 3), 0), 0, prompts)
    after = _evaluation(_noise((2, 3, 512, 512, 3), 1), 40, prompts)
    path = report.sample_grid(before, after, tmp_path / "grid.png", columns=8)  # 3 samples: 3 columns
    png = np.asarray(Image.open(path).convert("RGB"))
    _, layout = report.render_grid([(before, "before"), (after, "after")], 8)
    assert (layout.zoom, layout.shrink, layout.cell_h, layout.cell_w) == (1, 1, 512, 512)
    # native layout: 3 samples of 512 px and 4 gutters per panel row, 2 rows, two panels
    mosaic_w, mosaic_h = 3 * 512 + 4 * PAD, 2 * 512 + 3 * PAD
    assert (layout.mosaic_w, layout.mosaic_h, layout.panel_w) == (mosaic_w, mosaic_h, mosaic_w)
    expected = (2 * MARGIN + layout.label_w + 2 * mosaic_w + GAP, 2 * MARGIN + layout.title_h + mosaic_h)
    assert png.shape[1::-1] == expected
    for k, ev in enumerate((before, after)):
        for i in range(2):
            for j in range(3):
                x, y = layout.cell_origin(k, i, j)
                assert np.array_equal(png[y:y + 512, x:x + 512], ev.images[i, j]), (k, i, j)  # pixel for pixel
    assert all(t.endswith("512×512 px 1:1") for t in layout.titles)
    _assert_text_stays_in_its_place(png, layout)


def test_tiny_samples_are_enlarged_and_large_ones_shrunk_by_a_stated_integer_factor(tmp_path: Path) -> None:
    digits = _evaluation(_noise((3, 2, 8, 8, 1), 2), 0, ("a handwritten one", "a handwritten two", "a handwritten three"))
    image, layout = report.render_grid([(digits, "reward 0.250, diversity 0.500, a long title that must wrap")], 8)
    png = np.asarray(image)
    assert (layout.zoom, layout.cell_h, layout.columns) == (6, 48, 2)
    assert layout.titles[0].endswith("8×8 px shown ×6")
    assert layout.title_h >= 3 * layout.line_h  # wrapped to the narrow panel, and room made for it
    x, y = layout.cell_origin(0, 1, 1)
    ink = np.kron(255 - digits.images[1, 1, :, :, 0], np.ones((6, 6), np.uint8))  # dark ink on light, square pixels
    assert np.array_equal(png[y:y + 48, x:x + 48], np.repeat(ink[..., None], 3, -1))
    _assert_text_stays_in_its_place(png, layout)
    path = report.eval_grid(digits, tmp_path / "eval.png", columns=8)
    title = f"reward {digits.reward:.3f}, diversity {digits.diversity:.3f}"
    assert Image.open(path).size == report.render_grid([(digits, title)], 8)[1].size

    big = _evaluation(_noise((1, 4, 256, 256, 3), 3), 0, ("a cat",))
    image, layout = report.render_grid([(big, "before"), (big, "after")], 4, max_panel_width=512)
    assert (layout.shrink, layout.cell_h) == (2, 128) and layout.titles[0].endswith("256×256 px shown at 1/2")
    x, y = layout.cell_origin(1, 0, 3)
    shrunk = np.asarray(Image.fromarray(big.images[0, 3]).resize((128, 128), Image.Resampling.BOX))
    assert np.array_equal(np.asarray(image)[y:y + 128, x:x + 128], shrunk)
    assert image.size == (2 * MARGIN + layout.label_w + 2 * (4 * 128 + 5 * PAD) + GAP,
                          2 * MARGIN + layout.title_h + 128 + 2 * PAD)


def _integral_ticks(axis, lo: float, hi: float) -> list[float]:  # noqa: ANN001 - a matplotlib Axis
    ticks = [t for t in axis.get_ticklocs() if lo - 1e-9 <= t <= hi + 1e-9]
    assert ticks
    return [t for t in ticks if t != round(t)]


@pytest.mark.parametrize("iterations", [2, 3, 7])
def test_iteration_axes_have_integer_ticks(tmp_path: Path, iterations: int) -> None:
    import matplotlib.pyplot as plt

    rows = [{"kind": "eval", "when": "before", "reward": 0.4}]
    rows += [{"kind": "train", "iteration": i, "reward_mean": 0.4 + 0.05 * i, "reward/digits": 0.4 + 0.04 * i,
              "diversity": 1.0 - 0.1 * i, "w2": 0.01 * i} for i in range(iterations)]
    rows += [{"kind": "eval", "when": "after", "reward": 0.6}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = iterations - 1

    fig = report.reward_curve_figure(metrics)
    assert _integral_ticks(fig.axes[0].xaxis, 0, last) == []
    plt.close(fig)
    train = [r for r in rows if r["kind"] == "train"]
    fig = report.curves_figure(train)
    rewards, diversity, w2, colorbar = fig.axes
    for axis in (rewards.xaxis, w2.xaxis, colorbar.yaxis):
        assert _integral_ticks(axis, 0, last) == []
    plt.close(fig)

    fig, ax = plt.subplots()  # matplotlib's own choice on the same data: fractional iterations
    ax.plot(range(iterations), range(iterations))
    fig.canvas.draw()
    assert iterations > 5 or _integral_ticks(ax.xaxis, 0, last) != []
    plt.close(fig)
    assert report.reward_curve(metrics, tmp_path / "curve.png").is_file()


def test_the_w2_panel_names_the_policy_the_term_measures_the_distance_to():
    """AC-Flow anchored at π_old logs ‖v_θ − v_old‖², the other W2 terms ‖v_θ − v_ref‖²: the
    panel's label follows the run's config."""
    import matplotlib.pyplot as plt

    configs = {"old": {"algorithm": {"name": "ac_flow", "ac_flow": {"anchor": "rollout"}}},
               "ref": {"algorithm": {"name": "ac_flow", "ac_flow": {"anchor": "reference"}}}}
    assert {k: report.w2_anchor(c) for k, c in configs.items()} == {"old": "old", "ref": "ref"}
    assert report.w2_anchor({"algorithm": {"name": "orw_cfm_w2", "ac_flow": {"anchor": "rollout"}}}) == "ref"
    train = [{"iteration": i, "reward_mean": 0.5, "diversity": 1.0, "w2": 0.1 * i} for i in range(3)]
    for anchor, title in (("old", "W2 trust region (to π_old)"), ("ref", "W2 bound (ORW-CFM-W2, Thm 3)")):
        fig = report.curves_figure(train, anchor)
        w2 = fig.axes[2]
        assert (w2.get_ylabel(), w2.get_title()) == (f"mean ‖v_θ − v_{anchor}‖² per element", title)
        plt.close(fig)
