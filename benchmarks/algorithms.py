"""Compare the methods on the embedded benches through `fmrl train` (not run in CI).

For every bench (digits, compose), method and value of the method's own trade-off knob
(ORW α, AC-Flow τ, DiffusionNFT β, Flow-GRPO KL β, AdvantageFlow γ, AWM's regulariser), and
every seed, one real `fmrl train --config configs/<bench>_<method>.yaml` subprocess at its
config's budget. Then, per bench, every run at one equal rollout budget (EQUAL_ROLLOUTS: a run
with more is evaluated at its checkpoint made with exactly that many, by `fmrl eval`, cached
in the run's directory): a table (reward, held-out accuracy, diversity, rollouts to each
reward threshold; mean ± std over seeds), the reward-versus-diversity
front as a picture (images/front_<bench>.png beside the report: docs/images/ by default), the methods at matched diversity
(each method's best setting that keeps at least the diversity every method can keep) with
Welch's test of AC-Flow against each, and the commit the figures were made at.

    .venv/bin/python benchmarks/algorithms.py                       # everything (hours on 2 cores)
    .venv/bin/python benchmarks/algorithms.py --benches digits --methods ac_flow orw_cfm_w2 --seeds 0
    .venv/bin/python benchmarks/algorithms.py --report-only          # tables and pictures of the runs there

Each run leaves a record in --results (benchmarks/results/, committed: what the tables need of
it at the equal budget, its batch-reward curve and the commit it was made at), so the comparison
survives the run directories (git-ignored, and gone with the machine). A run with a record is
not made again; one whose directory is there is recorded without running (a run is named after
bench, method, knob value and seed); a failed run is reported and skipped. Progress and an estimate of the time left go
to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from fronts import (  # noqa: E402
    Point,
    best_at_diversity,
    budget_iteration,
    front_gap,
    matched_diversity,
    pareto_front,
    samples_to_threshold,
    verdict,
    welch,
)

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("digits", "compose")


@dataclass(frozen=True)
class Method:
    """A method as the bench runs it: its config stem and its trade-off knob."""

    name: str
    stem: str
    knob: str
    values: tuple[float, ...]
    label: str
    sets: tuple[str, ...] = ()
    """Further overrides that make a variant of a method (an AC-Flow lever)."""


# each method's knob values start with its config's own (`--knob-index 0`: the defaults only)
METHODS: dict[str, Method] = {m.name: m for m in (
    # the default: centred critic weights, the W2 term towards π_old (an EMA of π_θ, as
    # AdvantageFlow's rollout policy), α = 1 (the least α that keeps centred weights convex), the
    # actor on ORW weights during the critic's warm-up, trained on DiffusionNFT's grid times, so
    # the trade-off is the weights' temperature τ (the config's own 2 first)
    Method("ac_flow", "ac_flow", "algorithm.ac_flow.tau", (2.0, 4.0, 8.0), "AC-Flow τ (centred, W2 to π_old)"),
    # the default before 2026-12-07: one t ~ U(0, 1) a sample (its runs were the default's until
    # then), at that config's 200 iterations (compose's now 150: the grid's 3 s an iteration)
    Method("ac_flow_uniform", "ac_flow", "algorithm.ac_flow.tau", (2.0,), "AC-Flow, t ~ U(0, 1)",
           ("algorithm.ac_flow.times=uniform", "run.iterations=200")),
    # AC-Flow's levers (docs/algorithms.md), each at the default's own τ (the frozen warm-up and the
    # centred variant too: they are levers, not methods; until 2026-12-07 they were swept along τ)
    Method("ac_flow_rollout_critic", "ac_flow", "algorithm.ac_flow.tau", (2.0,),
           "AC-Flow, critic on recorded rollout states",
           ("algorithm.ac_flow.critic_states=rollout", "rollout.keep_states=true")),
    Method("ac_flow_critic_t4", "ac_flow", "algorithm.ac_flow.tau", (2.0,),
           "AC-Flow, critic on 4 t per sample", ("algorithm.ac_flow.critic_t_samples=4",)),
    # [ours] DiffusionNFT's implicit parametrisation around π_old: a 1/β step (one seed on compose
    # lifted the reward, docs/algorithms.md); along β at the default's τ
    Method("ac_flow_implicit", "ac_flow", "algorithm.ac_flow.implicit_step", (0.5, 0.3),
           "AC-Flow, implicit step β [ours]"),
    # the default with the actor frozen while the critic warms up (the paper's "only the critic
    # trains"; the default before the ORW warm-up)
    Method("ac_flow_frozen", "ac_flow", "algorithm.ac_flow.tau", (2.0,),
           "AC-Flow, actor frozen in warm-up", ("algorithm.ac_flow.warmup_actor=frozen",)),
    # AC-Flow as the paper states it: the critic's weights w and a fixed W2 tilt of π_ref,
    # rollouts from π_θ, the actor frozen in warm-up, flow matching's t ~ U(0, 1); its trade-off is α
    Method("ac_flow_tilt", "ac_flow", "algorithm.ac_flow.alpha", (0.5, 0.25, 1.0), "AC-Flow α, W2 to π_ref (paper)",
           ("algorithm.ac_flow.centre_weights=false", "algorithm.ac_flow.anchor=reference",
            "learner.rollout_update=copy", "algorithm.ac_flow.warmup_actor=frozen", "algorithm.ac_flow.times=uniform")),
    # centred weights with the W2 term towards π_ref (docs/compose.md: not enough on its own)
    Method("ac_flow_centred", "ac_flow", "algorithm.ac_flow.tau", (2.0,),
           "AC-Flow, centred, W2 to π_ref", ("algorithm.ac_flow.anchor=reference", "learner.rollout_update=copy",
                                              "algorithm.ac_flow.warmup_actor=frozen")),
    Method("orw_cfm_w2", "orw", "algorithm.orw.alpha", (0.5, 0.25, 1.0), "ORW-CFM-W2 α"),
    # γ + λ must exceed A_max = 1 (convexity): γ = 1.1 is the restated default
    Method("advantage_flow", "advantage_flow", "algorithm.advantage_flow.gamma", (1.1, 2.0, 4.0), "AdvantageFlow γ"),
    Method("diffusion_nft", "diffusion_nft", "algorithm.diffusion_nft.beta", (1.0, 0.1, 0.3), "DiffusionNFT β"),
    Method("flow_grpo", "flow_grpo", "algorithm.flow_grpo.kl_beta", (0.04, 0.01, 0.16), "Flow-GRPO KL β"),
    # the released Fast config trains without a KL (β = 0); its knob adds one
    Method("flow_grpo_fast", "flow_grpo_fast", "algorithm.flow_grpo.kl_beta", (0.0, 0.01, 0.04), "Flow-GRPO-Fast KL β"),
    Method("awm", "awm", "algorithm.awm.beta", (0.003, 0.001, 0.03), "AWM KL β"),
)}
THRESHOLDS = {"digits": (0.85, 0.90, 0.95), "compose": (0.35, 0.45, 0.55)}  # compose base: 0.285
# Every method is compared at these rollouts. The compose configs' iterations are sized so a run
# fits ~10 minutes on the 2-core machine (AWM 100, AC-Flow, DiffusionNFT and Flow-GRPO 150, the
# others 200 iterations of 160 rollouts): the 200-iteration runs are read at their 150-iteration
# checkpoint, and AWM at its own 16,000 (the table shows each point's rollouts).
EQUAL_ROLLOUTS = {"digits": 32_000, "compose": 24_000}
FLAGSHIP = "ac_flow"
KEEP = (0.5, 0.75)  # matched-diversity floors: these fractions of the base policy's diversity
FIGURES = ("reward", "accuracy", "diversity")  # what an evaluation gives the tables


def flagship(method: str) -> bool:
    """AC-Flow or one of its levers (the variants ``ac_flow_…``)."""
    return method == FLAGSHIP or method.startswith(FLAGSHIP + "_")


def commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return sha + (" (with uncommitted changes)" if dirty else "")


def config_of(bench: str, m: Method) -> Path:
    return ROOT / "configs" / f"{bench}_{m.stem}.yaml"


def run_name(bench: str, m: Method, value: float, seed: int) -> str:
    return f"{bench}-{m.name}-{m.knob.rsplit('.', 1)[1]}{value:g}-s{seed}"


def run_sets(m: Method, value: float, seed: int, iterations: int | None) -> list[str]:
    """The overrides that make a run the bench's (besides where it goes)."""
    return [f"run.seed={seed}", f"{m.knob}={value}", *m.sets, *([f"run.iterations={iterations}"] if iterations else [])]


def settings_digest(path: Path, sets: list[str] | tuple[str, ...] = (), *, run: bool = False) -> str | None:
    """What a run trains with, as a digest: the config at ``path`` with ``sets``, read through today's
    schema (``run``: a run's own config.yaml, whose keys predating it take the values it ran with),
    without what only names or places the run (run.name, run.out_dir, run.progress), serves its
    metrics, or belongs to another objective (the other algorithm sections). A record is trusted
    only for the settings the bench launches now, so a changed default makes its runs again rather
    than report them under it. None where today's schema refuses it."""
    from services.config import ConfigError, load_config

    try:
        c = load_config(path, list(sets), run=run).model_dump(mode="json")
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return None
    for k in ("name", "out_dir", "progress"):
        c["run"].pop(k, None)
    c.pop("metrics", None)
    name = c["algorithm"]["name"]
    own = "orw" if name == "orw_cfm_w2" else name
    c["algorithm"] = {"name": name, own: c["algorithm"][own]}
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


def expected_settings(bench: str, m: Method, value: float, seed: int, iterations: int | None) -> str | None:
    """The digest of the settings the bench launches this run with."""
    return settings_digest(config_of(bench, m), run_sets(m, value, seed, iterations))


def run_settings(run_dir: Path) -> str | None:
    return settings_digest(run_dir / "config.yaml", run=True) if (run_dir / "config.yaml").is_file() else None


def set_aside(run_dir: Path, where: str, why: str) -> Path:
    """Move a run directory the bench cannot use to ``<runs>/<where>/<name>-<n>`` (kept to be looked
    at, out of the name a new run needs), saying why; the new path."""
    n = 0
    while (aside := run_dir.parent / where / f"{run_dir.name}-{n}").exists():
        n += 1
    aside.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(aside)
    print(f"{run_dir.name}: {why}; moved to {aside}", file=sys.stderr)
    return aside


def launch(bench: str, m: Method, value: float, seed: int, runs: Path, iterations: int | None) -> Path:
    """One `fmrl train` run (reused when its summary is there and it ran with the bench's settings;
    one made with others is moved to ``runs/stale/``, one without a summary to ``runs/failed/``);
    its directory."""
    name = run_name(bench, m, value, seed)
    run_dir = runs / name
    if (run_dir / "summary.json").is_file():
        if run_settings(run_dir) == expected_settings(bench, m, value, seed, iterations):
            return run_dir
        set_aside(run_dir, "stale", "ran with other settings than the bench's now")
    elif run_dir.exists():
        set_aside(run_dir, "failed", "stopped before its summary (a failed or killed run)")
    sets = [f"run.out_dir={runs}", "run.progress=false", *run_sets(m, value, seed, iterations)]
    cmd = [str(ROOT / ".venv/bin/fmrl"), "train", "--config", str(config_of(bench, m)), "--name", name,
           *[x for s in sets for x in ("--set", s)]]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    (run_dir / "bench.json").write_text(json.dumps({"made_at": commit(), "wall_s": round(time.time() - t0)}) + "\n")
    return run_dir


def evaluate_at(run_dir: Path, iteration: int, sets: tuple[str, ...]) -> dict:
    """The run's checkpoint of ``iteration`` evaluated as the run evaluates its last one (`fmrl eval`
    with the run's config: the same prompts, samples and seed; bitwise the run's own final
    evaluation when given its last checkpoint); cached as ``eval-at-iter-N/eval.json``. ``sets``:
    the method's own overrides, given again so that a config saved before a setting existed
    still validates as the variant it was launched as (they change no evaluation figure)."""
    name = f"iter-{iteration:07d}"
    out = run_dir / f"eval-at-{name}"
    if not (out / "eval.json").is_file():
        print(f"evaluating {run_dir.name} at {name}", file=sys.stderr, flush=True)
        subprocess.run([str(ROOT / ".venv/bin/fmrl"), "eval", "--checkpoint", str(run_dir / "checkpoints" / name),
                        "--config", str(run_dir / "config.yaml"), "--out", str(out),
                        *[x for v in sets for x in ("--set", v)]],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    e = json.loads((out / "eval.json").read_text())
    return {k: e[k] for k in FIGURES}


def record(run_dir: Path, bench: str, sets: tuple[str, ...] = ()) -> dict | None:
    """What the report needs of a run, at the bench's equal budget (None, said on stderr, when it
    cannot be read there): the evaluation there, the base's, the batch-reward curve, the rollouts;
    kept in --results (committed) so the comparison outlives the run directories, which are not."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rewards = [r["reward_mean"] for r in rows if r.get("kind") == "train"]
    c = yaml.safe_load((run_dir / "config.yaml").read_text())
    per_it = (c["rollout"]["prompts_per_iteration"] or len(c["rollout"]["prompts"] or [])) * c["rollout"]["samples_per_prompt"]
    final = int(c["run"]["iterations"])
    kept = [int(d.name.split("-")[1]) for d in (run_dir / "checkpoints").glob("iter-*")]
    at = budget_iteration(final, kept, per_it, EQUAL_ROLLOUTS[bench])
    if at is None:
        print(f"{run_dir.name}: no checkpoint at {EQUAL_ROLLOUTS[bench]:,} rollouts; left out", file=sys.stderr)
        return None
    after = summary["after"] if at == final else evaluate_at(run_dir, at, sets)
    made = run_dir / "bench.json"  # written at launch: the commit the run was made at
    return {"run": run_dir.name, "budget": EQUAL_ROLLOUTS[bench], "settings": run_settings(run_dir),
            "iteration": at, "per_iteration": per_it,
            "after": {k: after[k] for k in FIGURES}, "before": {k: summary["before"][k] for k in FIGURES},
            "own": [summary["after"]["reward"], final * per_it], "batch_reward": rewards[:at],
            **(json.loads(made.read_text()) if made.is_file() else {"made_at": None})}


def result(run_dir: Path, bench: str, results: Path, sets: tuple[str, ...] = (), expected: str | None = None) -> dict | None:
    """A run's record from ``results`` when it is there, made at the bench's budget and with the
    ``expected`` settings (``settings_digest``); else read from its directory (when that is there
    and ran with them) and saved (so a record without its settings is made again from there)."""
    path = results / f"{run_dir.name}.json"
    if path.is_file():
        r = json.loads(path.read_text())
        if r.get("budget") == EQUAL_ROLLOUTS[bench]:
            if r.get("settings") == expected:
                return r
            print(f"{run_dir.name}: its record was made with other settings than the bench's now "
                  f"({r.get('settings')}, not {expected}); not reported", file=sys.stderr)
    if not (run_dir / "summary.json").is_file() or run_settings(run_dir) != expected:
        return None
    r = record(run_dir, bench, sets)
    if r is not None:
        results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r) + "\n")
    return r


def figures(r: dict, bench: str) -> dict:
    """A record as the tables read it: samples to each threshold from its batch-reward curve."""
    return {**r, "rollouts": r["iteration"] * r["per_iteration"], "own": tuple(r["own"]),
            "reach": {th: samples_to_threshold(r["batch_reward"], r["per_iteration"], th) for th in THRESHOLDS[bench]}}


def rollouts(per_seed: tuple[int, ...]) -> str:
    return " / ".join(f"{n:,}" for n in dict.fromkeys(per_seed))


def fmt(values: tuple[float, ...] | list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(points: list[Point], thresholds: tuple[float, ...], base: dict) -> str:
    lines = ["| method | knob | rollouts | reward | held-out | diversity | "
             + " | ".join(f"samples to {t}" for t in thresholds) + " | reward at its config's budget |",
             "|" + "---|" * (7 + len(thresholds))]
    for p in points:
        reach = ["—" if (s := p.samples_to(t)) is None else f"{s:,.0f}" for t in thresholds]
        held = fmt(p.heldout) if p.heldout else "—"
        own = "" if all(n == r for (_, n), r in zip(p.own, p.rollouts, strict=True)) else \
            f"{fmt([x for x, _ in p.own])} ({rollouts(tuple(n for _, n in p.own))})"
        lines.append(f"| {p.method} | {p.knob} | {rollouts(p.rollouts)} | {fmt(p.rewards)} | {held} | {fmt(p.diversities)} | "
                     + " | ".join(reach) + f" | {own} |")
    lines.append(f"| base policy | | 0 | {base['reward']:.3f} | {base['accuracy']:.3f} | {base['diversity']:.3f} |"
                 + " |" * (len(thresholds) + 1))
    return "\n".join(lines)


def draw_front(bench: str, points: list[Point], front: list[Point], base: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    methods = list(dict.fromkeys(p.method for p in points))
    colours = [*plt.get_cmap("tab10").colors, "black", "#6b6b00", "#000080", "#ff8c00"]  # tab10 repeats after 10
    markers = "osD^v<>pPXh*dH"
    for i, meth in enumerate(methods):
        mine = sorted((p for p in points if p.method == meth), key=lambda p: p.diversity)
        xs, ys = [p.diversity for p in mine], [p.reward for p in mine]
        xe = [statistics.stdev(p.diversities) if len(p.diversities) > 1 else 0.0 for p in mine]
        ye = [statistics.stdev(p.rewards) if len(p.rewards) > 1 else 0.0 for p in mine]
        style = {"lw": 2.5, "zorder": 3} if meth == FLAGSHIP else {"lw": 1.2}
        fewer = sorted({n for p in mine for n in p.rollouts if n != EQUAL_ROLLOUTS[bench]})
        label = METHODS[meth].label + (f" (at {rollouts(tuple(fewer))} rollouts)" if fewer else "")
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker=markers[i % len(markers)], capsize=2, label=label,
                    color=colours[i % len(colours)], **style)
        for p in mine:
            ax.annotate(p.knob.split("=")[-1], (p.diversity, p.reward), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([p.diversity for p in front], [p.reward for p in front], ls="--", color="grey", lw=1, label="front (all methods)")
    ax.scatter([base["diversity"]], [base["reward"]], marker="*", s=120, color="black", label="base policy", zorder=4)
    ax.set_xlabel("diversity (mean pairwise distance of evaluation samples per prompt)")
    ax.set_ylabel(f"reward at {EQUAL_ROLLOUTS[bench]:,} rollouts (CFG-free evaluation)")
    ax.set_title(f"{bench}: reward against diversity at {EQUAL_ROLLOUTS[bench]:,} rollouts, each method along its own "
                 "knob (mean ± std over seeds)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def section(bench: str, points: list[Point], base: dict, seeds: list[int], picture: Path) -> str:
    th = THRESHOLDS[bench]
    front = pareto_front(points)
    draw_front(bench, points, front, base, picture)
    rel = picture.relative_to(picture.parent.parent)  # beside the report: images/front_<bench>.png
    out = [f"## {bench}\n", f"![{bench} front]({rel})\n", table(points, th, base), ""]
    out.append("On the front (no other point has at least its reward and its diversity): "
               + ", ".join(f"{p.method} {p.knob}" for p in front) + ".")
    flag = [p for p in points if flagship(p.method)]
    if flag:
        def name(p: Point) -> str:
            return p.knob if p.method == FLAGSHIP else f"{p.method} {p.knob}"
        gaps = ", ".join(f"{name(p)}: {front_gap(p, front):.3f}" for p in flag)
        on = [p for p in flag if front_gap(p, front) == 0.0 and p in front]
        out.append(f"AC-Flow (with its levers) "
                   f"{'is on the front at ' + ', '.join(map(name, on)) if on else 'is not on the front'}; "
                   f"its reward below the front at its own diversity — {gaps}.")
    for keep in KEEP:
        floor = matched_diversity(base["diversity"], keep)
        out += ["", f"### At matched diversity: keeping at least {keep:.0%} of the base's ({floor:.3f})", "",
                "Each method's highest-reward setting whose diversity is at least the floor; AC-Flow's row is the "
                "best of AC-Flow and its levers (the variants `ac_flow_…`) measured at several seeds.", "",
                "| method | setting | rollouts | reward | diversity | " + " | ".join(f"samples to {t}" for t in th)
                + " | AC-Flow against it (Welch, reward) |", "|" + "---|" * (6 + len(th))]
        # the flagship's row among its settings with several seeds (a test needs them), if any
        seeded = [p for p in points if len(p.rewards) > 1]
        mine = best_at_diversity(seeded, FLAGSHIP, floor, family=True) or best_at_diversity(points, FLAGSHIP, floor,
                                                                                            family=True)
        others = [m for m in dict.fromkeys(p.method for p in points) if not flagship(m)]
        missing = []
        for m, p in [(FLAGSHIP, mine), *[(m, best_at_diversity(points, m, floor)) for m in others]]:
            if p is None:
                missing.append(m)
                continue
            reach = ["—" if (s := p.samples_to(t)) is None else f"{s:,.0f}" for t in th]
            test = ""
            if mine is not None and m != FLAGSHIP and len(p.rewards) > 1 and len(mine.rewards) > 1:
                t, pv = welch(mine.rewards, p.rewards)
                test = f"Δ = {mine.reward - p.reward:+.3f}, t = {t:.2f}, {verdict(pv)}"
            out.append(f"| {p.method} | {p.knob} | {rollouts(p.rollouts)} | {fmt(p.rewards)} | {fmt(p.diversities)} | "
                       + " | ".join(reach)
                       + f" | {test} |")
        if missing:
            out.append(f"\nNo setting measured keeps this diversity: {', '.join(missing)}.")
    out.append(f"\nSeeds {', '.join(map(str, seeds))}; n = {len(seeds)} per point (fewer where a row shows no ±), "
               "so a difference is claimed only where the test says so.")
    return "\n".join(out)


def partial(plan: list[tuple], done: dict[tuple, Path]) -> str:
    """A note naming the planned runs that are not there (empty when every one is): per bench and
    method, the knob values with their missing seeds."""
    missing: dict[tuple[str, str], dict[float, list[int]]] = {}
    for b, m, v, s in plan:
        if (b, m.name, v, s) not in done:
            missing.setdefault((b, m.name), {}).setdefault(v, []).append(s)
    if not missing:
        return ""
    parts = [f"{b} {m} " + ", ".join(f"{METHODS[m].knob.rsplit('.', 1)[1]}={v:g} (seed{'s' if len(ss) > 1 else ''} "
                                    f"{', '.join(map(str, ss))})" for v, ss in vals.items())
             for (b, m), vals in missing.items()]
    n = sum(len(ss) for vals in missing.values() for ss in vals.values())
    return (f"> **Partial**: {n} of the {len(plan)} planned runs are not made yet, so some points below have fewer "
            f"seeds (no ±) or are missing: {'; '.join(parts)}.\n\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benches", nargs="*", default=list(BENCHES), choices=BENCHES)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--knob-index", nargs="*", type=int, default=None,
                   help="Run only these positions of each method's knob values (clamped to its last), e.g. 1 "
                        "for the middle of three; default: all.")
    p.add_argument("--iterations", type=int, default=None, help="Override run.iterations (the same for every method).")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="Where each run's record is kept (committed: the run directories are not).")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "algorithms_results.md")
    p.add_argument("--report-only", action="store_true", help="Do not launch runs; report those present.")
    args = p.parse_args()
    def values(m: Method) -> tuple[float, ...]:
        if args.knob_index is None:
            return m.values
        return tuple(dict.fromkeys(m.values[min(i, len(m.values) - 1)] for i in args.knob_index))

    plan = [(b, METHODS[m], v, s) for b in args.benches for m in args.methods if config_of(b, METHODS[m]).is_file()
            for v in values(METHODS[m]) for s in args.seeds]
    done: dict[tuple, dict] = {}

    def have(b: str, m: Method, v: float, s: int) -> dict | None:
        r = result(args.runs_dir / run_name(b, m, v, s), b, args.results, m.sets,
                   expected_settings(b, m, v, s, args.iterations))
        if r is not None:
            done[(b, m.name, v, s)] = figures(r, b)
        return r

    todo = [x for x in plan if have(*x) is None]
    t0 = time.time()
    for i, (b, m, v, s) in enumerate([] if args.report_only else todo):
        eta = "" if not i else f", about {(time.time() - t0) / i * (len(todo) - i) / 60:.0f} min left"
        print(f"[{len(plan) - len(todo) + i + 1}/{len(plan)}] {run_name(b, m, v, s)} ({len(todo) - i} to run{eta})",
              file=sys.stderr, flush=True)
        try:
            launch(b, m, v, s, args.runs_dir, args.iterations)
        except subprocess.CalledProcessError as e:
            print(f"{run_name(b, m, v, s)} failed ({e.returncode}); skipped", file=sys.stderr)
            continue
        have(b, m, v, s)
    sections, short = [], []  # short: the methods whose configs make fewer rollouts than the budget
    for b in args.benches:
        points, base = [], None
        for mname in args.methods:
            m = METHODS[mname]
            for v in m.values:
                runs = [done[(b, mname, v, s)] for s in args.seeds if (b, mname, v, s) in done]
                if not runs:
                    continue
                base = base or runs[0]["before"]
                points.append(Point(mname, f"{m.knob.rsplit('.', 1)[1]}={v:g}",
                                    tuple(r["after"]["reward"] for r in runs), tuple(r["after"]["diversity"] for r in runs),
                                    tuple(r["after"]["accuracy"] for r in runs if r["after"].get("accuracy") is not None),
                                    {t: tuple(r["reach"][t] for r in runs) for t in THRESHOLDS[b]},
                                    tuple(r["rollouts"] for r in runs), tuple(r["own"] for r in runs)))
        short += sorted({f"{p.method} on {b}" for p in points if any(n < EQUAL_ROLLOUTS[b] for n in p.rollouts)})
        if points and base is not None:
            sections.append(section(b, points, base, args.seeds, args.out.parent / "images" / f"front_{b}.png"))
    made = sorted({str(r.get("made_at")) for r in done.values() if r.get("made_at")})
    text = (f"# Bench results\n\n{partial(plan, done)}Made at commit {commit()} by `python {' '.join(sys.argv)}` "
            f"on the 2-core build machine, from each run's record in `{args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results}/` "
            f"(the runs were made at commit{'s' if len(made) > 1 else ''} {', '.join(made) or 'unknown'}). Every method is compared at the same rollout budget: "
            + "; ".join(f"{b} {n:,}" for b, n in EQUAL_ROLLOUTS.items())
            + " (a run whose config makes more is read at its checkpoint made with exactly that many; a run whose "
            f"config makes fewer — {', '.join(short) or 'none here'} — at its own, shown in the rollouts column). "
            "Reward and diversity are the CFG-free evaluation at that budget (the run's own final evaluation, or "
            "`fmrl eval` of the checkpoint with the run's config: the same prompts, samples and seed); held-out is the "
            "evaluation-only model's accuracy; \"samples to x\": rollouts until the 5-iteration moving average of the "
            "batch reward first reaches x within that budget (mean over seeds; — when a seed never did); the last "
            "column is the final reward at the run's config budget where that differs.\n\n"
            + "\n\n".join(sections) + "\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
