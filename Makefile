# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/datasets)
# Use the workplace's offline datasets when they are there; otherwise hasched's own lookup applies.
ifneq ($(wildcard $(SHARED_DATA)),)
export HASCHED_DATA_DIR ?= $(SHARED_DATA)
endif
export HASCHED_MODELS_DIR ?= $(abspath .cache/models)

.PHONY: setup demo test lint bench clean

$(BIN)/hasched: pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/hasched

demo: setup
	$(BIN)/hasched demo --out runs/demo

# The Ray executor's identity test needs Ray; where it cannot be installed that test skips.
$(VENV)/.ray-extra: $(BIN)/hasched
	-$(BIN)/pip install -q 'ray>=2.9' && touch $@

test: setup $(VENV)/.ray-extra
	$(BIN)/ruff check src tests
	HASCHED_OFFLINE=1 $(BIN)/pytest

lint: setup
	$(BIN)/ruff check src tests

DEVICE ?= cpu
bench: setup
	$(BIN)/hasched bench --device $(DEVICE) --markdown runs/bench.md

clean:
	rm -rf $(VENV) .cache runs
