# sweep: two commands on a fresh machine —  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR ?= outputs/demo
# `make test`'s pytest-xdist processes, each taking a test module at a time (0: one process)
TEST_WORKERS ?= 2

.PHONY: setup demo test test-slow test-gpu test-all bench lint format clean

setup: $(STAMP)  ## create .venv and install sweep with its dev tools (torch==2.13.0: pip's build for this machine, with CUDA on Linux unless pip is set to a CPU index)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup  ## synthetic store with known features -> L1 x dict-ratio sweep -> results table
	$(BIN)/sweep run sweep_dir=$(DEMO_DIR) data.rows=1500000 \
		grid.l1='[1e-2,2e-2,4e-2,8e-2]' grid.dict_ratio='[4,8]'
	$(BIN)/sweep report $(DEMO_DIR)

test: setup  ## the test suite (CPU, real Ray / Hydra / transformer_lens, tiny sizes; a test that hangs fails after 10 min)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 --timeout=600

test-slow: setup  ## quality-bar and long end-to-end checks
	$(BIN)/python -m pytest -q -m slow

test-gpu: setup  ## the CUDA tests (skipped without a GPU)
	$(BIN)/python -m pytest -q -m gpu

test-all: setup
	$(BIN)/python -m pytest -q -m 'slow or not slow'

bench: setup  ## throughput ratios (ensemble vs loop, streaming, checkpoints, scheduling, harvest)
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_harvest.py

lint: setup
	$(BIN)/ruff check sweep tests scripts
	$(BIN)/ruff format --check sweep tests scripts

format: setup
	$(BIN)/ruff check --fix sweep tests scripts
	$(BIN)/ruff format sweep tests scripts

clean:  ## the demo's sweep and build caches (never your own sweeps under outputs/)
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache build dist *.egg-info
	rmdir outputs 2>/dev/null || true
