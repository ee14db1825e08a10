"""HF_HUB_OFFLINE is the user's: fmrl neither sets it in the driver nor forces it into actors,
forwards the user's own HF_* settings to them, and loads what it ships from disk without it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from services import cluster, cluster_guard

ROOT = Path(__file__).resolve().parents[2]


def test_actor_env_forwards_the_users_hf_settings_not_tokens() -> None:
    assert "HF_HUB_OFFLINE" not in cluster.actor_env({"PATH": "/bin"})
    env = cluster.actor_env({"HF_HUB_OFFLINE": "1", "HF_HOME": "/data/hf", "HF_HUB_DISABLE_PROGRESS_BARS": "0",
                             "HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN": "hf_old", "HF_HUB_TOKEN_PATH": "/t",
                             "OTHER": "x"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == "/data/hf"
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"  # the user's value over fmrl's default
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["TRANSFORMERS_VERBOSITY"] == "error"
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN_PATH"} & set(env) and "OTHER" not in env


class _Stop(Exception):
    pass


def _runtime_env_of(start, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The runtime_env the driver hands ray.init (ray.init replaced: no cluster starts)."""
    seen = {}

    def fake_init(*args, **kwargs):
        seen.update(kwargs.get("runtime_env") or {})
        raise _Stop

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster_guard, "reap_orphans", lambda *_: [])
    with pytest.raises(_Stop):
        start()
    return seen


def test_the_driver_does_not_force_hf_hub_offline_on_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    embedded = _runtime_env_of(lambda: cluster.start_embedded(1), monkeypatch)["env_vars"]
    assert "HF_HUB_OFFLINE" not in embedded and embedded["HF_ENDPOINT"] == "https://hub.example"

    # joining a cluster (RAY_ADDRESS, as under `ray job submit`): the same, less what the job sets
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, '{"runtime_env": {"env_vars": {"HF_ENDPOINT": "x"}}}')
    joined = _runtime_env_of(lambda: cluster.ensure_ray(None), monkeypatch)["env_vars"]
    assert "HF_HUB_OFFLINE" not in joined and "HF_ENDPOINT" not in joined
    assert joined["TOKENIZERS_PARALLELISM"] == "false"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's choice travels
    assert _runtime_env_of(lambda: cluster.ensure_ray(None), monkeypatch)["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_shipped_models_load_with_hf_hub_offline_unset_and_no_network() -> None:
    """In a fresh process whose environment has no HF_HUB_OFFLINE, with every socket refused
    and recorded: importing the CLI sets nothing, the hub library is online, and the MiniLM
    prompt encoder and the digits CLIP still load and run without a single network attempt."""
    probe = """
import os, socket
tried = []
def refuse(*args, **kwargs):
    tried.append(args[:2])
    raise OSError("no network in this test")
socket.getaddrinfo = refuse
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
import services.cli
assert "HF_HUB_OFFLINE" not in os.environ, "services.cli set HF_HUB_OFFLINE"
from huggingface_hub import constants
assert not constants.HF_HUB_OFFLINE
from samplers.text import PromptEncoder
emb = PromptEncoder().encode(["a handwritten seven", ""])
assert emb.tokens.shape[0] == 2 and emb.pooled.abs().sum() > 0
from reward_workers.digits_clip import load_digits_clip
model, processor = load_digits_clip()
assert model is not None and processor is not None
assert "HF_HUB_OFFLINE" not in os.environ
assert not tried, tried
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
