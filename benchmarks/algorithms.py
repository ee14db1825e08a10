"""Benchmark the algorithms on the digits world through `fmrl train` (not run in CI).

Each run is a real `fmrl train` subprocess with one config per algorithm; the script
reads every run's summary.json and metrics.jsonl and writes a markdown table:
reward, held-out-classifier accuracy and diversity (mean ± std over seeds), and the
rollout samples needed until the batch reward (moving average of 5 iterations) first
reaches each threshold. Sweeps reproduce the papers' claims.

    .venv/bin/python benchmarks/algorithms.py --seeds 0 1 2 --out docs/algorithms_results.md
    .venv/bin/python benchmarks/algorithms.py --seeds 0 1 2 --sweep-seeds 0 \
        --sweeps orw_tau orw_alpha ac_flow_ablations advantage_flow_gamma

Runs already in --runs-dir are reused. Five algorithms × 3 seeds take about 1 h 15 min on
2 cores (Flow-GRPO's SDE rollouts about 11 min a run, the others about 3.5 min); the
four sweeps at one seed about 45 min more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("ac_flow", "advantage_flow", "orw_cfm_w2", "diffusion_nft", "flow_grpo")
CONFIG = {a: ROOT / "configs" / f"digits_{'orw' if a == 'orw_cfm_w2' else a}.yaml" for a in ALGORITHMS}
THRESHOLDS = (0.85, 0.90, 0.95)
SWEEPS: dict[str, tuple[str, list[tuple[str, list[str]]]]] = {
    # a variant with no overrides is the algorithm's own config: its run is shared with the table above
    "orw_tau": ("orw_cfm_w2", [(f"τ={t}", [f"algorithm.orw.tau={t}"] if t != 20 else []) for t in (5, 10, 20, 40)]),
    "orw_alpha": ("orw_cfm_w2", [(f"α={a}", [f"algorithm.orw.alpha={a}"] if a != 0.5 else [])
                                 for a in (0, 0.25, 0.5, 1, 2)]),
    "ac_flow_ablations": ("ac_flow", [
        ("full", []),
        ("warm-up actor on ORW weights", ["algorithm.ac_flow.warmup_actor=orw"]),
        ("no warm-up", ["algorithm.ac_flow.warmup_steps=0"]),
        ("no clipping", ["algorithm.ac_flow.advantage_clip=null"]),
        ("no shaping", ["algorithm.ac_flow.shaping=none", "algorithm.ac_flow.tracker.min_count=1000",
                        "algorithm.ac_flow.tracker.buffer_size=1000"]),
    ]),
    # without the rollout term γ the loss needs λ > A_max to stay convex: the reference takes its place
    "advantage_flow_gamma": ("advantage_flow", [
        ("γ=1.1, λ=1e-3", []),
        ("γ=0, λ=1.1", ["algorithm.advantage_flow.gamma=0", "algorithm.advantage_flow.lam=1.1"]),
    ]),
}


def run(algorithm: str, seed: int, extra: list[str], out: Path, name: str) -> dict:
    if not extra:
        name = f"{algorithm}-s{seed}"
    run_dir = out / name
    if not (run_dir / "summary.json").is_file():
        cmd = [str(ROOT / ".venv/bin/fmrl"), "train", "--config", str(CONFIG[algorithm]),
               "--set", f"run.out_dir={out}", "--set", f"run.seed={seed}", "--set", "run.progress=false",
               "--name", name, *[x for e in extra for x in ("--set", e)]]
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    c = yaml.safe_load((run_dir / "config.yaml").read_text())
    per_it = (c["rollout"]["prompts_per_iteration"] or len(c["rollout"]["prompts"])) * c["rollout"]["samples_per_prompt"]
    rewards = [r["reward_mean"] for r in train]
    reach = {}
    for th in THRESHOLDS:
        hit = next((i for i in range(4, len(rewards)) if statistics.mean(rewards[i - 4:i + 1]) >= th), None)
        reach[th] = None if hit is None else (hit + 1) * per_it
    return {"after": summary["after"], "before": summary["before"], "reach": reach}


def fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(results: dict[str, list[dict]]) -> str:
    head = "| run | reward | held-out acc. | diversity | " + " | ".join(f"samples to {t}" for t in THRESHOLDS) + " |"
    lines = [head, "|" + "---|" * (4 + len(THRESHOLDS))]
    for name, rs in results.items():
        reach = []
        for t in THRESHOLDS:
            hits = [r["reach"][t] for r in rs]
            reach.append("—" if any(h is None for h in hits) else f"{statistics.mean(hits):,.0f}")
        lines.append(f"| {name} | {fmt([r['after']['reward'] for r in rs])} | {fmt([r['after']['accuracy'] for r in rs])} "
                     f"| {fmt([r['after']['diversity'] for r in rs])} | " + " | ".join(reach) + " |")
    base = next(iter(results.values()))[0]["before"]
    lines.append(f"| base policy | {base['reward']:.3f} | {base['accuracy']:.3f} | {base['diversity']:.3f} | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--sweeps", nargs="*", default=[], choices=sorted(SWEEPS))
    p.add_argument("--sweep-seeds", nargs="*", type=int, default=None, help="Seeds of the sweeps (default: --seeds).")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "algorithms_results.md")
    args = p.parse_args()
    sections = []
    if args.algorithms:
        res = {a: [run(a, s, [], args.runs_dir, f"{a}-s{s}") for s in args.seeds] for a in args.algorithms}
        sections.append("## Algorithms (same sample budget, seeds " + ", ".join(map(str, args.seeds)) + ")\n\n" + table(res))
    for sw in args.sweeps:
        algo, variants = SWEEPS[sw]
        seeds = args.seeds if args.sweep_seeds is None else args.sweep_seeds
        res = {label: [run(algo, s, extra, args.runs_dir, f"{sw}-{i}-s{s}") for s in seeds]
               for i, (label, extra) in enumerate(variants)}
        sections.append(f"## Sweep {sw} ({algo}; seeds " + ", ".join(map(str, seeds)) + ")\n\n" + table(res))
    text = "# Digits-world results\n\nMade by `" + " ".join(["python", *sys.argv]) + "`.\n\n" + "\n\n".join(sections) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
