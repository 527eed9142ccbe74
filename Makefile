# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both build their own virtual environment in .venv (torch first, pinned to the CPU
# build that lies on this machine's disk, so pip never pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
# pycose 1.1.0 needs cbor2 < 6, fedmq uses cbor2 6: the interoperability test runs
# pycose in a subprocess from this separate directory instead of pinning cbor2 down.
PYCOSE_DIR := $(VENV)/pycose-env

.PHONY: test demo venv clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.dev: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e '.[dev,embedded]'
	$(PIP) install -q --target $(PYCOSE_DIR) 'pycose==1.1.0' 'cbor2<6'
	touch $@

# [plot]: matplotlib, for demo-report/accuracy.png
$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e '.[embedded,plot]'
	touch $@

venv: $(VENV)/.dev

test: $(VENV)/.dev
	$(VENV)/bin/pytest

demo: $(VENV)/.demo
	$(VENV)/bin/fedmq demo --report demo-report

clean:
	rm -rf $(VENV) demo-report .pytest_cache .hypothesis
