# rayft: two commands for a new user.
#   make demo   create .venv, install everything, run the main job on the bundled data
#   make test   create .venv if needed, run the test suite (what CI runs)
#   make test-all   also the runs of minutes each: real model on real data (MiniLM on
#                   SST-2), PBT's exploit-and-restart on a real head

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a CPU-only machine this pin takes the local CPU build; on a GPU machine the CUDA one.
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed>=0.19,<0.20
PYTEST_ARGS ?=

.PHONY: venv demo test test-all test-cluster lint format docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	# DeepSpeed is a source package: build it against the torch above, not an isolated copy.
	$(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# DeepSpeed's C++ ops, compiled now rather than inside the first run (63-73 s on 2 cores).
	# Not fatal: a machine without a compiler (or a GPU one without nvcc, for CPUAdam) can
	# still run what does not load the op that failed.
	$(PY) -m rayft build-ops || echo "make: rayft build-ops failed (above); runs that load that op will try to compile it"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m rayft.tune --config configs/demo.yaml

test: venv lint
	$(PY) -m pytest -m "not real and not slow and not cluster" --durations=15 $(PYTEST_ARGS)

# Minutes each on 2 CPU cores: kept out of `make test` so that stays under 20 minutes.
# The cluster scenarios run first and alone: the autoscaler's needs `ray stop --force`.
test-all: venv lint test-cluster
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

test-cluster: venv
	$(PY) -m pytest -m cluster --durations=5 $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check rayft tests benchmarks
	$(VENV)/bin/ruff format --check rayft tests benchmarks

format: venv
	$(VENV)/bin/ruff check --fix rayft tests benchmarks
	$(VENV)/bin/ruff format rayft tests benchmarks

docs: venv
	$(PY) -m rayft.docs > docs/configuration.md

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
