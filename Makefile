# The two commands a newcomer needs:
#   make demo   install, then run the paid-call loop on SQLite in demo mode
#   make test   install everything the tests need, then lint, type-check and run the suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install lint bench

$(BIN)/mcpbill: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,mcp,x402]'
	touch $@

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error

install: $(BIN)/mcpbill

demo: install
	$(BIN)/mcpbill demo

# lint-imports checks the layer rules ([tool.importlinter] in pyproject.toml); --no-cache keeps
# its cache directory out of the tree.
lint: install
	$(BIN)/ruff check mcpbill_cli tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: install node_modules/.package-lock.json lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/verifier.py
	$(BIN)/python bench/mcp_overhead.py
	$(BIN)/python bench/scaleout.py
