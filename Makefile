# saejax: `make demo` runs the main job on the embedded default corpus; `make test` runs the tests.
# Both create (or refresh, when pyproject.toml changed) the local .venv first: the demo needs
# only saejax's own dependencies, the tests add the dev and hf (torch, transformers,
# sae-lens) extras.

PYTHON ?= $(shell for p in python3.12 python3.11 python3; do command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo $$p && break; done)
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev,hf
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
BASE   := $(VENV)/.installed-base
RUNS   ?= runs
# Transparent huge pages for malloc: XLA:CPU allocates fresh [batch, features] buffers every
# step and page faults otherwise dominate its elementwise passes (~3x, benchmarks/RESULTS.md).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: venv demo test test-slow test-all browsers bench bench-peers lint clean

define install
	@test -n "$(PYTHON)" || { echo "saejax needs Python >= 3.11 (python3.11 or python3.12 on PATH)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '$(1)'
	@touch $@
endef

$(STAMP): pyproject.toml
	$(call install,.[$(EXTRAS)])

$(BASE): pyproject.toml
	$(call install,.)

venv: $(STAMP)

demo: $(BASE)
	$(PY) launch/demo.py --runs=$(RUNS)

# Two pytest-xdist workers (a file's tests stay on one worker, so module fixtures are
# built once); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile

# The slow tests; the dashboard test in headless Chromium skips unless `make browsers`
# has installed chromium and chromedriver.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

test-all: $(STAMP)
	$(PY) -m pytest -q

# Chromium and its WebDriver for the slow dashboard test (Debian/Ubuntu, as root).
browsers:
	apt-get update && apt-get install -y chromium chromium-driver

bench: $(STAMP)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_sae.py --devices 1 --features 4096,16384 --ground-truth 0
	$(PY) benchmarks/bench_lm.py --steps 10
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_resample_draws.py
	$(PY) benchmarks/memory_estimates.py

# Optional, not part of `make test` or `make bench`: saejax against SAELens and EleutherAI
# sparsify on the same TopK and ReLU+L1 training steps (benchmarks/bench_peers.py; the table
# goes to benchmarks/out/peers.md). Builds its own $(PEERS_VENV) with all three (minutes, once):
# torch comes first from the CPU wheel index (PyPI's Linux torch pulls the CUDA toolkit),
# without dependencies; the second install takes those from PyPI.
# Arguments for the script go in PEERS_ARGS, e.g. make bench-peers PEERS_ARGS="--rounds 5".
PEERS_VENV  ?= .venv-peers
PEERS_PY    := $(PEERS_VENV)/bin/python
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PEERS_ARGS  ?=

$(PEERS_VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "saejax needs Python >= 3.11 (python3.11 or python3.12 on PATH)"; exit 1; }
	@test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --upgrade pip
	$(PEERS_PY) -m pip install --quiet --no-deps torch==2.13.0 --index-url $(TORCH_INDEX)
	$(PEERS_PY) -m pip install --quiet -e . torch==2.13.0 'sae-lens==6.54.*' eai-sparsify==1.3.3
	@touch $@

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_PY) benchmarks/bench_peers.py $(PEERS_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check saejax launch experiments tests benchmarks

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache .ruff_cache
