# One-command entry points. `make test` and `make demo` set up .venv first (reusing it if present).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eupmu-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*)

.PHONY: setup test demo bench clean-build

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/eupmu-unlearn

bench: setup
	$(VENV)/bin/eupmu-bench --quick --out runs/bench

clean-build:
	rm -rf build eupmu_kernels/_C*.so $(STAMP)
