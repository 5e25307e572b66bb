# saejax: `make demo` runs the main job on the embedded default corpus; `make test` runs the tests.
# Both create (or refresh, when pyproject.toml changed) the local .venv first.

PYTHON ?= $(shell for p in python3.12 python3.11 python3; do command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && echo $$p && break; done)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,hf
RUNS   ?= runs

.PHONY: venv demo test test-slow test-all bench lint clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "saejax needs Python >= 3.11 (python3.11 or python3.12 on PATH)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) launch/build_corpus.py --config=experiments/corpus_stdlib.py \
	    --config.corpus.out_dir=$(RUNS)/demo/corpus
	@echo "demo: token store and tokenizer written to $(RUNS)/demo/corpus (see metadata.json)"

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_data.py

lint: $(STAMP)
	$(PY) -m ruff check saejax launch experiments tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
