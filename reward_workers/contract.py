"""The wire contract between a training job and a reward service: typed, versioned, no pickle.

A request is one Redis stream entry with two fields:

- ``meta``: the JSON of a :class:`RewardRequest` (ids, reward name, prompts, image metadata,
  and each prompt's metadata from its dataset row: JSON objects, bounded like the rest);
- ``images``: the image bytes themselves, binary, never base64:
  ``"png"`` — one lossless PNG per image, concatenated, each one's length in the metadata;
  ``"raw"`` — the uint8 array (N, H, W, C) in C order, N·H·W·C bytes.

A result is the JSON of a :class:`RewardResult` stored under the request id, bound to the
request's content by its :func:`request_digest`: an id reused for other images or prompts is
refused (reason ``id_reused``), never answered with another request's scores. Every decode
step fails with :class:`ContractError`, whose ``reason`` is a short label (for metrics and
the dead-letter stream) and whose message names the problem.

Sizes are bounded before anything is allocated for them: the entry's bytes (measured in
Redis, see service.py), the ``meta`` bytes before JSON parsing, the declared pixels per image
and per request before the output array exists, and every PNG's header before any PNG is
inflated.

The key layout shared by client and service is :class:`StreamLayout`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from collections.abc import Mapping
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from reward_workers.base import RewardOutput

SCHEMA_VERSION = 1
FIELD_META = "meta"
FIELD_IMAGES = "images"
ImageEncoding = Literal["png", "raw"]
ContractReason = Literal["malformed", "schema_version", "wrong_reward", "bad_images", "too_large",
                         "prompt_count", "id_reused"]
"""Why a request was rejected; the label of the dead-letter metric and stream entry."""

# Request ids go into Redis key names: keep them short and free of separators' surprises.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"
_PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
RESULT_CONSUMED = b"\x00consumed"
"""The prefix of what a result key holds once its client took the result (never valid JSON, so
never a result); the request's digest follows it (:func:`consumed_marker`).

A key's life: absent → result (written once, SET NX) → consumed marker (the client swaps it
in, SET XX GET) → expired. A service finding either never scores again: it answers a
resubmission (same digest) with a re-notification and refuses another request under the same
id (another digest) with ``id_reused``.
"""


def consumed_marker(digest: str) -> bytes:
    """The consumed marker of the request with this digest."""
    return RESULT_CONSUMED + b" " + digest.encode()


def stored_digest(raw: bytes) -> str:
    """The request digest a result key's value is bound to ("" when it names none: an error
    result written for an undecodable request, or a value from before digests)."""
    if raw.startswith(RESULT_CONSUMED):
        return raw[len(RESULT_CONSUMED) + 1:].decode(errors="replace")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return ""
    digest = doc.get("digest") if isinstance(doc, dict) else None
    return digest if isinstance(digest, str) else ""


class ContractError(ValueError):
    """A message that breaks the contract; ``reason`` is one of :data:`ContractReason`."""

    def __init__(self, reason: ContractReason, message: str) -> None:
        super().__init__(message)
        self.reason: ContractReason = reason


class RequestLimits(BaseModel):
    """What a service accepts in one request (the client checks the same limits before sending)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_images: int = Field(256, ge=1, description="most images in one request")
    max_side: int = Field(4096, ge=1, description="largest height or width in pixels")
    max_pixels_per_image: int = Field(
        16 * 2**20, ge=1, description="most pixels (H·W) of one image (4096², 64 MiB as RGBA); "
        "checked on the declared shape before any pixel is allocated")
    max_pixels_per_request: int = Field(
        64 * 2**20, ge=1, description="most pixels (N·H·W) in one request: 64 images of 1024², "
        "so a request decodes to at most 256 MiB (RGBA). The declared shape is checked before the "
        "output array is allocated: a small payload cannot declare a huge batch. The client "
        "splits batches to fit")
    max_bytes: int = Field(64 * 2**20, ge=1, description="largest encoded image payload in bytes")
    max_meta_bytes: int = Field(4 * 2**20, ge=1, description="largest ``meta`` field (JSON with "
                                "the prompts and their metadata) in bytes, checked before it is parsed")
    max_prompt_metadata_bytes: int = Field(
        16 * 1024, ge=2, description="largest metadata of one prompt (its JSON object) in bytes; "
        "a prompt dataset's reader refuses larger rows before a run starts")

    @property
    def max_entry_bytes(self) -> int:
        """Largest stream entry a service reads out of Redis: payload, meta and field names."""
        return self.max_bytes + self.max_meta_bytes + 1024

    def images_per_request(self, height: int, width: int) -> int:
        """How many H×W images fit one request (at least 1; a too large image is rejected apart)."""
        return max(1, min(self.max_images, self.max_pixels_per_request // max(1, height * width)))


class ImageBatch(BaseModel):
    """How the ``images`` field encodes an (N, H, W, C) uint8 batch.

    lengths: for ``png``, the byte length of each image's PNG in order (N entries);
    None for ``raw``, whose payload is exactly N·H·W·C bytes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoding: ImageEncoding
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)],
                 Annotated[int, Field(ge=1)], Literal[1, 3, 4]]
    dtype: Literal["uint8"] = "uint8"
    lengths: list[Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _lengths_match_encoding(self) -> ImageBatch:
        if self.encoding == "png" and (self.lengths is None or len(self.lengths) != self.shape[0]):
            raise ValueError(f"png images need one length per image ({self.shape[0]}), "
                             f"got {self.lengths}")
        if self.encoding == "raw" and self.lengths is not None:
            raise ValueError("raw images carry no per-image lengths")
        return self

    @property
    def count(self) -> int:
        return self.shape[0]


class RewardRequest(BaseModel):
    """One scoring request: N prompts and the metadata of N images (the bytes travel apart).

    request_id: unique per request; a resubmission keeps it, so results collapse to one.
    reward: the reward's name (its registry kind); a service serves exactly one.
    reply_to: the client's notification list; the service pushes ``request_id`` onto it.
    created_at: Unix time of the first submission. attempt: 1 for the first submission.
    metadata: None, or one JSON object per prompt (its dataset row's other fields), handed to
    the reward as its third argument; each at most ``max_prompt_metadata_bytes`` as JSON.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    reward: str = Field(min_length=1, max_length=128)
    prompts: list[str]
    images: ImageBatch
    reply_to: str = Field(min_length=1, max_length=512)
    created_at: float
    attempt: int = Field(1, ge=1)
    metadata: list[dict[str, JsonValue]] | None = None


DetailValues = list[bool] | list[int] | list[float]


class RewardResult(BaseModel):
    """The answer to one request: scores (N,) and details, or ``ok=False`` with ``error``.

    details keep their kind (bool, int or float lists) so they decode to the same dtype family.
    digest: the :func:`request_digest` of the request answered; "" only on an error result for
    a request that could not be decoded (nothing to bind it to).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str
    reward: str
    ok: bool
    scores: list[float] = Field(default_factory=list)
    details: dict[str, DetailValues] = Field(default_factory=dict)
    error: str | None = None
    worker: str = ""
    elapsed_s: float = 0.0
    digest: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> RewardResult:
        if self.ok:
            if self.error is not None:
                raise ValueError("an ok result carries no error")
            bad = [k for k, v in self.details.items() if len(v) != len(self.scores)]
            if bad:
                raise ValueError(f"details {bad} do not have one value per score ({len(self.scores)})")
        elif not self.error:
            raise ValueError("a failed result must say why (error)")
        return self

    @classmethod
    def from_output(cls, request_id: str, reward: str, output: RewardOutput, n: int,
                    worker: str = "", elapsed_s: float = 0.0, digest: str = "") -> RewardResult:
        """The ok result for ``output``; raises ValueError on a wrong shape or a non-finite score."""
        scores = np.asarray(output.scores)
        if scores.shape != (n,):
            raise ValueError(f"reward {reward!r} returned scores of shape {scores.shape} for {n} images")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"reward {reward!r} returned non-finite scores "
                             f"(at {np.flatnonzero(~np.isfinite(scores)).tolist()})")
        details = {}
        for k, v in output.details.items():
            v = np.asarray(v)
            if v.shape != (n,):
                raise ValueError(f"reward {reward!r} returned detail {k!r} of shape {v.shape} for {n} images")
            # JSON has no NaN: it would arrive as null and fail the client's decoding
            if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                raise ValueError(f"reward {reward!r} returned non-finite detail {k!r}")
            details[k] = v.tolist()
        return cls(request_id=request_id, reward=reward, ok=True,
                   scores=scores.astype(np.float64).tolist(), details=details, worker=worker,
                   elapsed_s=elapsed_s, digest=digest)

    def to_output(self) -> RewardOutput:
        """The RewardOutput of an ok result (scores float64; details int64/float64/bool)."""
        if not self.ok:
            raise ValueError(f"result {self.request_id} is an error: {self.error}")
        return RewardOutput(scores=np.asarray(self.scores, dtype=np.float64).reshape(-1),
                            details={k: np.asarray(v) for k, v in self.details.items()})


class StreamLayout(BaseModel):
    """Where one reward's messages live in Redis; client and service derive it the same way.

    requests: the stream clients XADD to. group: the services' consumer group.
    dead: the dead-letter stream. Result keys, reply lists and retry notes share ``base``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward: str
    requests: str
    group: str
    dead: str
    base: str

    @classmethod
    def for_reward(cls, reward: str, stream: str | None = None, group: str | None = None,
                   dead: str | None = None) -> StreamLayout:
        requests = stream or f"fmrl:reward:{reward}:requests"
        base = requests.removesuffix(":requests")
        return cls(reward=reward, requests=requests, group=group or f"fmrl-reward-{reward}",
                   dead=dead or f"{base}:dead", base=base)

    def result_key(self, request_id: str) -> str:
        return f"{self.base}:result:{request_id}"

    def reply_key(self, client_id: str) -> str:
        return f"{self.base}:reply:{client_id}"

    def failure_key(self, entry_id: str) -> str:
        """The last scoring error of one stream entry, kept for its dead letter."""
        return f"{self.base}:failure:{entry_id}"

    def owns_reply_key(self, key: str) -> bool:
        return key.startswith(f"{self.base}:reply:")


# ------------------------------------------------------------------ images


def check_images(images: np.ndarray, limits: RequestLimits) -> None:
    """Reject an array that is not (N, H, W, C) uint8 with C in 1, 3, 4, or breaks ``limits``."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ContractError("bad_images", "images must be a uint8 numpy array, got "
                            f"{type(images).__name__} {getattr(images, 'dtype', '')}".rstrip())
    if images.ndim != 4 or images.shape[-1] not in _PNG_MODES or 0 in images.shape:
        raise ContractError("bad_images", "images must have shape (N, H, W, C) with C in 1, 3 or 4 "
                            f"and no empty axis, got {images.shape}")
    _check_shape_limits(tuple(images.shape), limits)


def _check_shape_limits(shape: tuple[int, ...], limits: RequestLimits) -> None:
    if shape[0] > limits.max_images:
        raise ContractError("too_large", f"{shape[0]} images in one request, "
                            f"more than the limit of {limits.max_images}")
    if max(shape[1], shape[2]) > limits.max_side:
        raise ContractError("too_large", f"images of {shape[1]}×{shape[2]} pixels exceed the "
                            f"largest side of {limits.max_side}")
    if shape[1] * shape[2] > limits.max_pixels_per_image:
        raise ContractError("too_large", f"images of {shape[1]}×{shape[2]} = {shape[1] * shape[2]} "
                            f"pixels exceed the limit of {limits.max_pixels_per_image} per image")
    if shape[0] * shape[1] * shape[2] > limits.max_pixels_per_request:
        raise ContractError("too_large", f"{shape[0]} images of {shape[1]}×{shape[2]} = "
                            f"{shape[0] * shape[1] * shape[2]} pixels exceed the limit of "
                            f"{limits.max_pixels_per_request} per request")


def encode_images(images: np.ndarray, encoding: ImageEncoding,
                  limits: RequestLimits | None = None) -> tuple[ImageBatch, bytes]:
    """(N, H, W, C) uint8 → its metadata and payload bytes (both lossless)."""
    limits = limits or RequestLimits()
    check_images(images, limits)
    shape = tuple(int(s) for s in images.shape)
    if encoding == "raw":
        meta, data = ImageBatch(encoding="raw", shape=shape), np.ascontiguousarray(images).tobytes()
    elif encoding == "png":
        from PIL import Image

        chunks = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im[..., 0] if shape[3] == 1 else im).save(
                buf, format="PNG", compress_level=1)
            chunks.append(buf.getvalue())
        meta = ImageBatch(encoding="png", shape=shape, lengths=[len(c) for c in chunks])
        data = b"".join(chunks)
    else:
        raise ValueError(f"unknown image encoding {encoding!r}; valid: png, raw")
    if len(data) > limits.max_bytes:
        raise ContractError("too_large", f"encoded images take {len(data)} bytes, more than the "
                            f"limit of {limits.max_bytes}")
    return meta, data


def decode_images(meta: ImageBatch, data: bytes, limits: RequestLimits | None = None) -> np.ndarray:
    """The payload bytes back to (N, H, W, C) uint8, checked against ``meta`` and ``limits``."""
    limits = limits or RequestLimits()
    _check_shape_limits(meta.shape, limits)
    if len(data) > limits.max_bytes:
        raise ContractError("too_large", f"image payload of {len(data)} bytes exceeds the limit "
                            f"of {limits.max_bytes}")
    n, h, w, c = meta.shape
    if meta.encoding == "raw":
        expected = n * h * w * c
        if len(data) != expected:
            raise ContractError("bad_images", f"raw images of shape {meta.shape} need {expected} "
                                f"bytes, got {len(data)} ({'truncated' if len(data) < expected else 'trailing bytes'})")
        return np.frombuffer(data, dtype=np.uint8).reshape(meta.shape).copy()
    assert meta.lengths is not None  # the model's validator guarantees it for png
    if sum(meta.lengths) != len(data):
        raise ContractError("bad_images", f"png lengths sum to {sum(meta.lengths)} bytes but the "
                            f"payload has {len(data)}")
    from PIL import Image

    # every header first (Image.open reads only the header): a size or mode other than the
    # declared one is rejected before any pixel is inflated or the output allocated
    opened = []
    offset = 0
    for i, length in enumerate(meta.lengths):
        chunk = data[offset:offset + length]
        offset += length
        try:
            im = Image.open(io.BytesIO(chunk), formats=["PNG"])
        except Exception as e:  # Pillow raises several types for corrupt data
            raise ContractError("bad_images", f"png image {i} does not decode: {e}") from None
        if im.size != (w, h) or im.mode != _PNG_MODES[c]:
            raise ContractError("bad_images", f"png image {i} is {im.size[1]}×{im.size[0]} "
                                f"mode {im.mode}, declared {h}×{w} with {c} channel(s) "
                                f"(mode {_PNG_MODES[c]})")
        opened.append(im)
    out = np.empty(meta.shape, dtype=np.uint8)
    for i, im in enumerate(opened):
        try:
            im.load()
        except Exception as e:
            raise ContractError("bad_images", f"png image {i} does not decode: {e}") from None
        arr = np.asarray(im, dtype=np.uint8)
        out[i] = arr[..., None] if c == 1 else arr
        im.close()
    return out


# ------------------------------------------------------------------ requests and results


def encode_request(images: np.ndarray, prompts: list[str], *, reward: str, request_id: str,
                   reply_to: str, encoding: ImageEncoding = "png", attempt: int = 1,
                   created_at: float | None = None, limits: RequestLimits | None = None,
                   metadata: list[dict] | None = None) -> tuple[RewardRequest, dict[str, bytes]]:
    """A request and the stream-entry fields (``meta`` JSON, ``images`` bytes) that carry it;
    ``metadata``: one JSON object per prompt, or None."""
    if len(prompts) != len(images):
        raise ContractError("prompt_count", f"{len(images)} images but {len(prompts)} prompts")
    limits = limits or RequestLimits()
    if metadata is not None:
        check_metadata(metadata, len(prompts), limits)
    meta, data = encode_images(images, encoding, limits)
    try:
        request = RewardRequest(request_id=request_id, reward=reward, prompts=list(prompts), images=meta,
                                reply_to=reply_to, created_at=time.time() if created_at is None else created_at,
                                attempt=attempt, metadata=None if metadata is None else list(metadata))
    except ValidationError as e:  # e.g. a metadata value that is not JSON
        raise ContractError("malformed", f"invalid request: {_one_line(e)}") from None
    return request, request_fields(request, data)


def request_fields(request: RewardRequest, data: bytes) -> dict[str, bytes]:
    """The stream-entry fields for an encoded request (a resubmission reuses the payload)."""
    return {FIELD_META: request.model_dump_json().encode(), FIELD_IMAGES: data}


def _field(fields: Mapping[bytes | str, bytes], name: str) -> bytes | None:
    value = fields.get(name.encode(), fields.get(name))  # type: ignore[call-overload]
    return value.encode() if isinstance(value, str) else value


def peek_request(fields: Mapping[bytes | str, bytes]) -> dict:
    """Whatever of ``meta`` parses as a JSON object ({} otherwise); for error replies only."""
    raw = _field(fields, FIELD_META)
    try:
        doc = json.loads(raw) if raw is not None else {}
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        return {}
    return doc if isinstance(doc, dict) else {}


def decode_request(fields: Mapping[bytes | str, bytes], *, reward: str,
                   limits: RequestLimits | None = None) -> tuple[RewardRequest, np.ndarray]:
    """A stream entry → its request and (N, H, W, C) uint8 images, or a ContractError naming why."""
    limits = limits or RequestLimits()
    raw_meta, data = _field(fields, FIELD_META), _field(fields, FIELD_IMAGES)
    if raw_meta is None or data is None:
        names = sorted(k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in fields)
        raise ContractError("malformed", f"entry needs fields {FIELD_META!r} and {FIELD_IMAGES!r}, "
                            f"got {names}")
    if len(raw_meta) > limits.max_meta_bytes:
        raise ContractError("too_large", f"{FIELD_META!r} of {len(raw_meta)} bytes exceeds the "
                            f"limit of {limits.max_meta_bytes}")
    try:
        doc = json.loads(raw_meta)
    except (ValueError, RecursionError) as e:  # ValueError covers UnicodeDecodeError
        raise ContractError("malformed", f"{FIELD_META!r} is not JSON: "
                            f"{'nested too deeply' if isinstance(e, RecursionError) else e}") from None
    if not isinstance(doc, dict):
        raise ContractError("malformed", f"{FIELD_META!r} must be a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ContractError("schema_version", f"unsupported schema_version {version!r}; this "
                            f"service speaks {SCHEMA_VERSION}")
    try:
        request = RewardRequest.model_validate(doc)
    except ValidationError as e:
        raise ContractError("malformed", f"invalid request: {_one_line(e)}") from None
    if request.reward != reward:
        raise ContractError("wrong_reward", f"request {request.request_id} asks for reward "
                            f"{request.reward!r} but this service scores {reward!r}")
    if len(request.prompts) != request.images.count:
        raise ContractError("prompt_count", f"{request.images.count} images but "
                            f"{len(request.prompts)} prompts")
    if request.metadata is not None:
        check_metadata(request.metadata, len(request.prompts), limits)
    return request, decode_images(request.images, data, limits)


def check_metadata(metadata: list[dict], n: int, limits: RequestLimits) -> None:
    """One JSON object per prompt, each within ``limits.max_prompt_metadata_bytes``."""
    if len(metadata) != n:
        raise ContractError("prompt_count", f"{n} prompts but {len(metadata)} metadata entries")
    for i, m in enumerate(metadata):
        if not isinstance(m, dict):
            raise ContractError("malformed", f"metadata {i} must be a JSON object, got {type(m).__name__}")
        try:
            size = len(json.dumps(m, allow_nan=False, ensure_ascii=False).encode())
        except (TypeError, ValueError) as e:
            raise ContractError("malformed", f"metadata {i} is not JSON: {e}") from None
        if size > limits.max_prompt_metadata_bytes:
            raise ContractError("too_large", f"metadata {i} takes {size} bytes as JSON, more than the "
                                f"limit of {limits.max_prompt_metadata_bytes}")


def request_digest(request: RewardRequest, data: bytes) -> str:
    """SHA-256 (hex) of what a request asks: reward, prompts, image metadata and bytes.

    Not of its id, reply list, time or attempt: a resubmission has the digest of its original,
    a request reusing another's id with other images or prompts has another.
    """
    asked = {"reward": request.reward, "prompts": request.prompts, "images": request.images.model_dump(mode="json")}
    if request.metadata is not None:  # a request without metadata keeps the digest it always had
        asked["metadata"] = request.metadata
    what = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    h = hashlib.sha256(len(what).to_bytes(8, "big"))
    h.update(what)
    h.update(data)
    return h.hexdigest()


def entry_digest(request: RewardRequest, fields: Mapping[bytes | str, bytes]) -> str:
    """The :func:`request_digest` of a decoded request's stream entry."""
    return request_digest(request, _field(fields, FIELD_IMAGES) or b"")


def encode_result(result: RewardResult) -> bytes:
    return result.model_dump_json().encode()


def decode_result(raw: bytes | str) -> RewardResult:
    """A stored result; ContractError when it is not one (e.g. written by a newer schema)."""
    try:
        result = RewardResult.model_validate_json(raw)
    except ValidationError as e:
        raise ContractError("malformed", f"invalid result: {_one_line(e)}") from None
    if any(not math.isfinite(s) for s in result.scores):
        raise ContractError("malformed", f"result {result.request_id} has non-finite scores")
    return result


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return re.sub(r"\s+", " ", "; ".join(parts))
