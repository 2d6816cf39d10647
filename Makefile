# Two commands on a fresh machine: `make serve` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
# CI sets TORCH=torch==2.13.0 (a CPU build on the CI machine's disk); a plain `torch` lets pip pick
# the CUDA build for GPU hosts.
TORCH ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install serve test protos check-protos bench bench-stream bench-model lint format soak

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[server,test,bench]'
	touch $@

serve: install
	$(VENV)/bin/roberta-server serve $(ARGS)

test: install
	$(PY) -m pytest -q -ra $(ARGS) tests

protos: install
	$(PY) protos/generate.py

check-protos: install
	rm -rf build/protos-check
	$(PY) protos/generate.py build/protos-check
	diff -r -x __pycache__ build/protos-check client/roberta_client/_proto \
	  || (echo "stale stubs: run 'make protos' and commit the result" >&2; exit 1)

bench-model: install
	$(PY) bench/bench_model.py $(ARGS)

# The server benchmark (issue targets a-e), then bulk streams against the same ceiling and the
# interactive p99 beside them. ARGS go to the first; `--quick` shortens both.
bench: install
	$(PY) bench/bench_server.py $(ARGS)
	$(PY) bench/bench_stream.py $(if $(findstring --quick,$(ARGS)),--quick)

bench-stream: install
	$(PY) bench/bench_stream.py $(ARGS)

# Bounded (default 5 minutes) mixed traffic with cancellations; not part of `make test`.
soak: install
	$(PY) bench/soak.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
