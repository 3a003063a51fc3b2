# The two commands of the README are make demo and make test; make help lists every target
# with its `## ` line (the line right above the target), and python -m loramill shows them too.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install lock publish gc seed-edits captions report help

## set up .venv if missing, fetch the demo data (dvc pull), train every dataset
demo: $(VENV)/.installed
	$(BIN)/dvc pull
	$(BIN)/snakemake --cores 1 train_all

# Three pytest-xdist workers on two cores: with two, a fifth of the cores' time went idle
# (Slurm's status polls, sleeps between a test's checks, process start-ups); the third fills it
# (tests/worker_groups.py says how the suite is split). The slowest tests are named so they
# stay visible. `make test PYTEST_ARGS=tests/test_merge.py` runs one file in this process.
PYTEST_ARGS ?= -n 3 --dist loadscope --no-loadscope-reorder --durations=25

## set up .venv if missing, run the test suite (lint included)
test: $(VENV)/.installed $(VENV)/.llama-cpp $(VENV)/.bitsandbytes
	$(BIN)/pytest $(PYTEST_ARGS)

## set up .venv only (pinned torch, locked dependencies, loramill itself)
install: $(VENV)/.installed

# First each dataset's overview page from what is there (--allowed-rules: nothing else runs,
# a stale stage is not retrained for a report), then the report of them and of train_all.
## report.html: every dataset's grid, loss curve and model card on one page (after a run)
report: $(VENV)/.installed
	$(BIN)/snakemake --cores 1 --allowed-rules overview report_pages -- report_pages
	$(BIN)/snakemake --report report.html report_pages

## push changed exports, grids (one .dvc file each) and data/ to your own DVC remote
publish: $(VENV)/.installed
	$(BIN)/python -m loramill.publish

# Existing rows are never changed or reordered.
## DS=<ds>: start caption review (auto captions of unedited images into metadata.csv)
seed-edits: $(VENV)/.installed
	$(BIN)/python -m loramill.captions.seed_edits $(DS)

# On 127.0.0.1 only, behind the random token of the URL it prints; it writes metadata.csv only.
## DS=<ds>: review and edit a dataset's captions in the browser (prints a local URL)
captions: $(VENV)/.installed
	$(BIN)/python -m loramill.captions.review $(DS)

# The run-cache entries are in .cache/runs, the grid cells in .cache/grid.
# `$(BIN)/python -m loramill.reruns.run_cache gc --max-size 20G` keeps the most recently used instead.
## free disk: drop run-cache entries no lock references, grid cells no grid shows
gc: $(VENV)/.installed
	$(BIN)/python -m loramill.reruns.run_cache gc
	$(BIN)/python -m loramill.grid.render gc

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

# bitsandbytes (the `quantize` extra), for the tests that quantize a base: in a folder of its
# own that those tests put on their path, not in the environment, where peft would import it in
# every test's jobs (about 2 s each; pyproject.toml says why).
# Its pin is the extra's in pyproject.toml.
$(VENV)/.bitsandbytes: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet --no-deps -c constraints.txt --target $(VENV)/bitsandbytes \
	  "$$(grep -o 'bitsandbytes==[0-9.]*' pyproject.toml)"
	touch $@

## regenerate constraints.txt from the installed .venv
lock: $(VENV)/.installed
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.tmp && mv constraints.tmp constraints.txt

## list the make targets with what each does
help:
	@awk '/^## /{d=substr($$0,4);next} /^[A-Za-z][A-Za-z0-9_-]*:/&&d!=""{split($$0,t,":");printf "  make %-11s %s\n",t[1],d} {d=""}' $(firstword $(MAKEFILE_LIST))
