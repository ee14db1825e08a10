"""The compositional digits world: its prompt datasets, its pretraining, the shipped base, a short run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from reward_workers.compose import score_constraints
from samplers import compose
from samplers.policy import build_sd3_velocity, read_tensors, save_velocity, state_checksum
from services.config import DatasetConfig
from services.datasets import read_dataset

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "configs" / "datasets"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATASETS / name).read_text().splitlines()]


def test_datasets_are_what_the_script_makes_and_round_trip():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_compose", DATASETS / "make_compose_datasets.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    for name, make_rows in make.FILES.items():
        rows = make_rows()
        assert _rows(name) == rows, f"{name} is not what make_compose_datasets.py writes"
        read = read_dataset(DatasetConfig(path=DATASETS / name))  # as a run reads it: prompt + metadata
        assert [{"prompt": p, **m} for p, m in zip(read.prompts, read.metadata, strict=True)] == rows
    train, held, phrased = (_rows(n) for n in ("compose_train.jsonl", "compose_eval.jsonl",
                                                "compose_eval_phrasings.jsonl"))
    assert len(train) == 64 and len(held) == len(phrased) == 40
    assert [r["task"] for r in train].count("relation") == 16 and {r["task"] for r in held} == set(compose.TASKS)

    def constraints(r: dict) -> str:
        return json.dumps({k: r[k] for k in ("task", "counts", "relation", "region")}, sort_keys=True)

    # held-out combinations: no training prompt asks what an evaluation prompt asks, in any wording
    assert not {constraints(r) for r in train} & {constraints(r) for r in held}
    assert [constraints(r) for r in held] == [constraints(r) for r in phrased]
    train_words = {compose.prompt_of(s, t) for s in compose.all_specs() for t in (0, 1)}
    assert {r["prompt"] for r in train + held} <= train_words  # the main evaluation: training wordings
    assert not {r["prompt"] for r in phrased} & train_words    # the second: held-out phrasings only
    assert train[0]["prompt"] == "two zeros"


def test_every_spec_has_a_layout_its_constraints_accept():
    rng = np.random.default_rng(0)
    for spec in compose.all_specs():
        cells = compose.layout(spec, rng)
        labels = np.array([-1 if c is None else c for c in cells])
        assert score_constraints(labels, compose.spec_metadata(spec))["all"] == 1.0, spec


def test_pretrain_is_bitwise_reproducible(tmp_path):
    from services.pretrain_compose import pretrain_compose

    with torch.random.fork_rng():
        for name in ("a", "b"):
            pretrain_compose(tmp_path / f"{name}.safetensors", steps=3, eval_samples=0, canvases=300)
    # the same tensors to the bit and the same metadata (its SHA-256 digest of the content included);
    # only the order of the header's metadata keys may differ (safetensors writes a hash map)
    (meta_a, a), (meta_b, b) = (read_tensors(tmp_path / f"{n}.safetensors") for n in ("a", "b"))
    assert meta_a == meta_b and state_checksum(a) == state_checksum(b)
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["command"] == "fmrl pretrain-compose --steps 3 --seed 0 --eval-samples 0 --canvases 300"


def test_shipped_base_and_its_report():
    with safe_open(str(compose.POLICY_FILE), framework="pt") as f:
        meta = f.metadata()
    report = json.loads(meta["pretrain_report"])
    beside = json.loads(compose.POLICY_FILE.with_suffix(".json").read_text())
    assert report == {k: v for k, v in beside.items() if k != "train_seconds"}
    assert report["command"].startswith("fmrl pretrain-compose")
    assert json.loads(meta["transformer_config"])["sample_size"] == 16
    ev = report["eval"]
    # deliberately short-trained: CFG-free compositional accuracy well below 50 %, better with CFG
    assert ev["heldout_phrasing_cfg_1.0"]["heldout_accuracy"] < 0.5
    assert ev["train_phrasing_cfg_1.0"]["accuracy"] < 0.5
    assert ev["train_phrasing_cfg_3.0"]["accuracy"] > ev["train_phrasing_cfg_1.0"]["accuracy"]
    assert report["readers_on_real_compositions"]["heldout_accuracy"] >= 0.9


def test_short_compose_run_through_fmrl_train(cluster, tmp_path):
    from services.cli import main

    torch.manual_seed(0)
    policy = tmp_path / "p.safetensors"  # one block of the compose shape: fast, the real classes
    save_velocity(build_sd3_velocity(dict(compose.COMPOSE_TRANSFORMER_CONFIG, num_layers=1)), policy)
    held = tmp_path / "held.jsonl"  # one held-out prompt of each task, with its constraints
    rows = _rows("compose_eval.jsonl")
    held.write_text("".join(json.dumps(rows[i]) + "\n" for i in (0, 10, 26, 34)))
    sets = [f"policy.checkpoint={policy}", f"run.out_dir={tmp_path}", "run.name=c", "run.iterations=2",
            "run.progress=false", "rollout.samples_per_prompt=3", "rollout.prompts_per_iteration=4",
            f"rollout.dataset.path={DATASETS / 'compose_train.jsonl'}", f"eval.dataset.path={held}",
            "eval.samples_per_prompt=2", "eval.grid_columns=2", "algorithm.ac_flow.warmup_steps=1",
            "resources.num_samplers=1", "resources.sampler_cpus=0.25",
            "resources.learner_cpus=0.25", "resources.reward_cpus=0.25", "metrics.port=0"]
    assert main(["train", "--config", str(ROOT / "configs" / "compose_ac_flow.yaml"), *sets]) == 0
    run = tmp_path / "c"
    summary = json.loads((run / "summary.json").read_text())
    for when in ("before", "after"):  # the held-out evaluator's all-or-nothing accuracy
        assert 0.0 <= summary[when]["accuracy"] <= 1.0
    assert summary["heldout_classifier_accuracy_on_real"] >= 0.9  # the evaluator on real compositions
    assert summary["prompts"]["eval_prompts"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/compose" in r]
    assert len(train_rows) == 2 and all(0.0 <= r["reward/compose"] <= 1.0 for r in train_rows)


def test_fmrl_eval_of_a_compose_checkpoint_hands_the_rewards_metadata(tmp_path):
    from services.eval_cmd import evaluate_checkpoint

    torch.manual_seed(0)
    policy = tmp_path / "p.safetensors"
    save_velocity(build_sd3_velocity(dict(compose.COMPOSE_TRANSFORMER_CONFIG, num_layers=1)), policy)
    held = tmp_path / "held.jsonl"
    rows = _rows("compose_eval.jsonl")
    held.write_text("".join(json.dumps(rows[i]) + "\n" for i in (0, 26)))
    result = evaluate_checkpoint(policy, str(ROOT / "configs" / "compose_ac_flow.yaml"), samples=2,
                                 out=tmp_path / "ev", overrides=[f"policy.checkpoint={policy}",
                                                                  f"eval.dataset.path={held}",
                                                                  "eval.grid_columns=2"])
    assert result["prompts"] == [rows[0]["prompt"], rows[26]["prompt"]]
    assert 0.0 <= result["rewards"]["compose"] <= 1.0
    assert 0.0 <= result["accuracy"] <= 1.0  # the held-out evaluator's all-or-nothing accuracy
