# Two commands do all set-up on a fresh machine:
#   make demo   the whole pipeline on an embedded tiny default (CPU, no download)
#   make test   the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup test demo clean

setup: $(VENV)/.installed

# CPU installs pin torch first: a bare `torch` requirement pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q -ra tests

demo: setup
	$(BIN)/llara-dist demo --out demo_out

clean:
	rm -rf $(VENV) demo_out
