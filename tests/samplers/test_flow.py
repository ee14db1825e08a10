"""The flow convention, pinned, and our Euler rollout against diffusers' scheduler."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from samplers import flow
from samplers.rollout import euler_rollout
from samplers.text import PromptEmbeddings


def test_convention_identities():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = flow.interpolate(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[3], eps[3])  # t=0 data, t=1 noise
    u = flow.velocity_target(x0, eps)
    # the exact velocity recovers x0 from any x_t, and one Euler step to 0 lands on x0
    torch.testing.assert_close(flow.data_prediction(xt, t, u), x0)
    torch.testing.assert_close(flow.euler_step(xt, t, torch.zeros(4), u), x0)
    # hand value: t=0.25, x0=2, eps=-2 → x_t = 0.75·2 + 0.25·(−2) = 1.0, u = −4
    assert float(flow.interpolate(torch.tensor([[2.0]]), torch.tensor([[-2.0]]), torch.tensor([0.25]))) == 1.0
    assert float(flow.velocity_target(torch.tensor(2.0), torch.tensor(-2.0))) == -4.0


def test_shift_hand_values():
    # shift 3 at σ = 0.5: 3·0.5 / (1 + 2·0.5) = 0.75; shift 1 is the identity
    assert float(flow.shift_sigmas(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    assert float(flow.shift_sigmas(torch.tensor(0.3), 1.0)) == pytest.approx(0.3)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (10, 1.0), (10, 3.0), (28, 3.0), (7, 2.5)])
def test_sigmas_match_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = flow.sampling_sigmas(steps, shift)
    assert torch.equal(ours, sched.sigmas.float())  # bit for bit
    assert torch.equal(flow.to_model_timestep(ours[:-1]), sched.timesteps.float())


class _Toy(torch.nn.Module):
    """A fixed nonlinear velocity field that depends on x, t and the prompt."""

    def forward(self, x, t, cond):
        tb = t.reshape(-1, 1, 1, 1)
        return torch.tanh(x) * (1 + tb) - 0.3 * cond.pooled[:, :1, None, None] + tb * x.roll(1, dims=-1)


@pytest.mark.parametrize("shift,cfg", [(1.0, 1.0), (3.0, 1.0), (3.0, 4.5)])
def test_euler_rollout_equals_diffusers_scheduler(shift, cfg):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    cond = PromptEmbeddings(torch.zeros(3, 2, 4), torch.randn(3, 4, generator=g))
    uncond = PromptEmbeddings(torch.zeros(3, 2, 4), torch.zeros(3, 4))
    model = _Toy()
    states, times = euler_rollout(model, noise, cond, num_steps=12, shift=shift, cfg_scale=cfg, uncond=uncond)

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(12)
    x = noise.clone()
    for k, ts in enumerate(sched.timesteps):
        t = (ts / 1000.0).expand(3)  # the scheduler's 0–1000 timestep back to t ∈ [0, 1]
        v_c, v_u = model(x, t, cond), model(x, t, uncond)
        v = v_u + cfg * (v_c - v_u)
        x = sched.step(v, ts, x, return_dict=False)[0]
        torch.testing.assert_close(states[:, k + 1], x, rtol=1e-5, atol=1e-5)
    assert states.shape == (3, 13, 1, 8, 8)
    torch.testing.assert_close(states[:, 0], noise)
    torch.testing.assert_close(times, sched.sigmas.float(), atol=1e-6, rtol=0)
