"""SD3 pipelines: our Sampler on a tiny random StableDiffusion3Pipeline against diffusers itself.

Tolerances: final latents agree with ``pipe(..., latents=noise)`` within 1e-5 (observed:
≤ 2e-6 on values of magnitude ≈ 4) and uint8 images within 1 level (observed: 0 or 1).
They are not bitwise equal for one measured float32 round-off reason: the text encoders'
outputs depend in their last bit on how prompts are batched (our encoder encodes each
distinct prompt once, diffusers encodes the batch as given, e.g. each prompt twice for two
samples, and ``[""] * B`` for the negative prompt); ``samplers.flow.sampling_sigmas`` are
the scheduler's sigmas bit for bit (tests/samplers/test_flow.py). Given the same
embeddings the two rollouts are identical,
and the decoder alone is bitwise diffusers' ``output_type="np"`` + ``numpy_to_pil``
rounding.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from samplers.sampler import Sampler
from samplers.sd3 import (
    SD3PromptEncoder,
    build_tiny_sd3_pipeline,
    latent_shape,
    load_sd3_pipeline,
    make_decoder,
    velocity_of,
)
from samplers.sde import recompute_log_probs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of a cat", "a red bicycle, studio light"]
SEEDS = [3, 7]
LATENT_ATOL = 1e-5  # see the module docstring
STEPS = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "tiny", seed=0, resolution=32)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_sd3_pipeline(str(tiny_dir))


def _sampler(pipe, cfg, **kw):
    encoder = SD3PromptEncoder(pipe)
    return Sampler(velocity_of(pipe), encoder.encode, make_decoder(pipe), latent_shape(pipe, 32),
                   num_steps=STEPS, shift=pipe.scheduler.config.shift, cfg_scale=cfg, keep_states=True, **kw)


def _diffusers(pipe, noise, cfg, output_type):
    neg = {"negative_prompt": ""} if cfg > 1.0 else {}  # diffusers guides only for guidance_scale > 1
    return pipe(prompt=[p for p in PROMPTS for _ in range(2)], num_inference_steps=STEPS, guidance_scale=cfg,
                latents=noise.clone(), height=32, width=32, output_type=output_type, **neg).images


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_rollout_matches_the_diffusers_pipeline(pipe, cfg):
    traj = _sampler(pipe, cfg).rollout(PROMPTS, 2, SEEDS)
    assert traj.states.shape == (4, STEPS + 1, 16, 8, 8) and traj.images.shape == (4, 32, 32, 3)
    assert traj.images.dtype == np.uint8
    latents = _diffusers(pipe, traj.noise, cfg, "latent")
    torch.testing.assert_close(traj.samples, latents, rtol=0, atol=LATENT_ATOL)
    images = _diffusers(pipe, traj.noise, cfg, "np")
    u8 = (images * 255).round().astype(np.uint8)  # VaeImageProcessor.numpy_to_pil's conversion
    assert np.abs(u8.astype(int) - traj.images.astype(int)).max() <= 1
    # the decoder alone is exact: diffusers' own final latents decode to its own images
    assert np.array_equal(make_decoder(pipe)(latents), u8)
    # and the samples are not trivial: the rollouts differ by seed and by prompt
    assert not torch.allclose(traj.samples[0], traj.samples[1]) and not torch.allclose(traj.samples[0],
                                                                                        traj.samples[2])


def test_same_embeddings_give_bitwise_the_pipelines_rollout(pipe):
    # the round-off source of the module docstring removed (our sigmas are the scheduler's bit
    # for bit, tests/samplers/test_flow.py): the rollout is the pipeline's
    sampler = _sampler(pipe, 4.0)
    traj = sampler.rollout(PROMPTS, 2, SEEDS)
    cond, uncond = sampler.encode(list(PROMPTS)).index(traj.prompt_ids), sampler.encode([""] * 4)
    latents = pipe(prompt_embeds=cond.tokens, pooled_prompt_embeds=cond.pooled,
                   negative_prompt_embeds=uncond.tokens, negative_pooled_prompt_embeds=uncond.pooled,
                   num_inference_steps=STEPS, guidance_scale=4.0, latents=traj.noise.clone(), height=32,
                   width=32, output_type="latent").images
    assert torch.equal(latents, traj.samples)


def test_cfg_uses_the_pipelines_negative_prompt(pipe):
    encoder = SD3PromptEncoder(pipe)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                                      do_classifier_free_guidance=True, negative_prompt="")
    ours, empty = encoder.encode(PROMPTS), encoder.encode(["", ""])
    # float32 round-off only: the text encoders batch ["", ""] here and [""] in our cache
    torch.testing.assert_close(ours.tokens, pos, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(empty.tokens, neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(empty.pooled, neg_pooled, rtol=0, atol=1e-6)
    # SD3's layout: 77 CLIP tokens (two CLIP widths, zero-padded to T5's) then 256 T5 tokens
    assert ours.tokens.shape == (2, 77 + 256, 96) and ours.pooled.shape == (2, 64)
    assert torch.all(ours.tokens[:, :77, 64:] == 0) and ours.tokens[:, 77:, 64:].abs().sum() > 0


def test_sde_log_probs_recompute_on_the_sd3_policy(pipe):
    sampler = _sampler(pipe, 1.0, kind="sde")
    traj = sampler.rollout(PROMPTS, 2, SEEDS)
    assert traj.log_probs is not None and traj.log_probs.shape == (4, STEPS)
    assert torch.isfinite(traj.log_probs).all()
    cond = sampler.encode(list(PROMPTS)).index(traj.prompt_ids)
    with torch.no_grad():
        again = recompute_log_probs(sampler.velocity, traj.states, traj.times, cond, a=sampler.sde_a)
    assert torch.equal(again, traj.log_probs)  # same inputs, same batch: bitwise the sampler's numbers
    # a different transition does not score the same
    moved = traj.states.clone()
    moved[:, 2:3] += 0.1
    with torch.no_grad():
        other = recompute_log_probs(sampler.velocity, moved, traj.times, cond, a=sampler.sde_a)
    assert (other[:, 1] < traj.log_probs[:, 1]).all()


def test_build_is_deterministic_and_encoding_round_trips(tiny_dir, pipe, tmp_path):
    again = build_tiny_sd3_pipeline(tmp_path / "again", seed=0)
    other = build_tiny_sd3_pipeline(tmp_path / "other", seed=1)
    for sub in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors",
                "tokenizer_3/tokenizer.json"):
        assert (again / sub).read_bytes() == (tiny_dir / sub).read_bytes()
    assert ((other / "transformer/diffusion_pytorch_model.safetensors").read_bytes()
            != (tiny_dir / "transformer/diffusion_pytorch_model.safetensors").read_bytes())
    size = sum(f.stat().st_size for f in tiny_dir.rglob("*") if f.is_file())
    assert size < 5e6
    assert json.loads((tiny_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert pipe.vae_scale_factor == 4 and pipe.scheduler.config.shift == 3.0
    assert pipe.vae.config.scaling_factor == 1.5305 and pipe.vae.config.shift_factor == 0.0609

    a, b = SD3PromptEncoder(pipe), SD3PromptEncoder(load_sd3_pipeline(str(again)))
    ea, eb = a.encode(["a cat", "", "a cat"]), b.encode(["a cat", "", "a cat"])
    assert torch.equal(ea.tokens, eb.tokens) and torch.equal(ea.pooled, eb.pooled)
    assert ea.tokens.dtype == torch.float32 and not ea.tokens.requires_grad
    assert torch.equal(ea.tokens[0], ea.tokens[2]) and not torch.equal(ea.tokens[0], ea.tokens[1])
    # the cache answers repeats with the very same values, without running the encoders
    cached = a._cache["a cat"][0]
    assert torch.equal(a.encode(["a cat"]).tokens[0], cached)
    assert all(not p.requires_grad for p in pipe.text_encoder_3.parameters())
    with pytest.raises(TypeError, match="list of prompts"):
        a.encode("a cat")  # type: ignore[arg-type]


def test_shapes_and_helpers(pipe):
    assert latent_shape(pipe, 32) == (16, 8, 8) and latent_shape(pipe, 64) == (16, 16, 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        latent_shape(pipe, 36)
    assert velocity_of(pipe).transformer is pipe.transformer
    images = make_decoder(pipe, max_batch=1)(torch.zeros(3, 16, 8, 8))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    whole = make_decoder(pipe)(torch.zeros(3, 16, 8, 8))
    assert np.abs(images.astype(int) - whole.astype(int)).max() <= 1  # batch-dependent conv round-off


def test_bad_paths_give_clear_errors(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no SD3 pipeline at .*nowhere: no such directory"):
        load_sd3_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"'fmrl-test/no-such-sd3'.*not in the Hugging Face cache"):
        load_sd3_pipeline("fmrl-test/no-such-sd3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers pipeline directory \\(no model_index.json\\)"):
        load_sd3_pipeline(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_sd3_pipeline(str(tmp_path / "file.bin"))
    flux = tmp_path / "flux"
    shutil.copytree(tiny_dir, flux)
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="holds a FluxPipeline, not a StableDiffusion3Pipeline"):
        load_sd3_pipeline(str(flux))
    with pytest.raises(FileExistsError, match="not empty and holds no pipeline"):
        build_tiny_sd3_pipeline(tmp_path)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_tiny_sd3_pipeline(tmp_path / "odd", resolution=20)


def test_a_hub_id_downloads_unless_the_user_set_hf_hub_offline(tmp_path, monkeypatch):
    """fmrl does not force HF_HUB_OFFLINE: a hub id asks the hub (here a stand-in for
    ``hf_hub_download``, nothing is downloaded) unless the user set it, and a local directory
    is read with ``local_files_only=True`` either way."""
    import diffusers
    import huggingface_hub
    from huggingface_hub import constants

    from samplers.sd3 import locate_sd3_pipeline

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(index)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, at import (conftest set it)
    assert locate_sd3_pipeline("some-org/some-sd3") == "some-org/some-sd3"
    assert asked == [("some-org/some-sd3", "model_index.json")]

    calls = []

    class FakePipe:
        def to(self, device):
            return self

        def set_progress_bar_config(self, **kwargs):
            pass

    def fake_from_pretrained(source, **kwargs):
        calls.append((source, kwargs["local_files_only"]))
        return FakePipe()

    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", fake_from_pretrained)
    load_sd3_pipeline("some-org/some-sd3")
    load_sd3_pipeline(str(tmp_path))
    assert calls == [("some-org/some-sd3", False), (str(tmp_path), True)]

    assert len(asked) == 2  # load_sd3_pipeline located the hub id first

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's choice: the cache only
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        locate_sd3_pipeline("some-org/some-sd3")
    assert len(asked) == 2


def test_cli_writes_a_loadable_pipeline(tmp_path, capsys):
    from services.cli import main

    out = tmp_path / "cli_tiny"
    assert main(["make-tiny-sd3", "--out", str(out), "--seed", "2", "--resolution", "16"]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and "latents 16×4×4" in printed and "SD3Transformer2DModel" in printed
    loaded = load_sd3_pipeline(str(out))
    assert latent_shape(loaded, 16) == (16, 4, 4)
    images = _sampler_images(loaded)
    assert images.shape == (1, 16, 16, 3)
    assert main(["make-tiny-sd3", "--out", str(tmp_path), "--seed", "2"]) == 1  # refuses a non-empty dir


def _sampler_images(pipe):
    encoder = SD3PromptEncoder(pipe, max_sequence_length=32)
    sampler = Sampler(velocity_of(pipe), encoder.encode, make_decoder(pipe), latent_shape(pipe, 16),
                      num_steps=2, shift=3.0)
    return sampler.rollout(["a cat"], 1, [0]).images
