# Two entry points, each complete on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv, install a CPU build of PyTorch and heavytail with what they need, then run.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STEPS ?= 300
OUT ?= heavytail_runs/demo

.PHONY: demo test install install-dev browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# Headless Chromium for the report's browser tests (skipped when it is absent and cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	   >/dev/null) || echo "chromium not installed: browser tests will be skipped"; }

demo: install
	$(VENV)/bin/heavytail demo --steps $(STEPS) --out $(OUT)

# The suite's temporary files stay in this checkout (.pytest_tmp): pytest's default, one directory per user that
# each session prunes, lets two test sessions on one machine delete each other's files.
test: install-dev browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q -p no:cacheprovider --basetemp=.pytest_tmp tests

clean:
	rm -rf $(VENV) heavytail_runs
