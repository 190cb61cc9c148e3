# kldsl — `make run` and `make test` each work as the first command on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
TORCH := torch==2.13.0

.PHONY: setup run test fuzz lint format bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/kldsl run examples/positive_not_curse.kl

test: setup
	$(PY) -m pytest

# a long run of tests/test_fuzz.py (10^5 cases unless KLDSL_FUZZ_EXAMPLES says); prints the count
fuzz: setup
	KLDSL_FUZZ_EXAMPLES=$${KLDSL_FUZZ_EXAMPLES:-100000} $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py

bench: setup
	$(PY) -m benchmarks.run

bench-quick: setup
	$(PY) -m benchmarks.run --quick

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
