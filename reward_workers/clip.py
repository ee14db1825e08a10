"""CLIP-based rewards: prompt–image alignment (CLIPScore) and a PickScore-style preference.

Both load a transformers ``CLIPModel`` and ``CLIPProcessor`` from one local directory
(never the Hub) and compare L2-normalised image and text embeddings of the image's own
prompt. :func:`save_random_clip` writes a tiny random model of the same layout, so tests
and benchmarks run the real loading code without downloaded weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from reward_workers.base import RewardOutput, check_batch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def check_model_dir(path: str | Path, what: str = "CLIP model") -> Path:
    """``path`` as a Path if it is a directory holding ``config.json``; else a FileNotFoundError."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} directory {path} has no config.json")
    return path


def _pooled(features: torch.Tensor | object) -> torch.Tensor:
    """The projected embedding: older transformers return a tensor, newer an output object."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def as_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) or (N, H, W, 3) uint8 → (N, H, W, 3); grey is repeated into each channel."""
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"CLIP rewards take 1 or 3 channels, got images of shape {images.shape}")
    return images


class ClipEncoder:
    """A CLIP model and its processor from a local directory, in eval mode, without gradients.

    ``embed_images`` / ``embed_texts`` return L2-normalised (N, D) float32 embeddings, D the
    model's projection dim.
    """

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = check_model_dir(model_path)
        self._wrap(CLIPModel.from_pretrained(path, local_files_only=True),
                   CLIPProcessor.from_pretrained(path, local_files_only=True), device)

    @classmethod
    def from_model(cls, model: torch.nn.Module, processor: object, device: str | torch.device = "cpu") -> ClipEncoder:
        """An encoder around a model already in memory (e.g. one being trained)."""
        enc = cls.__new__(cls)
        enc._wrap(model, processor, device)
        return enc

    def _wrap(self, model: torch.nn.Module, processor: object, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)
        self.projection_dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 1|3) → (N, D) unit vectors."""
        rgb = as_rgb(images)
        pixels = self.processor(images=list(rgb), input_data_format="channels_last",
                                return_tensors="pt")["pixel_values"]
        emb = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """N strings → (N, D) unit vectors; prompts longer than the model's context are truncated."""
        tokens = self.processor(text=texts, padding=True, truncation=True,
                                max_length=self.max_text_len, return_tensors="pt")
        emb = _pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                   attention_mask=tokens["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def cosine(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """(N,) cos(image i, prompt i); each distinct prompt is encoded once."""
        index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        text = self.embed_texts(list(index))[torch.tensor([index[p] for p in prompts])]
        return (self.embed_images(images) * text).sum(-1)


class CLIPScoreReward:
    """Reward = cos(CLIP image embedding, CLIP text embedding of the image's own prompt).

    CLIPScore (Hessel et al. 2021, eq. 1) is 2.5·max(cos, 0); we return the raw cosine in
    [-1, 1], since the clip at zero would tie every image below it, and the factor 2.5 is a plain
    rescaling. ``details["cosine"]`` repeats it.
    """

    name = "clip"

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu") -> None:
        self.encoder = ClipEncoder(model_path, device)

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        cos = self.encoder.cosine(images, prompts).double().cpu().numpy()
        return RewardOutput(scores=cos, details={"cosine": cos.copy()})


class PreferenceReward:
    """A PickScore-style preference model (Kirstain et al. 2023): a CLIP fine-tuned on human
    preferences, scoring exp(logit_scale)·cos(image, prompt), as PickScore's reference code.

    ``details["cosine"]`` is the cosine before scaling. The directory must hold both the
    model and its processor (PickScore_v1 ships its processor in another repository:
    copy it in).
    """

    name = "pickscore"

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu") -> None:
        self.encoder = ClipEncoder(model_path, device)
        self.scale = float(self.encoder.model.logit_scale.detach().exp())

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        cos = self.encoder.cosine(images, prompts).double().cpu().numpy()
        return RewardOutput(scores=self.scale * cos, details={"cosine": cos})


def _byte_level_tokenizer(max_len: int) -> CLIPTokenizer:
    """A CLIPTokenizer over the 256 byte-level symbols with no merges: every prompt
    tokenises (one token per byte), built in memory."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    # CLIP's BPE marks the last symbol of a word with "</w>", so each symbol comes twice
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def save_random_clip(directory: str | Path, seed: int = 0, image_size: int = 16, patch_size: int = 4,
                     hidden_size: int = 32, layers: int = 2, projection_dim: int = 16,
                     max_text_len: int = 32) -> Path:
    """Write a tiny randomly initialised CLIPModel with its CLIPProcessor to ``directory``.

    Same seed, same weights. The image processor resizes and crops to ``image_size`` and
    normalises with CLIP's mean and std, as the real one does at 224.
    """
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    directory = Path(directory)
    tokenizer = _byte_level_tokenizer(max_text_len)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=2)
    text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=max_text_len,
                          bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                          eos_token_id=eos, pad_token_id=eos, **common)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, num_channels=3, **common)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory
