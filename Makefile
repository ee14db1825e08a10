# Two commands from a clean clone: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fmrl-installed
# CPU torch from this machine's local wheel folder when there is one; the constraint
# lives here, not in pyproject.toml, so GPU users keep their CUDA build of torch.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
CONFIG ?= configs/digits_ac_flow.yaml
PYTEST_ARGS ?=
# two pytest-xdist workers: the modules that start Ray run in order on one, the rest beside them
# (tests/conftest.py's scheduler says why); TEST_WORKERS=0 runs the suite in this process alone
TEST_WORKERS ?= 2

.PHONY: setup run test lint programs redis assets clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) $(FIND_LINKS) -c constraints-cpu.txt -e '.[dev]'
	@# Byte-compile the installed packages once: where PYTHONDONTWRITEBYTECODE is set (as on
	@# this project's machines) every Ray worker would otherwise recompile transformers' and
	@# diffusers' sources on import, ~6 s of CPU per actor (a few files are Python-2 only: || true).
	@$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	@touch $(STAMP)

run: setup
	$(VENV)/bin/fmrl train --config $(CONFIG)

# Programs the tests start, from Debian's packages where missing: redis-server (the reward
# services' queue) and prometheus + promtool (the metrics tests scrape a run with a real one)
redis: programs

programs:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: setup programs
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# Remake the shipped weights (what is in the repository is what these make).
assets: setup
	$(VENV)/bin/fmrl train-classifier
	$(VENV)/bin/fmrl pretrain-digits
	$(VENV)/bin/fmrl train-digits-clip

clean-runs:
	rm -rf runs/
