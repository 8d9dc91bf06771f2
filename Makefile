# The two commands a newcomer needs:
#   make demo   install the package and the MCP SDK, then run the paid-call loop on SQLite in
#               demo mode (not the test tools: vyper, py-evm and eth-tester take minutes)
#   make test   install everything the tests need, then lint, type-check and run the suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install install-demo lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per install: after `make demo`, $(BIN)/mcpbill exists but the test tools do not.
$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,mcp,x402]'
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[mcp]'
	touch $@

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error

install: $(VENV)/.installed-all

install-demo: $(VENV)/.installed-demo

demo: install-demo
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
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/scaleout.py
