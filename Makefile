# The README's commands. `make serve` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build by default; GPU hosts override, e.g. `make serve TORCH_SPEC='torch==2.11.*'`.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8080
SERVE_ARGS ?=
PYTEST_ARGS ?=

SETUP_STAMP := $(VENV)/.setup-done
TEST_STAMP := $(VENV)/.test-deps-done

.PHONY: setup setup-test serve test lint bench bench-attention clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(SETUP_STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --disable-pip-version-check -q '$(TORCH_SPEC)'
	$(PIP) install --disable-pip-version-check -q -e '.[starter]'
	touch $@

$(TEST_STAMP): $(SETUP_STAMP)
	$(PIP) install --disable-pip-version-check -q -e '.[starter,test]'
	touch $@

setup: $(SETUP_STAMP)

setup-test: $(TEST_STAMP)

serve: setup
	$(VENV)/bin/infercore serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check .

bench: setup-test
	$(PY) benchmarks/bench_engine_cpu.py

bench-attention: setup-test
	$(PY) benchmarks/bench_attention_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
