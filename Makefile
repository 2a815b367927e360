# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: demo test deps install lint unit e2e bench clean

# System packages (Debian): git for the intent repos. Skipped when already present.
deps:
	@./scripts/apt-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: deps $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The fault suite runs after everything else, on its own (it writes docs/reliability.md).
test: install lint
	$(BIN)/pytest -q -p no:cacheprovider --durations=15 -m "not faults"
	$(BIN)/pytest -q -p no:cacheprovider -m faults e2e/test_faults.py

demo: install
	$(BIN)/lockgate demo

bench: install
	$(PY) bench/propagation.py
	$(PY) bench/dataplane.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) .lockgate *.egg-info
