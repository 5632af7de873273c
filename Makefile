# Each target sets up .venv on first use. On a machine without CUDA, torch==2.13.0 (CPU
# build) is installed first, so pip never pulls a multi-GB CUDA wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA present: keeping pip's choice of torch"; \
	else \
		$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hapo train --recipe tiny/hapo --output results/demo --overwrite
	$(BIN)/hapo evaluate results/demo --bench arith --n 8 --limit 200 \
		--temperature 0.5,0.8,1.0,1.1,adaptive --name temperature-sweep
	$(BIN)/hapo analyze results/demo --format png,pdf

test: $(STAMP)
	$(BIN)/ruff check hapo_cli analysis tests bench scripts
	$(BIN)/python -m pytest -q

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check hapo_cli analysis tests bench scripts

clean:
	rm -rf $(VENV)
