"""Config loading: YAML + overrides, and rejection messages that name the problem."""

from pathlib import Path

import pytest

from services.config import ConfigError, load_config, parse_override


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algorithm:\n  orw:\n    tau: 3.0\nrun:\n  iterations: 7\n")
    cfg = load_config(f, ["algorithm.orw.tau=4", "learner.lr=1e-3", "rollout.prompts=[a handwritten one, the digit 2]",
                          "rollout.prompts_per_iteration=2"])
    assert cfg.algorithm.orw.tau == 4.0 and cfg.run.iterations == 7 and cfg.learner.lr == 1e-3
    assert cfg.rollout.prompts == ["a handwritten one", "the digit 2"]
    s = cfg.learner_settings()
    assert (s.orw.tau, s.orw.alpha, s.lr, s.seed) == (4.0, 0.5, 1e-3, 0)


def test_shipped_config_loads():
    cfg = load_config("configs/digits_orw.yaml")
    assert cfg.algorithm.name == "orw_cfm_w2" and len(cfg.rollout.prompts) == 10


def test_make_run_default_is_ac_flow_and_equals_the_tree_defaults():
    """`make run`'s config is AC-Flow, and it spells out the tree's defaults: the other
    digits configs, which state only their algorithm, differ from it in nothing else."""
    assert "CONFIG ?= configs/digits_ac_flow.yaml" in Path("Makefile").read_text()
    shipped = load_config("configs/digits_ac_flow.yaml").model_dump()
    tree = load_config(None).model_dump()
    assert shipped["algorithm"]["name"] == tree["algorithm"]["name"] == "ac_flow"
    shipped["rollout"]["prompts_per_iteration"] = None  # 10 of 10 prompts = all (null)
    assert shipped == tree


@pytest.mark.parametrize("override,message", [
    ("algorithm.orw.taux=1", "unknown key 'algorithm.orw.taux'"),
    ("bogus.x=1", "unknown key 'bogus'"),
    ("learner.lr=-1", "learner.lr: Input should be greater than 0"),
    ("algorithm.orw.alpha=-0.5", "algorithm.orw.alpha: Input should be greater than or equal to 0"),
    ("algorithm.name=ppo", "algorithm.name: Input should be 'orw_cfm_w2', 'ac_flow'"),
    ("algorithm.advantage_flow.gamma=0.5", "γ + λ − A_max"),
    ("reward.components=[]", "reward.components is empty"),
    ("reward.components=[{kind: clip}, {kind: clip, weight: 2}]", "distinct names; repeated: clip"),
    ("reward.components=[{kind: clip, required: false}]", "at least one must be required"),
    ("reward.components=[{kind: dalle}]", "reward.components.0.kind: Input should be 'digits_classifier'"),
    ("reward.components=[{kind: clip, transport: http}]", "reward.components.0.transport: Input should be 'ray' or 'redis'"),
    ("pipeline.max_policy_lag=-1", "pipeline.max_policy_lag: Input should be greater than or equal to 0"),
    ("pipeline.dist_backend=nccl", "pipeline.dist_backend nccl broadcasts between GPUs"),
    ("pipeline.weight_sync=nccl", "pipeline.weight_sync: Input should be 'object_store' or 'torch_distributed'"),
    ("resources.sampler_resources={GPU: 1}", "['GPU']: custom resources need positive amounts, and CPU/GPU have their own keys"),
    ("resources.learner_resources={training_gpu: 0}", "['training_gpu']: custom resources need positive amounts"),
    ("resources.placement=strict", "resources.placement: Input should be 'pack', 'spread' or 'none'"),
    ("reward.components=[{kind: clip, weight: .nan}]", "reward.components.0.weight: must be finite"),
    ("algorithm.ac_flow.tracker.min_count=64", "min_count=64 exceeds buffer_size=32"),
    ("algorithm.ac_flow.weighting=cubic", "algorithm.ac_flow.weighting: Input should be 'exp', 'linear' or 'softplus'"),
    ("rollout.prompts=[]", "rollout.prompts: the prompt list is empty"),
    ("rollout.samples_per_prompt=many", "rollout.samples_per_prompt: Input should be a valid integer"),
    ("run.name=../escape", "run.name: must be letters"),
    ("rollout.prompts=[a handwritten cat]", "must name exactly one digit"),
    ("resources.num_samplers=11", "exceeds the 10 prompts of a rollout batch"),
    ("rollout.prompts_per_iteration=11", "prompts_per_iteration=11 exceeds the 10 prompts given"),
    ("learner.lr", "--set expects key=value"),
])
def test_rejections_name_the_problem(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_maps_to_learner_settings(path):
    cfg = load_config(path)
    settings = cfg.learner_settings()
    assert settings.objective == cfg.algorithm.name
