# pgext: `make demo` (train an agent with pgext) and `make test` (the full
# suite) do all set-up on a fresh machine: they create and reuse .venv.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC := torch==2.14.1
DEPS_STAMP := $(VENV)/.pgext-deps
REQUIREMENTS := $(wildcard requirements/*.txt)
# Build jobs for ninja; the CI machine has 2 cores.
export MAX_JOBS ?= 2

.PHONY: help demo test build bench dist clean

help:
	@echo "make demo   - set up .venv, build pgext, train CartPole with it"
	@echo "make test   - set up .venv, build pgext, run the whole test suite"
	@echo "make bench  - benchmark pgext against the reference (python -m pgext.bench)"
	@echo "make dist   - build the sdist and the CPU-only and CUDA wheels into dist/"
	@echo "make clean  - remove build outputs (keeps .venv)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(REQUIREMENTS) Makefile | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC) setuptools wheel pybind11 ninja $(addprefix -r ,$(REQUIREMENTS))
	touch $@

# Incremental (ninja) in-place build of pgext._C; CUDA kernels too when a CUDA
# toolkit is found (no GPU needed). The compiler output is kept in
# build/build_ext.log: the tests check it for warnings from pgext's sources.
build: $(DEPS_STAMP)
	@mkdir -p build
	$(PY) setup.py --quiet build_ext --inplace 2>&1 | tee build/build_ext.log

demo: build
	$(PY) -m pgext.demo

test: build
	$(PY) -m pytest tests -ra --durations=20

# The README's table and plot: benchmarks/cpu_2core.{md,json,png}.
bench: build
	$(PY) -m pgext.bench --json benchmarks/cpu_2core.json --plot benchmarks/cpu_2core.png | tee benchmarks/cpu_2core.md

# Release artifacts (.ci/dist.py): the sdist, and built from it a wheel per
# variant (dist/cpu: PGEXT_CPU_ONLY=1; dist/cu<NNN>: the CUDA kernels), with
# stripped binaries (their debug information in a .debug.tar.gz next to the
# wheel) and a manylinux tag from auditwheel. `make test` builds and installs
# the CPU-only one (tests/test_release.py). DIST_VARIANTS=cpu skips CUDA.
DIST_VARIANTS ?= cpu cuda
dist: $(DEPS_STAMP)
	$(PY) .ci/dist.py --variants $(DIST_VARIANTS)

clean:
	rm -rf build dist pgext/_C*.so pgext/*.so pgext/lib pgext/include pgext/share
