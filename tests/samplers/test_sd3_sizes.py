"""Random SD3 pipelines of two sizes (``fmrl make-random-sd3``): tiny, and SD3.5-medium's.

The medium pipeline is ~5 GB, so it is not written here: its transformer and VAE are built
on the meta device (configs and shapes only) and its small text encoders for real, which
is what its compatibility with the transformer depends on. A GPU check writes and runs the
whole thing (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from samplers.sd3 import (
    MEDIUM_TEXT,
    SD3_VAE,
    SD35_MEDIUM,
    SD3PromptEncoder,
    build_tiny_sd3_pipeline,
    latent_shape,
    load_sd3_pipeline,
    random_sd3_components,
    random_sd3_spec,
)
from services.cli import main as fmrl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plain(value):  # a config read back from JSON has lists where the arguments had tuples
    return list(value) if isinstance(value, tuple) else value


def _digests(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*.safetensors"))}


def test_cli_tiny_is_make_tiny_sd3(tmp_path, capsys):
    assert fmrl(["make-random-sd3", "--size", "tiny", "--out", str(tmp_path / "random"), "--seed", "3"]) == 0
    assert "wrote a tiny random StableDiffusion3Pipeline (seed 3; 32×32" in capsys.readouterr().out
    pipe = load_sd3_pipeline(str(tmp_path / "random"))
    assert latent_shape(pipe, 32) == (16, 8, 8)
    same = build_tiny_sd3_pipeline(tmp_path / "tiny", seed=3)
    assert _digests(tmp_path / "random") == _digests(same)  # the same weights, file for file
    assert len(_digests(same)) == 5  # transformer, VAE and three text encoders


def test_cli_refuses_a_resolution_for_medium(tmp_path, capsys):
    assert fmrl(["make-random-sd3", "--size", "medium", "--out", str(tmp_path / "m"), "--resolution", "64"]) == 1
    assert "--resolution sizes the tiny pipeline only" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="unknown pipeline size 'large'; valid: tiny, medium"):
        random_sd3_spec("large")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def medium():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**random_sd3_components("medium", seed=0, meta=True))


def test_medium_transformer_and_vae_configs(medium):
    tcfg = medium.transformer.config
    assert {k: _plain(tcfg[k]) for k in SD35_MEDIUM} == {k: _plain(v) for k, v in SD35_MEDIUM.items()}
    assert medium.transformer.device.type == "meta"  # no memory spent on 2.2 B parameters
    assert sum(p.numel() for p in medium.transformer.parameters()) == 2_243_171_520
    v = medium.vae.config
    assert list(v.block_out_channels) == [128, 256, 512, 512]
    assert (v.latent_channels, v.layers_per_block, v.sample_size, v.norm_num_groups) == (16, 2, 1024, 32)
    assert (v.scaling_factor, v.shift_factor) == (1.5305, 0.0609)
    assert (v.use_quant_conv, v.use_post_quant_conv) == (False, False)
    assert {k: _plain(v[k]) for k in SD3_VAE} == {k: _plain(x) for k, x in SD3_VAE.items()}
    assert medium.vae_scale_factor == 8
    assert latent_shape(medium, 512) == (16, 64, 64)


def test_medium_text_encoders_fit_the_transformer(medium):
    tcfg = medium.transformer.config
    hidden = [medium.text_encoder.config.hidden_size, medium.text_encoder_2.config.hidden_size]
    projection = [medium.text_encoder.config.projection_dim, medium.text_encoder_2.config.projection_dim]
    assert sum(hidden) <= tcfg.joint_attention_dim == medium.text_encoder_3.config.d_model == 4096
    assert sum(projection) == tcfg.pooled_projection_dim == 2048
    assert list(MEDIUM_TEXT.clip_projection) == projection
    small = sum(p.numel() for enc in (medium.text_encoder, medium.text_encoder_2, medium.text_encoder_3)
                for p in enc.parameters())
    assert small < 3_000_000  # MB, not SD3's ~10 GB of CLIP-L, CLIP-G and T5-XXL
    emb = SD3PromptEncoder(medium, max_sequence_length=256).encode(["a photo of a cat", ""])
    assert emb.tokens.shape == (2, 77 + 256, 4096)  # what the transformer's context_embedder takes
    assert emb.pooled.shape == (2, 2048)  # what its pooled-text embedder takes
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    # the two CLIPs' tokens side by side, zero-padded to T5's width: the padding is exact zeros
    assert torch.count_nonzero(emb.tokens[:, :77, sum(hidden):]) == 0
    assert torch.count_nonzero(emb.tokens[:, :77, :sum(hidden)]) > 0
