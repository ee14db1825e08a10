"""The reward wire contract: bit-exact round trips and every rejection, by its message."""

import json

import numpy as np
import pytest

from reward_workers.base import RewardOutput
from reward_workers.contract import (
    FIELD_IMAGES,
    FIELD_META,
    ContractError,
    RequestLimits,
    RewardResult,
    StreamLayout,
    decode_request,
    decode_result,
    encode_images,
    encode_request,
    encode_result,
)

RNG = np.random.default_rng(0)


def batch(n=3, h=8, w=8, c=1):
    return RNG.integers(0, 256, (n, h, w, c), dtype=np.uint8)


def fields_for(images, prompts=None, encoding="raw", reward="digits_classifier", **kw):
    prompts = prompts if prompts is not None else ["a handwritten one"] * len(images)
    return encode_request(images, prompts, reward=reward, request_id="r1",
                          reply_to="fmrl:reward:digits_classifier:reply:c", encoding=encoding, **kw)[1]


def edit_meta(fields, **changes):
    doc = json.loads(fields[FIELD_META])
    for path, value in changes.items():
        target = doc
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return {**fields, FIELD_META: json.dumps(doc).encode()}


@pytest.mark.parametrize("encoding", ["png", "raw"])
@pytest.mark.parametrize("shape", [(3, 8, 8, 1), (2, 5, 7, 3), (1, 16, 9, 4)])
def test_images_round_trip_bit_exact(encoding, shape):
    images = RNG.integers(0, 256, shape, dtype=np.uint8)
    images[0, 0, 0] = 0
    images[-1, -1, -1] = 255  # the extremes survive too
    prompts = [f"prompt {i}" for i in range(shape[0])]
    sent, fields = encode_request(images, prompts, reward="digits_classifier", request_id="abc-1",
                                  reply_to="x:reply:y", encoding=encoding, attempt=2)
    assert set(fields) == {FIELD_META, FIELD_IMAGES} and isinstance(fields[FIELD_IMAGES], bytes)
    # the metadata is small JSON; the pixels are not in it (no base64)
    assert len(fields[FIELD_META]) < 400 and b"images" in fields[FIELD_META]
    if encoding == "raw":
        assert fields[FIELD_IMAGES] == images.tobytes()
    got, decoded = decode_request({k.encode(): v for k, v in fields.items()}, reward="digits_classifier")
    assert got == sent and got.attempt == 2 and got.prompts == prompts
    assert decoded.dtype == np.uint8 and decoded.shape == shape and np.array_equal(decoded, images)


def test_result_round_trip_keeps_values_and_kinds():
    scores = RNG.random(5) * 1e-3 + np.array([0, 1e-300, 1.0, 1e300, -2.5])
    out = RewardOutput(scores=scores, details={
        "pred": np.arange(5), "p": RNG.random(5).astype(np.float32), "ok": np.arange(5) > 2})
    result = RewardResult.from_output("r1", "digits_classifier", out, 5, worker="w", elapsed_s=0.1)
    back = decode_result(encode_result(result)).to_output()
    assert back.scores.dtype == np.float64 and np.array_equal(back.scores, scores)  # bit-exact
    assert back.details["pred"].dtype == np.int64 and np.array_equal(back.details["pred"], np.arange(5))
    assert np.array_equal(back.details["p"], out.details["p"].astype(np.float64))
    assert back.details["ok"].dtype == np.bool_


def test_result_rejects_bad_outputs():
    with pytest.raises(ValueError, match=r"non-finite scores \(at \[1\]\)"):
        RewardResult.from_output("r", "d", RewardOutput(np.array([0.5, np.nan])), 2)
    with pytest.raises(ValueError, match=r"scores of shape \(3,\) for 2 images"):
        RewardResult.from_output("r", "d", RewardOutput(np.zeros(3)), 2)
    with pytest.raises(ValueError, match="detail 'x' of shape"):
        RewardResult.from_output("r", "d", RewardOutput(np.zeros(2), {"x": np.zeros(3)}), 2)
    with pytest.raises(ValueError, match="must say why"):
        RewardResult(request_id="r", reward="d", ok=False)
    with pytest.raises(ContractError, match="invalid result"):
        decode_result(b'{"schema_version": 2}')


def test_layout_defaults_and_override():
    d = StreamLayout.for_reward("clip")
    assert (d.requests, d.group, d.dead) == ("fmrl:reward:clip:requests", "fmrl-reward-clip",
                                             "fmrl:reward:clip:dead")
    assert d.result_key("r1") == "fmrl:reward:clip:result:r1" and d.owns_reply_key(d.reply_key("c"))
    o = StreamLayout.for_reward("clip", stream="team-a:clip")
    assert o.dead == "team-a:clip:dead" and o.result_key("r") == "team-a:clip:result:r"
    assert not o.owns_reply_key("fmrl:reward:clip:reply:c")


# ------------------------------------------------------------------ rejections, by message


def rejects(fields, reason, match, reward="digits_classifier", limits=None):
    with pytest.raises(ContractError, match=match) as e:
        decode_request(fields, reward=reward, limits=limits)
    assert e.value.reason == reason


def test_rejects_oversized_requests():
    limits = RequestLimits(max_images=2, max_side=8, max_bytes=100)
    with pytest.raises(ContractError, match="3 images in one request, more than the limit of 2"):
        encode_images(batch(3), "raw", limits)
    with pytest.raises(ContractError, match="images of 9×8 pixels exceed the largest side of 8"):
        encode_images(batch(1, 9, 8), "raw", limits)
    with pytest.raises(ContractError, match="encoded images take 192 bytes, more than the limit of 100"):
        encode_images(batch(3), "raw", RequestLimits(max_bytes=100))
    # the service checks the same limits on what arrives
    rejects(fields_for(batch(3)), "too_large", "3 images in one request", limits=limits)
    rejects(fields_for(batch(1, 4, 12)), "too_large", "largest side of 8", limits=limits)
    rejects(fields_for(batch(2)), "too_large", "payload of 128 bytes exceeds the limit of 100", limits=limits)


def test_rejects_bad_shape_and_dtype():
    with pytest.raises(ContractError, match="uint8 numpy array, got ndarray float32"):
        encode_images(np.zeros((1, 8, 8, 1), np.float32), "raw")
    with pytest.raises(ContractError, match=r"shape \(N, H, W, C\) with C in 1, 3 or 4.*\(2, 8, 8\)"):
        encode_images(np.zeros((2, 8, 8), np.uint8), "png")
    with pytest.raises(ContractError, match=r"got \(2, 8, 8, 2\)"):
        encode_images(np.zeros((2, 8, 8, 2), np.uint8), "raw")
    rejects(edit_meta(fields_for(batch(1)), images__dtype="float32"), "malformed",
            r"images.dtype: Input should be 'uint8'")
    rejects(edit_meta(fields_for(batch(1)), images__shape=[1, 8, 8, 2]), "malformed",
            r"images.shape.3: Input should be 1, 3 or 4")
    rejects(edit_meta(fields_for(batch(1)), images__shape=[1, 0, 8, 1]), "malformed",
            r"images.shape.1: Input should be greater than or equal to 1")


def test_rejects_prompt_count_mismatch():
    with pytest.raises(ContractError, match="3 images but 2 prompts") as e:
        encode_request(batch(3), ["a", "b"], reward="d", request_id="r", reply_to="q")
    assert e.value.reason == "prompt_count"
    rejects(edit_meta(fields_for(batch(3)), prompts=["one"]), "prompt_count", "3 images but 1 prompts")


def test_rejects_png_of_another_shape():
    # the metadata says 8×8 gray; the PNGs are 16×16 RGB
    meta_fields = fields_for(batch(2), encoding="png")
    real_meta, real_png = encode_images(batch(2, 16, 16, 3), "png")
    doctored = edit_meta(meta_fields, images__lengths=real_meta.lengths)
    doctored[FIELD_IMAGES] = real_png
    rejects(doctored, "bad_images", r"png image 0 is 16×16 mode RGB, declared 8×8 with 1 channel\(s\)")
    f = fields_for(batch(1), encoding="png")
    half = len(f[FIELD_IMAGES]) // 2  # a truncated PNG, its declared length matching
    cut = edit_meta(f, images__lengths=[half])
    rejects({**cut, FIELD_IMAGES: f[FIELD_IMAGES][:half]}, "bad_images", "png image 0 does not decode")
    rejects({**f, FIELD_IMAGES: b"GIF89a" + f[FIELD_IMAGES][6:]}, "bad_images",
            "png image 0 does not decode")
    rejects({**f, FIELD_IMAGES: f[FIELD_IMAGES][:-1]}, "bad_images",
            r"png lengths sum to \d+ bytes but the payload has \d+")


def test_rejects_truncated_raw_bytes():
    f = fields_for(batch(2))
    rejects({**f, FIELD_IMAGES: f[FIELD_IMAGES][:100]}, "bad_images",
            r"shape \(2, 8, 8, 1\) need 128 bytes, got 100 \(truncated\)")
    rejects({**f, FIELD_IMAGES: f[FIELD_IMAGES] + b"x"}, "bad_images", r"got 129 \(trailing bytes\)")


def test_rejects_wrong_schema_version_and_reward():
    f = fields_for(batch(1))
    rejects(edit_meta(f, schema_version=2), "schema_version",
            "unsupported schema_version 2; this service speaks 1")
    rejects({**f, FIELD_META: b'{"request_id": "x"}'}, "schema_version", "unsupported schema_version None")
    rejects(f, "wrong_reward", "request r1 asks for reward 'digits_classifier' but this service "
            "scores 'clip_score'", reward="clip_score")


def test_rejects_garbage():
    f = fields_for(batch(1))
    rejects({b"foo": b"bar"}, "malformed", r"needs fields 'meta' and 'images', got \['foo'\]")
    rejects({**f, FIELD_META: b"{not json"}, "malformed", "'meta' is not JSON")
    rejects({**f, FIELD_META: b"[1, 2]"}, "malformed", "must be a JSON object, got list")
    rejects(edit_meta(f, request_id="../../etc"), "malformed", "request_id: String should match")
    rejects(edit_meta(f, surprise=1), "malformed", "surprise: Extra inputs are not permitted")
    rejects(edit_meta(f, images__encoding="jpeg"), "malformed", "images.encoding: Input should be 'png' or 'raw'")


# ------------------------------------------------------------------ hostile sizes, digests


def test_declared_pixels_are_bounded_before_anything_is_allocated():
    limits = RequestLimits(max_pixels_per_image=100, max_pixels_per_request=150)
    with pytest.raises(ContractError, match=r"images of 8×16 = 128 pixels exceed the limit of 100 per image"):
        encode_images(batch(1, 8, 16), "raw", limits)
    with pytest.raises(ContractError, match=r"3 images of 8×8 = 192 pixels exceed the limit of 150 per request"):
        encode_images(batch(3), "raw", limits)
    # a payload of a few kB declaring 256 images of 4096² (12 GiB decoded) is refused by the
    # default limits from its declared shape alone: nothing is decoded or allocated
    small = fields_for(batch(1, 8, 8, 3), encoding="png")
    meta = json.loads(small[FIELD_META])
    meta["images"] |= {"shape": [256, 4096, 4096, 3], "lengths": [1] * 255 + [len(small[FIELD_IMAGES]) - 255]}
    meta["prompts"] = ["a handwritten one"] * 256
    rejects({FIELD_META: json.dumps(meta).encode(), FIELD_IMAGES: small[FIELD_IMAGES]}, "too_large",
            r"256 images of 4096×4096 = 4294967296 pixels exceed the limit of 67108864 per request")
    assert RequestLimits().images_per_request(1024, 1024) == 64
    assert RequestLimits(max_images=8).images_per_request(8, 8) == 8
    assert RequestLimits(max_pixels_per_request=10).images_per_request(8, 8) == 1


def test_png_headers_are_all_checked_before_any_image_is_inflated():
    from PIL import Image

    images = batch(2, 8, 8, 1)
    fields = fields_for(images, encoding="png")
    meta = json.loads(fields[FIELD_META])
    # image 1's header says 4096×4096 (a zero image compresses to a few kB): refused from the
    # header, while image 0 (fine) has not been inflated yet
    buf = __import__("io").BytesIO()
    Image.new("L", (4096, 4096)).save(buf, format="PNG", compress_level=1)
    first = fields[FIELD_IMAGES][:meta["images"]["lengths"][0]]
    meta["images"]["lengths"][1] = len(buf.getvalue())
    rejects({FIELD_META: json.dumps(meta).encode(), FIELD_IMAGES: first + buf.getvalue()}, "bad_images",
            r"png image 1 is 4096×4096 mode L, declared 8×8")


def test_meta_is_bounded_and_any_nesting_is_a_contract_error():
    rejects({FIELD_META: b"[" * 100_000, FIELD_IMAGES: b""}, "malformed", "'meta' is not JSON: nested too deeply")
    rejects({FIELD_META: b" " * 2000, FIELD_IMAGES: b""}, "too_large",
            "'meta' of 2000 bytes exceeds the limit of 1000", limits=RequestLimits(max_meta_bytes=1000))


def test_request_digest_binds_content_not_delivery():
    from reward_workers.contract import request_digest

    images = batch(2)
    a, fa = encode_request(images, ["a", "b"], reward="r", request_id="x", reply_to="q", encoding="raw")
    # a resubmission (attempt 2, another time, another reply list) asks the same: same digest
    again = a.model_copy(update={"attempt": 2, "created_at": a.created_at + 5, "reply_to": "q2"})
    assert request_digest(again, fa[FIELD_IMAGES]) == request_digest(a, fa[FIELD_IMAGES])
    other_pixels = images.copy()
    other_pixels[1, 3, 3, 0] ^= 1
    b, fb = encode_request(other_pixels, ["a", "b"], reward="r", request_id="x", reply_to="q", encoding="raw")
    c, fc = encode_request(images, ["a", "c"], reward="r", request_id="x", reply_to="q", encoding="raw")
    digests = {request_digest(r, f[FIELD_IMAGES]) for r, f in ((a, fa), (b, fb), (c, fc))}
    assert len(digests) == 3 and all(len(d) == 64 for d in digests)


def test_a_non_finite_detail_is_refused_at_the_service_not_at_the_client():
    out = RewardOutput(np.array([0.5, 0.25]), {"x": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="non-finite detail 'x'"):
        RewardResult.from_output("r", "digits", out, 2)
