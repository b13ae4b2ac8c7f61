# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# Re-installs only when the pins or the package metadata change (idempotent).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements.lock torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/vaelab train vae --dataset mnist --epochs 8 --out runs/demo --overwrite

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not realdata"

bench: install
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) runs
