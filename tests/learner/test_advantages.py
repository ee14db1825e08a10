"""Reward normalisation and advantage shaping on hand-computed numbers."""

import json
import math

import numpy as np
import pytest
import torch

from learner.advantages import (
    BatchStatTracker,
    PerPromptStatTracker,
    clip_advantages,
    group_centred,
    make_tracker,
    shape_rewards,
)

AB = ["a", "a", "b", "b"]


def test_below_min_count_uses_batch_stats():
    # Buffers a = [0, 2], b = [2, 4] hold 2 < min_count = 3 values → batch statistics:
    # μ = (0 + 2 + 2 + 4)/4 = 2, σ² = (4 + 0 + 0 + 4)/4 = 2 → A = (−2, 0, 0, 2)/√2
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3, eps=0.0)
    adv, stats = tracker.normalize(AB, torch.tensor([0.0, 2.0, 2.0, 4.0]))
    s = math.sqrt(2.0)
    torch.testing.assert_close(adv, torch.tensor([-s, 0.0, 0.0, s]))
    assert adv.dtype == torch.float32
    assert stats == {"zero_spread_groups": 0.0, "fallback_fraction": 1.0, "groups": 2.0}


def test_at_min_count_uses_per_prompt_stats():
    # Same batch, min_count = 2: a = [0, 2] → μ 1, σ 1 → (−1, 1); b = [2, 4] → μ 3, σ 1 → (−1, 1)
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2, eps=0.0)
    adv, stats = tracker.normalize(AB, torch.tensor([0.0, 2.0, 2.0, 4.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    assert stats["fallback_fraction"] == 0.0


def test_buffer_fills_across_batches_mixed_with_fallback():
    # Batch 1 (min_count 3): all fallback, as in the first test.
    # Batch 2: prompts (a, a, b, c), rewards (0, 2, 3, 5).
    #   a buffer [0, 2, 0, 2] → μ 1, σ² = (1+1+1+1)/4 = 1 → (0−1)/1 = −1, (2−1)/1 = 1
    #   b buffer [2, 4, 3]    → μ 3 → (3−3)/σ = 0
    #   c buffer [5], 1 < 3   → batch: μ = 10/4 = 2.5, σ² = (6.25+.25+.25+6.25)/4 = 13/4
    #                            → (5 − 2.5)/(√13/2) = 5/√13
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3, eps=0.0)
    tracker.normalize(AB, torch.tensor([0.0, 2.0, 2.0, 4.0]))
    adv, stats = tracker.normalize(["a", "a", "b", "c"], torch.tensor([0.0, 2.0, 3.0, 5.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 5 / math.sqrt(13.0)]))
    assert stats["fallback_fraction"] == 0.25
    assert stats["groups"] == 3.0


def test_buffer_size_evicts_old_values():
    # Batch 1: a = [0, 2] → μ 1, σ 1 → (−1, 1). Batch 2: a gets 4.
    #   buffer_size 2: 0 drops out → [2, 4], μ 3, σ 1 → (4 − 3)/1 = 1
    #   buffer_size 3: [0, 2, 4], μ 2, σ² = 8/3 → 2/√(8/3) = √(3/2) ≈ 1.2247
    results = []
    for size in (2, 3):
        tracker = PerPromptStatTracker(buffer_size=size, min_count=2, eps=0.0)
        first, _ = tracker.normalize(["a", "a"], torch.tensor([0.0, 2.0]))
        torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]))
        adv, _ = tracker.normalize(["a"], torch.tensor([4.0]))
        results.append(float(adv[0]))
    assert results[0] == pytest.approx(1.0)
    assert results[1] == pytest.approx(math.sqrt(1.5))


def test_global_std_divides_by_std_of_centred_rewards():
    # a = [0, 2] → μ 1, centred (−1, 1); b = [0, 14] → μ 7, centred (−7, 7)
    # σ_g² = (1 + 1 + 49 + 49)/4 = 25 → σ_g = 5 → A = (−0.2, 0.2, −1.4, 1.4)
    # (per-prompt std would give (−1, 1, −1, 1))
    rewards = torch.tensor([0.0, 2.0, 0.0, 14.0])
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2, global_std=True, eps=0.0)
    adv, _ = tracker.normalize(AB, rewards)
    torch.testing.assert_close(adv, torch.tensor([-0.2, 0.2, -1.4, 1.4]))
    local, _ = PerPromptStatTracker(buffer_size=8, min_count=2, eps=0.0).normalize(AB, rewards)
    torch.testing.assert_close(local, torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_zero_spread_group_counted():
    # a = (1, 1): μ 1, σ 0 → 0/(0 + eps) = 0, counted; b = (0, 2) → (−1, 1)/(1 + 1e-6)
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    adv, stats = tracker.normalize(AB, torch.tensor([1.0, 1.0, 0.0, 2.0]))
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -1.0, 1.0]) / (1 + 1e-6))
    assert stats["zero_spread_groups"] == 1.0
    # A single sample is a group with zero spread too: a (alone) counted, b = (0, 2) not.
    _, stats = PerPromptStatTracker(buffer_size=8, min_count=2).normalize(
        ["a", "b", "b"], torch.tensor([5.0, 0.0, 2.0]))
    assert stats["zero_spread_groups"] == 1.0


def test_non_finite_and_length_errors_leave_buffers_untouched():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    before = tracker.state_dict()
    with pytest.raises(ValueError, match="2 of 3 rewards are not finite"):
        tracker.normalize(["a", "a", "b"], torch.tensor([0.0, float("nan"), float("inf")]))
    with pytest.raises(ValueError, match="3 prompts for 2 rewards"):
        tracker.normalize(["a", "a", "b"], torch.tensor([0.0, 1.0]))
    assert tracker.state_dict() == before


def test_bad_settings():
    with pytest.raises(ValueError, match="must not exceed buffer_size"):
        PerPromptStatTracker(buffer_size=4, min_count=5)
    with pytest.raises(ValueError, match="saved with settings"):
        PerPromptStatTracker(buffer_size=4, min_count=2).load_state_dict(
            PerPromptStatTracker(buffer_size=8, min_count=2).state_dict())


def test_state_dict_round_trip_reproduces_later_outputs():
    # buffer_size 3 so that eviction is part of the state being resumed.
    original = PerPromptStatTracker(buffer_size=3, min_count=2, eps=1e-6)
    original.normalize(AB, torch.tensor([0.3, 1.7, 2.2, 4.9]))
    original.normalize(["a", "c", "c"], torch.tensor([0.1, 5.0, 5.5]))
    resumed = PerPromptStatTracker(buffer_size=3, min_count=2, eps=1e-6)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for prompts, rewards in [(["a", "b", "c", "d"], torch.tensor([0.9, 3.3, 4.4, 1.0])),
                             (AB, torch.tensor([2.0, 0.5, 3.1, 3.1]))]:
        expected, expected_stats = original.normalize(prompts, rewards)
        got, got_stats = resumed.normalize(prompts, rewards)
        assert torch.equal(got, expected)
        assert got_stats == expected_stats
    assert resumed.state_dict() == original.state_dict()


def test_shape_rewards_three_modes():
    a = torch.tensor([-2.0, 0.5, 3.0])
    # clip, limit 1: (−1, 0.5, 1)
    torch.testing.assert_close(shape_rewards(a, "clip"), torch.tensor([-1.0, 0.5, 1.0]))
    # tanh, limit 1: tanh(−2) = −0.96402758, tanh(0.5) = 0.46211716, tanh(3) = 0.99505475
    torch.testing.assert_close(shape_rewards(a, "tanh"), torch.tensor([-0.96402758, 0.46211716, 0.99505475]))
    # tanh, limit 2: 2·tanh(a/2) = 2·(tanh(−1), tanh(0.25), tanh(1.5))
    #              = 2·(−0.76159416, 0.24491866, 0.90514825)
    torch.testing.assert_close(shape_rewards(a, "tanh", limit=2.0),
                               torch.tensor([-1.52318832, 0.48983732, 1.81029650]))
    torch.testing.assert_close(shape_rewards(a, "none"), a)
    with pytest.raises(ValueError, match=r"valid modes: \['clip', 'none', 'tanh'\]"):
        shape_rewards(a, "sigmoid")  # type: ignore[arg-type]


def test_clip_advantages_fraction():
    # a_max 1: −3 and 2 lie strictly beyond, 1.0 sits on the bound → fraction 2/4
    clipped, fraction = clip_advantages(torch.tensor([-3.0, 0.5, 1.0, 2.0]), 1.0)
    torch.testing.assert_close(clipped, torch.tensor([-1.0, 0.5, 1.0, 1.0]))
    assert fraction == 0.5
    with pytest.raises(ValueError, match="a_max must be positive"):
        clip_advantages(torch.tensor([1.0]), 0.0)


def test_group_centred_hand_computed():
    # ids (7, 3, 7, 7): group 7 = (1, 2, 6), mean 3 → (−2, −1, 3); group 3 = (5), mean 5 → 0
    ids = torch.tensor([7, 3, 7, 7])
    out = group_centred(ids, torch.tensor([1.0, 5.0, 2.0, 6.0]))
    torch.testing.assert_close(out, torch.tensor([-2.0, 0.0, -1.0, 3.0]))


# ---- the released batch tracker (Flow-GRPO / DiffusionNFT) ----------------------------------

def _release_update(prompts: list[str], rewards: np.ndarray, global_std: bool) -> np.ndarray:
    """A cleared tracker's ``update`` (flow_grpo/stat_tracking.py:12–32 in both releases): for
    each distinct prompt, its rewards minus their mean, over (np.std of all the batch's rewards,
    or of the prompt's) + 1e-4. Written here in numpy, float64, as the release computes it."""
    names = np.array(prompts)
    out = np.zeros_like(rewards)
    for p in np.unique(names):
        mine = rewards[names == p]
        spread = np.std(rewards if global_std else mine) + 1e-4
        out[names == p] = (mine - np.mean(mine)) / spread
    return out


MIXED = ["c", "a", "b", "a", "c", "a", "d", "b", "b"]  # a ×3, b ×3 (all equal), c ×2, d alone


@pytest.mark.parametrize("global_std", [True, False])
def test_batch_tracker_equals_the_release(global_std):
    g = torch.Generator().manual_seed(4)
    rewards = torch.rand(9, generator=g, dtype=torch.float64)
    rewards[[2, 7, 8]] = 0.25  # prompt b: zero spread
    adv, stats = BatchStatTracker(global_std=global_std).normalize(MIXED, rewards)
    expected = _release_update(MIXED, rewards.numpy(), global_std)
    assert adv.dtype == torch.float64
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert adv[6] == 0.0 and (adv[[2, 7, 8]] == 0).all()  # the single sample, the zero-spread group
    assert stats == {"zero_spread_groups": 2.0, "groups": 4.0}  # b and d
    # float32 rewards (the learner's) give float32 advantages of the same numbers
    adv32, _ = BatchStatTracker(global_std=global_std).normalize(MIXED, rewards.float())
    assert adv32.dtype == torch.float32
    np.testing.assert_allclose(adv32.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_batch_tracker_hand_computed_global_std_of_raw_rewards():
    # a = (0, 2), b = (0, 14): centred (−1, 1, −7, 7); raw batch mean 4,
    # σ² = (16 + 4 + 16 + 100)/4 = 34 → A = (−1, 1, −7, 7)/(√34 + 1e-4)
    # (the buffer tracker's global std is of the centred rewards: σ = 5 → (−0.2, 0.2, −1.4, 1.4))
    adv, _ = BatchStatTracker().normalize(AB, torch.tensor([0.0, 2.0, 0.0, 14.0], dtype=torch.float64))
    want = torch.tensor([-1.0, 1.0, -7.0, 7.0], dtype=torch.float64) / (math.sqrt(34.0) + 1e-4)
    torch.testing.assert_close(adv, want, rtol=1e-14, atol=0)
    # per-prompt std: a σ 1, b σ 7 → (−1, 1, −1, 1)/(σ + 1e-4)
    local, _ = BatchStatTracker(global_std=False).normalize(AB, torch.tensor([0.0, 2.0, 0.0, 14.0],
                                                                             dtype=torch.float64))
    torch.testing.assert_close(local, torch.tensor([-1 / 1.0001, 1 / 1.0001, -7 / 7.0001, 7 / 7.0001],
                                                   dtype=torch.float64), rtol=1e-14, atol=0)


def test_batch_tracker_all_singletons_normalise_over_the_batch():
    # one sample per prompt: the release's scripts skip the tracker and use (r − mean)/(std + 1e-4)
    # over the batch (flow_grpo scripts/train_sd3.py:547–548, 781–782): r = (1, 2, 3, 6), mean 3,
    # σ² = (4 + 1 + 0 + 9)/4 = 3.5
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    adv, stats = BatchStatTracker().normalize(["a", "b", "c", "d"], r)
    torch.testing.assert_close(adv, (r - 3.0) / (math.sqrt(3.5) + 1e-4), rtol=1e-14, atol=0)
    assert stats["zero_spread_groups"] == 4.0


def test_batch_tracker_forgets_each_batch_and_saves_only_settings():
    t = BatchStatTracker()
    t.normalize(AB, torch.tensor([5.0, 9.0, 1.0, 1.5]))
    second, _ = t.normalize(AB, torch.tensor([0.3, 0.1, 0.7, 0.2]))
    fresh, _ = BatchStatTracker().normalize(AB, torch.tensor([0.3, 0.1, 0.7, 0.2]))
    assert torch.equal(second, fresh)
    state = json.loads(json.dumps(t.state_dict()))
    assert state == {"mode": "batch", "global_std": True, "eps": 1e-4}
    BatchStatTracker().load_state_dict(state)
    with pytest.raises(ValueError, match="saved with settings"):
        BatchStatTracker(global_std=False).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with settings"):
        BatchStatTracker().load_state_dict(PerPromptStatTracker(global_std=True).state_dict())
    with pytest.raises(ValueError, match="saved by a 'batch' tracker"):
        PerPromptStatTracker().load_state_dict(state)
    # a buffer tracker's state from before the mode was recorded still loads
    legacy = PerPromptStatTracker().state_dict()
    del legacy["mode"]
    PerPromptStatTracker().load_state_dict(legacy)
    with pytest.raises(ValueError, match="not finite"):
        t.normalize(AB, torch.tensor([0.0, float("nan"), 1.0, 2.0]))


def test_make_tracker_modes():
    assert isinstance(make_tracker("batch", global_std=True), BatchStatTracker)
    buf = make_tracker("buffer", buffer_size=8, min_count=2)
    assert isinstance(buf, PerPromptStatTracker) and buf.buffer_size == 8
    with pytest.raises(ValueError, match=r"valid modes: \['batch', 'buffer'\]"):
        make_tracker("window")  # type: ignore[arg-type]
