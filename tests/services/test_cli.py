"""Bad input at the command line: one clear line on stderr and a non-zero exit."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def fmrl(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["train", "--set", "algorithm.taux=1"], "unknown key 'algorithm.taux'"),
    (["train", "--set", "learner.lr=-1"], "learner.lr: Input should be greater than 0"),
    (["train", "--set", "rollout.prompts=[]"], "the prompt list is empty"),
    (["train", "--set", "policy.checkpoint=/nonexistent/p.safetensors"], "policy checkpoint not found"),
    (["train", "--config", "/nonexistent.yaml"], "config file not found"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", "a handwritten one", "--out", "x.npz"],
     "no policy checkpoint at /nonexistent"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt", " ", "--out", "x.npz"], "non-blank --prompt"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_one_line_nonzero(args, message, tmp_path):
    r = fmrl(*args)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and lines[0].startswith("fmrl")
    assert not list(tmp_path.iterdir())


def test_damaged_checkpoint_is_named(tmp_path):
    bad = tmp_path / "policy.safetensors"
    bad.write_bytes(b"not a safetensors file")
    r = fmrl("sample", "--checkpoint", str(bad), "--prompt", "a handwritten one", "--out", str(tmp_path / "o.npz"))
    assert r.returncode == 1 and "not a readable safetensors checkpoint" in r.stderr
    assert not (tmp_path / "o.npz").exists()
