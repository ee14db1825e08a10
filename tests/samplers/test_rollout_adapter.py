"""π_old of a LoRA policy as a second peft adapter (``RolloutAdapter``): it behaves as a frozen
copy of the policy taken at its last refresh, costs one adapter's bytes, leaves the policy's
trainable parameters and gradients alone, and is invisible to everything that reads the
policy's adapter (publishing, saving, the reference)."""

import copy

import pytest
import torch

from samplers.digits import IMAGE_SHAPE, to_uint8
from samplers.policy import (
    AdapterDisabled,
    RolloutAdapter,
    adapter_state,
    add_lora,
    is_adapted,
    load_adapter,
    load_velocity,
    load_weights,
    lora_settings,
    published_state,
    read_tensors,
    save_velocity,
    state_checksum,
)
from samplers.sampler import Sampler
from tests.helpers import table_encode, tiny_velocity

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _adapted(rank=4, dtype=torch.float32):
    return add_lora(tiny_velocity().to(dtype), rank=rank, alpha=8.0, target_modules=TARGETS)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g), table_encode(["a handwritten one"] * 4)


def _loss(policy, seed):
    x, t, c = _inputs(seed)
    return (policy(x, t, c) - x).pow(2).mean()


def _train(policy, steps, rollout=None, lr=5e-2):
    """AdamW steps on the policy's trainable parameters; with ``rollout``, π_old is called between
    the forward and the backward of each step (as a rule's prepare would)."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _loss(policy, i)
        if rollout is not None:
            rollout(*_inputs(100 + i))
        loss.backward()
        opt.step()
    return policy


def _trained(**kw):
    return _train(_adapted(**kw), 3)  # a non-zero adapter (LoRA's B starts at zero)


@torch.no_grad()
def _v(model, seed=7):
    return model(*_inputs(seed))


def _flags(policy):
    return {n: p.requires_grad for n, p in policy.named_parameters()}


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def test_pi_old_is_the_policy_at_its_last_refresh():
    policy = _trained()
    rollout = RolloutAdapter(policy)
    assert torch.equal(_v(rollout), _v(policy))
    before = copy.deepcopy(policy)
    _train(policy, 3)
    torch.testing.assert_close(_v(rollout), _v(before), rtol=0, atol=1e-6)
    assert not torch.allclose(_v(rollout), _v(policy), atol=1e-4)
    rollout.copy_from_policy()
    assert torch.equal(_v(rollout), _v(policy))


def test_ema_is_the_lerp_of_the_adapter_tensors():
    policy = _trained()
    rollout = RolloutAdapter(policy)
    _train(policy, 2)
    old, new = _clone(rollout.state()), _clone(adapter_state(policy))
    rollout.ema_from_policy(0.9)
    # 0.9·π_old + 0.1·π_θ, tensor by tensor
    torch.testing.assert_close(rollout.state(), {k: 0.9 * old[k] + 0.1 * new[k] for k in old}, rtol=0, atol=1e-7)
    assert any(not torch.equal(rollout.state()[k], old[k]) for k in old)
    with pytest.raises(ValueError, match="decay"):
        rollout.ema_from_policy(1.5)


def test_calls_keep_requires_grad_the_active_adapter_and_the_modes():
    policy = _trained().train()
    rollout = RolloutAdapter(policy)
    flags = _flags(policy)
    assert [n for n, f in flags.items() if f] == [n for n in flags if "lora_" in n and ".default." in n]
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".rollout." in n)
    v_before = _v(policy)
    out = rollout(*_inputs(1))
    assert not out.requires_grad
    assert _flags(policy) == flags and policy.training
    x, t, c = _inputs(1)
    with pytest.raises(RuntimeError):  # a forward that raises (wrong channel count)
        rollout(torch.cat([x, x], 1), t, c)
    assert _flags(policy) == flags and all(m.training for m in policy.modules())
    assert torch.equal(_v(policy), v_before)  # "default" is the active adapter again
    # a frozen policy (a sampler's) stays frozen; AdapterDisabled keeps the flags too
    policy.requires_grad_(False)
    rollout(*_inputs(1))
    AdapterDisabled(policy)(*_inputs(1))
    assert not any(p.requires_grad for p in policy.parameters())


def test_pi_old_calls_leave_the_policy_gradient_bitwise_unchanged():
    plain = _trained()
    twin = copy.deepcopy(plain)
    rollout = RolloutAdapter(twin)
    # one gradient, with and without a π_old call between forward and backward
    loss = _loss(twin, 0)
    loss.backward()
    g_plain = {n: p.grad.clone() for n, p in twin.named_parameters() if p.requires_grad}
    twin.zero_grad(set_to_none=True)
    loss = _loss(twin, 0)
    rollout(*_inputs(5))
    loss.backward()
    g_twin = {n: p.grad.clone() for n, p in twin.named_parameters() if p.requires_grad}
    assert g_plain.keys() == g_twin.keys() and all(torch.equal(g_plain[k], g_twin[k]) for k in g_plain)
    assert not any(p.grad is not None for n, p in twin.named_parameters() if ".rollout." in n)
    twin.zero_grad(set_to_none=True)
    # and a few optimizer steps, π_old interleaved in one run only
    _train(plain, 3)
    _train(twin, 3, rollout=rollout)
    a, b = adapter_state(plain), adapter_state(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_speaks_the_policy_keys_and_loads_back():
    policy = _trained()
    rollout = RolloutAdapter(policy)
    assert set(rollout.state()) == set(published_state(policy))
    saved = _clone(rollout.state())
    _train(policy, 2)
    rollout.copy_from_policy()
    assert not all(torch.equal(rollout.state()[k], saved[k]) for k in saved)
    rollout.load(saved)
    assert all(torch.equal(rollout.state()[k], saved[k]) for k in saved)
    # a sampler's single-adapter policy receives the state as published, checksum and all
    sampler = Sampler(_adapted(), table_encode, to_uint8, IMAGE_SHAPE, num_steps=3)
    state = _clone(rollout.state())
    assert sampler.apply(1, state, state_checksum(state)) == (1, state_checksum(state))
    assert torch.equal(_v(sampler.velocity), _v(rollout))


def test_a_state_of_another_key_set_is_refused_whole():
    rollout = RolloutAdapter(_trained())
    held = _clone(rollout.state())
    bad = {k: torch.zeros_like(v) for k, v in list(held.items())[1:]}
    with pytest.raises(ValueError, match="adapter tensors") as err:
        rollout.load(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="adapter tensors"):
        rollout.load({k.replace("lora_A", "lora_C"): v for k, v in held.items()})
    rank2 = RolloutAdapter(_trained(rank=2)).state()  # the same keys, another rank
    with pytest.raises(ValueError, match="another LoRA rank"):
        rollout.load({k: torch.zeros_like(v) for k, v in rank2.items()})
    assert all(torch.equal(rollout.state()[k], held[k]) for k in held)  # nothing was loaded


def test_the_policys_other_readers_do_not_see_the_rollout_adapter(tmp_path):
    plain = _trained()
    twin = copy.deepcopy(plain)
    rollout = RolloutAdapter(twin)
    _train(twin, 1)  # the adapters now differ: a leak of π_old's tensors would show
    _train(plain, 1)
    rollout_state = _clone(rollout.state())
    for fn in (published_state, adapter_state):
        a, b = fn(plain), fn(twin)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert is_adapted(twin) and lora_settings(twin) == lora_settings(plain)
    assert torch.equal(_v(AdapterDisabled(twin)), _v(AdapterDisabled(plain)))
    assert state_checksum(AdapterDisabled(twin).base_state()) == state_checksum(AdapterDisabled(plain).base_state())
    for adapter_only in (True, False):
        save_velocity(plain, tmp_path / "plain.safetensors", adapter_only=adapter_only)
        save_velocity(twin, tmp_path / "twin.safetensors", adapter_only=adapter_only)
        (ma, sa), (mb, sb) = read_tensors(tmp_path / "plain.safetensors"), read_tensors(tmp_path / "twin.safetensors")
        assert ma == mb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        load_weights(twin, tmp_path / "plain.safetensors")  # a policy file loads onto the two-adapter module
    assert torch.equal(_v(load_velocity(tmp_path / "twin.safetensors")), _v(plain))
    load_adapter(twin, {k.removeprefix("transformer."): v for k, v in adapter_state(plain).items()}, "plain")
    assert torch.equal(_v(twin), _v(plain))
    assert all(torch.equal(rollout.state()[k], rollout_state[k]) for k in rollout_state)  # π_old untouched


def _bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_it_costs_the_adapter_bytes_not_a_model_copy():
    policy = _trained()
    before = _bytes(policy)
    adapter = sum(v.numel() * v.element_size() for v in adapter_state(policy).values())
    RolloutAdapter(policy)
    assert _bytes(policy) - before == adapter
    assert _bytes(copy.deepcopy(policy)) > 5 * adapter  # what a deepcopy π_old costs: everything


def test_a_bf16_base_keeps_float32_adapters_and_the_global_rng():
    policy = _train(_adapted(dtype=torch.bfloat16), 2)
    rng = torch.random.get_rng_state()
    rollout = RolloutAdapter(policy)
    assert torch.equal(torch.random.get_rng_state(), rng)  # as a deepcopy: no draw from the global RNG
    assert {v.dtype for v in rollout.state().values()} == {torch.float32}
    assert torch.equal(_v(rollout), _v(policy))
    before = copy.deepcopy(policy)
    _train(policy, 2)
    torch.testing.assert_close(_v(rollout), _v(before), rtol=0, atol=1e-6)


def test_only_a_lora_policy_and_only_once():
    with pytest.raises(ValueError, match="LoRA"):
        RolloutAdapter(tiny_velocity())
    policy = _adapted()
    RolloutAdapter(policy)
    with pytest.raises(ValueError, match="already"):
        RolloutAdapter(policy)
