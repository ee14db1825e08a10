"""A user's reward: a Python callable named ``package.module:attribute``, under the reward contract.

The attribute is a function ``f(images, prompts, metadata)``, or a class instantiated once
(per reward actor or service) with ``init_kwargs`` whose instances are called that way:

- ``images``: uint8 numpy array (N, H, W, C); ``prompts``: N strings; ``metadata``: N dicts
  (each prompt's metadata from the dataset) or None when the prompts carry none;
- returns the N scores (any sequence or array of N real numbers), or a pair ``(scores,
  components)`` where ``components`` maps a name to N more numbers (logged as details
  ``<reward>/<name>``), or a :class:`RewardOutput`.

Everything that can be checked without calling it is checked by :func:`check_callable` (the
import, the attribute, the signature, the ``init_kwargs``), so a configuration naming a bad
callable is refused before a run starts; what it returns is checked on every call (shape,
finiteness, the type of ``components``), and a bad output is a ValueError naming the reward.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from reward_workers.base import RewardOutput, check_batch

CALLABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
"""``package.module:attribute`` (the attribute may be dotted: ``module:Class.method``)."""
_ARGS = ("images", "prompts", "metadata")


def _resolve(spec: str) -> Any:  # noqa: ANN401 - whatever the module holds
    """The object ``spec`` names; ValueError in one line for a bad spec, import or attribute."""
    if not isinstance(spec, str) or not re.fullmatch(CALLABLE_PATTERN, spec):
        raise ValueError(f"callable {spec!r} is not of the form 'package.module:function'")
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error the module raises while importing
        raise ValueError(f"cannot import {module_name!r}: {type(e).__name__}: {_first_line(e)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _check_accepts(fn: Callable, what: str, bound_self: bool = False) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the first call will tell
    try:
        sig.bind(*([None] if bound_self else []), None, None, None)
    except TypeError as e:
        raise ValueError(f"{what} must accept (images, prompts, metadata); its signature is "
                         f"{sig} ({e})") from None


def check_callable(spec: str, init_kwargs: Mapping[str, Any] | None = None) -> Any:  # noqa: ANN401
    """Import and check ``spec`` without calling it; returns the function or class.

    Refused (ValueError, one line): a malformed spec, a module that fails to import, a missing
    attribute, something not callable, a function (or a class's ``__call__``) that cannot take
    ``(images, prompts, metadata)``, ``init_kwargs`` the class's constructor does not take (or
    any for a function), ``init_kwargs`` that are not JSON.
    """
    kwargs = dict(init_kwargs or {})
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"init_kwargs must be JSON (strings, finite numbers, lists, mappings): {e}") from None
    obj = _resolve(spec)
    if inspect.isclass(obj):
        try:
            inspect.signature(obj).bind(**kwargs)
        except TypeError as e:
            raise ValueError(f"class {spec!r} cannot be constructed with init_kwargs "
                             f"{sorted(kwargs)}: {e}") from None
        except ValueError:
            pass  # no signature to read: construction will tell
        call = next((vars(k)["__call__"] for k in obj.__mro__ if "__call__" in vars(k)), None)
        if call is None:
            raise ValueError(f"class {spec!r} has no __call__: its instances cannot score images")
        _check_accepts(call, f"{spec}.__call__", bound_self=not isinstance(call, staticmethod))
        return obj
    if not callable(obj):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a function or class")
    if kwargs:
        raise ValueError(f"{spec!r} is a function: init_kwargs apply to a class only")
    _check_accepts(obj, spec)
    return obj


class PythonReward:
    """The reward ``spec`` names, its output checked on every call; see the module docstring.

    name: how errors refer to it (the component's label, or the service's reward name).
    """

    def __init__(self, spec: str, init_kwargs: Mapping[str, Any] | None = None, name: str | None = None) -> None:
        obj = check_callable(spec, init_kwargs)
        self.spec, self.name = spec, name or f"python:{spec}"
        self.fn: Callable[..., Any] = obj(**dict(init_kwargs or {})) if inspect.isclass(obj) else obj

    def __call__(self, images: np.ndarray, prompts: list[str],
                 metadata: list[dict] | None = None) -> RewardOutput:
        check_batch(images, prompts)
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")
        return self.check_output(self.fn(images, list(prompts), metadata), len(prompts))

    def check_output(self, out: object, n: int) -> RewardOutput:
        """``out`` as a RewardOutput of N finite scores, or a ValueError naming this reward."""
        if isinstance(out, RewardOutput):
            scores, components = out.scores, out.details
        elif isinstance(out, tuple):
            if len(out) != 2:
                raise self._error(f"returned a tuple of {len(out)} items; expected scores or "
                                  "(scores, components)")
            scores, components = out
            if not isinstance(components, Mapping):
                raise self._error(f"returned components of type {type(components).__name__}; "
                                  "expected a dict name → N numbers")
        else:
            scores, components = out, {}
        details: dict[str, np.ndarray] = {}
        for key, values in components.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise self._error(f"returned a component named {key!r}; names are non-empty "
                                  "strings without '/'")
            details[key] = self._numbers(values, n, f"component {key!r}")
        return RewardOutput(scores=self._numbers(scores, n, "scores"), details=details)

    def _numbers(self, values: object, n: int, what: str) -> np.ndarray:
        try:
            arr = np.asarray(values)
        except Exception as e:
            raise self._error(f"returned {what} that are not numbers: {type(e).__name__}") from None
        if arr.dtype == bool or arr.dtype.kind not in "iuf":
            raise self._error(f"returned {what} of dtype {arr.dtype}; expected real numbers")
        arr = arr.astype(np.float64)
        if arr.shape != (n,):
            raise self._error(f"returned {what} of shape {arr.shape} for {n} images; expected ({n},)")
        if not np.all(np.isfinite(arr)):
            bad = np.flatnonzero(~np.isfinite(arr))
            raise self._error(f"returned non-finite {what} at {bad[:8].tolist()} "
                              f"({arr[bad[0]]} at image {bad[0]})")
        return arr

    def _error(self, message: str) -> ValueError:
        return ValueError(f"reward {self.name!r} ({self.spec}) {message}")
