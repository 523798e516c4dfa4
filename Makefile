# The two entry points of the README. Each creates the virtual environment if missing,
# installs the pinned CPU torch first (an unpinned torch pulls CUDA packages), then the
# package with its extras, and runs the job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffusolve-installed

.PHONY: demo test test-all lint bench-quick solvers-table

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffusolve demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

test-all: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests && $(VENV)/bin/ruff format --check src tests

bench-quick: $(STAMP)
	$(VENV)/bin/diffusolve bench samplers --quick --json bench-out/samplers-quick.json
