"""The driver loop: wire the actors, move references, publish weights, write the run.

One iteration:

    samplers ── rollout(prompts, seeds) ──► trajectory refs (+ a few bytes: version, size)
    reward   ── score(*refs) ─────────────► scores ref
    learner  ── update(scores, *refs) ────► statistics (and maybe a new version)
    learner  ── publish ──────────────────► every sampler applies the new version

With ``pipeline.max_policy_lag`` = k ≥ 1 the next k batches are already rolling out while
the learner updates (a sampler applies a new version after the rollouts queued before
it), so a batch is trained on by a learner up to k published versions ahead of the
weights that rolled it out. The driver checks every part of a batch before the update:
a part whose version lags more than k (say, from a sampler that restarted with its
initial weights) is dropped and counted, and its prompts are rolled out again after the
sampler is resynced; a part lost with its sampler is redone the same way, so every
iteration trains on exactly its planned prompts and seeds, none twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import ray

from learner.group import split_rows
from reward_workers.digits import HeldoutSVM
from samplers.sampler import WeightsMismatch
from services.actors import Actors, PlacementError, start_actors
from services.checkpoints import (
    CHECKPOINTS,
    Resume,
    latest_checkpoint,
    link_final_checkpoint,
    nothing_to_keep,
    prepare_resume,
    write_checkpoint,
    write_text_atomic,
)
from services.cluster import ensure_ray
from services.config import TrainConfig, dump_config, validate_config
from services.datasets import (
    Prompts,
    check_cursor,
    cursor_record,
    load_prompts,
    plan_rows,
    truncation_note,
)
from services.evaluation import (
    Evaluation,
    eval_due,
    eval_metadata,
    eval_plan,
    evaluation_of,
    heldout_evaluator,
    seed_for,
)
from services.loggers import (
    ConsoleLogger,
    IterationInfo,
    JsonlLogger,
    Loggers,
    PrometheusLogger,
    check_trackers,
    open_trackers,
)
from services.observe import RunMetrics
from services.report import reward_curve, sample_grid, summary_table, write_report
from services.storage import RunStorage, StorageSync
from services.world import check_policy_source

log = logging.getLogger("fmrl")


class VersionMismatch(RuntimeError):
    """A sampler reports a policy version other than the one the learner published."""


class LearnerLost(RuntimeError):
    """The learner actor died; the run stops and keeps its last checkpoint."""


_LOST = (ray.exceptions.RayActorError,)  # ActorDiedError, ActorUnavailableError


def split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    """Cut ``items`` into ``parts`` contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + q + (1 if i < r else 0)
        out.append(items[lo:hi])
        lo = hi
    return out


@dataclass
class Part:
    """One sampler's share of a batch: what it was asked and the refs it returned."""

    sampler: int
    prompts: list[str]
    seeds: list[int]
    traj: Any
    meta: Any


@dataclass
class Batch:
    iteration: int
    parts: list[Part]
    scores: Any = None
    metadata: list[dict] | None = None  # each rollout's prompt's dataset metadata, in the parts' order
    launched: float = field(default_factory=time.perf_counter)
    lags: list[int] = field(default_factory=list)
    dropped_stale: int = 0
    redone_lost: int = 0
    lost_reward: int = 0


class Pipeline:
    """The actors, the history of published versions, and the moves between them."""

    def __init__(self, actors: Actors, cfg: TrainConfig) -> None:
        self.a = actors
        self.cfg = cfg
        self.published: list[int] = []
        self.payload: Any = None  # object-store payload of the newest version (resyncs use it)
        self.pending: list[tuple[int, Any, int, str]] = []  # (sampler, apply ref, version, checksum) to verify
        self.checksum = ""
        self.applied = [0] * len(actors.samplers)
        self.totals = {"dropped_stale": 0, "redone_lost": 0, "lost_reward": 0, "resyncs": 0,
                       "broadcast_failures": 0}
        self.dist = cfg.pipeline.weight_sync == "torch_distributed"
        self.current = False
        self.metrics: RunMetrics | None = None
        self.regroup = self.dist

    @property
    def version(self) -> int:
        return self.published[-1]

    # ---- weights -------------------------------------------------------------------
    def _form_group(self) -> None:
        addr, port = ray.get(self.a.learner.group_address.remote())
        world, t = len(self.a.samplers) + 1, self.cfg.pipeline.sync_timeout_s
        ray.get([self.a.learner.join_group.remote(addr, port, world, t),
                 *[s.join_group.remote(addr, port, i + 1, world, t) for i, s in enumerate(self.a.samplers)]],
                timeout=t + 30)
        self.regroup = False

    def _shards_to_rank0(self, current: bool) -> None:
        """An FSDP group's other ranks take part in rank 0's publish (its weights are gathered
        from their shards); their returns are unused."""
        if self.cfg.learner.sharding == "fsdp":
            for learner in self.a.learners[1:]:
                learner.publish.remote(current)

    def publish(self, current: bool) -> tuple[Any, Any]:
        """Rank 0's publish refs (payload, (version, checksum, bytes))."""
        self._shards_to_rank0(current)
        return self.a.learner.publish.remote(current)

    def sync(self, current: bool = False, wait: bool = True, busy: list[Any] | None = None) -> None:
        """Publish the learner's weights (π_old, or π_θ when ``current``) to every sampler.
        ``wait``: block until every sampler applied and verified them; otherwise the
        applies are queued behind the samplers' in-flight rollouts and checked later."""
        self.payload, self.current = None, current
        refs: dict[int, Any] = {}
        t0 = time.perf_counter()
        if self.dist:
            if busy:  # the broadcast's timeout is for the transfer, not for rollouts ahead of it
                ray.wait(busy, num_returns=len(busy))
            if self.regroup:
                self._form_group()
            self._shards_to_rank0(current)
            want = self.a.learner.broadcast_weights.remote(current)
            refs = {i: s.receive_weights.remote() for i, s in enumerate(self.a.samplers)}
            try:
                version, self.checksum, nbytes = ray.get(want)
            except ray.exceptions.RayTaskError as exc:
                # a peer left the group (a sampler died mid-broadcast, or timed out): this
                # version goes through the object store, and the group is formed again next time
                log.warning("weight broadcast failed (%s); publishing through the object store",
                            str(exc).splitlines()[0])
                self.totals["broadcast_failures"] += 1
                self.regroup, refs = True, {}
        if not refs:
            self.payload, want = self.publish(current)
            refs = {i: s.apply_weights.remote(self.payload) for i, s in enumerate(self.a.samplers)}
            version, self.checksum, nbytes = ray.get(want)
        self.published.append(version)
        self.pending += [(i, ref, version, self.checksum) for i, ref in refs.items()]
        if wait:
            self.check_applied(block=True)
        if self.metrics is not None:
            self.metrics.sync("torch_distributed" if self.payload is None else "object_store",
                              time.perf_counter() - t0 if wait else None, nbytes, len(self.a.samplers))

    def check_applied(self, block: bool = False) -> None:
        """Verify finished applies (all of them when ``block``), each against the version it
        was sent; a sampler that died meanwhile, or whose broadcast failed, is resynced.
        A payload a sampler refused (checksum, shape) stops the run."""
        todo = self.pending
        if not block and todo:
            ready, _ = ray.wait([r for _, r, _, _ in todo], num_returns=len(todo), timeout=0)
            done = set(ready)
            todo = [x for x in todo if x[1] in done]
        self.pending = [x for x in self.pending if x not in todo]
        for i, ref, want_version, want_checksum in todo:
            try:
                version, checksum = ray.get(ref)
            except _LOST:
                self.resync(i)
                continue
            except ray.exceptions.RayTaskError as exc:
                if not self.dist or isinstance(exc.cause, WeightsMismatch):
                    raise
                self.resync(i)  # the broadcast this apply waited on failed
                continue
            if version != want_version or checksum != want_checksum:
                raise VersionMismatch(f"sampler {i} applied version {version} ({checksum[:12]}), "
                                      f"learner published {want_version} ({want_checksum[:12]})")
            self.applied[i] = max(self.applied[i], version)

    def resync(self, i: int) -> None:
        """Give sampler i the newest weights through the object store (after a restart its
        policy is the initial checkpoint; the broadcast group is formed again at the next sync)."""
        if self.payload is None:
            self.payload, _ = self.publish(self.current)  # (version, checksum, bytes) unused
        self.pending = [x for x in self.pending if x[0] != i]
        self.applied[i], _ = self._retry(lambda: self.a.samplers[i].apply_weights.remote(self.payload))
        self.totals["resyncs"] += 1
        self.regroup = self.dist

    def _retry(self, submit: Any, patience_s: float = 120.0) -> Any:
        """ray.get(submit()), submitted again while the actor restarts: an actor that is
        restarting (ActorUnavailableError) is waited for with back-off up to ``patience_s``
        from when its bundle has a node (one lost with its node is placed again when a node with
        its resources joins; none within resources.placement_timeout_s is a PlacementError
        naming them); one that died (ActorDiedError) is tried max_restarts more times."""
        deaths, wait, end = 0, 0.05, time.monotonic() + patience_s
        unplaced_since: float | None = None
        while True:
            try:
                return ray.get(submit())
            except ray.exceptions.ActorUnavailableError:
                now, unplaced = time.monotonic(), []
                if self.a.group is not None:
                    table = ray.util.placement_group_table(self.a.group)
                    if table["state"] != "CREATED":  # RESCHEDULING: bundles lost with their node
                        unplaced = [f"bundle {k} {table['bundles'][k]}"
                                    for k, node in table["bundles_to_node_id"].items() if not node]
                if unplaced:
                    unplaced_since = now if unplaced_since is None else unplaced_since
                    timeout = self.cfg.resources.placement_timeout_s
                    if now - unplaced_since > timeout:
                        have = {k: v for k, v in ray.cluster_resources().items() if "_group_" not in k}
                        raise PlacementError(
                            f"actors of the run lost their node and the cluster could not place their bundles "
                            f"again within {timeout:g} s (resources.placement_timeout_s): {'; '.join(unplaced)}; "
                            f"the cluster has {have} — add a node with these resources") from None
                    end = now + patience_s  # the restart's patience runs from its placement
                elif now > end:
                    raise
                time.sleep(wait)
                wait = min(2.0, wait * 2)
            except _LOST:
                deaths += 1
                if deaths > self.cfg.resources.max_restarts:
                    raise

    # ---- rollouts ------------------------------------------------------------------
    def _rollout(self, i: int, prompts: list[str], seeds: list[int], n: int, cfg_scale: float | None,
                 kind: str | None) -> Part:
        traj, meta = self.a.samplers[i].rollout.remote(prompts, n, seeds, cfg_scale, kind)
        return Part(i, prompts, seeds, traj, meta)

    def launch(self, it: int, prompts: list[str], seeds: list[int], n: int,
               cfg_scale: float | None = None, kind: str | None = None,
               metadata: list[dict] | None = None) -> Batch:
        """Rollouts of the prompts divided among samplers (order kept), and their scoring;
        ``metadata``: each prompt's, handed to the rewards with each of its n rollouts."""
        pairs = list(zip(prompts, seeds, strict=True))
        parts = [self._rollout(i, [p for p, _ in chunk], [z for _, z in chunk], n, cfg_scale, kind)
                 for i, chunk in enumerate(split_evenly(pairs, len(self.a.samplers))) if chunk]
        # a sampler's rollouts are prompt-major (n of its first prompt, then n of the next), and
        # the reward joins the parts in order: each prompt's metadata repeated n times matches
        per_sample = None if metadata is None else [m for m in metadata for _ in range(n)]
        batch = Batch(it, parts, metadata=per_sample)
        batch.scores = self.score(batch)
        return batch

    def score(self, b: Batch, **kw: Any) -> Any:  # noqa: ANN401 - a Ray object ref
        """Ask the reward actor for the scores of ``b``'s rollouts (with their prompts' metadata)."""
        if b.metadata is not None:
            kw["metadata"] = b.metadata
        return self.a.reward.score.remote(*[p.traj for p in b.parts], **kw)

    def settle(self, b: Batch, max_lag: int, n: int, cfg_scale: float | None = None,
               kind: str | None = None) -> dict[str, Any]:
        """Make every part of ``b`` a rollout within ``max_lag`` published versions of the
        newest, redoing parts lost with their sampler or too stale; then make sure of its
        scores, which it returns (a few floats per rollout)."""
        self.check_applied()
        redone = False
        for _ in range(4 * (self.cfg.resources.max_restarts + 1)):
            bad = []
            b.lags = []
            for k, part in enumerate(b.parts):
                try:
                    meta = ray.get(part.meta)
                except _LOST:
                    b.redone_lost += len(part.prompts) * n
                    bad.append(k)
                    continue
                lag = self.lag(meta["version"])
                if lag > max_lag:
                    b.dropped_stale += meta["size"]
                    bad.append(k)
                b.lags.append(lag)
            if not bad:
                break
            redone = True
            for k in bad:
                part = b.parts[k]
                self.resync(part.sampler)
                b.parts[k] = self._rollout(part.sampler, part.prompts, part.seeds, n, cfg_scale, kind)
        else:
            raise RuntimeError(f"iteration {b.iteration}: rollouts kept failing after "
                               f"{self.cfg.resources.max_restarts} restarts per sampler")
        if redone:
            b.scores = self.score(b)
        first = [b.scores]

        def score() -> Any:
            if first:
                return first.pop()
            b.lost_reward += 1
            b.scores = self.score(b)
            return b.scores

        scored = self._retry(score)  # a few floats per rollout; raises the reward's own errors
        if self.metrics is not None:
            self.metrics.reward_clients(scored.get("_client_metrics", []))
        for k in ("dropped_stale", "redone_lost", "lost_reward"):
            self.totals[k] += getattr(b, k)
        return scored

    def lag(self, version: int) -> int:
        """Published versions between ``version`` and the newest (a large number when it was
        never published in this run, e.g. a restarted sampler's initial weights after a resume)."""
        for back, v in enumerate(reversed(self.published)):
            if v == version:
                return back
        return 1 << 30

    def update(self, b: Batch) -> dict[str, Any]:
        """Every learner rank's update on its rows of ``b`` (the statistics are the whole batch's,
        the same on every rank: rank 0's are returned). Each rank is handed the references of the
        parts that hold its rows and where its rows start in the first of them; the whole batch's
        scores and prompts are a few numbers and strings per rollout."""
        learners = self.a.learners
        refs = [p.traj for p in b.parts]
        if len(learners) == 1:
            calls = [learners[0].update.remote(b.scores, None, 0, *refs)]
        else:
            n = self.cfg.rollout.samples_per_prompt
            prompts = [s for p in b.parts for s in p.prompts for _ in range(n)]  # rollouts are prompt-major
            starts = np.cumsum([0] + [len(p.prompts) * n for p in b.parts])
            calls = []
            for learner, rows in zip(learners, split_rows(len(prompts), len(learners)), strict=True):
                first = int(np.searchsorted(starts, rows.lo, side="right")) - 1
                last = int(np.searchsorted(starts, rows.hi, side="left"))  # parts [first, last) hold the rows
                calls.append(learner.update.remote(b.scores, prompts, rows.lo - int(starts[first]),
                                                   *refs[first:last]))
        try:
            return first_failure(calls)[0]
        except Exception as exc:
            # a rank that died also fails its peers' collectives (a gloo/NCCL error), in either
            # order: look for the dead rank among every call before reporting anything else
            ray.wait(calls, num_returns=len(calls), timeout=5.0)
            rank = next((k for k, c in enumerate(calls) if _lost(c)), None)
            if rank is None:
                if not isinstance(exc, _LOST):
                    raise
                rank = 0
            who = "the learner" if len(learners) == 1 else f"learner rank {rank}"
            raise LearnerLost(f"{who} died at iteration {b.iteration}: {exc}") from None


def first_failure(refs: list[Any]) -> list[Any]:
    """``ray.get(refs)``, but raising the first error as soon as any call fails (a learner rank's
    peers would otherwise wait in a collective until its timeout before the driver heard)."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def _lost(ref: Any) -> bool:  # noqa: ANN401 - a Ray object ref
    """Whether the call behind ``ref`` failed because its actor died."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref)
    except _LOST:
        return True
    except Exception:  # noqa: BLE001 - any other failure is not a death
        return False
    return False


def evaluate(pipe: Pipeline, cfg: TrainConfig, version: int, svm: HeldoutSVM | None, iteration: int = 0,
             base: Evaluation | None = None) -> Evaluation:
    """CFG-free ODE samples of every prompt from fixed noise, scored by the reward, by eval.rewards
    (another call of the reward actor when they differ) and (digits world) the held-out SVM: the
    same measurement whichever sampler the algorithm trains with. ``base``: the evaluation the
    watch's drift is measured from."""
    t0 = time.perf_counter()
    prompts, seeds = eval_plan(cfg)
    n = cfg.eval.samples_per_prompt
    batch = pipe.launch(-1, prompts, seeds, n, cfg_scale=1.0, kind="ode", metadata=eval_metadata(cfg))
    scored = pipe.settle(batch, 0, n, cfg_scale=1.0, kind="ode")
    batch_scores = scored["scores"]
    components = cfg.eval.rewards or cfg.reward.components
    if cfg.eval.rewards is not None:
        scored = pipe._retry(lambda: pipe.score(batch, eval_rewards=True))
    eval_scores = {c.label: float(scored[c.label].mean()) for c in components if c.label in scored}
    trajs = ray.get([p.traj for p in batch.parts])
    flat = np.concatenate([t.images for t in trajs])
    accuracy = None
    if svm is not None:  # the held-out SVM as a reward: 1 where it reads the prompted digit
        accuracy = float(svm(flat, [s for t in trajs for s in t.prompt_list()], batch.metadata).scores.mean())
    return evaluation_of(version, prompts, flat.reshape(len(prompts), n, *flat.shape[1:]), batch_scores,
                         accuracy, iteration=iteration, eval_scores=eval_scores, base=base,
                         seconds=time.perf_counter() - t0)


class Evaluator:
    """The run's evaluations (before training, every ``eval.every`` iterations, after), with the
    digits world's held-out SVM; ``base`` (the 'before' evaluation) is the watch's yardstick."""

    def __init__(self, pipe: Pipeline, cfg: TrainConfig) -> None:
        self.pipe, self.cfg = pipe, cfg
        self.svm = heldout_evaluator(cfg)  # the world's evaluation-only reader (services/evaluation.py)
        self.samples = len(eval_plan(cfg)[0]) * cfg.eval.samples_per_prompt
        self.base: Evaluation | None = None

    def due(self, done: int) -> bool:
        """Whether to evaluate between batches once ``done`` iterations are trained."""
        return eval_due(self.cfg.eval.every, done, self.cfg.run.iterations)

    def __call__(self, version: int, iteration: int = 0) -> Evaluation:
        return evaluate(self.pipe, self.cfg, version, self.svm, iteration, self.base)


def open_run(cfg: TrainConfig, config_name: str, resume: Path | str | None) -> tuple[RunStorage, Resume | None]:
    """Where the run lives (``run.out_dir``: a path or a URI, services/storage.py), and for a
    resumed run what it continues from, downloaded first when it lives at a URI. Nothing is
    created yet; an out_dir the run would lose (Ray's temporary directory) is refused."""
    if resume is None:
        name = cfg.run.name or f"{config_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        return RunStorage(cfg.run.out_dir, name), None
    storage = RunStorage.of_run(resume)
    try:
        return storage, prepare_resume(storage.download_for_resume(), cfg)
    except BaseException:
        storage.finish(ok=True)  # a refused resume: its download is of no use
        raise


def plan_iteration(cfg: TrainConfig, it: int, source: Prompts | None = None
                   ) -> tuple[list[str], list[int], list[dict] | None]:
    """Iteration ``it``'s prompts, their noise seeds and (from a dataset) their metadata: the
    inline list cycled through, or rollout.dataset's epochs (services/datasets.py). A function
    of (config, dataset, it) alone, so a resumed run plans what the uninterrupted one would."""
    per_it = cfg.rollout.batch_prompts
    seeds = [seed_for(cfg.run.seed, it, k) for k in range(per_it)]
    dc = cfg.rollout.dataset
    if dc is None:
        prompts = cfg.rollout.prompts
        return [prompts[(it * per_it + k) % len(prompts)] for k in range(per_it)], seeds, None
    train = (source or load_prompts(cfg)).train
    assert train is not None  # load_prompts reads rollout.dataset whenever it is set
    rows = plan_rows(len(train), per_it, it, dc.shuffle, dc.seed)
    return [train.prompts[i] for i in rows], seeds, [train.metadata[i] for i in rows]


def batch_plan(cfg: TrainConfig, it: int, source: Prompts | None = None) -> tuple[list[str], list[int]]:
    """Iteration ``it``'s prompts and their noise seeds (:func:`plan_iteration` without metadata)."""
    prompts, seeds, _ = plan_iteration(cfg, it, source)
    return prompts, seeds


def write_outputs(run_dir: Path, before: Evaluation, after: Evaluation, extra: dict[str, Any],
                  grid_columns: int, probability: bool = True) -> dict[str, Any]:
    """The grid, the curve, summary.json and summary.txt; prints the table. ``probability``:
    the reward is a probability (the digits classifier alone), which has a target p + (1 − p)/2."""
    sample_grid(before, after, run_dir / "samples_before_after.png", grid_columns)
    reward_curve(run_dir / "metrics.jsonl", run_dir / "reward_curve.png", probability)
    table = summary_table(before, after)
    summary = {"run_dir": str(run_dir), **extra, "before": before.headline(), "after": after.headline()}
    if probability:
        summary["target_reward"] = before.reward + (1 - before.reward) / 2
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.txt").write_text(table + "\n")
    write_report(run_dir, summary, table)
    print(table)
    return summary


def save_checkpoint(pipe: Pipeline, run_dir: Path, next_it: int, elapsed: float, keep: int,
                    cursor: dict[str, Any] | None = None) -> Path:
    """The learner's files and the driver's state at ``next_it`` (see ``write_checkpoint``);
    ``cursor``: where rollout.dataset's epochs stand (datasets.cursor_record)."""
    state = {"iteration": next_it, "version": pipe.version, "elapsed_s": elapsed, "totals": pipe.totals}
    if cursor is not None:
        state["prompts"] = cursor
    def save(d: Path) -> None:  # rank 0 writes; an FSDP group's other ranks send it their shards
        ranks = pipe.a.learners if pipe.cfg.learner.sharding == "fsdp" else pipe.a.learners[:1]
        ray.get([learner.save.remote(str(d.resolve())) for learner in ranks])

    return write_checkpoint(run_dir, next_it, state, save, keep)


class Checkpoints:
    """The run's checkpoints: one every ``run.checkpoint_every`` iterations and at the last (each
    announced to the loggers once complete), the restore of a resumed run, the final checkpoint/."""

    def __init__(self, pipe: Pipeline, run_dir: Path, cfg: TrainConfig, loggers: Loggers,
                 prompts: Prompts | None = None) -> None:
        self.pipe, self.run_dir, self.loggers = pipe, run_dir, loggers
        self.every, self.last, self.keep = cfg.run.checkpoint_every, cfg.run.iterations, cfg.run.keep_checkpoints
        self.cfg, self.prompts = cfg, prompts

    def after_iteration(self, done: int, elapsed: float) -> None:
        if (self.every and done % self.every == 0) or done == self.last:
            t = time.perf_counter()
            cursor = None if self.prompts is None else cursor_record(self.cfg, self.prompts, done)
            path = save_checkpoint(self.pipe, self.run_dir, done, elapsed, self.keep, cursor)
            self.loggers.on_checkpoint(path, time.perf_counter() - t)

    def restore(self, resumed: Resume, cfg: TrainConfig) -> None:
        """Load the checkpoint into the learner, then record the config the run continues under,
        restore the pipeline's totals and publish the checkpoint's version to every sampler."""
        ckpt, state, pipe = resumed.ckpt, resumed.state, self.pipe
        # every rank loads the same files: a DDP group's state is the same on every rank
        ray.get([learner.load.remote(str(ckpt.resolve())) for learner in pipe.a.learners])
        write_text_atomic(self.run_dir / "config.yaml", dump_config(cfg))
        pipe.totals.update(state["totals"])
        if pipe.metrics is not None:
            pipe.metrics.baseline(pipe.totals["resyncs"])
        pipe.sync()
        if pipe.version != state["version"]:
            raise VersionMismatch(f"checkpoint {ckpt} holds version {pipe.version}, driver.json says "
                                  f"{state['version']}")

    def final(self) -> str:
        return link_final_checkpoint(latest_checkpoint(self.run_dir), self.run_dir / "checkpoint")


def resume_hint(run_dir: Path, location: str | None = None) -> str:
    """What a user can do after the learner was lost (``location``: the run's URI, if it has one)."""
    if (run_dir / CHECKPOINTS / "latest").is_file():
        return (f"last checkpoint: {latest_checkpoint(run_dir)}; continue with "
                f"`fmrl train --resume {location or run_dir}`")
    return "no checkpoint was written yet"


def warmup_warning(cfg: TrainConfig) -> str | None:
    """A warning when every learner step of the run is AC-Flow critic warm-up."""
    ac, ln = cfg.algorithm.ac_flow, cfg.learner
    steps = cfg.run.iterations * ln.updates_per_batch
    if cfg.algorithm.name != "ac_flow" or steps > ac.warmup_steps:
        return None
    effect = ("the actor is frozen throughout, so the policy will not change" if ac.warmup_actor == "frozen"
              else "the critic never steers the actor")
    return (f"warning: this run makes {steps} learner steps (run.iterations × learner.updates_per_batch), all of "
            f"them AC-Flow's critic warm-up (algorithm.ac_flow.warmup_steps={ac.warmup_steps}): {effect}; set "
            f"run.iterations above {ac.warmup_steps // ln.updates_per_batch} or lower the warm-up")


def prompts_summary(prompts: Prompts) -> dict[str, Any]:
    """Where the run's prompts came from, for the summary and the report."""
    train = prompts.train
    return {"train": train.where if train else "rollout.prompts",
            "train_prompts": len(train) if train else None, "eval": prompts.eval.where,
            "eval_prompts": len(prompts.eval),
            "metadata_fields": sorted({k for s in (train, prompts.eval) if s for m in s.metadata for k in m})}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def train(cfg: TrainConfig, config_name: str = "digits", resume: Path | str | None = None) -> dict[str, Any]:
    """Run the job the config describes (or continue ``resume``, a run directory or a run's URI,
    from its last checkpoint); returns the summary (also written to the run).

    Everything is checked before anything is made (the config, the policy, the trackers'
    packages, a resumed run's files); then the run directory, Ray and the actors, and the loop:
    launch rollouts up to the lag bound ahead, settle a batch (redo what was lost or too stale),
    update, sync the new weights, log; checkpoints and evaluations are its collaborators."""
    cfg = validate_config(cfg)  # the Python API refuses what the command line refuses
    check_policy_source(cfg.policy)  # fail before any directory or cluster exists
    check_trackers(cfg.run.loggers)
    prompts = load_prompts(cfg)  # a bad dataset is one line naming its file and row, before anything starts
    storage, resumed = open_run(cfg, config_name, resume)
    if resumed is not None:
        try:
            check_cursor(resumed.state.get("prompts"), cfg, prompts, resumed.state["iteration"])
        except BaseException:
            storage.finish(ok=True)  # as open_run does for a refused resume
            raise
    sync = StorageSync(storage, cfg.run.keep_checkpoints, new_run=resumed is None)  # a URI run's uploads
    console = ConsoleLogger(cfg)
    try:
        prom = PrometheusLogger(cfg)  # a taken port fails here too
    except BaseException:
        sync.close()
        raise
    # sync before the trackers (added later, before the console): it closes after them, so it
    # uploads what they flush when they close
    loggers = Loggers(prom, sync, console)
    if prom.port is not None:
        loggers.log_phase(f"metrics: http://{cfg.metrics.host}:{prom.port}/metrics")
    if (warning := warmup_warning(cfg)) is not None:
        loggers.log_phase(warning)
    if (note := truncation_note(cfg, prompts)) is not None:
        loggers.log_phase(note)
    run_dir: Path | None = None
    actors, started_ray, finished = None, False, False
    try:
        if resumed is None:
            run_dir = storage.create()
            write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        else:  # its config.yaml is written once the checkpoint loaded: a refused resume changes nothing
            run_dir = resumed.run_dir
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            loggers.log_phase(f"joining the Ray cluster at {address}" if address else "starting Ray")
        started_ray = ensure_ray(cfg)
        t0 = time.time()
        loggers.log_phase(f"starting {_plural(cfg.resources.num_samplers, 'sampler')}, "
                          f"{_plural(cfg.resources.num_learners, 'learner')}, 1 reward actor")
        actors = start_actors(cfg, f"fmrl-{run_dir.name}")
        pipe = Pipeline(actors, cfg)
        pipe.metrics = prom.metrics
        evaluator = Evaluator(pipe, cfg)
        checkpoints = Checkpoints(pipe, run_dir, cfg, loggers, prompts)
        if resumed is None:
            start, lines = 0, []
            pipe.published.append(0)
            if pipe.dist:
                pipe.sync()  # forms the group and proves it before the first rollout
        else:
            checkpoints.restore(resumed, cfg)
            start, lines, t0 = resumed.state["iteration"], resumed.lines, t0 - resumed.state["elapsed_s"]
            loggers.log_phase(f"resuming {run_dir} at iteration {start} (version {pipe.version}) from {resumed.ckpt}")
        loggers.add(JsonlLogger(run_dir, lines), *open_trackers(cfg, run_dir))
        loggers.log_config(cfg, run_dir)
        if resumed is None:
            loggers.log_phase(f"baseline evaluation ({evaluator.samples} samples)")
            before = evaluator(0)
            before.save(run_dir / "eval_before.npz")
            loggers.log_eval("before", before)
        else:
            before = resumed.before
        evaluator.base = before
        fit(pipe, cfg, start, t0, loggers, checkpoints, evaluator, prompts)
        loggers.log_phase(f"final evaluation ({evaluator.samples} samples)")
        after = evaluator(pipe.version, cfg.run.iterations)
        loggers.log_eval("after", after)
        summary = write_outputs(run_dir, before, after, {
            "run_dir": storage.location, "checkpoint": storage.location_of(checkpoints.final()),
            "seconds": round(time.time() - t0, 1),
            "heldout_classifier_accuracy_on_real": evaluator.svm.heldout_accuracy if evaluator.svm else None,
            "prompts": prompts_summary(prompts),
            "pipeline": pipe.totals},
            cfg.eval.grid_columns,
            probability=[(c.kind, c.weight) for c in cfg.reward.components] == [("digits_classifier", 1.0)])
        loggers.log_summary(summary)  # the console's line, the run's last, comes after every other logger's
        finished = True
        return summary
    except LearnerLost as exc:
        raise LearnerLost(f"{exc}\n{resume_hint(run_dir, storage.location)}") from None
    finally:
        try:
            loggers.close()
        except Exception as exc:  # noqa: BLE001 - a logger that fails to close does not hide the run's outcome
            log.warning("closing the run's loggers failed: %s", exc)
        if actors is not None and not started_ray:
            actors.shutdown()
        if started_ray:
            ray.shutdown()
        if resumed is None and not finished and run_dir is not None and nothing_to_keep(run_dir):
            # a directory that blocks the run's name and holds nothing to resume
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"removed {storage.location}: the run stopped before its first iteration, nothing to resume")


def fit(pipe: Pipeline, cfg: TrainConfig, start: int, t0: float, loggers: Loggers, checkpoints: Checkpoints,
        evaluator: Evaluator | None = None, prompts: Prompts | None = None) -> None:
    """Iterations ``start`` … run.iterations − 1: launch, settle, update, sync, log, evaluate when
    due, checkpoint; then every sampler holds π_θ, the policy the final evaluation measures.

    An evaluation between batches runs on the samplers after the rollouts already queued there
    and after the version just published (so it measures that version, the one the next batch
    rolls out with), at any lag; the learner waits for it. Its row precedes the checkpoint of
    the same iteration, so a resume from that checkpoint keeps it and does not redo it."""
    lag, n = cfg.pipeline.max_policy_lag, cfg.rollout.samples_per_prompt
    inflight: deque[Batch] = deque()
    next_it = start
    for it in range(start, cfg.run.iterations):
        t_it = time.perf_counter()
        while next_it < cfg.run.iterations and len(inflight) <= lag:
            chosen, seeds, metadata = plan_iteration(cfg, next_it, prompts)
            inflight.append(pipe.launch(next_it, chosen, seeds, n, metadata=metadata))
            next_it += 1
        batch = inflight.popleft()
        clock = _Clock()
        with clock("rollout"):
            pipe.settle(batch, lag, n)
        clock.times["rollout_duration"] = time.perf_counter() - batch.launched
        with clock("update"):
            stats = pipe.update(batch)
        if stats["version"] != pipe.version:
            with clock("sync"):
                pipe.sync(wait=lag == 0, busy=[p.traj for b in inflight for p in b.parts])
        row = {"kind": "train", "iteration": it, "time_s": round(time.time() - t0, 3),
               "sampler_versions": list(pipe.applied), "lag": max(batch.lags),
               "dropped_stale": batch.dropped_stale, "redone_lost": batch.redone_lost,
               "lost_reward": batch.lost_reward, **stats}
        loggers.log_iteration(it, row, IterationInfo(clock.times, time.perf_counter() - t_it, len(inflight),
                                                     len(pipe.pending), pipe.totals["resyncs"]))
        if evaluator is not None and evaluator.due(it + 1):
            loggers.log_eval("iteration", evaluator(pipe.version, it + 1))
        checkpoints.after_iteration(it + 1, time.time() - t0)  # after the row: a resume finds every row before it
    pipe.check_applied(block=True)
    pipe.sync(current=True)


class _Clock:
    """Seconds spent in each named phase of an iteration."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.times[phase] = time.perf_counter() - t
