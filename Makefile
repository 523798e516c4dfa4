# The two entry points of the README. Each creates the virtual environment if missing,
# installs torch 2.13.0 (the tested version) first, then the package with its [dev] and
# [docs] extras, and runs the job. `make test` builds the documentation site first (strict:
# a warning fails it; the gallery examples run during the build, about a minute on 2
# cores), then runs the test suite, whose summary is the last thing it prints.
#
# TORCH_INDEX chooses where torch comes from. Empty (the default): pip's configured index;
# on Linux PyPI serves the CUDA build (with ~2 GB of CUDA packages). For the CPU build:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffusolve-installed

.PHONY: demo test test-all docs lint bench-quick solvers-table wheel-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0$(if $(TORCH_INDEX), --index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

# the demo's own folder (diffusolve-demo/) is refreshed on every run
demo: $(STAMP)
	$(VENV)/bin/diffusolve demo --force

test: $(STAMP) docs
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

# the documentation site in build/site (open build/site/index.html); warnings are errors
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 OMP_NUM_THREADS=1 $(VENV)/bin/mkdocs build --strict

# build the wheel and sdist, twine-check them, install the wheel in a fresh venv, run the demo
wheel-check: $(STAMP)
	PY=$(PY) TORCH_INDEX=$(TORCH_INDEX) bash tools/check_wheel.sh

test-all: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests && $(VENV)/bin/ruff format --check src tests

bench-quick: $(STAMP)
	$(VENV)/bin/diffusolve bench samplers --quick --json bench-out/samplers-quick.json
