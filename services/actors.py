"""Ray actors: samplers, reward workers and the learner, placed by one placement group.

Each actor wraps one plain object (``Sampler``, a reward, ``Learner``) and adds
nothing but placement and the hand-offs: trajectories and weights travel as object
references (or, for weights, a torch.distributed broadcast); the driver never holds
their tensors. Samplers and the reward actor restart when they die (``max_restarts``);
the learner does not.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.group import LearnerGroup
from learner.learner import Learner
from reward_workers.metrics import client_metric_families
from samplers.policy import published_state
from samplers.trajectory import Trajectory
from services.config import ResourcesConfig, RewardConfig, TrainConfig
from services.evaluation import mean_pairwise_distance
from services.rewards import RewardStage, component_means
from services.weight_sync import (
    WirePayload,
    broadcast_state,
    group_address,
    join_group,
    receive_state,
)
from services.world import build_learner, build_sampler
from telemetry.metrics import ray_metric


class PlacementError(RuntimeError):
    """The cluster cannot place the run's actors."""


class _ActorMetrics:
    """What an actor records through Ray's metrics (telemetry/metrics.py, scope ray_actor):
    its busy seconds, and the timings of its role."""

    def __init__(self, role: str, *names: str) -> None:
        self.role = role
        self.busy = ray_metric("fmrl_actor_busy_seconds_total")
        self.m = {name: ray_metric(name) for name in names}

    @contextmanager
    def work(self, histogram: str | None = None, **tags: str):
        """Time a work call: its seconds go to the busy counter (and to ``histogram``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.busy.inc(dt, tags={"role": self.role})
            if histogram is not None:
                self.m[histogram].observe(dt, tags=tags or None)


def _device(backend: str) -> str:
    """Where broadcast buffers live: NCCL moves GPU memory (the actor's GPU), gloo host memory."""
    return "cuda" if backend == "nccl" else "cpu"


class SamplerWorker:
    def __init__(self, cfg: TrainConfig) -> None:
        torch.set_num_threads(cfg.resources.torch_threads)
        self.sampler = build_sampler(cfg)
        self.backend = cfg.pipeline.dist_backend
        self.metrics = _ActorMetrics("sampler", "fmrl_sampler_rollout_seconds", "fmrl_sampler_rollout_images_total",
                                     "fmrl_sampler_weight_apply_seconds", "fmrl_sampler_policy_version")
        self.metrics.m["fmrl_sampler_policy_version"].set(self.sampler.version)

    def _applied(self, out: tuple[int, str]) -> tuple[int, str]:
        self.metrics.m["fmrl_sampler_policy_version"].set(out[0])
        return out

    def apply_weights(self, payload: WirePayload) -> tuple[int, str]:
        """Apply published weights; returns the (version, checksum) now in use."""
        with self.metrics.work("fmrl_sampler_weight_apply_seconds", backend="object_store"):
            return self._applied(self.sampler.apply(payload.version, payload.state(), payload.checksum))

    @ray.method(num_returns=2)
    def rollout(self, prompts: list[str], samples_per_prompt: int, seeds: list[int],
                cfg_scale: float | None = None, kind: str | None = None) -> tuple[Trajectory, dict[str, Any]]:
        """The trajectory, and a few bytes about it that the driver reads instead of the tensors."""
        with self.metrics.work("fmrl_sampler_rollout_seconds"):
            traj = self.sampler.rollout(prompts, samples_per_prompt, seeds, cfg_scale, kind)
        self.metrics.m["fmrl_sampler_rollout_images_total"].inc(traj.size)
        return traj, {"version": traj.version, "size": traj.size}

    def version(self) -> tuple[int, str]:
        return self.sampler.version, self.sampler.checksum

    def join_group(self, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        join_group(address, port, rank, world_size, timeout_s, self.backend)

    def receive_weights(self) -> tuple[int, str]:
        """Receive a broadcast from the learner, verify it, apply it."""
        with self.metrics.work("fmrl_sampler_weight_apply_seconds", backend="torch_distributed"):
            # shaped like what the learner publishes: an adapted policy's adapter, else every tensor
            version, checksum, state = receive_state(published_state(self.sampler.velocity), _device(self.backend))
            return self._applied(self.sampler.apply(version, state, checksum))


class RewardWorker:
    def __init__(self, cfg: TrainConfig) -> None:
        torch.set_num_threads(cfg.resources.torch_threads)
        self.stage = RewardStage(cfg.reward)
        # eval.rewards' components (their weights are not summed: the training reward's checks
        # do not apply), built at start so a bad one fails before training
        self.eval_stage = self.stage if cfg.eval.rewards is None else \
            RewardStage(RewardConfig.model_construct(components=cfg.eval.rewards))
        self.metrics = _ActorMetrics("reward", "fmrl_reward_score_seconds")

    def score(self, *parts: Trajectory, eval_rewards: bool = False,
              metadata: list[dict] | None = None) -> dict[str, np.ndarray]:
        """Scores of the concatenated batches: ``scores`` (B,), each component's and their
        details, and ``diversity``: the batch's mean pairwise distance within a prompt's samples
        (pixels in [0, 1], averaged over prompts with two or more), the collapse watch.
        ``eval_rewards``: by eval.rewards' components instead (default: the same).
        ``metadata``: each rollout's prompt's metadata, in the parts' order (prompt datasets)."""
        stage = self.eval_stage if eval_rewards else self.stage
        with self.metrics.work():
            images = np.concatenate([p.images for p in parts])
            prompts = [s for p in parts for s in p.prompt_list()]
            scored = stage.score(images, prompts, metadata)
            groups = [p.images[p.prompt_ids.numpy() == j] for p in parts for j in range(len(p.prompts))]
            spreads = [mean_pairwise_distance(g) for g in groups if len(g) >= 2]
            scored["diversity"] = np.array(np.mean(spreads) if spreads else np.nan)
        for label, seconds in stage.seconds.items():
            self.metrics.m["fmrl_reward_score_seconds"].observe(seconds, tags={"reward": label})
        if stage.remote:  # the Redis clients' metrics, for the driver's /metrics
            scored["_client_metrics"] = client_metric_families()
        return scored


class LearnerWorker:
    """One learner rank. A single learner builds its Learner at once; the ranks of a learner
    group (resources.num_learners > 1) build theirs in ``join_learners``, once the group's
    process group exists (DDP's construction is a collective)."""

    def __init__(self, cfg: TrainConfig, rank: int = 0) -> None:
        torch.set_num_threads(cfg.resources.torch_threads)
        self.cfg, self.rank = cfg, rank
        self.learner: Learner | None = build_learner(cfg) if cfg.resources.num_learners == 1 else None
        self.backend = cfg.pipeline.dist_backend
        self.reward_cfg = cfg.reward
        self.metrics = _ActorMetrics("learner", "fmrl_learner_step_phase_seconds", "fmrl_learner_publish_seconds")

    def join_learners(self, address: str, port: int, timeout_s: float) -> None:
        """Form the learner group with the other ranks (all call this at once), then build the learner."""
        n = self.cfg.resources.num_learners
        backend = "nccl" if self.cfg.resources.learner_gpus >= 1 else "gloo"
        group = LearnerGroup.join(address, port, self.rank, n, timeout_s, backend, self.cfg.learner.sharding)
        self.learner = build_learner(self.cfg, group)

    def update(self, scored: dict[str, np.ndarray], prompts: list[str] | None, skip: int,
               *parts: Trajectory) -> dict[str, Any]:
        """Update on the parts' rollouts from ``skip`` on: the whole batch for a single learner; a
        rank's rows (``prompts``: the whole batch's) in a group, whose statistics are the batch's."""
        assert self.learner is not None
        batch = Trajectory.concat(list(parts))
        rewards = torch.tensor(scored["scores"], dtype=torch.float32)  # arrives read-only
        if self.learner.group.distributed:
            rows = self.learner.group.rows(int(rewards.shape[0]))
            batch = batch.rows(skip, skip + rows.size)
        with self.metrics.work():
            stats = self.learner.update(batch, rewards, prompts)
        for phases in self.learner.step_phase_seconds:
            for phase, seconds in phases.items():
                self.metrics.m["fmrl_learner_step_phase_seconds"].observe(
                    seconds, tags={"phase": phase, "rank": str(self.rank)})
        stats.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                     step=self.learner.step, version=self.learner.version,
                     learner_ranks=self.learner.group.world_size)
        stats.update(component_means(scored, self.reward_cfg))
        stats["diversity"] = float(scored["diversity"])
        if "digits_classifier/correct" in scored:
            stats["accuracy"] = float(np.mean(scored["digits_classifier/correct"]))
        return stats

    @ray.method(num_returns=2)
    def publish(self, current: bool = False) -> tuple[WirePayload | None, tuple[int, str, int]]:
        """The payload (for samplers) and its (version, checksum, bytes) (for the driver). In an
        FSDP group every rank calls it (the weights are gathered from their shards); only rank 0's
        payload is used, the others return none."""
        assert self.learner is not None
        with self.metrics.work("fmrl_learner_publish_seconds", backend="object_store"):
            p = self.learner.publish(current)
            if self.rank != 0:
                return None, (p.version, p.checksum, 0)
            wire = WirePayload.from_state(p.version, p.state, p.checksum)
        return wire, (p.version, p.checksum, wire.nbytes)

    def group_address(self) -> tuple[str, int]:
        return group_address()

    def join_group(self, address: str, port: int, world_size: int, timeout_s: float) -> None:
        join_group(address, port, 0, world_size, timeout_s, self.backend)

    def broadcast_weights(self, current: bool = False) -> tuple[int, str, int]:
        """Broadcast the published weights to the group; returns (version, checksum, bytes)."""
        with self.metrics.work("fmrl_learner_publish_seconds", backend="torch_distributed"):
            p = self.learner.publish(current)
            nbytes = broadcast_state(p.version, p.state, p.checksum, _device(self.backend))
        return p.version, p.checksum, nbytes

    def save(self, directory: str) -> str:
        return str(self.learner.save(directory))

    def load(self, directory: str) -> tuple[int, int]:
        """Restore a checkpoint; returns the learner's (step, version)."""
        self.learner.load(directory)
        return self.learner.step, self.learner.version


@dataclass
class Actors:
    samplers: list[Any]
    reward: Any
    learners: list[Any]  # rank 0 first
    group: PlacementGroup | None

    @property
    def learner(self) -> Any:  # noqa: ANN401 - a Ray actor handle
        """Rank 0: the learner that publishes and writes checkpoints."""
        return self.learners[0]

    def shutdown(self) -> None:
        """Kill the actors and free their placement group (a joined cluster keeps running)."""
        for a in (*self.samplers, self.reward, *self.learners):
            ray.kill(a, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)


def _bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    b = {"CPU": cpus, "GPU": gpus, **custom}
    return {k: v for k, v in b.items() if v > 0}


def reserve(cfg: TrainConfig, name: str) -> tuple[PlacementGroup | None, list[dict[str, float]]]:
    """One bundle per actor (learner, reward, samplers…), reserved all at once, so a run
    either gets every role's resources or fails naming what it asked for."""
    r: ResourcesConfig = cfg.resources
    bundles = [_bundle(r.learner_cpus, r.learner_gpus, r.learner_resources),
               _bundle(r.reward_cpus, r.reward_gpus, r.reward_resources),
               *[_bundle(r.sampler_cpus, r.sampler_gpus, r.sampler_resources)] * r.num_samplers,
               *[_bundle(r.learner_cpus, r.learner_gpus, r.learner_resources)] * (r.num_learners - 1)]
    roles = (["learner", "reward"] + [f"sampler {i}" for i in range(r.num_samplers)]
             + [f"learner {i}" for i in range(1, r.num_learners)])
    check_fits(cfg)
    if r.placement == "none":
        return None, bundles
    pg = placement_group(bundles, strategy=r.placement.upper(), name=name)
    try:
        ray.get(pg.ready(), timeout=r.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        asked = "; ".join(f"{role} {b}" for role, b in zip(roles, bundles, strict=True))
        raise PlacementError(f"the cluster could not place the run's actors within {r.placement_timeout_s:g} s "
                             f"(strategy {r.placement.upper()}): asked {asked}; the cluster has "
                             f"{ray.cluster_resources()} — lower resources.* or add nodes") from None
    return pg, bundles


def check_fits(cfg: TrainConfig) -> None:
    """On a cluster this run started (nothing else can join it), refuse CPUs or GPUs it does not
    have, naming the keys, before any actor starts; a joined cluster may still grow (an
    autoscaler), so there the placement timeout decides."""
    from services.cluster import embedded

    if not embedded():
        return
    r = cfg.resources
    have = ray.cluster_resources()
    lacking = []
    for kind, per in (("CPU", "cpus"), ("GPU", "gpus")):
        learner, sampler, reward = (getattr(r, f"{role}_{per}") for role in ("learner", "sampler", "reward"))
        asked = r.declared(per)
        if asked > have.get(kind, 0.0) + 1e-9:
            lacking.append(f"{asked:g} {kind}s (resources.num_learners={r.num_learners} × learner_{per}={learner:g}, "
                           f"num_samplers={r.num_samplers} × sampler_{per}={sampler:g}, reward_{per}={reward:g}) "
                           f"where this machine's cluster has {have.get(kind, 0.0):g}"
                           + (" (resources.ray_num_cpus)" if kind == "CPU" else ""))
    if lacking:
        raise PlacementError(f"the run asks for {' and '.join(lacking)}")


def start_actors(cfg: TrainConfig, name: str = "fmrl") -> Actors:
    """Samplers, reward worker and learner in their bundles; actor names are ``<name>-learner``,
    ``<name>-reward``, ``<name>-sampler-<i>`` (so operators and tests can find them)."""
    r = cfg.resources
    pg, bundles = reserve(cfg, name)

    def opts(i: int, restarts: int) -> dict[str, Any]:
        b = bundles[i]
        o: dict[str, Any] = {"num_cpus": b.get("CPU", 0), "num_gpus": b.get("GPU", 0), "max_concurrency": 1,
                             "resources": {k: v for k, v in b.items() if k not in ("CPU", "GPU")},
                             "max_restarts": restarts, "max_task_retries": 0}
        if pg is not None:
            o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        return o

    learners = [ray.remote(LearnerWorker).options(name=f"{name}-learner", **opts(0, 0)).remote(cfg)]
    learners += [ray.remote(LearnerWorker).options(name=f"{name}-learner-{k}", **opts(1 + r.num_samplers + k, 0))
                 .remote(cfg, k) for k in range(1, r.num_learners)]
    reward = ray.remote(RewardWorker).options(name=f"{name}-reward", **opts(1, r.max_restarts)).remote(cfg)
    samplers = [ray.remote(SamplerWorker).options(name=f"{name}-sampler-{i}", **opts(2 + i, r.max_restarts))
                .remote(cfg) for i in range(r.num_samplers)]
    actors = Actors(samplers, reward, learners, pg)
    if r.num_learners > 1:  # rank 0 hosts the group's rendezvous; every rank joins at once
        address, port = ray.get(learners[0].group_address.remote())
        t = cfg.pipeline.sync_timeout_s
        try:
            ray.get([w.join_learners.remote(address, port, t) for w in learners], timeout=t + 60)
        except BaseException:
            actors.shutdown()
            raise
    return actors
