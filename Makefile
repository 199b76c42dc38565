# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv, install the pinned environment (torch from the local wheels via pip), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lpft-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements/constraints.txt torch torchvision
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[dev,ray,lora,hf]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lpft demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
