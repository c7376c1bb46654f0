# The two README commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output
PER_CLASS ?= 150
BACKBONE ?=
DATA ?=

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/xray-ray demo --out $(DEMO_DIR) --per-class $(PER_CLASS) \
		$(if $(BACKBONE),--backbone $(BACKBONE)) $(if $(DATA),--data $(DATA))

test: setup
	$(BIN)/python -m pytest

# The inner loop: every test that neither trains a network nor starts Ray or Serve (under 3 minutes).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	@set -e; for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
