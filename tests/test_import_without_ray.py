"""samplers/, learner/ and reward_workers/ import without Ray (a GPU check runs them in one
process on a machine where Ray is not installed: benchmarks/gpu_e2e.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("samplers", "learner", "reward_workers")

# a meta-path hook that makes every `import ray…` fail, then each module of the packages imported
PROBE = r"""
import importlib, importlib.abc, pkgutil, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this check runs without Ray)")
        return None

sys.meta_path.insert(0, NoRay())
failed = []
for package in sys.argv[1:]:
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_packages_import_without_ray() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"modules that need Ray (or fail to import):\n{out.stdout}{out.stderr[-2000:]}"
