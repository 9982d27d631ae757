# Two commands do everything on a fresh machine:
#   make quickstart   install, then train + evaluate + sample a tiny MoR on the bundled corpus (CPU, minutes)
#   make test         install with the development extras, then run the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: quickstart test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: install
	$(BIN)/mor quickstart $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) runs/quickstart .pytest_cache
