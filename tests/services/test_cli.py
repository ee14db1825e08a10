"""Bad input at the command line: one clear line on stderr and a non-zero exit."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def fmrl(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


BAD_INPUTS = [
    (["train", "--set", "algorithm.orw.taux=1"], "unknown key 'algorithm.orw.taux'"),
    (["train", "--set", "learner.lr=-1"], "learner.lr: Input should be greater than 0"),
    (["train", "--set", "rollout.prompts=[]"], "the prompt list is empty"),
    (["train", "--set", "policy.checkpoint=/nonexistent/p.safetensors"], "policy checkpoint not found"),
    (["train", "--config", "/nonexistent.yaml"], "config file not found"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a handwritten one", "--out", "x.npz"],
     "no policy checkpoint at /nonexistent"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", " ", "--out", "x.npz"], "non-blank --prompt"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--resume", "/nonexistent/run"], "/nonexistent/run is not a run directory (no config.yaml)"),
    (["train", "--resume", "/nonexistent/run", "--name", "x"], "give only --set overrides"),
    (["eval", "--checkpoint", "/nonexistent"], "no policy checkpoint at /nonexistent"),
    (["eval", "--checkpoint", str(ROOT / "samplers/assets/digits_policy.safetensors"), "--prompts",
      "/nonexistent.txt"], "prompts file not found: /nonexistent.txt"),
    (["eval", "--checkpoint", str(ROOT / "samplers/assets/digits_policy.safetensors"), "-n", "1"],
     "argument -n: Input should be greater than or equal to 2"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_one_line_nonzero(args, message, tmp_path, monkeypatch, capsys):
    # in this process (a new interpreter per case cost ~2.7 s of imports each); the test below
    # runs three of them as the real command, where nothing else may reach stderr either
    from services.cli import main

    monkeypatch.chdir(tmp_path)  # whatever a refused command might write would land here
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert message in lines[0] and lines[0].startswith("fmrl")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", [0, 5, 7])  # a config error, a sample error, an unknown command
def test_bad_input_is_one_line_from_the_real_command(case):
    args, message = BAD_INPUTS[case]
    r = fmrl(*args)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and lines[0].startswith("fmrl")


def test_resume_without_a_checkpoint_is_refused_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run:\n  iterations: 3\n")
    r = fmrl("train", "--resume", str(run))
    assert r.returncode == 1 and "has no resumable checkpoint" in r.stderr, r.stderr
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    assert (run / "config.yaml").read_text() == "run:\n  iterations: 3\n"


def test_damaged_checkpoint_is_named(tmp_path):
    bad = tmp_path / "policy.safetensors"
    bad.write_bytes(b"not a safetensors file")
    r = fmrl("sample", "--checkpoint", str(bad), "--prompt", "a handwritten one", "--out", str(tmp_path / "o.npz"))
    assert r.returncode == 1 and "not a readable safetensors checkpoint" in r.stderr
    assert not (tmp_path / "o.npz").exists()


def test_sample_writes_images_and_prompts(tmp_path):
    out = tmp_path / "s.npz"
    r = fmrl("sample", "--checkpoint", "samplers/assets/digits_policy.safetensors", "--prompt", "a handwritten seven",
             "--prompt", "the digit 3", "-n", "5", "--cfg-scale", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    with np.load(out) as f:
        images, prompts = f["images"], f["prompts"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert prompts.tolist() == ["a handwritten seven"] * 5 + ["the digit 3"] * 5
    # the shipped model with CFG draws what was asked, by the evaluation classifier
    from reward_workers.digits import HeldoutSVM

    assert (HeldoutSVM().predict(images) == np.array([7] * 5 + [3] * 5)).mean() >= 0.8


def test_pretrain_and_classifier_commands_write_loadable_files(tmp_path, capsys):
    # in this process (the real command's entry is the bad-input tests'): imports cost seconds
    # each; the global RNGs the commands seed are given back afterwards
    import random

    import torch
    from safetensors import safe_open

    from samplers.policy import load_velocity
    from services.cli import main

    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        assert main(["pretrain-digits", "--steps", "3", "--eval-samples", "2", "--out",
                     str(tmp_path / "p.safetensors")]) == 0
        capsys.readouterr()
        assert main(["train-classifier", "--epochs", "1", "--out", str(tmp_path / "c.safetensors")]) == 0
        assert "held-out accuracy" in capsys.readouterr().out
    random.setstate(states[0])
    np.random.set_state(states[1])
    load_velocity(tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert '"command": "fmrl pretrain-digits --steps 3 --seed 0"' in f.metadata()["pretrain_report"]
    assert (tmp_path / "p.json").is_file()
    from reward_workers.digits import load_classifier

    load_classifier(tmp_path / "c.safetensors")
