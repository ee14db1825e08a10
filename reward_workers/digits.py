"""The digits world's rewards: a CNN classifier (the reward) and an SVM (evaluation only).

Both are trained on the fixed train part of scikit-learn's bundled digits and judged
on the held-out part. The CNN's probability of the prompted digit is the reward; the
RBF-kernel SVM is a model of another family, never seen by training, used to check
that a gain is real and not an exploit of the reward model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reward_workers.base import RewardOutput, check_batch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER_FILE = ASSETS / "digits_classifier.safetensors"


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed split. images: (N, 8, 8) uint8 in 0–255; labels: (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    heldout_images: np.ndarray
    heldout_labels: np.ndarray


def load_split() -> DigitsSplit:
    """scikit-learn's 1,797 digits, stratified 80/20 with a fixed seed (1,437 / 360)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images / 16.0 * 255.0).astype(np.uint8)
    xtr, xte, ytr, yte = train_test_split(
        images, d.target.astype(np.int64), test_size=HELDOUT_FRACTION,
        random_state=SPLIT_SEED, stratify=d.target,
    )
    return DigitsSplit(xtr, ytr, xte, yte)


_WORD_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b")


def prompt_digit(prompt: str) -> int:
    """The digit a prompt asks for ("a handwritten seven" → 7); exactly one must be named."""
    found = {m if len(m) == 1 and m.isdigit() else str(DIGIT_WORDS.index(m))
             for m in _WORD_RE.findall(prompt.lower())}
    if len(found) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one digit (zero … nine or 0 … 9)")
    return int(found.pop())


def _as_gray(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8, 1) or (N, 8, 8, 3) uint8 → (N, 8, 8) float32 in [0, 1]."""
    if images.shape[1:3] != (8, 8):
        raise ValueError(f"digits rewards take 8×8 images, got {images.shape}")
    x = images.astype(np.float32) / 255.0
    return x.mean(-1)


class DigitsCNN(nn.Module):
    """A small convolutional classifier on 8×8 inputs in [0, 1]; ≈90 k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 64), nn.GELU(),
                                  nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


def _shift_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random ±1 pixel translations; handwritten digits are not always centred."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(1, 2))


def train_classifier(split: DigitsSplit, epochs: int = 60, seed: int = 0) -> tuple[DigitsCNN, float]:
    """Train the reward CNN on the train part; returns it with its held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x = torch.from_numpy(split.train_images.astype(np.float32) / 255.0)
    y = torch.from_numpy(split.train_labels)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 63) // 64))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(_shift_augment(x[idx], g)), y[idx], label_smoothing=0.02)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, heldout_accuracy(lambda im: classifier_probs(model, im).argmax(1), split)


def classifier_probs(model: DigitsCNN, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, 10) for uint8 images (N, 8, 8) or (N, 8, 8, C)."""
    x = images.astype(np.float32) / 255.0 if images.ndim == 3 else _as_gray(images)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).double().numpy()


def heldout_accuracy(predict, split: DigitsSplit) -> float:  # noqa: ANN001 - any (N,8,8)->(N,) callable
    pred = np.asarray(predict(split.heldout_images))
    return float((pred == split.heldout_labels).mean())


def save_classifier(model: DigitsCNN, path: Path = CLASSIFIER_FILE) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path = CLASSIFIER_FILE) -> DigitsCNN:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"digits classifier weights not found at {path}; "
                                "make them with `fmrl train-classifier`")
    model = DigitsCNN()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


class DigitsClassifierReward:
    """Reward = the CNN's probability of the digit the prompt names.

    details: ``pred`` (argmax class) and ``correct`` (pred equals the prompted digit).
    """

    name = "digits_classifier"

    def __init__(self, path: Path | str = CLASSIFIER_FILE) -> None:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.model = load_classifier(Path(path))

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        target = np.array([prompt_digit(p) for p in prompts], dtype=np.int64)
        probs = classifier_probs(self.model, images)
        pred = probs.argmax(1)
        return RewardOutput(
            scores=probs[np.arange(len(target)), target],
            details={"pred": pred, "correct": (pred == target).astype(np.float64)},
        )


class HeldoutSVM:
    """The evaluation-only classifier: an RBF SVM (scikit-learn) on raw pixels.

    Deterministic and fast to fit (≈0.1 s), so it is refit from the fixed train part on
    construction rather than shipped as a pickle.
    """

    name = "heldout_svm"

    def __init__(self, split: DigitsSplit | None = None) -> None:
        from sklearn.svm import SVC

        split = split or load_split()
        self.svm = SVC(C=10.0, gamma=0.02)
        self.svm.fit(self._features(split.train_images), split.train_labels)
        self.heldout_accuracy = heldout_accuracy(self.predict, split)

    @staticmethod
    def _features(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 255.0 if images.ndim == 3 else _as_gray(images)
        return x.reshape(len(x), -1)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.svm.predict(self._features(images))

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        target = np.array([prompt_digit(p) for p in prompts], dtype=np.int64)
        correct = (self.predict(images) == target).astype(np.float64)
        return RewardOutput(scores=correct, details={"correct": correct})
