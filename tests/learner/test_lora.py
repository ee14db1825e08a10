"""LoRA: the adapted policy starts as the base, only the adapter trains, the reference is the
base (adapter off), only the adapter is published and checkpointed, and it round-trips."""

import copy
import dataclasses

import pytest
import torch

from learner.learner import Learner, LearnerSettings
from learner.settings import ORWParams
from samplers.digits import IMAGE_SHAPE, to_uint8
from samplers.policy import add_lora, load_velocity, published_state, state_checksum
from samplers.sampler import Sampler
from tests.helpers import fake_batch, table_encode, tiny_velocity

REWARDS = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _adapted(rank=4):
    return add_lora(tiny_velocity(), rank=rank, alpha=8.0, target_modules=TARGETS)


def _learner(rank=4) -> Learner:
    settings = dataclasses.replace(LearnerSettings(orw=ORWParams(alpha=1.0)), lr=5e-2, warmup_steps=0)
    return Learner(_adapted(rank), table_encode, settings)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 8, 8, generator=g), torch.rand(8, generator=g), table_encode(["a handwritten one"] * 8)


@torch.no_grad()
def test_adapter_trains_alone_and_the_reference_stays_the_base():
    base = tiny_velocity().eval()
    ln = _learner()
    x, t, c = _inputs()
    assert torch.equal(ln.policy(x, t, c), base(x, t, c))  # LoRA's B starts at zero
    frozen = {k: v.clone() for k, v in ln.policy.state_dict().items() if "lora_" not in k}
    with torch.enable_grad():
        for i in range(3):
            ln.update(fake_batch(seed=i), REWARDS)
    now = ln.policy.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())  # the base never moves
    assert not torch.allclose(ln.policy(x, t, c), base(x, t, c), atol=1e-4)  # the adapter did
    assert torch.equal(ln.reference(x, t, c), base(x, t, c))  # reference = adapter off = base
    assert ln.policy.transformer.peft_config["default"].r == 4
    trainable = [n for n, p in ln.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(ln.optimizer.param_groups[0]["params"]) == len(trainable)


def test_only_the_adapter_is_published_and_a_sampler_applies_it():
    ln = _learner()
    for i in range(2):
        ln.update(fake_batch(seed=i), REWARDS)
    payload = ln.publish()
    assert payload.state and all("lora_" in k for k in payload.state)
    n_adapter = sum(v.numel() for v in payload.state.values())
    assert n_adapter < sum(v.numel() for v in ln.policy.state_dict().values()) / 5
    s = Sampler(_adapted(), table_encode, to_uint8, IMAGE_SHAPE, num_steps=3)
    # a broadcast receiver shapes its buffer by published_state: the same tensors the learner sends
    template = published_state(s.velocity)
    assert {k: v.shape for k, v in template.items()} == {k: v.shape for k, v in payload.state.items()}
    assert s.apply(payload.version, payload.state, payload.checksum) == (payload.version, payload.checksum)
    x, t, c = _inputs(1)
    with torch.no_grad():
        assert torch.equal(s.velocity(x, t, c), ln.rollout(x, t, c))


def test_adapter_checkpoint_round_trips_and_refuses_another_rank(tmp_path):
    a = _learner()
    for i in range(2):
        a.update(fake_batch(seed=i), REWARDS)
    a.save(tmp_path / "ck")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ck" / "policy.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the base is not copied into checkpoints
    b = _learner()
    b.load(tmp_path / "ck")
    assert state_checksum(b.policy.state_dict()) == state_checksum(a.policy.state_dict())
    assert state_checksum(b.rollout.state()) == state_checksum(a.rollout.state())
    ref_a = copy.deepcopy(a)
    a.update(fake_batch(seed=5), REWARDS)
    b.update(fake_batch(seed=5), REWARDS)
    assert state_checksum(b.policy.state_dict()) == state_checksum(a.policy.state_dict())
    assert state_checksum(ref_a.policy.state_dict()) != state_checksum(a.policy.state_dict())
    with pytest.raises(ValueError, match="holds only a LoRA adapter"):
        load_velocity(tmp_path / "ck" / "policy.safetensors")
    with pytest.raises(ValueError, match="another LoRA rank or target modules"):
        _learner(rank=2).load(tmp_path / "ck")


def test_bf16_policy_trains_a_float32_adapter_from_float32_inputs():
    v = add_lora(tiny_velocity().to(torch.bfloat16), rank=4, alpha=4.0, target_modules=TARGETS)
    lora = {n: p for n, p in v.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for n, p in v.named_parameters() if "lora_" not in n)
    x, t, c = _inputs()
    out = v(x, t, c)  # float32 in, float32 out, the transformer itself in bf16
    assert out.dtype == torch.float32
    with torch.no_grad():
        base = tiny_velocity().to(torch.bfloat16)(x, t, c)
    assert torch.equal(out.detach(), base)  # B = 0: the adapter changes nothing yet
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.values())
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B learns first
