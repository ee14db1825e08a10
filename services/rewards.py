"""The training reward: configured components, each in-cluster or a Redis service, summed.

A component with ``transport: ray`` is loaded into the reward actor and called there; one
with ``transport: redis`` is a :class:`reward_workers.client.RewardClient` that sends the
images to `fmrl reward-worker` services. Components are scored concurrently, so one slow
service does not serialise the others. The result is the weighted sum Σ wᵢ·rᵢ over the
components that answered; an optional component that stays unavailable is left out of
that batch (and flagged), a required one raises. After an optional component was
unavailable, the following batches go without it at once for ``redis.retry_unavailable_s``
seconds, then it is tried again: a service that is down costs one timeout, not one per batch.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from reward_workers.base import RewardOutput
from reward_workers.combined import combine
from reward_workers.registry import PYTHON, build_python_reward, build_reward, python_wire_name
from services.config import RewardComponentConfig, RewardConfig

REDIS_URL_ENV = "FMRL_REDIS_URL"
log = logging.getLogger(__name__)


def build_component(c: RewardComponentConfig) -> Any:
    """A callable ``(images, prompts, metadata=None) -> RewardOutput | None`` for one component.

    A ``python`` component is the user's callable in this process (its output checked on every
    call), or over Redis the services of ``fmrl reward-worker --reward python --callable …``,
    whose requests name the callable (:func:`python_wire_name`)."""
    if c.transport == "ray":
        if c.kind == PYTHON:
            return build_python_reward(c.callable, c.init_kwargs, name=c.label)
        return build_reward(c.kind, c.model_path)
    from reward_workers.client import RewardClient

    r = c.redis
    client = RewardClient(
        os.environ.get(REDIS_URL_ENV) or r.url, python_wire_name(c.callable) if c.kind == PYTHON else c.kind,
        stream=r.stream,
        timeout_s=r.timeout_s, attempts=r.attempts, max_in_flight=r.max_in_flight,
        max_images_per_request=r.max_images_per_request, encoding=r.encoding, required=c.required,
    )
    return client if c.required else SkipWhileDown(client, c.label, r.retry_unavailable_s)


class SkipWhileDown:
    """An optional remote reward that, once unavailable, is skipped for ``skip_s`` seconds."""

    def __init__(self, client: Any, label: str, skip_s: float) -> None:
        self.client, self.label, self.skip_s = client, label, skip_s
        self.down_until = 0.0

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput | None:
        if time.monotonic() < self.down_until:
            return None
        out = self.client(images, prompts, metadata)
        if out is None:
            self.down_until = time.monotonic() + self.skip_s
            log.warning("optional reward %s unavailable: batches go without it for %.0f s", self.label, self.skip_s)
        return out

    def close(self) -> None:
        self.client.close()


class RewardStage:
    """Every configured reward, scored together; see the module docstring."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.components = [(c, build_component(c)) for c in cfg.components]
        self.remote = any(c.transport == "redis" for c in cfg.components)  # has Redis clients
        self._pool = ThreadPoolExecutor(max_workers=len(self.components), thread_name_prefix="reward")
        self.seconds: dict[str, float] = {}  # each component's time on the last batch

    def score(self, images: np.ndarray, prompts: list[str],
              metadata: list[dict] | None = None) -> dict[str, np.ndarray]:
        """``scores`` (B,) the weighted sum; ``<name>`` each component's (B,) scores,
        ``<name>/<detail>`` its details, ``<name>/available`` 1 or 0 for the batch.
        ``metadata``: each image's prompt's metadata (B JSON objects, from the prompt dataset),
        handed to every component that takes it (``component(images, prompts, metadata)``)."""
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")

        def timed(comp: tuple) -> Any:  # noqa: ANN401 - a component's output
            t0 = time.perf_counter()
            try:
                return comp[1](images, prompts, metadata)
            finally:
                self.seconds[comp[0].label] = time.perf_counter() - t0

        self.seconds.clear()
        outs = list(self._pool.map(timed, self.components))
        out = combine([(c.label, c.weight, o) for (c, _), o in zip(self.components, outs, strict=True)], len(prompts))
        return {"scores": out.scores, **out.details}

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for _, comp in self.components:
            if hasattr(comp, "close"):
                comp.close()


def component_means(scored: dict[str, np.ndarray], cfg: RewardConfig) -> dict[str, float]:
    """Per-component figures for the metrics: ``reward/<name>`` the batch mean (when it
    answered) and ``reward_available/<name>`` 1 or 0."""
    out: dict[str, float] = {}
    for c in cfg.components:
        available = c.label in scored
        out[f"reward_available/{c.label}"] = float(available)
        if available:
            out[f"reward/{c.label}"] = float(scored[c.label].mean())
    return out

