"""The SD3 path through the whole Ray path (CI's smoke test): a tiny random
StableDiffusion3Pipeline, written by the project's command, trained with a LoRA adapter."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from samplers.sd3 import build_tiny_sd3_pipeline
from services.config import load_config
from services.driver import train

# starts Ray processes (the shared `cluster`): the suite's Ray group (tests/conftest.py)
pytestmark = pytest.mark.ray_processes


def test_tiny_sd3_trains_a_lora_adapter_through_ray(cluster, tmp_path):
    pipe = build_tiny_sd3_pipeline(tmp_path / "tiny-sd3")
    cfg = load_config("configs/sd3_tiny_cpu.yaml", [
        f"policy.pretrained={pipe}", f"run.out_dir={tmp_path}", "run.name=sd3", "run.iterations=4",
        "run.progress=false", "algorithm.ac_flow.warmup_steps=0", "learner.lr=3e-2", "eval.samples_per_prompt=2",
        "resources.num_samplers=1", "resources.sampler_cpus=0.25", "resources.learner_cpus=0.25",
        "metrics.port=0"])
    summary = train(cfg)
    run = tmp_path / "sd3"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["version"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["sampler_versions"] == [r["version"]] for r in train_rows)
    assert all(np.isfinite(r["loss"]) and r["reward_mean"] < 0 for r in train_rows)  # −JPEG kB
    # only the adapter is checkpointed (and published); the base stays in the pipeline directory
    saved = load_file(str(run / "checkpoint" / "policy.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert summary["before"]["accuracy"] is None  # no digits classifier for SD3 images
    # the adapter trained (LoRA's B starts at zero) and moved the samples; the JPEG reward is
    # whole bytes, so its mean can come out equal by chance — the diversity is continuous
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert summary["after"]["diversity"] != summary["before"]["diversity"]
    assert (run / "samples_before_after.png").is_file()
