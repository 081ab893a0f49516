# Two commands do all set-up on a fresh machine:
#   make demo          the whole pipeline on an embedded tiny default (CPU, no download)
#   make test          the whole test suite
# Both install the exact versions of requirements.lock, the set CI tested. To move to newer releases:
#   make test-latest   refresh requirements.lock to the newest releases and run the suite against them
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# CPU installs pin torch first: a bare `torch` requirement pulls a multi-GB CUDA build. Elsewhere
# than CI's machines, a CPU build comes from PyTorch's own index: make TORCH_INDEX=<its /whl/cpu URL>
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
LATEST := .venv-latest

.PHONY: setup test demo lock test-latest clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_FROM) "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q -ra tests

demo: setup
	$(BIN)/llara-dist demo --out demo_out

# The newest releases that pyproject's ranges admit, frozen into the lock; torch stays $(TORCH)
# (PyPI's Linux torch is a CUDA build: a newer CPU build comes with TORCH=torch==X TORCH_INDEX=...).
# Local version labels (+cpu) are dropped, so that `torch==X` matches a CPU or a CUDA build.
lock:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH_FROM) "$(TORCH)"
	echo "$(TORCH)" > $(LATEST)/torch-pin.txt  # the upgrade below must keep this torch build
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e '.[dev]'
	{ echo "# Exact versions CI tests (Linux x86_64, CPython 3.11, torch CPU build). Written by make lock;"; \
	  echo "# pyproject.toml keeps the ranges for installing into an environment of your own."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//'; } > $(LOCK)

test-latest: lock
	$(LATEST)/bin/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) $(LATEST) demo_out
