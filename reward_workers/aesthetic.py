"""The LAION aesthetic predictor (v2): a linear MLP head on L2-normalised CLIP image embeddings.

The head's layout is that of ``improved-aesthetic-predictor``'s ``MLP.layers``:
Linear(d, 1024) → Dropout(0.2) → Linear(1024, 128) → Dropout(0.2) → Linear(128, 64) →
Dropout(0.1) → Linear(64, 16) → Linear(16, 1), with no activations, so its state-dict keys
are ``layers.{0,2,4,6,7}.{weight,bias}``. The sizes are read from the file, so a smaller
head of the same layout loads too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from reward_workers.base import RewardOutput, check_batch
from reward_workers.clip import ClipEncoder

LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
EXPECTED_KEYS = frozenset(f"layers.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias"))


class AestheticHead(nn.Module):
    """The predictor's MLP; ``sizes`` = (d, h1, h2, h3, h4, 1), the width of each layer edge."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        edges = iter(zip(sizes[:-1], sizes[1:], strict=True))
        for i in range(LINEAR_INDICES[-1] + 1):
            modules.append(nn.Linear(*next(edges)) if i in LINEAR_INDICES else nn.Dropout(DROPOUTS[i]))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """The head from a safetensors file, its sizes inferred from the weight shapes."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head weights not found: {path}")
    state = load_file(str(path))
    missing, extra = sorted(EXPECTED_KEYS - state.keys()), sorted(state.keys() - EXPECTED_KEYS)
    if missing or extra:
        raise ValueError(f"aesthetic head {path} does not have the LAION predictor layout: "
                         f"missing keys {missing}, unexpected keys {extra}")
    weights = [state[f"layers.{i}.weight"] for i in LINEAR_INDICES]
    for i, w in zip(LINEAR_INDICES, weights, strict=True):
        if w.ndim != 2 or state[f"layers.{i}.bias"].shape != (w.shape[0],):
            raise ValueError(f"aesthetic head {path}: layers.{i} has weight {tuple(w.shape)} and bias "
                             f"{tuple(state[f'layers.{i}.bias'].shape)}")
    chain = [(w.shape[1], w.shape[0]) for w in weights]
    if any(a[1] != b[0] for a, b in zip(chain[:-1], chain[1:], strict=True)) or chain[-1][1] != 1:
        raise ValueError(f"aesthetic head {path}: layer shapes (in, out) {chain} do not chain to one output")
    head = AestheticHead((chain[0][0], *(out for _, out in chain)))
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


def save_random_aesthetic_head(path: str | Path, embed_dim: int, seed: int = 0,
                               hidden: tuple[int, int, int, int] = (64, 32, 16, 8)) -> Path:
    """Write a randomly initialised head of the predictor's layout (the real one has
    hidden = (1024, 128, 64, 16)). Same seed, same weights."""
    from safetensors.torch import save_file

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead((embed_dim, *hidden, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


class AestheticReward:
    """Reward = the LAION aesthetic predictor's score of the image (the prompt is not used;
    on the real predictor ≈ 1–10)."""

    name = "aesthetic"

    def __init__(self, clip_path: str | Path, head_path: str | Path,
                 device: str | torch.device = "cpu") -> None:
        self.encoder = ClipEncoder(clip_path, device)
        self.head = load_aesthetic_head(head_path).to(self.encoder.device)
        d_head, d_clip = self.head.layers[0].in_features, self.encoder.projection_dim
        if d_head != d_clip:
            raise ValueError(f"aesthetic head {head_path} takes {d_head}-dim embeddings but the CLIP "
                             f"model at {clip_path} projects to {d_clip}")

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        with torch.no_grad():
            scores = self.head(self.encoder.embed_images(images)).squeeze(-1)
        return RewardOutput(scores=scores.double().cpu().numpy())
