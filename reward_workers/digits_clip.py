"""A digits CLIP: a small transformers ``CLIPModel`` trained contrastively on the digits.

The CLIP reward needs an image-text model whose cosine means something; no pretrained
CLIP can be downloaded here, so the digits world ships its own, trained on the fixed
train part of the digits (``reward_workers.digits.load_split``) against the prompts the
RL world uses, and judged zero-shot on the 360 held-out images.

It is a real ``CLIPModel`` + ``CLIPProcessor`` saved with ``save_pretrained``, so the
code that loads ``openai/clip-vit-*`` loads it unchanged (``from_pretrained(dir)``):

- tokenizer: CLIP's own byte-level BPE (``CLIPTokenizer``: CLIP's normaliser and
  pre-tokeniser, ``</w>`` word ends), built in memory: the 256 byte symbols (and their
  ``</w>`` forms), then merges learnt from the templates × ten digits until every word
  of them is one token. Any text tokenises (an unseen word falls back to sub-words or
  bytes, as in CLIP; there is never an unknown token); callers should still pass
  ``truncation=True`` since positions stop at ``MAX_TEXT_POSITIONS``;
- image processor: ``CLIPImageProcessor`` resized/cropped to 8×8 (the identity on the
  digits, so no upscaling to 224), rescaled by 1/255, normalised with mean = std = 0.5
  (pixels in [-1, 1]); it takes uint8 (N, 8, 8, 3) arrays, grey images repeated to RGB.

Training: each step samples one template, embeds its ten class prompts and a batch of
±1-pixel-shifted train images; images of one class are all positives of the same text,
so the loss is the image → 10-prompt cross-entropy plus a text → batch term that
spreads each prompt's target over its class's images (a multi-positive InfoNCE).
Seeded and run on one CPU thread, the defaults give bitwise the shipped weights.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from reward_workers.clip import ClipEncoder
from reward_workers.digits import DIGIT_WORDS, DigitsSplit, load_split

DIGITS_CLIP_DIR = Path(__file__).resolve().parent / "assets" / "digits_clip"
TRAINING_FILE = "training.json"

# The phrasings the RL world prompts with; ``{word}`` is "seven", ``{d}`` is "7".
TEMPLATES = (
    "a handwritten {word}",
    "the digit {d}",
    "a picture of the number {word}",
    "{word}",
    "the digit {word}",
    "a handwritten {d}",
    "{d}, written by hand",
    "a photo of the number {d}",
)
ZERO_SHOT_TEMPLATE = TEMPLATES[0]

DEFAULT_STEPS = 1500
BATCH_SIZE = 128
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_STEPS = 100
MAX_TEXT_POSITIONS = 32  # 4× the longest template (8 tokens with <start>/<end>): room for unseen words
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_EOW = "</w>"


def class_prompts(template: str) -> list[str]:
    """The ten prompts of a template, digit 0 first: "a handwritten {word}" → "a handwritten zero", …"""
    return [template.format(word=w, d=i) for i, w in enumerate(DIGIT_WORDS)]


# ---------------------------------------------------------------------------- tokenizer

def _bpe_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Greedy BPE on a set of (byte-level) words until each is a single symbol.

    Most frequent pair first, ties broken by the pair's text, so the merges (and hence
    the token ids) are a pure function of the word set.
    """
    seqs = [(*w[:-1], w[-1] + _EOW) for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(p for s in seqs for p in zip(s[:-1], s[1:], strict=True))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        merged = []
        for s in seqs:
            out: list[str] = []
            i = 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(tuple(out))
        seqs = merged


def build_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer over the prompt vocabulary (see the module docstring)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = alphabet + [c + _EOW for c in alphabet]
    # Words as CLIP's own normaliser and pre-tokeniser cut them (lower case, byte-level).
    base = CLIPTokenizer(vocab={s: i for i, s in enumerate([*vocab, BOS, EOS])}, merges=[])
    norm, pre = base.backend_tokenizer.normalizer, base.backend_tokenizer.pre_tokenizer
    words = [w for t in TEMPLATES for p in class_prompts(t)
             for w, _ in pre.pre_tokenize_str(norm.normalize_str(p))]
    merges = _bpe_merges(words)
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    tok = CLIPTokenizer(vocab={s: i for i, s in enumerate([*vocab, BOS, EOS])}, merges=merges,
                        model_max_length=MAX_TEXT_POSITIONS)
    for w in set(words):  # the learnt merges must rebuild every word whole
        if len(tok.backend_tokenizer.model.tokenize(w)) != 1:
            raise RuntimeError(f"BPE merges do not make {w!r} a single token")
    return tok


def build_processor() -> CLIPProcessor:
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 8}, do_center_crop=True, crop_size={"height": 8, "width": 8},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD), do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


# ---------------------------------------------------------------------------- model

def digits_clip_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """≈0.2 M parameters: a 3-layer ViT on 2×2 patches (16 + [CLS]) and a 2-layer text transformer."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TEXT_POSITIONS, projection_dim=32, **ids)
    vision = dict(image_size=8, patch_size=2, num_channels=3, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, projection_dim=32)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def _pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) uint8 → (N, 3, 8, 8) as the image processor makes them (a test pins the equality)."""
    x = images_u8.float() / 255.0
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x.unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std


def _shift(images_u8: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random ±1 pixel in x and y, zero (background) filled."""
    n = len(images_u8)
    padded = torch.nn.functional.pad(images_u8, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=g)
    ar = torch.arange(8)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]


def contrastive_loss(logits_per_image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric multi-positive InfoNCE against class prompts.

    logits_per_image: (B, 10) scaled cosines of B images with the 10 class prompts;
    labels: (B,) the images' digits. Image side: cross-entropy over the 10 prompts.
    Text side: each prompt's softmax over the B images, its target spread evenly over
    the images of its class (classes absent from the batch are skipped).
    """
    image_loss = torch.nn.functional.cross_entropy(logits_per_image, labels)
    onehot = torch.nn.functional.one_hot(labels, 10).T.float()  # (10, B)
    per_class = onehot.sum(1)
    present = per_class > 0
    log_p = torch.log_softmax(logits_per_image.T, dim=1)  # (10, B)
    text_loss = -((onehot * log_p).sum(1)[present] / per_class[present]).mean()
    loss = 0.5 * (image_loss + text_loss)
    acc = (logits_per_image.argmax(1) == labels).float().mean()
    return loss, {"image_loss": image_loss.item(), "text_loss": text_loss.item(), "batch_accuracy": acc.item()}


def train_digits_clip(steps: int = DEFAULT_STEPS, seed: int = 0,
                      split: DigitsSplit | None = None) -> tuple[CLIPModel, CLIPProcessor, dict[str, float]]:
    """Train the digits CLIP on the train part; metrics: held-out zero-shot accuracy per template.

    Runs on one CPU thread (restored afterwards) with its own RNG streams, so the same
    (steps, seed) give bitwise the same weights whatever the host's thread count.
    """
    split = split or load_split()
    processor = build_processor()
    tok = processor.tokenizer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(digits_clip_config(tok))
        g = torch.Generator().manual_seed(seed)
        texts = [tok(class_prompts(t), padding=True, return_tensors="pt") for t in TEMPLATES]
        images = torch.from_numpy(split.train_images)
        labels = torch.from_numpy(split.train_labels)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": rest, "weight_decay": 0.0}], lr=LR)
        warmup = min(WARMUP_STEPS, max(1, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + np.cos(np.pi * min(1.0, s / max(1, steps)))))
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(images), (BATCH_SIZE,), generator=g)
            text = texts[int(torch.randint(0, len(TEMPLATES), (1,), generator=g))]
            out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                        pixel_values=_pixels(_shift(images[idx], g)))
            loss, _ = contrastive_loss(out.logits_per_image, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # CLIP's clamp: temperature no lower than 1/100
                model.logit_scale.clamp_(max=float(np.log(100.0)))
        model.eval()
        metrics = {t: heldout_zero_shot_accuracy(model, processor, t, split) for t in TEMPLATES}
    finally:
        torch.set_num_threads(threads)
    return model, processor, metrics


# ---------------------------------------------------------------------------- use

def cosine_matrix(model: CLIPModel, processor: CLIPProcessor, images: np.ndarray,
                  prompts: list[str]) -> np.ndarray:
    """Cosines (N, P) of N uint8 images, (N, H, W) grey or (N, H, W, C), with P prompts
    (the CLIP reward's own encoder, around this model)."""
    enc = ClipEncoder.from_model(model, processor)
    return (enc.embed_images(images[..., None] if images.ndim == 3 else images)
            @ enc.embed_texts(prompts).T).double().numpy()


def heldout_zero_shot_accuracy(model: CLIPModel, processor: CLIPProcessor, template: str = ZERO_SHOT_TEMPLATE,
                               split: DigitsSplit | None = None) -> float:
    """Fraction of the 360 held-out images whose highest-cosine class prompt is their digit's."""
    split = split or load_split()
    cos = cosine_matrix(model, processor, split.heldout_images, class_prompts(template))
    return float((cos.argmax(1) == split.heldout_labels).mean())


def save_digits_clip(model: CLIPModel, processor: CLIPProcessor, directory: Path | str = DIGITS_CLIP_DIR, *,
                     metrics: dict[str, float] | None = None, steps: int = DEFAULT_STEPS, seed: int = 0,
                     command: str = "fmrl train-digits-clip") -> Path:
    """Write model (safetensors) and processor with ``save_pretrained``; with metrics, a training.json."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    if metrics is not None:
        record = {"command": command, "steps": steps, "seed": seed,
                  "heldout_zero_shot_accuracy": metrics}
        (directory / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def load_digits_clip(directory: Path | str = DIGITS_CLIP_DIR) -> tuple[CLIPModel, CLIPProcessor]:
    """The shipped (or any saved) digits CLIP, offline, in eval mode."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no digits CLIP at {directory}; make it with `fmrl train-digits-clip`")
    return (CLIPModel.from_pretrained(directory, local_files_only=True).eval(),
            CLIPProcessor.from_pretrained(directory, local_files_only=True))
