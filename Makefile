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

.PHONY: setup system-packages demo test test-fast bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# System packages the tests need, installed when missing: Debian's Chromium, which the review page's browser tests
# drive (tests/serving/test_page.py; Playwright downloads no browser). As root (CI) it is installed without asking;
# otherwise the command to run is printed and those tests skip, saying why.
system-packages:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing the system package chromium (the review page's browser tests)"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation fonts-dejavu-core >/dev/null; \
		else \
			echo "chromium is not installed and cannot be installed from here (not root, or no apt-get):"; \
			echo "  run 'sudo apt-get install chromium'; until then the browser tests of the review page skip"; \
		fi; }

demo: setup
	$(BIN)/xray-ray demo --out $(DEMO_DIR) --per-class $(PER_CLASS) \
		$(if $(BACKBONE),--backbone $(BACKBONE)) $(if $(DATA),--data $(DATA))

test: setup system-packages
	$(BIN)/python -m pytest

# The inner loop: every test that neither trains a network nor starts Ray or Serve (under 3 minutes).
test-fast: setup system-packages
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	@set -e; for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
