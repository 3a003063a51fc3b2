# The two commands of the README, plus their one-time setup.
#   make demo   set up .venv if missing, fetch the demo data (dvc pull), train every dataset
#   make test   set up .venv if missing, run the test suite (lint included)

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install lock publish gc seed-edits report

demo: $(VENV)/.installed
	$(BIN)/dvc pull
	$(BIN)/snakemake --cores 1 train_all

test: $(VENV)/.installed $(VENV)/.llama-cpp
	$(BIN)/pytest

install: $(VENV)/.installed

# One self-contained page of every dataset's grid, loss curve and model card (after a run).
report: $(VENV)/.installed
	$(BIN)/snakemake --report report.html train_all

# Push changed exports and grids (one .dvc file each) and data/ to your own DVC remote.
publish: $(VENV)/.installed
	$(BIN)/python -m loramill.publish

# Start caption review: append the auto captions of images that have no edit yet to
# data/<DS>/metadata.csv (existing rows are never changed or reordered).
seed-edits: $(VENV)/.installed
	$(BIN)/python -m loramill.seed_edits $(DS)

# Free disk: drop the run-cache entries (.cache/runs) that no lock in locks/ references, and
# the cached grid cells (.cache/grid) that no grid in grids/ shows.
# `$(BIN)/python -m loramill.run_cache gc --max-size 20G` keeps the most recently used instead.
gc: $(VENV)/.installed
	$(BIN)/python -m loramill.run_cache gc
	$(BIN)/python -m loramill.grid_render gc

# torch is pinned to 2.13.0 and everything else is constrained by the lock file, so pip never
# swaps in a newer torch with its several GB of CUDA wheels. open-clip-torch only carries the
# CLIP BPE vocabulary for models/pretrain_tiny_sd.py and the tests: --no-deps, and it is never imported.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -c constraints.txt open-clip-torch
	touch $@

# llama.cpp itself, for the tests that load GGUF exports (the `llama` extra): it has no wheel
# here, so pip builds it from source, about 4 minutes on two cores (multimodal library left
# out). Only `make test` needs it.
$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install --quiet -c constraints.txt -e '.[llama]'
	touch $@

lock: $(VENV)/.installed
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.tmp && mv constraints.tmp constraints.txt
