# Two commands do everything on a fresh machine:
#   make quickstart   install, then train + evaluate + sample a tiny MoR on the bundled corpus (CPU, minutes)
#   make test         install with every extra, then run the whole test suite
# make test-core runs the suite on the core install alone (its own .venv-core/): tests that need an extra skip
# and name it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin

.PHONY: quickstart test test-core install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: install
	$(BIN)/mor quickstart $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(ARGS)

test-core:
	$(MAKE) test VENV=.venv-core EXTRAS=test

clean:
	rm -rf $(VENV) .venv-core runs/quickstart .pytest_cache
