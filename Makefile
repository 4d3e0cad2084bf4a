# Two commands are all a newcomer needs: `make run` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/mailrelay.dev.toml

.PHONY: install run test lint typecheck bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: install
	$(BIN)/mailrelay --config $(CONFIG) serve

test: install
	sh scripts/ensure_postgresql.sh
	$(BIN)/ruff check mailrelay tests scripts
	$(BIN)/mypy
	$(BIN)/pytest -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check mailrelay tests scripts
	$(BIN)/ruff format --check mailrelay tests scripts

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python scripts/bench_submission.py

# mailrelay side by side with Postfix + OpenDKIM, relaying to one TLS 1.3 sink on loopback.
# Needs root (installs postfix and opendkim with apt-get if missing). E.g. BENCH_ARGS="--clients 16"
.PHONY: bench-peer
bench-peer: install
	$(BIN)/python scripts/bench_vs_postfix.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache
