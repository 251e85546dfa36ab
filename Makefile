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

# every benchmark on one throw-away tampered guest; each prints ratios against its own baseline
bench: $(STAMP)
	-$(VENV)/bin/nephoscope lab down bench >/dev/null 2>&1
	$(VENV)/bin/nephoscope lab up bench --profile tampered >/dev/null
	status=0; \
	for cmd in "bench/lab_boot.py" "bench/kb.py" "bench/arch.py --guest bench" "bench/inspect_speed.py bench" \
	           "bench/methods.py bench" "bench/vulns.py" "bench/trap.py bench" "bench/robustness.py" \
	           "bench/cli_start.py --guest bench"; do \
	  echo "== $$cmd"; $(PY) $$cmd || status=1; \
	done; \
	$(VENV)/bin/nephoscope lab down bench; exit $$status

clean:
	$(VENV)/bin/nephoscope lab list --json >/dev/null 2>&1 || true
	rm -rf $(VENV) build src/*.egg-info
