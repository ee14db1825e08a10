"""fmrl's Python API, over the project's top-level packages (services, learner, samplers, ...):

    import fmrl
    cfg = fmrl.load_config("digits_ac_flow", ["run.iterations=20"])  # a shipped name, or a path
    summary = fmrl.train(cfg)
    fmrl.evaluate(Path("runs/NAME"))                                  # `fmrl eval`

Names are imported on first use, so ``import fmrl`` (and ``fmrl.__version__``) loads neither
torch nor Ray.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.config import ConfigError, TrainConfig, load_config, shipped_configs
    from services.driver import train
    from services.eval_cmd import evaluate_checkpoint as evaluate

try:
    __version__ = version("fmrl")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

# public name → (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "train": ("services.driver", "train"),
    "TrainConfig": ("services.config", "TrainConfig"),
    "load_config": ("services.config", "load_config"),
    "shipped_configs": ("services.config", "shipped_configs"),
    "ConfigError": ("services.config", "ConfigError"),
    "evaluate": ("services.eval_cmd", "evaluate_checkpoint"),
}

__all__ = ["ConfigError", "TrainConfig", "__version__", "evaluate", "load_config", "shipped_configs", "train"]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'fmrl' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
