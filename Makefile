# nephoscope: two commands do all set-up on a fresh Debian 12 machine (as root).
#   make demo   install everything, build and boot the lab guest, run every method, print the report
#   make test   install everything and run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nephoscope-setup

.PHONY: demo test setup lint bench clean

demo: $(STAMP)
	$(VENV)/bin/nephoscope demo

test: $(STAMP)
	bash scripts/test.sh

setup: $(STAMP)

$(STAMP): scripts/setup.sh pyproject.toml
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	$(VENV)/bin/nephoscope lab list --json >/dev/null 2>&1 || true
	rm -rf $(VENV) build src/*.egg-info
