"""Learner group scaling: one optimiser step on the same batch with N = 1 and N = 2 learner ranks.

The digits AC-Flow batch of configs/digits_ac_flow.yaml (rollout.batch_prompts ×
samples_per_prompt rollouts, 10 Euler steps, rewards drawn at random: the learner's cost does
not depend on their values) is rolled out once here; every configuration trains on it from the
same initial weights with algorithm.ac_flow.warmup_steps=0, so the actor trains at every step
(the critic's warm-up is past). Each configuration runs in its own processes (torch's
multiprocessing spawn, gloo, torch.distributed's default group via LearnerGroup.join); rank r
trains on its rows ``group.rows(B)`` of the batch. Per update it records the learner's own
phases (Learner.step_phase_seconds: prepare — the rule's whole-batch inputs —, forward/backward
— DDP's gradient all-reduce included —, optimizer — clipping, AdamW, AC-Flow's critic steps with
their own DDP all-reduces and collectives, π_old's refresh) and,
separately, ``torch.distributed.all_reduce`` of one flat float32 buffer the size of the
trainable gradients on the same group. Medians over the timed updates, after warm-up updates;
each phase is the slowest rank's.

    .venv/bin/python benchmarks/learner_scaling.py [--updates 7] [--warmup 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import ROOT, machine, write_section

BEGIN, END = "<!-- learner-scaling:begin -->", "<!-- learner-scaling:end -->"
CONFIG = ROOT / "configs" / "digits_ac_flow.yaml"
OVERRIDES = ["algorithm.ac_flow.warmup_steps=0"]
PHASES = ("prepare", "forward_backward", "optimizer")


def cfg_critic_steps() -> int:
    from services.config import load_config

    return load_config(str(CONFIG), OVERRIDES).algorithm.ac_flow.critic_steps


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(seed: int):  # noqa: ANN201 - (Trajectory, rewards)
    """The config's batch: its first batch_prompts prompts × samples_per_prompt, fixed seeds."""
    from services.config import load_config
    from services.world import build_sampler

    cfg = load_config(str(CONFIG), OVERRIDES)
    prompts = list(cfg.rollout.prompts)[:cfg.rollout.batch_prompts]
    torch.manual_seed(seed)
    traj = build_sampler(cfg).rollout(prompts, cfg.rollout.samples_per_prompt, list(range(len(prompts))))
    rewards = torch.rand(traj.size, generator=torch.Generator().manual_seed(seed))
    return traj, rewards


def _rank(rank: int, world: int, threads: int, port: int, batch_file: str, out: str,
          warmup: int, updates: int, reduce_reps: int, half: bool) -> None:
    torch.set_num_threads(threads)
    import torch.distributed as dist

    from learner.group import LearnerGroup
    from services.config import load_config
    from services.world import build_learner

    group = LearnerGroup.join("127.0.0.1", port, rank, world, timeout_s=300)
    cfg = load_config(str(CONFIG), OVERRIDES)
    torch.manual_seed(0)
    ln = build_learner(cfg, group)
    traj, rewards = torch.load(batch_file, weights_only=False)
    rows = group.rows(traj.size)
    mine = traj.rows(rows.lo, rows.hi) if group.distributed else traj
    prompts = traj.prompt_list()
    if half:  # a single learner on a rank's share of the batch: the ideal N = 2 step, without a group
        mine = traj.rows(0, traj.size // 2)
        rewards, prompts = rewards[:mine.size], mine.prompt_list()
    trainable = sum(p.numel() for p in ln.policy.parameters() if p.requires_grad)
    steps, walls = [], []
    for i in range(warmup + updates):
        group.barrier()
        t = time.perf_counter()
        ln.update(mine, rewards, prompts)
        wall = time.perf_counter() - t
        if i >= warmup:
            steps.extend(ln.step_phase_seconds)
            walls.append(wall)
    reduce_s = []
    if group.distributed:
        buf = torch.zeros(trainable, dtype=torch.float32)
        for i in range(reduce_reps + 2):
            group.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            if i >= 2:
                reduce_s.append(time.perf_counter() - t)
    torch.save({"steps": steps, "walls": walls, "reduce_s": reduce_s, "trainable": trainable,
                "rows": mine.size, "actor_trained": ln.step}, f"{out}.{rank}")
    group.barrier()
    if group.distributed:
        dist.destroy_process_group()


def run(world: int, threads: int, batch_file: str, warmup: int, updates: int, reduce_reps: int,
        half: bool = False) -> dict:
    """One configuration in fresh processes; each phase's median, the slowest rank's."""
    out = tempfile.mktemp(prefix="fmrl-learner-scaling-")
    mp.spawn(_rank, args=(world, threads, _port(), batch_file, out, warmup, updates, reduce_reps, half),
             nprocs=world, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    for r in range(world):
        os.unlink(f"{out}.{r}")
    med = {k: statistics.median(max(rk["steps"][i][k] for rk in ranks) for i in range(len(ranks[0]["steps"])))
           for k in PHASES}
    return {"world": world, "threads": threads, **med,
            "step": statistics.median(max(rk["walls"][i] for rk in ranks) for i in range(len(ranks[0]["walls"]))),
            "all_reduce": statistics.median(max(x) for x in zip(*(rk["reduce_s"] for rk in ranks), strict=True))
            if world > 1 else 0.0,
            "trainable": ranks[0]["trainable"], "rows": [rk["rows"] for rk in ranks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=7, help="timed updates (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="updates before timing")
    ap.add_argument("--reduce-reps", type=int, default=20)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    traj, rewards = make_batch(0)
    batch_file = Path(tempfile.mkdtemp(prefix="fmrl-learner-scaling-")) / "batch.pt"
    torch.save((traj, rewards), batch_file)
    # (ranks, torch threads per rank, half the batch on one rank)
    configs = [(1, 1, False), (2, 1, False), (1, 2, False), (1, 1, True)]
    res = {}
    for world, threads, half in configs:
        r = run(world, threads, str(batch_file), args.warmup, args.updates, args.reduce_reps, half)
        res[world, threads, half] = r
        print(r, flush=True)
    base = res[1, 1, False]["step"]
    mb = res[1, 1, False]["trainable"] * 4 / 1e6
    lines = ["| learner ranks × torch threads | rows per rank | update (median) | prepare | forward/backward "
             "(incl. DDP all-reduce) | optimizer | all-reduce of the gradients alone | vs N=1 × 1 thread |",
             "|---|---|---|---|---|---|---|---|"]
    for (world, threads, half), r in res.items():
        ar = f"{r['all_reduce'] * 1e3:.1f} ms" if world > 1 else "—"
        what = f"{world} × {threads}" + (" (half the batch, no group)" if half else "")
        lines.append(f"| {what} | {' + '.join(map(str, r['rows']))} | {r['step']:.3f} s "
                     f"| {r['prepare']:.3f} s | {r['forward_backward']:.3f} s | {r['optimizer']:.3f} s "
                     f"| {ar} | {r['step'] / base:.2f}× |")
    ratio = res[2, 1, False]["step"] / base
    text = (
        f"Measured by `.venv/bin/python benchmarks/learner_scaling.py --updates {args.updates} --warmup "
        f"{args.warmup} --write-docs` on a 2-core CPU, no GPU ({machine()}), {time.strftime('%Y-%m-%d')}: "
        f"one learner update (1 optimiser step) on the same digits AC-Flow batch of "
        f"`configs/digits_ac_flow.yaml` ({traj.size} rollouts, 10 Euler steps, rewards drawn at random) "
        f"with `algorithm.ac_flow.warmup_steps=0`, so the actor trains (past the critic's warm-up). "
        f"N ranks are N processes in one gloo group (LearnerGroup.join, torch DDP), each with a fixed "
        f"number of torch threads; the median of {args.updates} updates after {args.warmup} warm-up "
        f"updates, each phase the slowest rank's (Learner.step_phase_seconds: prepare = the rule's whole-"
        f"batch inputs; forward/backward includes DDP's gradient all-reduce; optimizer = clipping, AdamW, "
        f"AC-Flow's {cfg_critic_steps()} critic steps — data-parallel, each with its own collectives — and "
        f"π_old's refresh). "
        f"The all-reduce alone: `torch.distributed.all_reduce` of one flat float32 buffer of the "
        f"trainable parameters' size ({res[1, 1, False]['trainable']:,} parameters, {mb:.1f} MB: the digits "
        f"policy trains every weight, no LoRA) on the same group, median of {args.reduce_reps}.\n\n"
        + "\n".join(lines) + "\n\n"
        f"N = 2 (1 thread each) against N = 1 (1 thread): {ratio:.2f}× the step time (the issue's goal: "
        f"≤ 0.6×; {'met' if ratio <= 0.6 else 'not met'} here). N = 1 with 2 threads uses the same two "
        f"cores in one process: {res[1, 2, False]['step'] / base:.2f}×. One rank's share alone (a single "
        f"learner on half the batch, 1 thread, no group) takes {res[1, 1, True]['step'] / base:.2f}×: what "
        f"N = 2 would take with free communication and no contention between the two processes."
    )
    print(text)
    if args.write_docs:
        write_section(BEGIN, END, "## Learner group scaling (issue 13)", text)


if __name__ == "__main__":
    main()
