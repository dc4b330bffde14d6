# The two README commands live here: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := constraints/lock.txt
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-latest lock bench redis-server browser install proto clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "BlockPress needs Python 3.11 or newer; set PYTHON=python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# Every package comes from the lock, pip and setuptools included, so an upstream release cannot
	# change what a fresh clone installs; --no-build-isolation builds with the locked setuptools.
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

install: $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (the tests and the embedded default start their own)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# The trace page's browser test needs Debian's chromium and its driver (selenium downloads nothing).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "installing chromium and chromium-driver (the trace page's browser test)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: install redis-server
	$(BIN)/blockpress demo

test: install redis-server browser
	$(BIN)/ruff check .
	$(BIN)/mypy runtime workers agents
	$(BIN)/pytest

# Regenerates the lock from pyproject.toml's ranges, constraints/build.in and the CPU torch pin. The
# +cpu torch wheel must be reachable: TORCH_FIND_LINKS is a folder or page that holds it.
TORCH_FIND_LINKS ?= /opt/wheels
lock: install
	$(BIN)/uv pip compile pyproject.toml constraints/build.in --all-extras \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_FIND_LINKS) -c constraints/cpu.txt -o $(LOCK)

# Opt-in, not run by CI: the suite on the newest release of every dependency (torch stays on the CPU
# build), in a venv of its own, to see the next upstream break here before users do.
LATEST := .venv-latest
test-latest: redis-server browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c constraints/cpu.txt -e ".[worker,dev,openai-agents,langchain]"
	$(LATEST)/bin/pip list --format=freeze > $(LATEST)/versions.txt
	@echo "newest releases installed: $(LATEST)/versions.txt"
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/mypy runtime workers agents
	$(LATEST)/bin/pytest -p no:cacheprovider

bench: install redis-server
	$(BIN)/python bench/engine_vs_transformers.py

# Flattens protoc's blockpress/v1/ output into runtime/_pb/ with a relative import (see _generate.py).
proto: install
	$(BIN)/python runtime/_pb/_generate.py

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
