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
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test,tensorboard,sweep]"
	touch $(STAMP)

# The vae-2d-mnist recipe in --quick mode: trains the 2-D MLP VAE, draws and measures it, writes
# runs/demo/report.html (the recipe prints the path).
demo: install
	$(BIN)/vaelab recipe vae-2d-mnist --quick --out runs/demo --overwrite

# One test process per CPU (pytest-xdist), each on one thread unless OMP_NUM_THREADS says otherwise:
# the tests are small, so processes side by side beat threads inside one.
TEST_RUN := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n auto

test: install
	$(TEST_RUN)

test-fast: install
	$(TEST_RUN) -m "not realdata"

bench: install
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) runs
