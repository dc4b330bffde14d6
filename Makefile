# The two README commands live here: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench redis-server install proto clean

$(STAMP): pyproject.toml constraints/cpu.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "BlockPress needs Python 3.11 or newer; set PYTHON=python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The constraints file pins the CPU build of torch; without it pip may pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints/cpu.txt -e ".[worker,dev]"
	touch $@

install: $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (the tests and the embedded default start their own)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

demo: install redis-server
	$(BIN)/blockpress demo

test: install redis-server
	$(BIN)/ruff check .
	$(BIN)/mypy runtime workers agents
	$(BIN)/pytest

bench: install redis-server
	$(BIN)/python bench/engine_vs_transformers.py

# Flattens protoc's blockpress/v1/ output into runtime/_pb/ with a relative import (see _generate.py).
proto: install
	$(BIN)/python runtime/_pb/_generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
