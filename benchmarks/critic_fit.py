"""How much of the shaped reward AC-Flow's critic can explain, by time t, per critic lever (not run in CI).

Rolls out the shipped digits policy CFG-free (``--per-digit`` samples per digit, default 200, in
chunks of 200 with seeds 10·chunk + digit; 10 Euler steps, every state recorded), scores the
samples with the reward CNN, shapes the rewards as AC-Flow does (per-prompt normalisation, tanh),
and fits a fresh ValueCritic per variant on 80% of them — the same data, the same optimiser steps
and samples per step for every variant:

    baseline      one interpolant x_t = (1 − t)x0 + tε per sample and step (the default)
    layernorm     critic_norm: layer
    t4            critic_t_samples: 4 (fresh t and ε per extra draw)
    layernorm+t4  both
    rollout       critic_states: rollout, one recorded state per sample and step
    rollout+t4    four recorded states per sample and step

Each fitted critic is scored on the 20% held-out samples twice: on interpolants (10 draws of
t ~ U(0, 1) and ε per sample, the same for every variant) and on the 11 recorded states of each
rollout; explained variance 1 − Var(r̃ − V)/Var(r̃) overall and per bucket of t (t0: [0, .25),
t1: [.25, .5), t2: [.5, .75), t3: [.75, 1]). The critic's advantages use the interpolant with
``interpolant`` critics and the nearest recorded state with ``rollout`` ones, so each variant's
own row is the one that matters for training. ``train`` is the same overall figure on as many
training samples as are held out: a gap to the held-out figure is overfitting (the recorded
states of a fixed set of rollouts carry no fresh noise; online every batch is new).

    .venv/bin/python benchmarks/critic_fit.py [--steps 1500] [--per-digit 200] [--variants baseline rollout ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from learner.advantages import PerPromptStatTracker, shape_rewards
from learner.critic import ValueCritic
from learner.objectives.ac_flow import (
    EV_BUCKETS,
    critic_regression_loss,
    explained_variance,
    explained_variance_by_t,
)
from reward_workers.digits import DigitsClassifierReward
from samplers import digits
from samplers.flow import interpolate
from samplers.policy import load_velocity
from samplers.sampler import Sampler
from samplers.text import PromptEncoder

VARIANTS: dict[str, tuple[str, int, str]] = {  # name: (critic_norm, critic_t_samples, critic_states)
    "baseline": ("none", 1, "interpolant"),
    "layernorm": ("layer", 1, "interpolant"),
    "t4": ("none", 4, "interpolant"),
    "layernorm+t4": ("layer", 4, "interpolant"),
    "rollout": ("none", 1, "rollout"),
    "rollout+t4": ("none", 4, "rollout"),
}
EVAL_DRAWS = 10


def fit(norm: str, k: int, states: str, data: dict[str, torch.Tensor], train: torch.Tensor, steps: int,
        lr: float, batch: int) -> ValueCritic:
    torch.manual_seed(0)  # the same initial weights for every variant (LayerNorm draws nothing)
    critic = ValueCritic(1, data["pooled"].shape[1], norm=norm)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(critic.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)  # the same sample order for every variant
    x0, traj, times = data["x0"], data["states"], data["times"]
    for _ in range(steps):
        b = train[torch.randint(0, len(train), (batch,), generator=g)]
        if states == "rollout":
            idx = torch.randint(0, len(times), (batch, k), generator=g)
            x, t = traj[b[:, None], idx].flatten(0, 1), times[idx].flatten()
        else:
            t = torch.rand(batch * k, generator=g)
            x = interpolate(x0[b].repeat_interleave(k, 0), torch.randn((batch * k, *x0.shape[1:]), generator=g), t)
        loss, _ = critic_regression_loss(critic(x, t, data["pooled"][b].repeat_interleave(k, 0)),
                                         data["target"][b].repeat_interleave(k))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    return critic


@torch.no_grad()
def score(critic: ValueCritic, data: dict[str, torch.Tensor], test: torch.Tensor) -> dict[str, list[float]]:
    """Explained variance [overall, t0..t3] on held-out interpolants and on recorded states."""
    out = {}
    g = torch.Generator().manual_seed(2)  # the same held-out draws for every variant
    n, x0 = len(test), data["x0"][test]
    t = torch.rand(n * EVAL_DRAWS, generator=g)
    x = interpolate(x0.repeat(EVAL_DRAWS, 1, 1, 1), torch.randn((n * EVAL_DRAWS, *x0.shape[1:]), generator=g), t)
    rows = [(x, t, test.repeat(EVAL_DRAWS))]
    k = len(data["times"])
    rows.append((data["states"][test].flatten(0, 1), data["times"].repeat(n), test.repeat_interleave(k)))
    for name, (x, t, idx) in zip(("interpolants", "recorded"), rows, strict=True):
        v, target = critic(x, t, data["pooled"][idx]), data["target"][idx]
        by_t = explained_variance_by_t(v, target, t)
        out[name] = [explained_variance(v, target), *(by_t[f"explained_variance_t{b}"] for b in range(EV_BUCKETS))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="critic optimiser steps per variant")
    p.add_argument("--batch", type=int, default=160, help="samples per critic step (each with k states)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--per-digit", type=int, default=200, help="rollouts per digit, a multiple of 200")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    enc = PromptEncoder()
    sampler = Sampler(load_velocity(digits.POLICY_FILE), enc.encode, digits.to_uint8, digits.IMAGE_SHAPE,
                      num_steps=10, keep_states=True)
    reward, chunks = DigitsClassifierReward(), []
    for c in range(max(1, args.per_digit // 200)):
        traj = sampler.rollout(digits.default_prompts(), 200, [10 * c + d for d in range(10)])
        scores = torch.tensor(reward(traj.images, traj.prompt_list()).scores, dtype=torch.float32)
        chunks.append((traj.states, scores, traj.prompt_list()))
    prompts = [q for _, _, ps in chunks for q in ps]
    rewards = torch.cat([r for _, r, _ in chunks])
    states = torch.cat([s for s, _, _ in chunks])
    adv, _ = PerPromptStatTracker(buffer_size=10**6, min_count=1).normalize(prompts, rewards)
    data = {"x0": states[:, -1], "states": states, "times": traj.times, "target": shape_rewards(adv, "tanh"),
            "pooled": enc.encode(prompts).pooled}
    order = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(0))
    cut = len(order) * 4 // 5
    train, test = order[:cut], order[cut:]
    print(f"{len(rewards)} rollouts (mean reward {float(rewards.mean()):.3f}), {states.shape[1]} recorded states "
          f"each; {args.steps} critic steps of {args.batch} samples, lr {args.lr}; {len(train)} train, {len(test)} "
          "held out", flush=True)
    print("| variant | scored on | held-out overall | t0 [0, .25) | t1 [.25, .5) | t2 [.5, .75) | t3 [.75, 1] "
          "| train overall | fit s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.variants:
        t0 = time.time()
        critic = fit(*VARIANTS[name], data, train, args.steps, args.lr, args.batch)
        took = time.time() - t0
        seen = score(critic, data, train[:len(test)])
        for where, ev in score(critic, data, test).items():
            print(f"| {name} | {where} | " + " | ".join(f"{v:.3f}" for v in ev) + f" | {seen[where][0]:.3f} "
                  f"| {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
