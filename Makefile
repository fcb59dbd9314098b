# Funnel: `make demo` and `make test` each do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is installed first, by what the machine has: with CUDA, torch==$(TORCH_VERSION) from the
# default index (a CUDA build); on Linux without CUDA, the CPU build ($(TORCH_VERSION)+cpu) from the
# PyTorch CPU wheel index, never the multi-GB CUDA wheels; elsewhere (macOS) the default index,
# whose wheels are CPU builds. Overrides: TORCH_SPEC (the requirement, e.g. 'torch==2.13.0') and
# TORCH_PIP_ARGS (e.g. '--index-url https://mirror.example/whl/cpu').
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS ?=
TORCH_SPEC ?=
CONFIG ?= configs/small.yaml
ML100K := data/raw/ml-100k/ml-100k.inter
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow bench bench-funnel bench-peer fidelity lint lock movielens clean

setup: $(STAMP) $(ML100K)

# The venv is rebuilt whenever the pins change (stale) or it is missing.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || { \
	  echo "setup: Funnel needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) -V 2>/dev/null || echo 'not found')." \
	       "Run with PYTHON=python3.11 (or newer), e.g. 'make test PYTHON=python3.12'." >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  spec="$(or $(TORCH_SPEC),torch==$(TORCH_VERSION))"; echo "setup: CUDA present -> $$spec (CUDA build)"; \
	  $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$$spec"; \
	elif [ "$$(uname -s)" = Linux ]; then \
	  spec="$(or $(TORCH_SPEC),torch==$(TORCH_VERSION)+cpu)"; \
	  echo "setup: no CUDA -> $$spec (CPU build, from $(TORCH_CPU_INDEX) or a local wheel)"; \
	  $(PY) -m pip install -q --retries 1 --extra-index-url $(TORCH_CPU_INDEX) $(TORCH_PIP_ARGS) "$$spec"; \
	else \
	  spec="$(or $(TORCH_SPEC),torch==$(TORCH_VERSION))"; echo "setup: no CUDA -> $$spec (CPU build)"; \
	  $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$$spec"; \
	fi 2>&1 | grep -v -e '^WARNING: Location' -e '^WARNING: Retrying' -e 'Could not fetch URL'; test $${PIPESTATUS[0]} -eq 0
	@echo "setup: pinned dependencies from requirements.lock"
	@$(PY) -m pip install -q -r requirements.lock 2>&1 | grep -v '^WARNING: Location'; test $${PIPESTATUS[0]} -eq 0
	@$(PY) -m pip install -q --no-deps -e . 2>&1 | grep -v '^WARNING: Location'; test $${PIPESTATUS[0]} -eq 0
	@$(PY) -c "import torch, ray, mlflow, faiss; cuda = torch.version.cuda; print('setup: torch', torch.__version__, '(CUDA ' + cuda + ')' if cuda else '(CPU build)', '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
	@touch $(STAMP)

# MovieLens-100k (real data; GroupLens terms: research use, no redistribution).
# Read out of the recbole 1.2.1 wheel into the git-ignored data/ folder.
$(ML100K):
	@$(PYTHON) scripts/fetch_movielens.py data/raw/ml-100k || echo "setup: MovieLens-100k not fetched (offline?); its tests will be skipped"

movielens: $(ML100K)

demo: setup
	$(PY) -m jobs.e2e --config $(CONFIG)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.pipeline
	@test -f data/processed/small/stats.json || $(PY) -m jobs.ingest --config configs/small.yaml
	$(PY) -m benchmarks.sequences --data data/processed/small
	$(PY) -m benchmarks.models
	$(PY) -m benchmarks.lrea_serving
	$(PY) -m benchmarks.train_throughput
	$(PY) -m benchmarks.faiss_recall

# Training steps against FuxiCTR in one process (benchmarks/peer_fuxictr.py). FuxiCTR is a
# benchmark-only extra, installed here against the lock, never part of the runtime set.
bench-peer: setup
	@$(PY) -m pip install -q -c requirements.lock 'fuxictr==2.3.10' 2>&1 | grep -v '^WARNING: Location'; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m benchmarks.peer_fuxictr

# Needs `make demo` first (registered models); the fidelity report takes about an hour.
bench-funnel: setup
	$(PY) -m benchmarks.ab_headroom --config configs/small.yaml
	$(PY) -m benchmarks.serve_load --config configs/small.yaml

# The converged protocol (benchmarks/RESULTS.md): both datasets side by side, one thread each;
# about 1.5 h on 2 cores (the same command uses the GPU where one is present).
fidelity: setup movielens
	@test -f data/processed/small/stats.json || $(PY) -m jobs.ingest --config configs/small.yaml
	@test -f data/processed/movielens/stats.json || $(PY) -m jobs.ingest --config configs/small.yaml --source movielens
	@mkdir -p benchmarks/out
	$(PY) -m benchmarks.fidelity --data data/processed/movielens --seeds 3 --parts ranking --rows core --epochs 10 \
	  --out benchmarks/out/fidelity_movielens.json > benchmarks/out/fidelity_movielens.md & \
	$(PY) -m benchmarks.fidelity --data data/processed/small --seeds 3 --parts ranking --rows paper \
	  --train-rows 200000 --eval-rows 40000 --epochs 8 --out benchmarks/out/fidelity_small.json; wait
	$(PY) -m benchmarks.fidelity --report benchmarks/out/fidelity_movielens.json

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

lock: setup
	$(PY) -m pip freeze --exclude-editable | grep -viE '^(torch==|funnel)' > requirements.lock.new
	@(echo "# Resolved with Python 3.11 after \`pip install torch==2.13.0\` (installed first, see Makefile)."; \
	  echo "# Regenerate: make lock"; cat requirements.lock.new) > requirements.lock; rm requirements.lock.new

clean:
	rm -rf $(VENV) data/processed runs .pytest_cache
