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

# System packages the tests need, installed when missing (Debian names):
#   chromium, fonts      the review page's browser tests (tests/serving/test_page.py; Playwright downloads no browser)
#   orthanc, orthanc-dicomweb   a real PACS for the DICOMweb tests (tests/scoring/test_pacs*.py; started on a free port)
#   dicom3tools          dciodvfy, which validates every DICOM SR and Secondary Capture the tests write
# As root (CI) they are installed without asking; otherwise the command to run is printed and those tests skip, saying
# why (under CI=true they fail instead).
SYSTEM_PACKAGES_NEEDED = $(strip \
	$(if $(shell command -v chromium || command -v chromium-browser),,chromium fonts-liberation fonts-dejavu-core) \
	$(if $(shell command -v Orthanc),,orthanc) \
	$(if $(wildcard /usr/share/orthanc/plugins/libOrthancDicomWeb.so),,orthanc-dicomweb) \
	$(if $(shell command -v dciodvfy),,dicom3tools))

system-packages:
	@missing="$(SYSTEM_PACKAGES_NEEDED)"; [ -z "$$missing" ] || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing the system packages $$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "system packages missing and not installable from here (not root, or no apt-get): $$missing"; \
			echo "  run 'sudo apt-get install $$missing'; until then the tests that need them skip"; \
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
