"""Artifacts out: a run's adapter in the diffusers/PEFT layout, `fmrl export`, `fmrl sample`.

The SD3 run is built cheaply from real parts, without Ray: a Learner on the tiny random
StableDiffusion3Pipeline with a LoRA adapter (alpha ≠ rank, so an adapter loaded without its
metadata would scale wrongly), its adapter moved off zero by a seeded perturbation (as training
would; B starts at zero), then the driver's own checkpoint writer and final checkpoint/.
Tolerances are those of tests/samplers/test_sd3.py (latents within 1e-5, uint8 images within
1 level), for the same reason: the text encoders' last bits depend on prompt batching.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from learner.learner import Learner
from samplers.policy import LORA_WEIGHTS_FILE, is_adapter_key, load_velocity, load_weights
from samplers.sampler import Sampler
from samplers.sd3 import build_tiny_sd3_pipeline
from services.checkpoints import link_final_checkpoint, write_checkpoint
from services.cli import main
from services.config import dump_config, load_config
from services.eval_cmd import sample_seeds
from services.world import load_policy
from tests.samplers.test_sd3 import LATENT_ATOL
from tests.services.test_checkpoints import TOTALS, make_run, one_error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of a cat", "a red bicycle, studio light"]
SEEDS = [3, 7]
STEPS, CFG, SEQ = 4, 4.0, 16

SD3_RUN = """
run: {{name: lora, out_dir: {out}, iterations: 1, checkpoint_every: 1, progress: false}}
policy:
  kind: sd3
  pretrained: {tiny}
  resolution: 32
  dtype: float32
  device: cpu
  max_sequence_length: {seq}
  num_steps: {steps}
  shift: 3.0
  cfg_scale: {cfg}
  lora: {{rank: 4, alpha: 8.0, target_modules: [to_q, to_k, to_v, to_out.0]}}
rollout: {{prompts: {prompts}, samples_per_prompt: 2}}
reward:
  components: [{{kind: jpeg_compressibility}}]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "tiny", seed=0, resolution=32)


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory, tiny):
    """A finished tiny-SD3 LoRA run directory: config.yaml, checkpoints/, checkpoint/, summary
    and sample grid."""
    out = tmp_path_factory.mktemp("runs")
    (out / "lora.yaml").write_text(SD3_RUN.format(out=out, tiny=tiny, seq=SEQ, steps=STEPS, cfg=CFG,
                                                  prompts=json.dumps(PROMPTS)))
    cfg = load_config(out / "lora.yaml")
    run = out / "lora"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    parts = load_policy(cfg.policy)
    learner = Learner(parts.velocity, parts.encode, cfg.learner_settings())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in learner.policy.named_parameters():
            if is_adapter_key(name):
                param.add_(0.2 * torch.randn(param.shape, generator=g))
    learner.refresh_rollout()
    state = {"iteration": 1, "version": 0, "elapsed_s": 1.0, "totals": TOTALS}
    link_final_checkpoint(write_checkpoint(run, 1, state, learner.save, keep=1), run / "checkpoint")
    summary = {"before": {"reward": 0.25, "accuracy": None, "diversity": 0.5},
               "after": {"reward": 0.75, "accuracy": None, "diversity": 0.4}}
    (run / "summary.json").write_text(json.dumps(summary))
    Image.new("RGB", (16, 8), (200, 10, 10)).save(run / "samples_before_after.png")
    return run


def _trained_sampler(run, cfg_scale=CFG):
    """fmrl's sampler with the run's trained adapter on its base (as `fmrl eval` builds it)."""
    cfg = load_config(run / "config.yaml")
    parts = load_policy(cfg.policy)
    load_weights(parts.velocity, run / "checkpoint" / "policy.safetensors")
    return Sampler(parts.velocity, parts.encode, parts.decode, parts.latent_shape, num_steps=STEPS,
                   shift=cfg.policy.shift, cfg_scale=cfg_scale, keep_states=False)


def _diffusers(pipe, noise, output_type):
    return pipe(prompt=[p for p in PROMPTS for _ in range(2)], negative_prompt="", num_inference_steps=STEPS,
                guidance_scale=CFG, latents=noise.clone(), height=32, width=32, max_sequence_length=SEQ,
                output_type=output_type).images


def _lora_file(path):
    """(keys, metadata, tensors); the metadata's JSON parsed (safetensors orders it arbitrarily)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) if k == "lora_adapter_metadata" else v for k, v in f.metadata().items()}
        meta["lora_adapter_metadata"]["transformer.target_modules"].sort()  # a set, written in hash order
        return sorted(f.keys()), meta, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a mapping


def _assert_matches(pipe, traj):
    torch.testing.assert_close(_diffusers(pipe, traj.noise, "latent"), traj.samples, rtol=0, atol=LATENT_ATOL)
    u8 = (_diffusers(pipe, traj.noise, "np") * 255).round().astype(np.uint8)  # numpy_to_pil's rounding
    assert np.abs(u8.astype(int) - traj.images.astype(int)).max() <= 1


def test_exported_adapter_loads_in_diffusers_and_reproduces_fmrls_samples(sd3_run, tiny, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "adapter"
    assert main(["export", "--checkpoint", str(sd3_run), "--out", str(out)]) == 0
    assert "LoRA adapter" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", LORA_WEIGHTS_FILE, "samples_before_after.png"]
    (keys, meta, tensors), final = (_lora_file(d / LORA_WEIGHTS_FILE) for d in (out, sd3_run / "checkpoint"))
    # the run's final checkpoint/ holds the same adapter (what the user's load_lora_weights read)
    assert (keys, meta) == final[:2] and all(torch.equal(tensors[k], final[2][k]) for k in keys)
    assert keys and all(k.startswith("transformer.") and ".default." not in k for k in keys)
    lora = meta["lora_adapter_metadata"]
    assert lora["transformer.r"] == 4 and lora["transformer.lora_alpha"] == 8.0

    traj = _trained_sampler(sd3_run).rollout(PROMPTS, 2, SEEDS)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny))
    pipe.set_progress_bar_config(disable=True)
    base = _diffusers(pipe, traj.noise, "latent")
    pipe.load_lora_weights(str(out))  # diffusers' own loader, default weight name
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8.0
    _assert_matches(pipe, traj)
    # the adapter matters: without it diffusers draws something else (so this test can fail)
    assert (base - traj.samples).abs().max() > 1000 * LATENT_ATOL

    card = (out / "README.md").read_text()
    for needed in (str(tiny), "ac_flow", "jpeg_compressibility", PROMPTS[1], "| reward | 0.2500 | 0.7500 |",
                   "![Samples before (left) and after (right) training](samples_before_after.png)",
                   "pipe.load_lora_weights(", "tags:\n- fmrl"):
        assert needed in card, needed


def test_merged_pipeline_reproduces_fmrls_samples(sd3_run, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(sd3_run / "checkpoint"), "--out", str(out), "--merge"]) == 0
    assert "complete StableDiffusion3Pipeline" in capsys.readouterr().out
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert not any(is_adapter_key(k) for k in pipe.transformer.state_dict())  # fused, not carried
    _assert_matches(pipe, _trained_sampler(sd3_run).rollout(PROMPTS, 2, SEEDS))
    # a second export never writes into a directory that holds something
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(sd3_run), "--out", str(out)]) == 1
    assert "is not an empty directory" in one_error_line(capsys)


def test_digits_export_is_the_transformer_directory(tmp_path, small_policy, capsys):
    from diffusers import SD3Transformer2DModel

    run = make_run(tmp_path, small_policy)
    trained = load_velocity(run / "checkpoint" / "policy.safetensors").transformer.state_dict()
    # the final checkpoint/ carries it too
    assert (run / "checkpoint" / "transformer" / "config.json").is_file()
    out = tmp_path / "digits"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "transformer"]
    loaded = SD3Transformer2DModel.from_pretrained(str(out / "transformer")).state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert "all-MiniLM-L6-v2" in (out / "README.md").read_text()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m"), "--merge"]) == 1
    assert "a digits-world policy has none" in one_error_line(capsys) and not (tmp_path / "m").exists()


# ---- fmrl sample ------------------------------------------------------------------------------
def test_sample_loads_the_adapter_onto_its_base_and_writes_pngs(sd3_run, tmp_path, capsys):
    out = tmp_path / "pngs"
    assert main(["sample", "--checkpoint", str(sd3_run), "--prompt", PROMPTS[0], "-n", "2", "--seed", "5",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote 2 PNG images (32×32)" in captured.out
    assert not [x for x in captured.err.splitlines() if x.startswith("fmrl")]  # no digits warning for SD3
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["000-a-photo-of-a-cat-000.png", "000-a-photo-of-a-cat-001.png"]
    seed = sample_seeds(5, 1)
    # the run's sampler settings (steps, shift, CFG) and its trained adapter
    want = _trained_sampler(sd3_run).rollout([PROMPTS[0]], 2, seed).images
    for i, path in enumerate(files):
        with Image.open(path) as im:
            assert im.text["prompt"] == PROMPTS[0] and im.text["seed"] == str(seed[0])
            assert im.text["sample"] == str(i) and im.text["cfg_scale"] == "4" and im.text["steps"] == "4"
            assert np.array_equal(np.asarray(im.convert("RGB")), want[i])
    # an adapter on its own, outside its run, has no base to go onto: refused, naming the way out
    alone = tmp_path / "adapter.safetensors"
    shutil.copy(sd3_run / "checkpoint" / "policy.safetensors", alone)
    assert main(["sample", "--checkpoint", str(alone), "--prompt", "x", "--out", str(tmp_path / "a.npz")]) == 1
    assert "holds only a LoRA adapter and is in no run directory" in one_error_line(capsys)


def test_sample_warns_once_about_prompts_the_digits_world_does_not_know(tmp_path, capsys):
    policy = "samplers/assets/digits_policy.safetensors"
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", policy, "--prompt", "a handwritten seven", "--prompt", "a photo of a cat",
                 "--prompt", "7, written by hand", "-n", "1", "--out", str(out)]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fmrl")]
    assert len(warned) == 1 and warned[0].startswith("fmrl: warning: 'a photo of a cat' is outside what the digits "
                                                     "world knows"), warned
    with np.load(out) as f:
        assert f["images"].shape == (3, 8, 8, 1)
    assert main(["sample", "--checkpoint", policy, "--prompt", "the digit 3", "-n", "1",
                 "--out", str(tmp_path / "png")]) == 0
    assert not [x for x in capsys.readouterr().err.splitlines() if x.startswith("fmrl")]
    (png,) = (tmp_path / "png").iterdir()
    with Image.open(png) as im:
        assert im.size == (8, 8) and im.mode == "L" and im.text["prompt"] == "the digit 3"
