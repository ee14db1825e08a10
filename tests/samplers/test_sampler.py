"""Sampler: deterministic per-prompt noise, the Trajectory contract, verified weights."""

import numpy as np
import pytest
import torch

from samplers.digits import IMAGE_SHAPE, to_pixels, to_uint8
from samplers.policy import load_velocity, save_velocity, state_checksum
from samplers.sampler import Sampler, WeightsMismatch
from samplers.trajectory import Trajectory
from tests.helpers import table_encode, tiny_velocity


def _sampler(seed=0, **kw):
    return Sampler(tiny_velocity(seed), table_encode, to_uint8, IMAGE_SHAPE, num_steps=4, **kw)


def test_trajectory_fields_and_split_invariance():
    s = _sampler()
    prompts, seeds = ["a handwritten one", "a handwritten two", "a handwritten three"], [11, 22, 33]
    whole = s.rollout(prompts, 2, seeds)
    assert whole.states.shape == (6, 5, 1, 8, 8) and whole.times.shape == (5,)
    assert whole.images.shape == (6, 8, 8, 1) and whole.images.dtype == np.uint8
    assert whole.prompt_list() == [p for p in prompts for _ in range(2)]
    torch.testing.assert_close(whole.states[:, 0], whole.noise)
    # the same prompts cut across two samplers give the same batch
    parts = Trajectory.concat([s.rollout(prompts[:1], 2, seeds[:1]), s.rollout(prompts[1:], 2, seeds[1:])])
    torch.testing.assert_close(parts.states, whole.states)
    assert parts.prompt_list() == whole.prompt_list()
    final_only = _sampler(keep_states=False).rollout(prompts, 2, seeds)
    torch.testing.assert_close(final_only.samples, whole.samples)
    assert final_only.states.shape == (6, 1, 1, 8, 8)


def test_cfg_changes_samples_and_is_recorded():
    s = _sampler()
    a = s.rollout(["a handwritten one"], 3, [5])
    b = s.rollout(["a handwritten one"], 3, [5], cfg_scale=3.0)
    assert b.cfg_scale == 3.0 and not torch.allclose(a.samples, b.samples)


def test_apply_checks_the_checksum():
    s, other = _sampler(0), tiny_velocity(1)
    state = other.state_dict()
    good = state_checksum(state)
    assert s.apply(4, state, good) == (4, good)
    assert s.rollout(["a handwritten one"], 1, [0]).version == 4
    tampered = {k: v.clone() for k, v in state.items()}
    next(iter(tampered.values())).view(-1)[0] += 1.0
    with pytest.raises(WeightsMismatch, match="fail their checksum"):
        s.apply(5, tampered, good)
    assert s.version == 4 and state_checksum(s.velocity.state_dict()) == good  # nothing applied


def test_concat_refuses_mixed_versions():
    s = _sampler()
    a = s.rollout(["a handwritten one"], 1, [0])
    s.apply(1, s.velocity.state_dict(), state_checksum(s.velocity.state_dict()))
    with pytest.raises(ValueError, match="different policy versions"):
        Trajectory.concat([a, s.rollout(["a handwritten one"], 1, [0])])


def test_pixel_round_trip_and_velocity_file(tmp_path):
    imgs = np.arange(0, 256, 4, dtype=np.uint8).reshape(1, 8, 8)
    assert np.array_equal(to_uint8(to_pixels(imgs))[..., 0], imgs)
    v = tiny_velocity(3)
    save_velocity(v, tmp_path / "p.safetensors")
    assert state_checksum(load_velocity(tmp_path / "p.safetensors").state_dict()) == state_checksum(v.state_dict())


def test_sde_sampler_records_log_probs_and_evaluation_can_ask_for_the_ode():
    s = _sampler(kind="sde")
    sde = s.rollout(["a handwritten one"], 3, [5])
    assert sde.log_probs is not None and sde.log_probs.shape == (3, 4)
    ode = s.rollout(["a handwritten one"], 3, [5], kind="ode")
    torch.testing.assert_close(ode.samples, _sampler().rollout(["a handwritten one"], 3, [5]).samples)
    assert ode.log_probs is None
    with pytest.raises(ValueError, match="unknown sampler kind"):
        s.rollout(["a handwritten one"], 1, [5], kind="langevin")
