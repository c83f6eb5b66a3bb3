# Two commands on a fresh machine, each setting itself up first:
#   make demo   train the digits demo        make test   run the test suite
#   make lint   ruff over the package, tests, benchmarks and examples
#   make typecheck   mypy over the package (every definition typed)
# The environment lives in $(VENV); it is (re)installed when it is missing or when
# pyproject.toml is newer than the last install. Nothing is installed outside it, so this
# works where the system Python refuses `pip install` (PEP 668).
#
#   make test ARGS="-x -q tests/functional/test_bounds.py"   arguments for pytest
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu   CPU-only torch (saves ~5 GB)
#   make venv PYTHON=python3.12                     which interpreter creates the venv

PYTHON ?= python3
VENV ?= .venv
TORCH_INDEX ?=
ARGS ?=

PY := $(VENV)/bin/python
# Written after a successful install: its age against pyproject.toml says whether to reinstall.
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck docs serve venv clean

demo: $(STAMP)
	$(PY) -m lightning_spectral.demo

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check lightning_spectral tests benchmarks examples

typecheck: $(STAMP)
	$(PY) -m mypy

docs: $(STAMP)
	$(PY) -m mkdocs build --strict

serve: $(STAMP)
	$(PY) -m mkdocs serve

venv: $(STAMP)

# pyvenv.cfg is a plain file written once per venv (bin/python is a symlink whose target's
# age means nothing), so a venv recreated by hand also triggers a reinstall.
$(VENV)/pyvenv.cfg:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
		|| { echo "error: '$(PYTHON)' is not a Python >= 3.10; choose one:" \
			"make PYTHON=python3.x ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) \
		|| { rm -rf $(VENV); echo "error: '$(PYTHON) -m venv' failed;" \
			"on Debian/Ubuntu: apt install python3-venv" >&2; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(VENV)/pyvenv.cfg
	$(if $(TORCH_INDEX),$(PY) -m pip install torch --index-url $(TORCH_INDEX))
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) site
