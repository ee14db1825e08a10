"""How much of the shaped reward AC-Flow's critic can explain, by time t (not run in CI).

Rolls out the shipped digits policy CFG-free (200 samples per digit), scores the samples
with the reward CNN, shapes the rewards as AC-Flow does (per-prompt normalisation, tanh),
fits a fresh ValueCritic on interpolants x_t of 1,600 of them, and reports its explained
variance on the other 400 at fixed t.

    .venv/bin/python benchmarks/critic_fit.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import time

import torch

from learner.advantages import PerPromptStatTracker, shape_rewards
from learner.critic import ValueCritic
from learner.objectives.ac_flow import critic_regression_loss
from reward_workers.digits import DigitsClassifierReward
from samplers import digits
from samplers.flow import interpolate
from samplers.policy import load_velocity
from samplers.sampler import Sampler
from samplers.text import PromptEncoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()
    torch.set_num_threads(1)
    enc = PromptEncoder()
    sampler = Sampler(load_velocity(digits.POLICY_FILE), enc.encode, digits.to_uint8, digits.IMAGE_SHAPE,
                      num_steps=10, keep_states=False)
    traj = sampler.rollout(digits.default_prompts(), 200, list(range(10)))
    rewards = torch.tensor(DigitsClassifierReward()(traj.images, traj.prompt_list()).scores, dtype=torch.float32)
    adv, _ = PerPromptStatTracker(buffer_size=1000, min_count=1).normalize(traj.prompt_list(), rewards)
    target = shape_rewards(adv, "tanh")
    x0, pooled = traj.samples, enc.encode(traj.prompt_list()).pooled
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))
    train, test = order[:1600], order[1600:]
    critic = ValueCritic(1, 384)
    opt = torch.optim.AdamW(critic.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1)
    t0 = time.time()
    for _ in range(args.steps):
        b = train[torch.randint(0, len(train), (160,), generator=g)]
        t = torch.rand(160, generator=g)
        x_t = interpolate(x0[b], torch.randn(x0[b].shape, generator=g), t)
        loss, _ = critic_regression_loss(critic(x_t, t, pooled[b]), target[b])
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    print(f"critic {sum(q.numel() for q in critic.parameters())} parameters, fit in {time.time() - t0:.1f} s")
    print("t      explained variance (held-out samples)")
    with torch.no_grad():
        for tv in (0.05, 0.2, 0.4, 0.6, 0.8):
            t = torch.full((len(test),), tv)
            x_t = interpolate(x0[test], torch.randn(x0[test].shape, generator=g), t)
            _, st = critic_regression_loss(critic(x_t, t, pooled[test]), target[test])
            print(f"{tv:<6} {float(st['explained_variance']):.3f}")


if __name__ == "__main__":
    main()
