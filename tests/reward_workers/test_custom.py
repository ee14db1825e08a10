"""User rewards (kind python): refused at start when they cannot run, checked on every call,
and the same scores in this process and through a real `fmrl reward-worker` service."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reward_workers.client import RewardClient
from reward_workers.custom import PythonReward, check_callable
from reward_workers.examples import TargetInk, stroke_contrast
from reward_workers.registry import build_python_reward, python_wire_name
from reward_workers.service import main
from services.config import ConfigError, load_config
from services.rewards import build_component
from tests.conftest import terminate

ROOT = Path(__file__).resolve().parents[2]
FMRL = Path(sys.executable).parent / "fmrl"
EXAMPLE = "reward_workers.examples:stroke_contrast"
THIS = "tests.reward_workers.test_custom"


# callables the tests name by "tests.reward_workers.test_custom:<name>"
def two_args(images, prompts):
    return np.zeros(len(prompts))


def with_defaults(images, prompts, metadata=None, scale=1.0):
    return scale * np.zeros(len(prompts))


def keywords(*, images, prompts, metadata):
    return np.zeros(len(prompts))


def returns(value):
    return lambda images, prompts, metadata: value


class NoCall:
    def __init__(self, scale=1.0):
        self.scale = scale


NOT_CALLABLE = 3


def images_prompts(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8), [f"a handwritten {i}" for i in range(n)]


def config_error(tmp_path, **component):
    """The one-line ConfigError of a config whose only reward is ``component``."""
    lines = ["reward:", "  components:", "    - kind: python", "      name: mine"]
    lines += [f"      {k}: {v}" for k, v in component.items()]
    (tmp_path / "c.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    message = str(e.value)
    assert "\n" not in message and "reward 'mine'" in message, message
    return message


@pytest.mark.parametrize("spec, expected", [
    ("no_such_package_xyz.mod:f", "cannot import 'no_such_package_xyz.mod': ModuleNotFoundError"),
    ("reward_workers.examples:missing", "module 'reward_workers.examples' has no attribute 'missing'"),
    (f"{THIS}:two_args", "must accept (images, prompts, metadata)"),
    (f"{THIS}:keywords", "must accept (images, prompts, metadata)"),
    (f"{THIS}:NoCall", "has no __call__"),
    (f"{THIS}:NOT_CALLABLE", "is a int, not a function or class"),
    ("reward_workers.examples", "is not of the form 'package.module:function'"),
])
def test_a_callable_that_cannot_run_is_refused_by_the_config_in_one_line(tmp_path, spec, expected):
    assert expected in config_error(tmp_path, callable=f'"{spec}"')


def test_config_refuses_bad_init_kwargs_and_a_python_reward_without_callable(tmp_path):
    assert "cannot be constructed with init_kwargs ['colour']" in config_error(
        tmp_path, callable="reward_workers.examples:TargetInk", init_kwargs="{colour: 1}")
    assert "init_kwargs apply to a class only" in config_error(tmp_path, callable=EXAMPLE, init_kwargs="{a: 1}")
    assert "kind python needs callable" in config_error(tmp_path)
    assert "takes no model_path" in config_error(tmp_path, callable=EXAMPLE, model_path="/x")
    # a service's callable lives where the service runs: only its form is checked here
    assert "not of the form" in config_error(tmp_path, callable="nope", transport="redis")
    (tmp_path / "r.yaml").write_text("reward:\n  components:\n    - {kind: python, callable: 'elsewhere.mod:f', "
                                     "transport: redis}\n")
    assert load_config(tmp_path / "r.yaml").reward.components[0].callable == "elsewhere.mod:f"


@pytest.mark.parametrize("value, expected", [
    (np.array([0.1, np.nan, 0.3, 0.4]), "returned non-finite scores at [1]"),
    (np.zeros(3), "returned scores of shape (3,) for 4 images"),
    ((np.zeros(4), [1, 2, 3, 4]), "returned components of type list; expected a dict"),
    ((np.zeros(4), {"ink": np.zeros(5)}), "returned component 'ink' of shape (5,)"),
    ((np.zeros(4), {"a/b": np.zeros(4)}), "returned a component named 'a/b'"),
    ((np.zeros(4), {"ink": [0, 0, np.inf, 0]}), "returned non-finite component 'ink' at [2]"),
    (["a", "b", "c", "d"], "returned scores of dtype <U1; expected real numbers"),
    (np.ones(4, dtype=bool), "returned scores of dtype bool"),
])
def test_a_bad_output_is_an_error_naming_the_reward(monkeypatch, value, expected):
    monkeypatch.setattr(sys.modules[__name__], "bad", returns(value), raising=False)
    reward = build_python_reward(f"{THIS}:bad", name="mine")
    with pytest.raises(ValueError) as e:
        reward(*images_prompts())
    assert f"reward 'mine' ({THIS}:bad) {expected}" in str(e.value)
    assert "\n" not in str(e.value)


def test_the_example_rewards_and_their_outputs():
    images, prompts = images_prompts()
    out = build_component(load_config(None, [
        "reward.components=[{kind: python, callable: 'reward_workers.examples:stroke_contrast'}]",
    ]).reward.components[0])(images, prompts, None)
    scores, parts = stroke_contrast(images, prompts, None)
    np.testing.assert_array_equal(out.scores, scores)
    np.testing.assert_array_equal(out.details["ink"], parts["ink"])
    # a class is built once with its init kwargs; metadata, where a prompt has it, wins
    ink = PythonReward("reward_workers.examples:TargetInk", {"default": 0.5})
    meta = [{"ink": 0.0}, {}, {"ink": 1.0}, {"objects": ["cat"]}]
    got = ink(images, prompts, meta).scores
    mean = images.astype(np.float64).mean(axis=(1, 2, 3)) / 255
    np.testing.assert_allclose(got, -np.abs(mean - [0.0, 0.5, 1.0, 0.5]))
    np.testing.assert_allclose(ink(images, prompts).scores, TargetInk(0.5)(images, prompts, None))
    with pytest.raises(ValueError, match="4 prompts but 3 metadata entries"):
        ink(images, prompts, meta[:3])
    assert check_callable(EXAMPLE) is stroke_contrast
    assert check_callable(f"{THIS}:with_defaults") is with_defaults


def test_a_python_reward_service_scores_as_in_process(redis_url, tmp_path):
    """A real `fmrl reward-worker --reward python --callable …` process and redis-server."""
    images, prompts = images_prompts(n=6, seed=1)
    expected = PythonReward(EXAMPLE)(images, prompts)
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([str(FMRL), "reward-worker", "--reward", "python", "--callable", EXAMPLE,
                             "--redis-url", redis_url, "--block-ms", "200", "--consumer", "py-worker"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    client = RewardClient(redis_url, python_wire_name(EXAMPLE), timeout_s=60, attempts=1)
    try:
        out = client(images, prompts)
    finally:
        client.close()
        terminate(proc, 20)
    assert out is not None, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    np.testing.assert_array_equal(out.scores, expected.scores)
    np.testing.assert_array_equal(out.details["ink"], expected.details["ink"])
    assert proc.returncode == 0


def test_a_python_reward_service_refuses_a_bad_callable_at_start(redis_url, capsys):
    for args, message in [
        (["--callable", f"{THIS}:two_args"], "must accept (images, prompts, metadata)"),
        (["--callable", "no_such_package_xyz:f"], "cannot import 'no_such_package_xyz'"),
        ([], "--reward python needs --callable"),
        (["--callable", "reward_workers.examples:TargetInk", "--init-kwargs", "[1]"], "must be a JSON object"),
        (["--callable", "reward_workers.examples:TargetInk", "--init-kwargs", '{"colour": 1}'],
         "cannot be constructed with init_kwargs ['colour']"),
    ]:
        assert main(["--reward", "python", *args, "--redis-url", redis_url]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("reward service: error:") and message in err, err
    assert main(["--reward", "clip", "--callable", EXAMPLE, "--redis-url", redis_url]) == 2
    assert "--callable and --init-kwargs go with --reward python only" in capsys.readouterr().err
