# Two commands on a fresh machine:  make demo   (the main job)   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
LOCK := requirements.lock
TORCH_VERSION := $(shell sed -n 's/^torch==//p' $(LOCK))
LOCK_PYTHON := $(shell sed -n 's/.*needs Python >= \([0-9]*\.[0-9]*\).*/\1/p' $(LOCK))
# Without an NVIDIA driver, torch comes from PyTorch's CPU index: PyPI's Linux wheel is a multi-GB CUDA build.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,--index-url https://download.pytorch.org/whl/cpu)
TESTS = OMP_NUM_THREADS=1 $(1)/bin/python -m pytest -q tests
export HF_HUB_OFFLINE ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1

.PHONY: install browser demo test test-latest lock lint default-model clean

# torch first, at the locked version: a wheel pip already has on disk if there is one (its dependencies come with
# the locked set next), else from the index that fits the machine.
define install_locked_torch
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null \
		|| $(1)/bin/pip install -q torch==$(TORCH_VERSION) $(TORCH_INDEX)
endef

# Idempotent: the stamp is rebuilt only when the requirements or the lock change.
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < tuple(map(int, "$(LOCK_PYTHON)".split("."))))' \
		|| { echo "error: the locked set needs Python >= $(LOCK_PYTHON) ($(LOCK)); run: make install PYTHON=python$(LOCK_PYTHON)" >&2; exit 2; }
	$(call install_locked_torch,$(VENV))
	$(BIN)/pip install -q -c $(LOCK) -r requirements.txt -r requirements-dev.txt
	$(BIN)/python tools/deps.py diff $(LOCK)
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
	$(call TESTS,$(VENV))

# The upgrade check: the newest releases within each requirement's major version (torch held at the lock's), in a
# venv of their own, then the whole suite. When it passes, `make lock` adopts them.
test-latest: browser
	rm -f $(LATEST)/.passed
	$(call install_locked_torch,$(LATEST))
	$(PYTHON) tools/deps.py relax requirements.txt > $(LATEST)/requirements-relaxed.txt
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c <(echo torch==$(TORCH_VERSION)) \
		-r $(LATEST)/requirements-relaxed.txt -r requirements-dev.txt
	$(LATEST)/bin/python tools/deps.py diff $(LOCK)
	$(call TESTS,$(LATEST))
	touch $(LATEST)/.passed

# Adopt what the last `make test-latest` passed on: the lock, and requirements.txt's caps.
lock:
	test -f $(LATEST)/.passed || { echo "error: run make test-latest first: the lock records what it passed on" >&2; exit 2; }
	$(LATEST)/bin/python tools/deps.py freeze $(LOCK)
	$(PYTHON) tools/deps.py caps requirements.txt $(LOCK)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf models outputs-* runs .pytest_cache
