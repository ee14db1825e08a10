"""Overrides and presets, as a user found them (issue 15): dotlist overrides with list indexes
and text kept as text, `fmrl train key=value`, per-algorithm presets, `fmrl config --explain`,
`fmrl --version`, bare `fmrl`, defaults in every --help, and the Python API refusing what the
command line refuses. In-process (main(argv) and capsys); no Ray."""

import argparse
import importlib.metadata
import tracemalloc

import pytest
import yaml

from services.cli import build_parser, main
from services.config import (
    PRESETS,
    ConfigError,
    PolicyConfig,
    RewardComponentConfig,
    TrainConfig,
    explain,
    load_config,
    parse_override,
    validate_config,
)


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("fmrl"), err
    return lines[0]


# ---- the bugs as found --------------------------------------------------------------------------

def test_list_index_and_date_like_name_print_as_given(capsys):
    """`--set reward.components.0.weight=2` was refused ("'components' is a value, not a
    section"); `run.name=2026-12-02` became a date and was refused."""
    rc, out, err = _run(capsys, ["config", "reward.components.0.weight=2", "run.name=2026-12-02"])
    assert rc == 0, err
    tree = yaml.safe_load(out)
    assert tree["run"]["name"] == "2026-12-02"
    assert [(c["kind"], c["weight"]) for c in tree["reward"]["components"]] == [("digits_classifier", 2.0)]
    # the --set spelling, and bracket indexes, give the same
    rc, out2, _ = _run(capsys, ["config", "--set", "reward.components[0].weight=2", "--set", "run.name=2026-12-02"])
    assert rc == 0 and out2 == out


def test_train_takes_key_value_words_and_flow_grpo_alone(capsys, monkeypatch, tmp_path):
    """`fmrl train algorithm.name=flow_grpo` was not accepted, and --set algorithm.name=flow_grpo
    failed until policy.sampler: sde was set too."""
    import services.driver

    seen = []
    monkeypatch.setattr(services.driver, "train", lambda cfg, *a, **k: seen.append(cfg))
    for argv in (["train", "algorithm.name=flow_grpo", f"run.out_dir={tmp_path}"],
                 ["train", "--set", "algorithm.name=flow_grpo", "--set", f"run.out_dir={tmp_path}"],
                 ["train", "--set", f"run.out_dir={tmp_path}", "algorithm.name=flow_grpo", "--name", "r1",
                  "reward.components.0.weight=2"]):
        rc, _, err = _run(capsys, argv)
        assert rc == 0, err
    assert [c.algorithm.name for c in seen] == ["flow_grpo"] * 3
    assert [c.policy.sampler for c in seen] == ["sde"] * 3
    assert seen[2].run.name == "r1" and seen[2].reward.components[0].weight == 2.0


def test_overrides_apply_in_command_line_order(capsys):
    rc, out, err = _run(capsys, ["config", "--set", "run.name=a", "run.name=b", "--set", "run.name=c"])
    assert rc == 0, err
    assert yaml.safe_load(out)["run"]["name"] == "c"
    rc, out, _ = _run(capsys, ["config", "run.name=a", "--set", "run.name=b", "run.name=c"])
    assert yaml.safe_load(out)["run"]["name"] == "c"


def test_eval_takes_key_value_words(capsys):
    rc, _, err = _run(capsys, ["eval", "--checkpoint", "/nonexistent", "eval.seed=3"])
    assert rc == 1 and "no policy checkpoint at /nonexistent" in _one_line_error(err)


def test_a_stray_word_is_one_line(capsys):
    rc, _, err = _run(capsys, ["train", "algorithm.name=orw_cfm_w2", "--name", "x", "oops"])
    assert rc == 1 and "--set expects key=value, got 'oops'" in _one_line_error(err)
    rc, _, err = _run(capsys, ["sample", "--checkpoint", "x", "--prompt", "a one", "--out", "o.npz", "a=1"])
    assert rc == 2 and "unrecognized arguments: a=1" in _one_line_error(err)


# ---- values: text where the schema says text, YAML elsewhere ------------------------------------

@pytest.mark.parametrize("item,expected", [
    ("run.name=2026-12-02", "2026-12-02"),
    ("run.name=1.0", "1.0"),
    ("run.name=yes", "yes"),
    ("run.name=007", "007"),
    ("run.name=null", None),
    ("run.name='quoted name'", "quoted name"),
    ("policy.pretrained=1e-3", "1e-3"),
    ("policy.checkpoint=2026", "2026"),
    ("rollout.prompts.0=a handwritten seven: bold", "a handwritten seven: bold"),
    ("rollout.prompts.0=the digit ${two} ???", "the digit ${two} ???"),
    ("learner.lr=0.001", 1e-3),
    ("run.iterations=7", 7),
    ("run.progress=false", False),
    ("rollout.prompts=[a, b]", ["a", "b"]),
    ("reward.components.0.weight=2", 2),
    ("no.such.key=2026-12-02", "2026-12-02"),  # no schema: YAML, whose dates this loader keeps as text
])
def test_values_read_by_the_schema(item, expected):
    assert parse_override(item)[1] == expected


def test_text_values_reach_the_config():
    cfg = load_config(None, ["rollout.prompts.1=the digit 1 ${x} ???", "run.name=1.5",
                             "rollout.prompts_per_iteration=3", "reward.components[0].name=cls"])
    assert cfg.rollout.prompts[:3] == ["a handwritten zero", "the digit 1 ${x} ???", "a handwritten two"]
    assert cfg.run.name == "1.5" and cfg.reward.components[0].label == "cls"


def test_an_index_edits_a_list_the_file_gave(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward:\n  components:\n    - {kind: digits_classifier}\n    - {kind: jpeg_compressibility, "
                 "weight: 0.5}\n")
    cfg = load_config(f, ["reward.components.1.weight=0.25", "reward.components.-1.required=false"])
    assert [(c.kind, c.weight, c.required) for c in cfg.reward.components] == [
        ("digits_classifier", 1.0, True), ("jpeg_compressibility", 0.25, False)]


def test_a_date_in_a_file_is_text(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  name: 2026-12-02\n")
    assert load_config(f).run.name == "2026-12-02"


@pytest.mark.parametrize("override,message", [
    ("reward.components.3.weight=2", "index 3 is past the end of 'components' (1 item(s))"),
    ("reward.components.first.weight=2", "'components' is a list; index it by number (reward.components.0)"),
    ("run.iterations.x=1", "'iterations' is a value, not a section"),
    ("run..name=x", "a key is names and list indexes joined by dots"),
    ("run.name=../up", "run.name: must be letters"),
    ("reward.components.0.weight=heavy", "reward.components.0.weight: Input should be a valid number"),
])
def test_bad_overrides_are_one_line(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_aliases_in_text_and_list_values_stay_bounded():
    """An alias bomb aimed at a text field stays the text it was typed as (never expanded);
    at a list field it is refused before it expands, as for any other key."""
    items = ["&a0 [" + ", ".join(["lol"] * 10) + "]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
                                                          for i in range(1, 7)]
    bomb = "[" + ", ".join(items) + "]"
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as text_exc:
            load_config(None, ["run.name=" + bomb])
        with pytest.raises(ConfigError) as list_exc:
            load_config(None, ["rollout.prompts=" + bomb])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "run.name: must be letters" in str(text_exc.value) and len(str(text_exc.value)) < 400
    assert "alias" in str(list_exc.value) and "--set rollout.prompts" in str(list_exc.value)
    assert peak < 20 * 2**20


# ---- presets ------------------------------------------------------------------------------------

def test_every_preset_is_explained_and_gives_a_valid_config():
    assert {"flow_grpo", "ac_flow"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        cfg = load_config(None, [f"algorithm.name={name}"])
        for key, (value, why) in preset.items():
            assert len(why) > 20
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == value


def test_flow_grpo_preset_applies_from_a_file_and_from_python(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algorithm:\n  name: flow_grpo\n")
    assert load_config(f).policy.sampler == "sde"
    assert TrainConfig(algorithm={"name": "flow_grpo"}).policy.sampler == "sde"
    cfg = TrainConfig(policy=PolicyConfig(num_steps=4), algorithm={"name": "flow_grpo"})
    assert (cfg.policy.sampler, cfg.policy.num_steps) == ("sde", 4)
    # other algorithms keep the ODE
    assert load_config(None, ["algorithm.name=orw_cfm_w2"]).policy.sampler == "ode"


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_key_the_user_set_is_not_replaced_by_a_preset(tmp_path, where):
    f = tmp_path / "c.yaml"
    f.write_text("policy:\n  sampler: ode\n" if where == "file" else "")
    overrides = ["algorithm.name=flow_grpo"] + (["policy.sampler=ode"] if where == "override" else [])
    with pytest.raises(ConfigError, match="flow_grpo needs policy.sampler: sde"):
        load_config(f, overrides)
    f.write_text("rollout:\n  keep_states: false\n")
    with pytest.raises(ConfigError, match=r"keep their states \(rollout.keep_states: true\)"):
        load_config(f, ["algorithm.name=flow_grpo"])
    f.write_text("policy:\n  cfg_scale: 4.5\n")  # CFG rollouts are Flow-GRPO's own (the learner recomputes under CFG)
    assert load_config(f, ["algorithm.name=flow_grpo"]).learner_settings().flow_grpo.cfg_scale == 4.5
    with pytest.raises(ValueError, match="flow_grpo needs policy.sampler: sde"):
        TrainConfig(policy={"sampler": "ode"}, algorithm={"name": "flow_grpo"})


def test_ac_flow_presets_an_ema_rollout_policy_for_its_pi_old_anchor(tmp_path):
    """AC-Flow's W2 term holds the actor to π_old by default, so π_old trails π_θ as an EMA: the
    preset applies to the default algorithm too, a value given stays, and the one setting where
    the term would vanish (a copy refreshed every step, one update a batch) is refused."""
    assert load_config(None).learner.rollout_update == "ema"
    assert TrainConfig().learner.rollout_update == "ema"
    assert load_config(None, ["algorithm.name=ac_flow"]).learner_settings().rollout_update == "ema"
    assert load_config(None, ["algorithm.name=orw_cfm_w2"]).learner.rollout_update == "copy"
    paper = ["algorithm.ac_flow.anchor=reference", "algorithm.ac_flow.centre_weights=false",
             "algorithm.ac_flow.alpha=0.5", "learner.rollout_update=copy"]
    s = load_config(None, paper).learner_settings()
    assert (s.rollout_update, s.ac_flow.anchor, s.ac_flow.centre_weights, s.ac_flow.alpha) == ("copy", "reference", False, 0.5)
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  rollout_update: copy\n")
    with pytest.raises(ConfigError, match=r"anchor rollout with learner.rollout_update copy and one update a batch has no "
                                          r"W2 term \(π_old is π_θ\)"):
        load_config(f)
    assert load_config(f, ["learner.updates_per_batch=2"]).learner.rollout_update == "copy"
    assert load_config(f, ["algorithm.ac_flow.anchor=reference"]).learner.rollout_update == "copy"


def test_a_run_config_written_before_the_pi_old_anchor_loads_as_it_ran(tmp_path):
    """A run's config.yaml holds every key of its day; one written before centre_weights, anchor
    and times existed ran with the paper's AC-Flow (t ~ U(0, 1)), and loads (resume, eval, export)
    as that run, not with today's defaults, which its α = 0.5 would fail."""
    import yaml

    from services.config import RUN_DEFAULTS_BEFORE, dump_config

    paper = ["algorithm.ac_flow.anchor=reference", "algorithm.ac_flow.centre_weights=false",
             "algorithm.ac_flow.alpha=0.5", "learner.rollout_update=copy", "algorithm.ac_flow.times=uniform"]
    then = yaml.safe_load(dump_config(load_config(None, paper)))
    for key in RUN_DEFAULTS_BEFORE:
        del then["algorithm"]["ac_flow"][key.rsplit(".", 1)[1]]
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(then))
    assert load_config(f, run=True) == load_config(None, paper)
    with pytest.raises(ConfigError, match="centre_weights needs alpha >= 1"):
        load_config(f)  # as a config a user wrote today
    f.write_text(dump_config(load_config(None)))  # a run of today keeps what it states
    assert load_config(f, run=True) == load_config(None)


def test_a_preset_leaves_the_callers_objects_alone():
    policy = {"num_steps": 4}
    TrainConfig(policy=policy, algorithm={"name": "flow_grpo"})
    assert policy == {"num_steps": 4}


# ---- fmrl config --explain ----------------------------------------------------------------------

def test_explain_prints_description_type_choices_default_and_preset(capsys):
    rc, out, err = _run(capsys, ["config", "--explain", "policy.sampler"])
    assert rc == 0, err
    assert out.splitlines()[0] == "policy.sampler"
    assert "Flow-GRPO's SDE with per-step log-probs" in out
    assert "choices: ode, sde" in out and "default: ode" in out
    assert "preset:  algorithm.name=flow_grpo sets sde" in out


@pytest.mark.parametrize("key,parts", [
    ("learner.lr", ["AdamW learning rate.", "type:    number, > 0, <= 1.0", "default: 0.0002"]),
    ("reward.components.0.weight", ["Weight of this component", "type:    number", "default: 1.0"]),
    ("reward.components.weight", ["Weight of this component", "default: 1.0"]),
    ("reward.components", ["type:    list of sections", "default: [{kind: digits_classifier}]"]),
    ("run.name", ["type:    text or null", "default: null"]),
    ("algorithm.flow_grpo.tracker.global_std", ["default: true"]),  # the section's default, not the class's
    ("algorithm", ["type:    section", "keys:    name, orw, ac_flow"]),
])
def test_explain(key, parts):
    text = explain(key)
    for part in parts:
        assert part in text, text


def test_explain_an_unknown_key_is_one_line(capsys):
    rc, _, err = _run(capsys, ["config", "--explain", "learner.lrr"])
    assert rc == 1 and "unknown key 'learner.lrr'; did you mean lr?" in _one_line_error(err)


# ---- --version, bare fmrl, --help ---------------------------------------------------------------

def test_version(capsys):
    rc, out, _ = _run(capsys, ["--version"])
    assert rc == 0 and out.strip() == f"fmrl {importlib.metadata.version('fmrl')}"


def test_bare_fmrl_prints_usage_and_exits_2(capsys):
    rc, out, err = _run(capsys, [])
    assert rc == 2 and out == ""
    assert err.startswith("usage: fmrl") and "train" in err and "config" in err and "--version" in err


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_help_shows_defaults_and_choices():
    """Walks every subcommand, so one added later is covered: each option with a default to show
    (not None, not a flag's False) has it in --help, and each option with choices lists them."""
    from reward_workers.service import build_parser as service_parser

    shown = 0
    parsers = _subparsers(build_parser())
    parsers["reward-worker"] = service_parser()  # `fmrl reward-worker --help` is the service's own
    for name, sub in parsers.items():
        text = "".join(sub.format_help().split())  # argparse wraps, even inside a long path
        for action in sub._actions:
            if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                    and action.nargs != 0:
                assert f"(default:{action.default})" in text, (name, action.dest)
                shown += 1
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, (name, action.dest)
    assert shown >= 20


# ---- the Python API refuses what the command line refuses ----------------------------------------

def _bad_configs() -> dict[str, TrainConfig]:
    nested = TrainConfig()
    nested.algorithm.name = "flow_grpo"  # assignment validates the name, not the sections around it
    appended = TrainConfig()
    appended.reward.components.append(RewardComponentConfig(kind="digits_classifier"))  # validates nothing
    return {
        "constructed": TrainConfig.model_construct(run={"iterations": 0}),
        "assigned": nested,
        "appended": appended,
    }


@pytest.mark.parametrize("case,message", [
    ("constructed", "run.iterations: Input should be greater than or equal to 1"),
    ("assigned", "flow_grpo needs policy.sampler: sde"),
    ("appended", "repeated: digits_classifier"),
])
def test_validate_config_refuses_what_load_config_refuses(case, message):
    with pytest.raises(ConfigError) as exc:
        validate_config(_bad_configs()[case])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_validate_config_returns_a_good_config_unchanged():
    cfg = load_config(None, ["algorithm.name=flow_grpo", "run.iterations=3"])
    assert validate_config(cfg) == cfg
    with pytest.raises(ConfigError, match="expected a TrainConfig"):
        validate_config({"run": {}})


def test_train_refuses_a_bad_config_before_starting_anything(monkeypatch, tmp_path):
    import services.driver

    def must_not_run(*a, **k):
        raise AssertionError("train() went on with a config load_config would refuse")

    for name in ("check_policy_source", "ensure_ray", "start_actors"):
        if hasattr(services.driver, name):
            monkeypatch.setattr(services.driver, name, must_not_run)
    cfg = _bad_configs()["appended"]
    cfg.run.out_dir = tmp_path
    with pytest.raises(ConfigError, match="repeated: digits_classifier"):
        services.driver.train(cfg)
    assert not list(tmp_path.iterdir())
