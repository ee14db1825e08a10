"""benchmarks/algorithms.py keeps each run's figures as a committed record: made from a run
directory at the bench's equal budget (the final evaluation, or the cached one of the budget's
checkpoint), read back without the directory, and not trusted once the budget or the settings the
bench launches the run with differ."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import algorithms as bench  # noqa: E402


def _run(root: Path, name: str, iterations: int, kept: list[int], rewards: list[float]) -> Path:
    """A run directory as `fmrl train` leaves it (the files the bench reads), 10 × 16 rollouts an iteration."""
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    for k in kept:
        (d / "checkpoints" / f"iter-{k:07d}").mkdir()
    cfg = {"run": {"iterations": iterations}, "rollout": {"prompts_per_iteration": 10, "prompts": None,
                                                          "samples_per_prompt": 16}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "reward_mean": r}) + "\n" for r in rewards)
                                     + json.dumps({"kind": "eval", "reward": 0.5}) + "\n")
    (d / "summary.json").write_text(json.dumps({
        "before": {"reward": 0.1, "accuracy": 0.2, "diversity": 5.0, "extra": 1},
        "after": {"reward": 0.9, "accuracy": 0.8, "diversity": 4.0}}))
    return d


def test_a_run_at_the_budget_is_recorded_and_read_back_without_its_directory(tmp_path):
    rewards = [0.1 * i for i in range(200)]  # the 5-window mean ending at iteration i is 0.1 (i − 2)
    d = _run(tmp_path / "runs", "digits-x-tau2-s0", 200, [100, 200], rewards)
    (d / "bench.json").write_text(json.dumps({"made_at": "abc1234", "wall_s": 300}))
    results = tmp_path / "results"
    mine = bench.run_settings(d)
    r = bench.result(d, "digits", results, expected=mine)
    assert r["iteration"] == 200 and r["per_iteration"] == 160 and r["made_at"] == "abc1234"
    assert r["after"] == {"reward": 0.9, "accuracy": 0.8, "diversity": 4.0}
    assert r["before"] == {"reward": 0.1, "accuracy": 0.2, "diversity": 5.0}
    assert r["own"] == [0.9, 32_000] and len(r["batch_reward"]) == 200
    f = bench.figures(r, "digits")
    assert f["rollouts"] == 32_000
    assert f["reach"][0.85] == 12 * 160  # first at iteration 11 (0.9; 0.8 at 10): 12 batches
    assert f["reach"][0.95] == 13 * 160
    # the directory gone, the record stands for the run
    (d / "summary.json").unlink()
    assert bench.result(d, "digits", results, expected=mine) == r
    assert json.loads((results / "digits-x-tau2-s0.json").read_text()) == r


def test_a_longer_run_is_recorded_at_its_budget_checkpoint_and_a_stale_budget_is_not_used(tmp_path):
    # compose: 24,000 rollouts = iteration 150 of a 200-iteration run; its evaluation there is cached
    d = _run(tmp_path / "runs", "compose-x-tau2-s1", 200, [50, 100, 150, 200], [0.3] * 150 + [0.6] * 50)
    at = d / "eval-at-iter-0000150"
    at.mkdir()
    (at / "eval.json").write_text(json.dumps({"reward": 0.45, "accuracy": 0.3, "diversity": 4.5, "n": 320}))
    results = tmp_path / "results"
    mine = bench.run_settings(d)
    r = bench.result(d, "compose", results, expected=mine)
    assert r["iteration"] == 150 and r["after"] == {"reward": 0.45, "accuracy": 0.3, "diversity": 4.5}
    assert r["own"] == [0.9, 32_000] and len(r["batch_reward"]) == 150 and r["made_at"] is None
    f = bench.figures(r, "compose")
    assert f["rollouts"] == 24_000 and f["reach"][0.35] is None  # the rise after 150 is not counted
    # a record made at another budget is not trusted: made again from the directory, or missing
    path = results / "compose-x-tau2-s1.json"
    path.write_text(json.dumps({**r, "budget": 32_000, "after": {"reward": 0.0}}))
    assert bench.result(d, "compose", results, expected=mine) == r
    path.write_text(json.dumps({**r, "budget": 32_000}))
    (d / "summary.json").unlink()
    assert bench.result(d, "compose", results, expected=mine) is None


def test_a_record_stands_only_for_the_settings_the_bench_launches_now(tmp_path, capsys):
    """The settings digest: the bench's config with the method's overrides equals the config.yaml
    `fmrl train` writes for it (whatever its name, place and metrics port); a changed setting —
    a default changed in the method's config since — makes the record and the directory stale."""
    from services.config import dump_config, load_config

    m = bench.METHODS["ac_flow_frozen"]
    want = bench.expected_settings("compose", m, 2.0, 1, None)
    # as `fmrl train --config configs/compose_ac_flow.yaml --name … --set run.out_dir=… …` writes it
    ran = load_config(bench.config_of("compose", m), [f"run.out_dir={tmp_path}", "run.progress=false", "run.name=x",
                                                      "metrics.port=9999", *bench.run_sets(m, 2.0, 1, None)])
    d = _run(tmp_path / "runs", "compose-ac_flow_frozen-tau2-s1", 200, [150, 200], [0.3] * 200)
    (d / "config.yaml").write_text(dump_config(ran))
    assert bench.run_settings(d) == want and len(want) == 16
    assert bench.expected_settings("compose", m, 2.0, 2, None) != want  # the seed is a setting
    assert bench.expected_settings("compose", bench.METHODS["ac_flow"], 2.0, 1, None) != want  # the lever's own
    results = tmp_path / "results"
    at = d / "eval-at-iter-0000150"
    at.mkdir()
    (at / "eval.json").write_text(json.dumps({"reward": 0.45, "accuracy": 0.3, "diversity": 4.5}))
    r = bench.result(d, "compose", results, m.sets, want)
    assert r["settings"] == want
    # the bench's settings changed since: neither the record nor the directory stands for the run
    assert bench.result(d, "compose", results, m.sets, "0" * 16) is None
    assert "made with other settings than the bench's now" in capsys.readouterr().err
    # a record from before records kept their settings is made again from its directory
    old = {k: v for k, v in r.items() if k != "settings"}
    (results / f"{d.name}.json").write_text(json.dumps(old))
    assert bench.result(d, "compose", results, m.sets, want) == r
    assert json.loads((results / f"{d.name}.json").read_text()) == r


def test_a_run_directory_the_bench_cannot_use_is_set_aside_not_lost(tmp_path, capsys):
    d = _run(tmp_path / "runs", "digits-x-tau2-s0", 200, [200], [0.5] * 200)
    (d / "summary.json").unlink()  # stopped before its summary
    first = bench.set_aside(d, "failed", "stopped before its summary")
    assert first == tmp_path / "runs" / "failed" / "digits-x-tau2-s0-0" and not d.exists()
    assert (first / "metrics.jsonl").is_file()  # kept whole, to be looked at
    d = _run(tmp_path / "runs", "digits-x-tau2-s0", 200, [200], [0.5] * 200)
    assert bench.set_aside(d, "failed", "again").name == "digits-x-tau2-s0-1"  # the first is not overwritten
    assert "digits-x-tau2-s0: again; moved to" in capsys.readouterr().err
