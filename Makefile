# gpu-dra: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
SRC := driver cdi mig sharing tests benchmarks

.PHONY: all venv peers proto verify-proto lint fmt typecheck check test test-fast test-k8s demo bench clean

all: test

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

peers:  ## Go-built test peers (etcd, kube-*, helm, cdi, mock NVML), cached under ~/.cache/gpu-dra
	tests/peers/build.sh all

proto: venv
	$(BIN)/python proto/generate.py

verify-proto: venv
	$(BIN)/python proto/generate.py --check

lint: venv
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

fmt: venv
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

typecheck: venv
	$(BIN)/mypy driver cdi mig sharing tests benchmarks

check: verify-proto lint typecheck

# The one test command (CI runs it through .ci/run): set-up, static checks, every test.
test: venv peers check
	$(BIN)/python -m pytest tests

test-fast: venv  ## unit + integration only, no Go peers
	$(BIN)/python -m pytest tests -m "not e2e and not mocknvml"

test-k8s: venv peers  ## the e2e tests against another Kubernetes release: make test-k8s K8S_VERSION=v1.34.4
	K8S_VERSION=$(K8S_VERSION) tests/peers/build.sh k8s
	$(BIN)/python -m pytest tests/e2e --k8s-version $(K8S_VERSION)

demo: venv peers  ## a simulated 8x A100 node against the local control plane
	$(BIN)/python -m tests.ground.demo $(DEMO_ARGS)

bench: venv peers
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
