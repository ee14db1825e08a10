"""CLIP, preference, aesthetic, JPEG, target-image and weighted-sum rewards against hand-computed values.

The CLIP models are tiny random ones written by ``save_random_clip`` and read back through
the real loading code; the reference numbers come from the model's towers, called directly.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from reward_workers.aesthetic import AestheticReward, save_random_aesthetic_head
from reward_workers.base import RewardOutput
from reward_workers.clip import CLIPScoreReward, PreferenceReward, save_random_clip
from reward_workers.combined import WeightedSum, combine
from reward_workers.image_rewards import JpegCompressibility, TargetImageReward
from reward_workers.registry import AESTHETIC_HEAD_FILE, build_reward

SIZE = 16  # image side of the random CLIP
PROMPTS = ["a cat", "a dog on a mat", "a cat", "7"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0, image_size=SIZE)


@pytest.fixture(scope="module")
def clip_reward(clip_dir):
    return CLIPScoreReward(clip_dir)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (len(PROMPTS), SIZE, SIZE, 3), dtype=np.uint8)


def hand_image_embeds(reward, images):
    """Normalise by hand ((x/255 − mean)/std, channels first; a SIZE×SIZE image is neither
    resized nor cropped), then vision tower → projection → unit length."""
    ip, model = reward.encoder.processor.image_processor, reward.encoder.model
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.no_grad():
        e = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
    return e / e.norm(dim=-1, keepdim=True)


def hand_text_embed(reward, prompt):
    """One prompt alone (no padding): text tower → projection → unit length."""
    model = reward.encoder.model
    ids = torch.tensor([reward.encoder.processor.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        e = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
    return e / e.norm()


def hand_cosines(reward, images, prompts):
    img = hand_image_embeds(reward, images)
    return np.array([float(img[i] @ hand_text_embed(reward, p)) for i, p in enumerate(prompts)])


def test_clip_score_is_the_cosine_of_the_towers(clip_reward, images):
    out = clip_reward(images, PROMPTS)
    expected = hand_cosines(clip_reward, images, PROMPTS)
    assert out.scores.dtype == np.float64 and out.scores.shape == (4,)
    np.testing.assert_allclose(out.scores, expected, atol=1e-5)
    np.testing.assert_array_equal(out.details["cosine"], out.scores)
    assert clip_reward.name == "clip"
    # a random model gives distinct cosines, so the test would see a prompt mix-up
    assert len(np.unique(np.round(expected, 4))) == 4


def test_pickscore_is_scaled_cosine(clip_dir, clip_reward, images):
    r = PreferenceReward(clip_dir)
    out = r(images, PROMPTS)
    # a fresh CLIPConfig's logit_scale is 2.6592 (≈ log(1/0.07)): exp(2.6592) = 14.28486
    assert r.scale == pytest.approx(14.28486, abs=1e-5)
    cos = hand_cosines(clip_reward, images, PROMPTS)
    np.testing.assert_allclose(out.details["cosine"], cos, atol=1e-5)
    np.testing.assert_allclose(out.scores, 14.28486 * cos, atol=1e-4)
    assert r.name == "pickscore"


def test_batch_scores_equal_single_scores(clip_reward, images):
    # the batch pads prompts to a common length and shares duplicate prompts; neither may
    # change a score beyond float32 rounding. A batch of 4 and one of 1 take other kernel paths
    # (a few 1e-7 apart on a cosine, more on some CPUs), so 1e-5; a padding or prompt mix-up
    # moves a cosine by far more (the four are distinct to 1e-4, see above)
    batch = clip_reward(images, PROMPTS).scores
    alone = [clip_reward(images[i:i + 1], [p]).scores[0] for i, p in enumerate(PROMPTS)]
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5)


def test_grey_image_equals_its_rgb_repeat(clip_reward, images):
    grey = images[:2, :, :, :1]
    a = clip_reward(grey, PROMPTS[:2]).scores
    b = clip_reward(np.repeat(grey, 3, axis=-1), PROMPTS[:2]).scores
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        clip_reward(np.zeros((1, SIZE, SIZE, 4), np.uint8), ["x"])


def test_long_prompts_are_truncated_to_the_context(clip_reward, images):
    # byte-level tokens, no merges: "a" is one token; context 32 = start + 30 tokens + end,
    # so 50 a's and 30 a's give the same tokens
    long, cut = clip_reward(images[[0, 0]], ["a " * 50, "a " * 30]).scores
    assert long == pytest.approx(cut, abs=1e-6)


def test_other_image_sizes_are_resized(clip_reward):
    out = clip_reward(np.full((2, 24, 20, 3), 128, np.uint8), ["a", "b"])
    assert out.scores.shape == (2,) and np.all(np.abs(out.scores) <= 1)


def test_save_random_clip_is_deterministic(tmp_path, clip_dir):
    a = load_file(str(clip_dir / "model.safetensors"))
    b = load_file(str(save_random_clip(tmp_path / "again", seed=0, image_size=SIZE) / "model.safetensors"))
    c = load_file(str(save_random_clip(tmp_path / "other", seed=1, image_size=SIZE) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual_projection.weight"], c["visual_projection.weight"])


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CLIPScoreReward(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        PreferenceReward(tmp_path / "empty")


def test_aesthetic_head_is_a_linear_chain(tmp_path, clip_dir, clip_reward, images):
    head = save_random_aesthetic_head(tmp_path / "head.safetensors", embed_dim=16, seed=3)
    r = AestheticReward(clip_dir, head)
    out = r(images, PROMPTS)
    # LAION predictor: x ← W·x + b through layers 0, 2, 4, 6, 7 (16→64→32→16→8→1), no activations
    w = load_file(str(head))
    x = hand_image_embeds(clip_reward, images).double()
    for i in (0, 2, 4, 6, 7):
        x = x @ w[f"layers.{i}.weight"].double().T + w[f"layers.{i}.bias"].double()
    assert x.shape == (4, 1)
    np.testing.assert_allclose(out.scores, x[:, 0].numpy(), atol=1e-5)
    assert r.name == "aesthetic" and out.scores.dtype == np.float64


def test_aesthetic_head_size_mismatch_is_named(tmp_path, clip_dir):
    head = save_random_aesthetic_head(tmp_path / "head8.safetensors", embed_dim=8)
    with pytest.raises(ValueError, match="takes 8-dim embeddings .* projects to 16"):
        AestheticReward(clip_dir, head)
    state = load_file(str(head))
    state.pop("layers.7.bias")
    state["layers.9.weight"] = torch.zeros(1, 1)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['layers.7.bias'\], unexpected keys \['layers.9.weight'\]"):
        AestheticReward(clip_dir, tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        AestheticReward(clip_dir, tmp_path / "absent.safetensors")


def jpeg_kb_by_hand(image, quality):
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_size_in_kb_with_sign(channels):
    rng = np.random.default_rng(1)
    images = np.stack([np.full((32, 32, channels), 128, np.uint8),
                       rng.integers(0, 256, (32, 32, channels), dtype=np.uint8)])
    kb = np.array([jpeg_kb_by_hand(im, 80) for im in images])
    comp = JpegCompressibility(quality=80)(images, ["", ""])
    incomp = JpegCompressibility(quality=80, sign=1)(images, ["", ""])
    np.testing.assert_array_equal(comp.details["jpeg_kb"], kb)
    np.testing.assert_array_equal(comp.scores, -kb)
    np.testing.assert_array_equal(incomp.scores, kb)
    assert kb[0] < kb[1]  # a flat image compresses better than noise
    assert JpegCompressibility().name == "jpeg_compressibility"
    assert JpegCompressibility(sign=1).name == "jpeg_incompressibility"


def test_jpeg_rejects_bad_settings():
    with pytest.raises(ValueError, match="sign"):
        JpegCompressibility(sign=2)
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


# target [[0, 255], [255, 0]] (one channel); images in [0, 1] units:
#   the target itself           → −0
#   all black (0)               → −(0² + 1² + 1² + 0²)/4 = −0.5
#   all 51 (= 0.2)              → −(0.2² + 0.8² + 0.8² + 0.2²)/4 = −(0.04+0.64+0.64+0.04)/4 = −0.34
TARGET = np.array([[0, 255], [255, 0]], np.uint8)[..., None]
TARGET_IMAGES = np.stack([TARGET, np.zeros_like(TARGET), np.full_like(TARGET, 51)])


@pytest.mark.parametrize("source", ["array", "npy", "png"])
def test_target_image_mse(tmp_path, source):
    if source == "npy":
        target = tmp_path / "t.npy"
        np.save(target, TARGET)
    elif source == "png":
        target = tmp_path / "t.png"
        Image.fromarray(TARGET[..., 0]).save(target)
    else:
        target = TARGET
    out = TargetImageReward(target)(TARGET_IMAGES, ["", "", ""])
    np.testing.assert_allclose(out.scores, [0.0, -0.5, -0.34], atol=1e-12)


def test_target_image_rejects_other_shapes(tmp_path):
    r = TargetImageReward(TARGET)
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 3\) do not match the target image of shape \(2, 2, 1\)"):
        r(np.zeros((1, 2, 2, 3), np.uint8), [""])
    with pytest.raises(FileNotFoundError, match="none.png"):
        TargetImageReward(tmp_path / "none.png")


class Fixed:
    def __init__(self, scores, details=None):
        self.name = "fixed"
        self.scores, self.details = np.asarray(scores, dtype=np.float64), details or {}

    def __call__(self, images, prompts, metadata=None):
        return RewardOutput(self.scores, self.details)


def test_weighted_sum_on_hand_values():
    images = np.zeros((2, 2, 2, 1), np.uint8)
    a = Fixed([1.0, 2.0], {"x": np.array([5.0, 6.0])})
    b = Fixed([4.0, 0.0])
    out = WeightedSum([("a", 2.0, a), ("b", -0.5, b)])(images, ["", ""])
    # [2·1 − 0.5·4, 2·2 − 0.5·0] = [0, 4]
    np.testing.assert_array_equal(out.scores, [0.0, 4.0])
    assert set(out.details) == {"a", "a/x", "b", "a/available", "b/available"}
    np.testing.assert_array_equal(out.details["a/available"], [1.0, 1.0])
    np.testing.assert_array_equal(out.details["a"], [1.0, 2.0])
    np.testing.assert_array_equal(out.details["a/x"], [5.0, 6.0])
    np.testing.assert_array_equal(out.details["b"], [4.0, 0.0])


def test_combine_leaves_out_a_component_that_did_not_answer():
    # a: [1, 2] × 2; b (optional) gave no answer → [2, 4], b flagged unavailable, no "b" scores
    out = combine([("a", 2.0, RewardOutput(np.array([1.0, 2.0]))), ("b", -0.5, None)], 2)
    np.testing.assert_array_equal(out.scores, [2.0, 4.0])
    assert set(out.details) == {"a", "a/available", "b/available"}
    np.testing.assert_array_equal(out.details["b/available"], [0.0, 0.0])


def test_weighted_sum_rejects_bad_components():
    images = np.zeros((2, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])
    with pytest.raises(ValueError, match=r"duplicate component names: \['a'\]"):
        WeightedSum([("a", 1.0, Fixed([0, 0])), ("a", 1.0, Fixed([0, 0]))])
    with pytest.raises(ValueError, match="'a' has a non-finite weight nan"):
        WeightedSum([("a", float("nan"), Fixed([0, 0]))])
    with pytest.raises(ValueError, match="'bad' returned non-finite"):
        WeightedSum([("ok", 1.0, Fixed([0, 0])), ("bad", 1.0, Fixed([0, np.inf]))])(images, ["", ""])
    with pytest.raises(ValueError, match=r"'short' returned scores of shape \(1,\), expected \(2,\)"):
        WeightedSum([("short", 1.0, Fixed([0]))])(images, ["", ""])


def test_registry_builds_each_kind(tmp_path, clip_dir, images):
    assert build_reward("clip", clip_dir).name == "clip"
    assert build_reward("pickscore", clip_dir).name == "pickscore"
    save_random_aesthetic_head(clip_dir / AESTHETIC_HEAD_FILE, embed_dim=16)
    assert build_reward("aesthetic", clip_dir)(images, PROMPTS).scores.shape == (4,)
    assert build_reward("jpeg_compressibility").name == "jpeg_compressibility"
    assert build_reward("jpeg_incompressibility").name == "jpeg_incompressibility"
    np.save(tmp_path / "t.npy", TARGET)
    assert build_reward("target_image", tmp_path / "t.npy")(TARGET_IMAGES, ["", "", ""]).scores[1] == -0.5
    with pytest.raises(ValueError, match="has no shipped model"):
        build_reward("target_image")
    with pytest.raises(ValueError, match="takes no model_path"):
        build_reward("jpeg_compressibility", tmp_path)


def test_registry_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown reward 'hps'; valid: aesthetic, clip, compose, digits_classifier, "
                                         "jpeg_compressibility, jpeg_incompressibility, pickscore, python, target_image"):
        build_reward("hps")


def test_clip_kinds_default_to_the_shipped_digits_clip(monkeypatch, tmp_path):
    import reward_workers.registry as registry

    assert registry.DIGITS_CLIP_DIR == registry.ASSETS / "digits_clip"
    # point the default somewhere empty: the error names it, so None was resolved to it
    monkeypatch.setattr(registry, "DIGITS_CLIP_DIR", tmp_path / "shipped_clip")
    for kind in ("clip", "pickscore"):
        with pytest.raises(FileNotFoundError, match="shipped_clip"):
            build_reward(kind)
