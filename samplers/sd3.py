"""Stable Diffusion 3 pipelines in the project's terms: encoder, decoder, velocity, latents.

A diffusers ``StableDiffusion3Pipeline`` (a real one, or the tiny random one that
``build_tiny_sd3_pipeline`` writes for tests and offline work) supplies the four
pieces a ``samplers.sampler.Sampler`` needs:

- ``SD3PromptEncoder(pipe).encode``: prompts → ``PromptEmbeddings`` exactly as
  ``pipe.encode_prompt`` makes them (tokens = ``prompt_embeds``: the two CLIPs'
  penultimate hidden states side by side, zero-padded to T5's width, followed by T5's
  last hidden states; pooled = the two CLIP projections side by side). The pipeline
  builds its negative embeddings for ``negative_prompt=""`` through the same functions
  (``clip_skip=None``), so ``encode([""])`` is the pipeline's unconditional prompt;
- ``make_decoder(pipe)``: final latents → uint8 images, the pipeline's
  ``output_type="np"`` post-processing followed by ``numpy_to_pil``'s rounding;
- ``velocity_of(pipe)``: the pipeline's transformer as an ``SD3Velocity``;
- ``latent_shape(pipe, resolution)``: the (C, h, w) of one latent.

Equivalence with diffusers (tests/samplers/test_sd3.py): with the same initial noise,
our Euler rollout reproduces ``pipe(..., latents=noise)`` on the tiny pipeline, with and
without CFG, to float32 round-off: final latents within 1e-5 absolute (observed ≤ 4e-6
on values of magnitude ≈ 4, CFG scale up to 7) and uint8 images within 1 level (a
latent a few ulps away can move a pixel across a rounding boundary). Not bitwise, for
one measured reason: the text encoders' last bits depend on how prompts are batched (we
encode each distinct prompt once, diffusers the batch as given); our sampling sigmas are
the scheduler's bit for bit. Given the same embeddings the two rollouts are bitwise equal, and
``make_decoder`` is bitwise the pipeline's ``output_type="np"`` + ``numpy_to_pil``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from samplers.policy import SD3Velocity
from samplers.text import CachedPromptEncoder

PIPELINE_CLASS = "StableDiffusion3Pipeline"

# Tiny pipeline sizes. SD3 itself: CLIP-L (768) + CLIP-G (1280) padded up to T5-XXL's
# 4096, pooled 768 + 1280 = 2048, 16 latent channels, VAE scale factor 8.
CLIP_HIDDEN = 32
CLIP_PROJECTION = 32
CLIP_MAX_TOKENS = 77  # CLIP's context; the pipeline's tokenizer_max_length
T5_D_MODEL = 96  # > 2·CLIP_HIDDEN, so the CLIP part of the tokens is really zero-padded
LATENT_CHANNELS = 16
VAE_BLOCKS = (16, 32, 32)  # three levels: a VAE scale factor of 4
SD3_VAE_SCALING_FACTOR = 1.5305  # SD3's VAE config
SD3_VAE_SHIFT_FACTOR = 0.0609
SCHEDULER_SHIFT = 3.0  # SD3-medium's scheduler

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BOS, _EOS, _EOW = "<|startoftext|>", "<|endoftext|>", "</w>"


# ---------------------------------------------------------------------------- tokenizers

def _clip_tokenizer(pad_token: str):
    """CLIP's byte-level BPE with no merges: every byte symbol and its ``</w>`` form.

    The approach of ``reward_workers.digits_clip.build_tokenizer`` without its learnt
    merges (the import arrows keep samplers from importing reward_workers): any text
    tokenises, a word being one token per byte, so there is never an unknown token.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = [*alphabet, *(c + _EOW for c in alphabet), _BOS, _EOS]
    return CLIPTokenizer(vocab={s: i for i, s in enumerate(vocab)}, merges=[], pad_token=pad_token,
                         model_max_length=CLIP_MAX_TOKENS)


def _t5_tokenizer():
    """A T5 (SentencePiece-style Unigram) tokenizer over printable ASCII, built in memory.

    Pieces: T5's <pad> = 0, </s> = 1, <unk> = 2, the word boundary ``▁``, every printable
    non-space ASCII character, and ``▁`` + each letter or digit; all of equal score, so
    a word becomes its first letter with ``▁`` and then single characters. Other
    characters map to <unk>. No sentinel (<extra_id_*>) tokens.
    """
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    pieces = ["▁", *chars, *("▁" + c for c in string.ascii_letters + string.digits)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((p, -1.0) for p in pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


# ---------------------------------------------------------------------------- building

@contextmanager
def _quiet_progress() -> Iterator[None]:
    """diffusers' and transformers' load/save progress bars off for the block, then as before."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


# SD3.5-medium's transformer (diffusers' SD3Transformer2DModel arguments). From the installed
# diffusers: the signature's comment gives dual_attention_layers (0..12) for SD3.5, and the
# single-file loader recognises an SD3.5-medium checkpoint by a pos_embed of 147456 = 384²
# positions and adaLN rows of 9216 = 6·1536 (24 heads × 64). num_layers 24, qk_norm rms_norm
# and caption_projection_dim 1536 are the published model config.
SD35_MEDIUM: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
# SD3's (and SD3.5's) VAE: the published vae/config.json of both pipelines
SD3_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "latent_channels": LATENT_CHANNELS, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": SD3_VAE_SCALING_FACTOR, "shift_factor": SD3_VAE_SHIFT_FACTOR, "force_upcast": True,
    "use_quant_conv": False, "use_post_quant_conv": False, "act_fn": "silu",
}

RandomSize = Literal["tiny", "medium"]
RANDOM_SIZES: tuple[str, ...] = get_args(RandomSize)


@dataclass(frozen=True)
class TextSizes:
    """The three text encoders of a random pipeline. What the transformer needs of them:
    the two CLIPs' hidden sizes together at most T5's width (the pipeline zero-pads them to
    it), their projections together ``pooled_projection_dim``, T5's width ``joint_attention_dim``."""

    clip_hidden: tuple[int, int]
    clip_projection: tuple[int, int]
    clip_layers: int  # at least 2: the pipeline reads the penultimate hidden state
    clip_heads: int
    t5_d_model: int
    t5_d_kv: int
    t5_d_ff: int
    t5_layers: int
    t5_heads: int


TINY_TEXT = TextSizes(clip_hidden=(CLIP_HIDDEN, CLIP_HIDDEN), clip_projection=(CLIP_PROJECTION, CLIP_PROJECTION),
                      clip_layers=2, clip_heads=4, t5_d_model=T5_D_MODEL, t5_d_kv=16, t5_d_ff=2 * T5_D_MODEL,
                      t5_layers=2, t5_heads=4)
# SD3's widths where the transformer sees them (CLIP-L 768 + CLIP-G 1280 projections, T5-XXL's
# 4096), toy sizes everywhere else: a few MB of text encoders instead of ~10 GB
MEDIUM_TEXT = TextSizes(clip_hidden=(64, 64), clip_projection=(768, 1280), clip_layers=2, clip_heads=4,
                        t5_d_model=SD35_MEDIUM["joint_attention_dim"], t5_d_kv=16, t5_d_ff=64, t5_layers=1,
                        t5_heads=2)


def _tiny_models(resolution: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tiny pipeline's transformer and VAE arguments for resolution × resolution images."""
    vae_scale = 2 ** (len(VAE_BLOCKS) - 1)
    patch = 2
    if resolution < 1 or resolution % (vae_scale * patch):
        raise ValueError(f"resolution must be a positive multiple of {vae_scale * patch} "
                         f"(VAE scale factor {vae_scale} × patch size {patch}), got {resolution}")
    sample_size = resolution // vae_scale
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
               up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS), block_out_channels=VAE_BLOCKS,
               layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=resolution,
               scaling_factor=SD3_VAE_SCALING_FACTOR, shift_factor=SD3_VAE_SHIFT_FACTOR,
               use_quant_conv=False, use_post_quant_conv=False)
    transformer = dict(sample_size=sample_size, patch_size=patch, in_channels=LATENT_CHANNELS,
                       out_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                       joint_attention_dim=T5_D_MODEL, caption_projection_dim=32,
                       pooled_projection_dim=2 * CLIP_PROJECTION, pos_embed_max_size=2 * sample_size // patch)
    return transformer, vae


def random_sd3_spec(size: RandomSize, resolution: int = 32) -> tuple[dict[str, Any], dict[str, Any], TextSizes]:
    """(transformer arguments, VAE arguments, text-encoder sizes) of a random pipeline.

    tiny: toy sizes for resolution × resolution images (VAE scale factor 4). medium:
    SD3.5-medium's transformer (``SD35_MEDIUM``) and SD3's VAE (``SD3_VAE``, scale factor 8)
    with small text encoders of SD3's output widths (``MEDIUM_TEXT``); ``resolution`` does not
    apply (any multiple of 16 px renders, 1024 px being the model's native size)."""
    if size == "tiny":
        return (*_tiny_models(resolution), TINY_TEXT)
    if size == "medium":
        return dict(SD35_MEDIUM), dict(SD3_VAE), MEDIUM_TEXT
    raise ValueError(f"unknown pipeline size {size!r}; valid: {', '.join(RANDOM_SIZES)}")


def _text_encoders(text: TextSizes, tokenizers: tuple) -> tuple[Any, Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(tok, hidden: int, projection: int) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
            projection_dim=projection, num_hidden_layers=text.clip_layers, num_attention_heads=text.clip_heads,
            max_position_embeddings=CLIP_MAX_TOKENS, hidden_act="gelu", bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return CLIPTextModelWithProjection(config)

    tokenizer, tokenizer_2, tokenizer_3 = tokenizers
    text_encoder = clip(tokenizer, text.clip_hidden[0], text.clip_projection[0])
    text_encoder_2 = clip(tokenizer_2, text.clip_hidden[1], text.clip_projection[1])
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=text.t5_d_model, d_kv=text.t5_d_kv, d_ff=text.t5_d_ff,
        num_layers=text.t5_layers, num_heads=text.t5_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
        decoder_start_token_id=tokenizer_3.pad_token_id))
    return text_encoder, text_encoder_2, text_encoder_3


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    was = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(was)


def random_sd3_components(size: RandomSize, seed: int, resolution: int = 32, dtype: torch.dtype = torch.float32,
                          meta: bool = False) -> dict[str, Any]:
    """A random ``StableDiffusion3Pipeline``'s components (``random_sd3_spec``'s sizes), in eval mode.

    Weights are initialised in ``dtype`` (bf16 halves the medium transformer's 2.5 B
    parameters to ~5 GB of RAM); the same seed gives the same weights. ``meta``: the
    transformer and the VAE on the meta device (their configs and shapes, no memory);
    the text encoders, tokenizers and scheduler are always real."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer_args, vae_args, text = random_sd3_spec(size, resolution)
    tokenizers = _clip_tokenizer(_EOS), _clip_tokenizer("!"), _t5_tokenizer()
    big = torch.device("meta") if meta else contextlib.nullcontext()
    # the order of construction is the order of random draws: keep it, or a seed's weights change
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
        torch.manual_seed(seed)
        text_encoder, text_encoder_2, text_encoder_3 = _text_encoders(text, tokenizers)
        with big:
            vae = AutoencoderKL(**vae_args)
            transformer = SD3Transformer2DModel(**transformer_args)
    for model in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        model.eval()
    return dict(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizers[0], text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizers[1], text_encoder_3=text_encoder_3, tokenizer_3=tokenizers[2],
    )


def _tiny_components(seed: int, resolution: int) -> dict[str, Any]:
    return random_sd3_components("tiny", seed, resolution)


def build_random_sd3_pipeline(out_dir: str | Path, size: RandomSize = "tiny", seed: int = 0,
                              resolution: int = 32) -> Path:
    """Write a random, complete ``StableDiffusion3Pipeline`` of ``size`` to ``out_dir``; returns it.

    tiny (float32, kB–MB): see :func:`build_tiny_sd3_pipeline`. medium (bfloat16, ~5 GB):
    SD3.5-medium's transformer (2.5 B parameters) and SD3's VAE with random weights, and
    text encoders of SD3's output widths at toy depth — for timing and memory, not images.
    An existing ``out_dir`` must be empty or hold a pipeline (which is overwritten)."""
    from diffusers import StableDiffusion3Pipeline

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no pipeline (no model_index.json); "
                              "give a new or empty directory")
    random_sd3_spec(size, resolution)  # a bad size or resolution fails before any weights are drawn
    dtype = torch.bfloat16 if size == "medium" else torch.float32
    pipe = StableDiffusion3Pipeline(**random_sd3_components(size, seed, resolution, dtype))
    with _quiet_progress():
        pipe.save_pretrained(out)
    return out


def build_tiny_sd3_pipeline(out_dir: str | Path, seed: int = 0, resolution: int = 32) -> Path:
    """Write a tiny random, complete ``StableDiffusion3Pipeline`` to ``out_dir``; returns it.

    Every component is SD3's class at toy size, built from a random config (nothing is
    downloaded): a 2-layer ``SD3Transformer2DModel`` on 16-channel latents, an
    ``AutoencoderKL`` with a scale factor of 4 and SD3's scaling/shift factors (images
    resolution × resolution RGB, latents (16, resolution/4, resolution/4)), two 2-layer
    ``CLIPTextModelWithProjection`` (hidden 32, projection 32), a 2-layer
    ``T5EncoderModel`` (d_model 96), SD3's ``FlowMatchEulerDiscreteScheduler(shift=3)``
    and tokenizers built in memory. The same seed gives the same weights. An existing
    ``out_dir`` must be empty or hold a pipeline (which is overwritten).
    """
    return build_random_sd3_pipeline(out_dir, "tiny", seed, resolution)


# ---------------------------------------------------------------------------- loading

def _check_model_index(index_file: Path, where: str) -> None:
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: unreadable model_index.json ({exc})") from exc
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls != PIPELINE_CLASS:
        raise ValueError(f"{where} holds a {cls or 'pipeline of unknown class'}, not a {PIPELINE_CLASS}")


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def locate_sd3_pipeline(path: str | Path) -> str:
    """Where ``from_pretrained`` will read an SD3 pipeline from, checked without loading it:
    a local directory, or a hub id that is cached (offline) or reachable.

    Raises FileNotFoundError for a path that is neither a directory nor a cached hub
    model (with ``HF_HUB_OFFLINE=1`` nothing is downloaded), ValueError for a directory
    that is not an SD3 pipeline (no model_index.json, or another pipeline class).
    """
    where = str(path)
    local = Path(path).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{local} is not a diffusers pipeline directory (no model_index.json); "
                             "make a tiny one with `fmrl make-tiny-sd3 --out DIR`")
        _check_model_index(index, str(local))
        return str(local)
    if local.exists():
        raise ValueError(f"{local} is a file; an SD3 pipeline is a directory with a model_index.json")
    if isinstance(path, str) and _HUB_ID.match(path):
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        if _hub_offline():
            cached = try_to_load_from_cache(path, "model_index.json")
            if not isinstance(cached, str):
                raise FileNotFoundError(
                    f"no SD3 pipeline at {path!r}: not a local directory, and not in the Hugging Face cache "
                    "(HF_HUB_OFFLINE=1, so nothing is downloaded)")
        else:
            try:
                cached = hf_hub_download(path, "model_index.json")
            except Exception as exc:  # network, auth, or unknown repo: all mean "cannot load"
                raise FileNotFoundError(f"no SD3 pipeline at {path!r}: not a local directory, and the hub "
                                        f"gives no model_index.json ({type(exc).__name__}: {exc})") from exc
        _check_model_index(Path(cached), path)
        return path
    raise FileNotFoundError(f"no SD3 pipeline at {where}: no such directory")


def load_sd3_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A ``StableDiffusion3Pipeline`` from a local directory (or, where a hub is
    reachable or the model is cached, a hub id), in ``dtype`` on ``device``; the source is
    checked first (:func:`locate_sd3_pipeline`, whose errors it raises)."""
    from diffusers import StableDiffusion3Pipeline

    source = locate_sd3_pipeline(path)
    with _quiet_progress():
        # a local directory never asks the hub; a hub id follows the user's HF_HUB_OFFLINE
        pipe = StableDiffusion3Pipeline.from_pretrained(source, dtype=dtype,
                                                        local_files_only=Path(source).is_dir())
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- the sampler's pieces

class SD3PromptEncoder(CachedPromptEncoder):
    """Prompt strings → ``PromptEmbeddings`` as ``pipe.encode_prompt`` computes them.

    tokens: (B, 77 + max_sequence_length, T5 width), the pipeline's ``prompt_embeds``;
    pooled: (B, 2 CLIP projection widths), its ``pooled_prompt_embeds``. Each distinct
    prompt is encoded once (no grad, text encoders frozen) and cached as float32 on the
    CPU; ``encode`` returns those CPU tensors (``SD3Velocity`` moves them to the
    transformer's device and dtype; the learner's critic stays on the CPU). ``""`` is the
    pipeline's negative prompt for ``negative_prompt=""``, i.e. the unconditional prompt of CFG.
    """

    def __init__(self, pipe, max_sequence_length: int = 256) -> None:
        super().__init__()
        if not 1 <= max_sequence_length <= 512:  # the pipeline's own limit
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if enc is not None:
                enc.eval().requires_grad_(False)

    def _text_device(self) -> torch.device:
        for enc in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3):
            if enc is not None:
                return enc.device
        return self.pipe.transformer.device

    @torch.no_grad()
    def _encode_new(self, prompts: list[str]) -> None:
        tokens, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self._text_device(),
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        for i, p in enumerate(prompts):
            self._cache[p] = (tokens[i].float().cpu(), pooled[i].float().cpu())


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of one latent for resolution × resolution images: C the transformer's
    input channels, h = w = resolution / the VAE scale factor (as ``prepare_latents``)."""
    multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if resolution < 1 or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple} (VAE scale factor "
                         f"{pipe.vae_scale_factor} × patch size {pipe.transformer.config.patch_size}), "
                         f"got {resolution}")
    side = resolution // pipe.vae_scale_factor
    return (int(pipe.transformer.config.in_channels), side, side)


def make_decoder(pipe, max_batch: int | None = None) -> Callable[[torch.Tensor], np.ndarray]:
    """Final latents (B, C, h, w) → uint8 images (B, H, W, 3), as the pipeline decodes.

    latents / scaling_factor + shift_factor (in float32, then cast to the VAE's dtype and
    device) → ``vae.decode`` → ``image_processor.postprocess(output_type="np")`` (float
    in [0, 1]) → ``(x * 255).round().astype(uint8)``, the rounding of
    ``VaeImageProcessor.numpy_to_pil`` (numpy's round half to even). With ``max_batch``
    it decodes that many latents at a time, bounding the VAE's memory; the VAE works per
    sample, but its convolutions' float32 round-off depends on the batch, so a pixel may
    then differ by one level from decoding the batch whole as the pipeline does.
    """
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    vae = pipe.vae

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> np.ndarray:
        if latents.ndim != 4:
            raise ValueError(f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}")
        out = []
        for chunk in latents.split(max_batch or max(1, len(latents))):
            x = chunk.detach().float() / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            image = vae.decode(x.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
            out.append(pipe.image_processor.postprocess(image, output_type="np"))
        return (np.concatenate(out) * 255).round().astype(np.uint8)

    return decode


def velocity_of(pipe) -> SD3Velocity:
    """The pipeline's transformer as an ``SD3Velocity`` (shared, not copied: training
    the velocity trains ``pipe.transformer``)."""
    return SD3Velocity(pipe.transformer)
