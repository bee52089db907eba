# Everything runs in the project's own virtual environment, .venv, created on first use and
# reinstalled only when pyproject.toml changes (.venv/.installed records the last install).
#
#   make demo                 generate the demo data, train, test, print the table
#   make test                 the test suite, in TEST_WORKERS parallel processes (default 2; 0: one process)
#   make demo ARGS="trainer.max_steps=20"     extra overrides for run.py (or pytest arguments for make test)
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                             CPU-only torch wheels (about 1 GB instead of the 6 GB CUDA set); takes
#                             effect when torch is installed, i.e. on a new .venv (rm -rf .venv first)

PYTHON ?= python3
VENV ?= .venv
TORCH_INDEX ?=
ARGS ?=
TEST_WORKERS ?= 2

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install

demo: $(STAMP)
	$(PY) run.py experiment=demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "AnomalyMoE needs Python 3.10 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1). Use make PYTHON=python3.X"; exit 1; }
	@test -x $(PY) || { echo "Creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "Installing the project into $(VENV) (the first time takes a few minutes)"
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip check
	@touch $@
