"""Pipeline efficiency: end-to-end samples/s ÷ the slowest stage's samples/s measured alone.

For 1 and 2 samplers, on the digits config (`make run`'s), it first times each stage alone
on the run's own actors — a batch's rollouts (all samplers at once), its scoring, one
learner update — then runs `fmrl train`'s loop at max_policy_lag 0 and 1 and reads the
steady-state iteration time from metrics.jsonl (iterations after the AC-Flow warm-up).
Efficiency = (batch / iteration time) ÷ min over stages of (batch / stage time). Also
measures the driver's per-call overhead (an empty actor call), which the scaling
estimate uses. Writes docs/performance.md between markers and docs/pipeline.json.

    .venv/bin/python benchmarks/pipeline.py           # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
from common import ROOT, machine, write_section

BEGIN, END = "<!-- pipeline:begin -->", "<!-- pipeline:end -->"


def stage_times(cfg, repeats: int) -> dict[str, float]:  # noqa: ANN001 - a TrainConfig
    """Median seconds of each stage alone on one batch, on the run's own actors."""
    from services.actors import start_actors
    from services.driver import Pipeline, batch_plan

    actors = start_actors(cfg, "fmrl-bench-stages")
    try:
        pipe = Pipeline(actors, cfg)
        pipe.published.append(0)
        n = cfg.rollout.samples_per_prompt
        times: dict[str, list[float]] = {"rollout": [], "reward": [], "learner": [], "empty_call": []}
        for rep in range(repeats + 1):  # the first round warms up
            t = time.perf_counter()
            b = pipe.launch(rep, *batch_plan(cfg, rep), n)
            trajs = [p.traj for p in b.parts]
            ray.wait(trajs, num_returns=len(trajs))
            t_roll = time.perf_counter() - t
            ray.get(b.scores)  # launch already queued the scoring; let it finish untimed
            t = time.perf_counter()
            scores = actors.reward.score.remote(*trajs)
            ray.wait([scores])
            t_rew = time.perf_counter() - t
            t = time.perf_counter()
            ray.get(actors.learner.update.remote(scores, None, 0, *trajs))
            t_learn = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(20):
                ray.get(actors.samplers[0].version.remote())
            t_call = (time.perf_counter() - t) / 20
            if rep:
                for k, v in zip(times, (t_roll, t_rew, t_learn, t_call), strict=True):
                    times[k].append(v)
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        actors.shutdown()


def end_to_end(cfg, skip: int) -> float:  # noqa: ANN001 - a TrainConfig
    """Median seconds per iteration of a real run, after ``skip`` iterations."""
    from services.driver import train

    train(cfg)
    rows = [json.loads(x) for x in (cfg.run.out_dir / cfg.run.name / "metrics.jsonl").read_text().splitlines()]
    t = [r["time_s"] for r in rows if r["kind"] == "train"][skip:]
    return statistics.median(b - a for a, b in zip(t, t[1:], strict=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "digits_ac_flow.yaml"))
    ap.add_argument("--samplers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--lags", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--iterations", type=int, default=45)
    ap.add_argument("--skip", type=int, default=25, help="iterations left out (start-up, AC-Flow's critic warm-up)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from services.config import load_config

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = Path(tempfile.mkdtemp(prefix="fmrl-pipeline-"))
    results = []
    for ns in args.samplers:
        base = [f"resources.num_samplers={ns}", f"run.out_dir={out}", "run.progress=false",
                "run.checkpoint_every=0", "eval.samples_per_prompt=2", f"run.iterations={args.iterations}"]
        # the stages alone start at learner step 0: without AC-Flow's critic warm-up, so the
        # learner is timed doing what it does in the measured (post-warm-up) iterations
        stages = stage_times(load_config(args.config, base + ["run.name=stages",
                                                              "algorithm.ac_flow.warmup_steps=0"]), args.repeats)
        cfg = load_config(args.config, base + ["run.name=size"])
        batch = cfg.rollout.batch_prompts * cfg.rollout.samples_per_prompt
        slowest = max(("rollout", "reward", "learner"), key=lambda k: stages[k])
        for lag in args.lags:
            name = f"s{ns}-lag{lag}"
            it_s = end_to_end(load_config(args.config, base + [f"run.name={name}",
                                                               f"pipeline.max_policy_lag={lag}"]), args.skip)
            row = {"samplers": ns, "lag": lag, "batch": batch, **{f"{k}_s": v for k, v in stages.items()},
                   "iteration_s": it_s, "samples_per_s": batch / it_s,
                   "slowest_stage": slowest, "slowest_samples_per_s": batch / stages[slowest],
                   "efficiency": (batch / it_s) / (batch / stages[slowest])}
            results.append(row)
            print(json.dumps(row))
    ray.shutdown()

    lines = ["| samplers | lag | rollout alone | reward alone | learner alone | iteration | samples/s "
             "| slowest stage alone | efficiency |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['samplers']} | {r['lag']} | {r['rollout_s']:.3f} s | {r['reward_s']:.3f} s "
                     f"| {r['learner_s']:.3f} s | {r['iteration_s']:.3f} s | {r['samples_per_s']:.0f} "
                     f"| {r['slowest_samples_per_s']:.0f} ({r['slowest_stage']}) | {r['efficiency']:.2f} |")
    call_ms = statistics.median(r["empty_call_s"] for r in results) * 1e3
    text = (f"Measured by `.venv/bin/python benchmarks/pipeline.py` on {machine()}, {time.strftime('%Y-%m-%d')}: "
            f"`configs/digits_ac_flow.yaml` ({results[0]['batch']} rollouts per iteration, 10 Euler steps), "
            f"iterations {args.skip}–{args.iterations - 1} of each run (after AC-Flow's critic warm-up), "
            f"stage times the median of {args.repeats} batches on the run's own actors. Efficiency = "
            f"end-to-end samples/s ÷ the slowest stage's samples/s alone. An empty actor call costs the "
            f"driver {call_ms:.2f} ms.\n\n" + "\n".join(lines))
    print(text)
    if not args.no_write:
        write_section(BEGIN, END, "## Pipeline efficiency (issue 5)", text)
        (ROOT / "docs" / "pipeline.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
