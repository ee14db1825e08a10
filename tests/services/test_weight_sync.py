"""Weight payloads: the object-store form round-trips every dtype, and samplers refuse what
fails its checksum or does not fit, loading nothing; a partial payload loads only its tensors."""

import numpy as np
import pytest
import torch

from samplers.digits import IMAGE_SHAPE, to_uint8
from samplers.policy import state_checksum
from samplers.sampler import Sampler, WeightsMismatch
from services.weight_sync import WirePayload
from tests.helpers import table_encode, tiny_velocity


def _sampler(seed=0):
    return Sampler(tiny_velocity(seed), table_encode, to_uint8, IMAGE_SHAPE, num_steps=2)


def test_wire_payload_round_trips_every_dtype_without_copying():
    state = {"w": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16), "i": torch.arange(6),
             "m": torch.tensor([True, False]), "f16": torch.randn(2, 2).half()}
    p = WirePayload.from_state(7, state, state_checksum(state))
    assert p.dtypes["h"] == "torch.bfloat16" and p.arrays["h"].dtype == np.int16  # numpy has no bf16
    assert p.nbytes == 12 * 4 + 5 * 2 + 6 * 8 + 2 + 4 * 2
    back = p.state()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())
    assert state_checksum(back) == p.checksum
    assert back["w"].data_ptr() == p.arrays["w"].ctypes.data  # a view of the array, not a copy


def test_a_tampered_payload_is_refused_and_nothing_is_loaded():
    learner, s = _sampler(1), _sampler(0)
    own = state_checksum(s.velocity.state_dict())
    state = learner.velocity.state_dict()
    p = WirePayload.from_state(3, state, state_checksum(state))
    name = sorted(p.arrays)[0]
    p.arrays[name].reshape(-1)[0] += 1.0  # one value changed after the checksum was taken
    with pytest.raises(WeightsMismatch, match="version 3 fail their checksum"):
        s.apply(p.version, p.state(), p.checksum)
    assert s.version == 0 and state_checksum(s.velocity.state_dict()) == own


def test_a_partial_payload_loads_only_its_tensors():
    learner, s = _sampler(1), _sampler(0)
    before = {k: v.clone() for k, v in s.velocity.state_dict().items()}
    names = [k for k in before if "attn" in k]
    assert 0 < len(names) < len(before)
    part = {k: v for k, v in learner.velocity.state_dict().items() if k in names}
    assert s.apply(2, part, state_checksum(part)) == (2, state_checksum(part))
    after = s.velocity.state_dict()
    assert all(torch.equal(after[k], part[k]) for k in names)
    assert all(torch.equal(after[k], before[k]) for k in before if k not in names)


@pytest.mark.parametrize("bad", ["unknown", "shape"])
def test_a_payload_that_does_not_fit_the_policy_is_refused(bad):
    s = _sampler()
    state = {k: v.clone() for k, v in s.velocity.state_dict().items()}
    if bad == "unknown":
        state["lora_A.extra"] = torch.zeros(2)
    else:
        k = next(iter(state))
        state[k] = torch.zeros(*state[k].shape, 2)
    with pytest.raises(WeightsMismatch, match="do not fit this policy"):
        s.apply(1, state, state_checksum(state))
    assert s.version == 0
