"""Hostile or careless input at the edges: each is refused in one short line that names the
key or the file, before anything runs; no traceback, no magic value, no blow-up."""

import json
import socket
import struct
import tracemalloc
import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from services.cli import main
from services.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = str(ROOT / "samplers/assets/digits_policy.safetensors")


def _one_short_line(msg: str, limit: int = 400) -> str:
    assert "\n" not in msg.strip(), msg[:2000]
    assert len(msg) < limit, msg[:2000]
    return msg


# ---- every number in the config tree --------------------------------------------------------

def _leaf(annotation: typing.Any) -> typing.Any:
    """float | None → float; Annotated[int, ...] → int; anything else as it is."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _leaf(args[0])
    if typing.get_origin(annotation) in (typing.Union, type(int | None)) and len(args) == 1:
        return _leaf(args[0])
    return annotation


def _sections(cls: type[BaseModel], seen: set | None = None) -> list[type[BaseModel]]:
    """Every model class reachable from ``cls`` (through fields, lists and optionals)."""
    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)
    out = [cls]
    for f in cls.model_fields.values():
        stack = [f.annotation]
        while stack:
            a = stack.pop()
            if isinstance(a, type) and issubclass(a, BaseModel):
                out += _sections(a, seen)
            stack += list(typing.get_args(a))
    return out


def _numeric_fields() -> list[tuple[type[BaseModel], str, typing.Any]]:
    rows = []
    for cls in _sections(TrainConfig):
        for name, f in cls.model_fields.items():
            leaf = _leaf(f.annotation)
            numeric_dict = typing.get_origin(leaf) is dict and _leaf(typing.get_args(leaf)[1]) in (int, float)
            if leaf in (int, float) or numeric_dict:
                rows.append((cls, name, leaf))
    return rows


def test_schema_walk_finds_the_numbers():
    fields = {f"{c.__name__}.{n}" for c, n, _ in _numeric_fields()}
    assert {"ORWConfig.tau", "LearnerConfig.grad_clip", "RunConfig.iterations", "RewardComponentConfig.weight",
            "ResourcesConfig.sampler_resources", "MetricsConfig.port"} <= fields
    assert len(fields) > 50


@pytest.mark.parametrize("cls,name,leaf", _numeric_fields(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_number_in_the_tree_refuses_non_finite_values_and_booleans(cls, name, leaf):
    """Walks the whole schema, so a field added later is covered: a float field refuses ±inf
    and nan, an int or float field refuses true/false (a bool is not a count)."""
    from pydantic import ValidationError

    section = cls.model_construct()  # defaults, unvalidated; assignment validates the one field
    if typing.get_origin(leaf) is dict:
        bad_values = [{"x": float("inf")}, {"x": float("nan")}, {"x": True}]
    elif leaf is float:
        bad_values = [float("inf"), float("-inf"), float("nan"), "inf", "-Infinity", "nan", True, False]
    else:
        bad_values = [True, False, float("inf"), float("nan")]
    for bad in bad_values:
        with pytest.raises(ValidationError) as exc:
            setattr(section, name, bad)
        err = exc.value.errors()[0]
        assert err["type"] in ("finite_number", "value_error", "int_from_float", "int_parsing", "float_type",
                               "int_type"), err
        if leaf is float and bad is not True and bad is not False:
            assert err["type"] == "finite_number"


@pytest.mark.parametrize("override,message", [
    ("algorithm.orw.tau=.inf", "algorithm.orw.tau: must be finite"),
    ("algorithm.ac_flow.tau=inf", "algorithm.ac_flow.tau: must be finite"),
    ("algorithm.orw.tau=1000", "algorithm.orw.tau: Input should be less than or equal to 100"),
    ("learner.grad_clip=.inf", "learner.grad_clip: must be finite"),
    ("learner.lr=.nan", "learner.lr: must be finite"),
    ("run.iterations=true", "run.iterations: must be a number, not true/false"),
    ("reward.components=[{kind: clip, weight: true}]", "reward.components.0.weight: must be a number"),
    ("policy.shift=.nan", "policy.shift: must be finite"),
    ("policy.cfg_scale=.nan", "policy.cfg_scale: must be finite"),
    ("resources.sampler_resources={inference_gpu: .inf}", "resources.sampler_resources.inference_gpu: must be finite"),
    ("pipeline.sync_timeout_s=1e300", "pipeline.sync_timeout_s: Input should be less than or equal to 604800"),
    ("reward.components=[{kind: clip, weight: -1}]",
     "reward.components.0.weight=-1.0 is negative: set reward.allow_negative_weights: true"),
])
def test_meaningless_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    msg = _one_short_line(str(exc.value))
    assert message in msg
    assert "≤" not in msg and "(got nan)" not in msg


def test_negative_reward_weight_is_an_explicit_choice():
    cfg = load_config(None, ["reward.components=[{kind: clip}, {kind: pickscore, weight: -0.5}]",
                             "reward.allow_negative_weights=true", "rollout.prompts=[a cat]",
                             "resources.num_samplers=1"])
    assert [c.weight for c in cfg.reward.components] == [1.0, -0.5]


# ---- YAML: alias bombs, duplicate keys, encodings, echoed values ------------------------------

BOMB_LEVELS = 6  # 10**7 strings once expanded, from under 1 KB of YAML


def _alias_items(levels: int) -> list[str]:
    """'billion laughs': each anchor is a list of ten aliases of the one before."""
    items = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return items


def _alias_bomb(levels: int = BOMB_LEVELS) -> str:
    body = "".join(f"  - {item}\n" for item in _alias_items(levels))
    return f"anchors:\n{body}run:\n  iterations: *a{levels}\n"


@pytest.mark.parametrize("where", ["file", "override"])
def test_alias_bomb_is_refused_before_it_expands(tmp_path, where):
    text = _alias_bomb()
    assert len(text) < 1200
    f = tmp_path / "bomb.yaml"
    f.write_text(text)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as exc:
            if where == "file":
                load_config(f)
            else:
                load_config(None, ["run.iterations=[" + ", ".join(_alias_items(BOMB_LEVELS)) + "]"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = _one_short_line(str(exc.value), 300)
    assert "alias" in msg and ("bomb.yaml" in msg if where == "file" else "--set run.iterations" in msg)
    assert peak < 20 * 2**20  # the 10**8 strings never existed: the refusal counts nodes


def test_a_few_aliases_still_work(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("algorithm:\n  ac_flow:\n    tracker: &t {buffer_size: 8, min_count: 4}\n"
                 "  advantage_flow:\n    tracker: *t\n")
    cfg = load_config(f)
    assert cfg.algorithm.advantage_flow.tracker.buffer_size == 8
    # an override of one aliased place leaves the others as written
    cfg = load_config(f, ["algorithm.ac_flow.tracker.buffer_size=16"])
    assert (cfg.algorithm.ac_flow.tracker.buffer_size, cfg.algorithm.advantage_flow.tracker.buffer_size) == (16, 8)


def test_recursive_alias_is_refused(tmp_path):
    f = tmp_path / "loop.yaml"
    f.write_text("run: &r\n  name: x\n  loop: *r\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert "loop.yaml" in _one_short_line(str(exc.value))


def test_deep_nesting_is_refused(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("run: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert "deep.yaml" in _one_short_line(str(exc.value))


def test_duplicate_key_is_refused_naming_key_and_line(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("run:\n  iterations: 3\n  seed: 1\n  iterations: 5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    msg = _one_short_line(str(exc.value))
    assert "dup.yaml" in msg and "duplicate key 'iterations'" in msg and "line 4" in msg
    f.write_text("run:\n  iterations: 3\nlearner:\n  lr: 0.1\nrun:\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'run' .*line 5"):
        load_config(f)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(None, ["resources.sampler_resources={a: 1, a: 2}"])


def test_non_utf8_config_names_its_file(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    msg = _one_short_line(str(exc.value))
    assert "latin1.yaml" in msg and "UTF-8" in msg and "line 2" in msg


def test_invalid_yaml_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("run:\n  iterations: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    msg = _one_short_line(str(exc.value))
    assert "broken.yaml" in msg and "line" in msg


@pytest.mark.parametrize("override", [
    "run.iterations=" + "x" * 100_000,
    "rollout.prompts=[a handwritten " + "cat " * 50_000 + "]",
    "rollout.prompts=[" + ", ".join(["' '"] * 20_000) + "]",
    "resources.sampler_resources={" + ", ".join(f"k{i}: 0" for i in range(20_000)) + "}",
])
def test_echoed_values_are_truncated(override):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    _one_short_line(str(exc.value), 600)


# ---- the command line ------------------------------------------------------------------------

def _cli_error(capsys, argv: list[str], code: int) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fmrl")
    return _one_short_line(lines[0])


@pytest.mark.parametrize("args,message", [
    (["eval", "--checkpoint", "/nonexistent", "-n", "0"], "argument -n: Input should be greater than or equal to 2"),
    (["eval", "--checkpoint", "/nonexistent", "-n", "1e9"], "argument -n: Input should be a valid integer"),
    (["eval", "--checkpoint", "/nonexistent", "-n", "5000"], "argument -n: Input should be less than or equal to 1024"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a one", "--out", "x.npz", "--shift", "0"],
     "argument --shift: Input should be greater than 0"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a one", "--out", "x.npz", "--shift", "nan"],
     "argument --shift: must be finite"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a one", "--out", "x.npz", "--cfg-scale", "nan"],
     "argument --cfg-scale: must be finite"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a one", "--out", "x.npz", "--cfg-scale", "inf"],
     "argument --cfg-scale: must be finite"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a one", "--out", "x.npz", "-n", "100000"],
     "argument -n: Input should be less than or equal to 1024"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a one", "--out", "x.npz", "-n", "0"],
     "argument -n: Input should be greater than or equal to 1"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a one", "--out", "x.npz", "--steps", "0"],
     "argument --steps: Input should be greater than or equal to 1"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a one", "--out", "x.npz", "--seed", "-1"],
     "argument --seed: Input should be greater than or equal to 0"),
    (["pretrain-digits", "--out", "{tmp}/p.safetensors", "--steps", "0"], "argument --steps: must be at least 1"),
    (["train-classifier", "--out", "{tmp}/c.safetensors", "--epochs", "-3"], "argument --epochs: must be at least 1"),
    (["make-tiny-sd3", "--out", "{tmp}/sd3", "--resolution", "1e99"], "argument --resolution: must be an integer"),
])
def test_cli_numbers_are_refused_in_one_line(capsys, tmp_path, args, message):
    assert message in _cli_error(capsys, [a.replace("{tmp}", str(tmp_path)) for a in args], 2)
    assert not list(tmp_path.iterdir())


def test_metrics_port_taken_is_one_line_naming_port_and_key(capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        msg = _cli_error(capsys, ["train", "--set", f"metrics.port={port}", "--set", f"run.out_dir={tmp_path}"], 1)
    assert f"127.0.0.1:{port}" in msg and "metrics.port" in msg
    assert not list(tmp_path.iterdir())


def test_out_dir_that_is_a_file_is_one_line(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    msg = _cli_error(capsys, ["train", "--set", f"run.out_dir={f}", "--set", "metrics.port=null"], 1)
    assert str(f) in msg and "Not a directory" in msg


def test_fmrl_debug_still_raises_oserror(monkeypatch, tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    monkeypatch.setenv("FMRL_DEBUG", "1")
    with pytest.raises(OSError):
        main(["train", "--set", f"run.out_dir={f}", "--set", "metrics.port=null"])


def test_non_utf8_files_named_at_the_cli(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"run:\n  name: \xff\n")
    assert str(cfg) in _cli_error(capsys, ["config", "--config", str(cfg)], 1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a handwritten one\n\xfe\xff\n")
    msg = _cli_error(capsys, ["eval", "--checkpoint", SHIPPED, "--prompts", str(prompts)], 1)
    assert str(prompts) in msg and "UTF-8" in msg and "line 2" in msg


# ---- a non-finite gradient ---------------------------------------------------------------------

def _poisoned_update(objective: str = "orw_cfm_w2") -> None:
    """A learner whose policy holds a NaN weight: its first update meets a NaN gradient."""
    import dataclasses

    from learner.learner import Learner, LearnerSettings
    from tests.helpers import fake_batch, table_encode, tiny_velocity

    policy = tiny_velocity()
    with torch.no_grad():
        next(p for p in policy.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    ln = Learner(policy, table_encode, dataclasses.replace(LearnerSettings(), objective=objective))
    ln.update(fake_batch(), torch.linspace(0, 1, 8))


def test_non_finite_gradient_names_step_and_objective():
    with pytest.raises(FloatingPointError) as exc:
        _poisoned_update()
    msg = _one_short_line(str(exc.value))
    assert "learner step 0" in msg and "orw_cfm_w2" in msg and "learner.lr" in msg


def test_non_finite_gradient_is_one_line_at_the_cli(capsys, monkeypatch):
    import services.driver

    monkeypatch.setattr(services.driver, "train", lambda *a, **k: _poisoned_update())
    msg = _cli_error(capsys, ["train"], 1)
    assert "non-finite gradient" in msg and "learner step 0" in msg


# ---- a policy file's transformer_config --------------------------------------------------------

def _policy_file(path: Path, header_meta: bytes) -> Path:
    """A safetensors file with one tensor and raw metadata bytes (to write what the API would not)."""
    tensor = struct.pack("<f", 0.0)
    header = (b'{"__metadata__":' + header_meta + b',"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    path.write_bytes(struct.pack("<Q", len(header)) + header + tensor)
    return path


@pytest.mark.parametrize("meta", [
    json.dumps({"transformer_config": "{not json"}).encode(),
    json.dumps({"transformer_config": "[1, 2]"}).encode(),
    json.dumps({"transformer_config": json.dumps({"num_layers": "many"})}).encode(),
    json.dumps({"transformer_config": json.dumps({"no_such_option": 1})}).encode(),
    b'{"transformer_config":"{\xff}"}',
])
def test_bad_transformer_config_names_the_file(tmp_path, meta):
    from samplers.policy import load_velocity

    f = _policy_file(tmp_path / "p.safetensors", meta)
    with pytest.raises(ValueError) as exc:
        load_velocity(f)
    msg = _one_short_line(str(exc.value), 600)
    assert str(f) in msg
