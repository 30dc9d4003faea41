# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DATA := data/rotten-tomatoes
MODEL := models/rotten-tomatoes
REPORTS := reports

.PHONY: install demo demo-model test test-fast lint typecheck bench bench-smoke clean

install: $(STAMP)

# torch is pinned in pyproject.toml to the CPU build that pip finds locally
# (a plain `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(DATA)/train.jsonl: | $(STAMP)
	$(BIN)/exemplar data rotten-tomatoes --out $(DATA)

$(MODEL)/bundle.json: $(DATA)/train.jsonl | $(STAMP)
	$(BIN)/exemplar train --data $(DATA)/train.jsonl --calib $(DATA)/calib.jsonl --out $(MODEL)

demo-model: $(MODEL)/bundle.json

demo: demo-model
	@echo "== held-out test split (in distribution)"
	$(BIN)/exemplar eval --model $(MODEL) --data $(DATA)/test.jsonl --json $(REPORTS)/demo-test.json --plot $(REPORTS)/demo-test.png
	@echo "== one explanation"
	$(BIN)/exemplar explain --model $(MODEL) "A gorgeous, heartfelt film with a terrific cast, though it drags a little in the middle."
	@echo "== the streaming loop: embedded broker, predictor, a few hundred events"
	$(BIN)/exemplar demo --model $(MODEL) --data $(DATA)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Benchmarks of the model `make demo` builds and ships (another: make bench MODEL=... DATA=...;
# extra flags, e.g. --skip-1m or --index-1m: make bench BENCH_ARGS=--skip-1m).
bench: demo-model
	$(BIN)/python -m benchmarks.run --model $(MODEL) --data $(DATA) $(BENCH_ARGS)

# Every figure at toy sizes with a tiny random model (CI: tests/integration/test_bench_smoke.py).
bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run --smoke

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
