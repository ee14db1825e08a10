"""The training reward stage outside Ray: the weighted sum and an optional service that is down."""

import numpy as np
from prometheus_client import REGISTRY

from reward_workers.digits import DigitsClassifierReward, load_split
from services.config import load_config
from services.rewards import RewardStage

PROMPTS = ["a handwritten zero", "a handwritten one", "a handwritten two", "a handwritten three"]


def unavailable_count() -> float:
    return REGISTRY.get_sample_value("fmrl_reward_client_errors_total", {"reward": "clip", "kind": "unavailable"}) or 0.0


def test_optional_service_that_is_down_costs_one_timeout_then_is_retried(redis_url):
    """No worker serves CLIP: the first batch waits one timeout and goes on without it; the
    next batches skip it at once (no new attempt is counted) until the window has passed."""
    cfg = load_config(None, ["reward.components=[{kind: digits_classifier, weight: 2.0}, {kind: clip, transport: redis, "
                             f"required: false, redis: {{url: '{redis_url}', timeout_s: 0.2, attempts: 1, "
                             "retry_unavailable_s: 3600}}]"]).reward
    split = load_split()
    images = split.heldout_images[:4, :, :, None]
    stage = RewardStage(cfg)
    try:
        start = unavailable_count()
        first, second = stage.score(images, PROMPTS), stage.score(images, PROMPTS)
        assert unavailable_count() - start == 1  # the second batch did not try
        digits = DigitsClassifierReward()(images, PROMPTS).scores
        for out in (first, second):
            np.testing.assert_array_equal(out["clip/available"], np.zeros(4))
            np.testing.assert_array_equal(out["digits_classifier/available"], np.ones(4))
            np.testing.assert_allclose(out["scores"], 2.0 * digits, rtol=1e-12)  # the weight applies
            assert "clip" not in out
        stage.components[1][1].down_until = 0.0  # the window has passed
        stage.score(images, PROMPTS)
        assert unavailable_count() - start == 2
    finally:
        stage.close()
