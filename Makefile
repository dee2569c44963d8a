# Two commands on a fresh machine:  make demo   (the main job)   and   make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1

.PHONY: install browser demo test lint default-model clean

# Idempotent: the stamp is rebuilt only when the requirements change.
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

default-model: install
	$(BIN)/python -m medicalgpt.default_model

demo: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash run_full_pipeline.sh

# The chat demo's browser test drives Debian's headless Chromium (never a downloaded browser).
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# One thread: with two, throughput collapses whenever the other core is busy.
test: install browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf models outputs-* runs .pytest_cache
