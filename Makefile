# Set-up and the two main jobs (README, "Two commands"). Each target creates or reuses the local environment
# $(VENV) on first use and installs what it needs; nothing else has to be installed first but Python 3.
#
#   make study      the main job: the divergence study (python -m fdpo_study study); ARGS=--quick for a short one
#   make test       the tests (python -m pytest tests -q); ARGS="-k cpu" to select
#   make bench      microbenchmarks with pytest-benchmark (pytest benchmarks/ --benchmark-only); ARGS to filter
#   make examples   run examples/ with quick settings
#   make dist       sdist and wheel into dist/
#   make kernels    compile the C++/CUDA kernels now (otherwise they compile on first use) and say where they are
#   make lint       ruff (format + lint) and clang-format checks, as CI runs them; make format applies them
#   make typecheck  mypy over the kernel package (pyproject.toml [tool.mypy]); needs the install (torch's stubs)
#
# Variables: PYTHON (python3), VENV (.venv), TORCH_SPEC (torch==2.14.1: the torch pinned here; e.g.
# TORCH_SPEC=torch==2.13.0 for another), EXTRAS (what `pip install -e .[...]` adds). With FDIV_KERNELS_BUILD=aot or
# FDIV_KERNELS_BUILD_CUDA=1 in the environment the install compiles fdiv_kernels._C ahead of time, in place,
# against the venv's torch (CI does, so that a .cu compile error fails it).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.14.1
EXTRAS     ?= train,train-hf,test
PIP_FLAGS  ?= -q
ARGS       ?=

PY := $(VENV)/bin/python
AOT := $(strip $(filter aot,$(FDIV_KERNELS_BUILD))$(filter 1 true yes on,$(FDIV_KERNELS_BUILD_CUDA)))
BUILD_KIND := $(if $(AOT),aot,jit)
# The stamp records that the install ran (and how); it is redone when the package metadata changes.
STAMP := $(VENV)/.fdiv_kernels-installed-$(BUILD_KIND)

.DEFAULT_GOAL := help
.PHONY: help install kernels study test bench examples dist lint typecheck format clean print-%

help:
	@sed -n 's/^#   make /  make /p' Makefile

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)" setuptools wheel ninja
	$(PY) -m pip install $(PIP_FLAGS) $(if $(AOT),--no-build-isolation) -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.fdiv_kernels-installed-*
	@touch $@

kernels: $(STAMP)
	$(PY) -m fdiv_kernels._build

study: kernels
	$(PY) -m fdpo_study study $(ARGS)

test: kernels
	$(PY) -m pytest tests -q $(ARGS)

bench: kernels
	$(PY) -m pytest benchmarks/ --benchmark-only $(ARGS)

examples: kernels
	$(PY) examples/train_step.py --quick
	$(PY) examples/diffusers_dropin.py --quick
	$(PY) examples/microbenchmark.py --quick

LINT_STAMP := $(VENV)/.fdiv_kernels-lint-tools
$(LINT_STAMP):
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install $(PIP_FLAGS) "ruff==0.17.6" "clang-format==23.1.5" "mypy==2.4.1"
	@touch $@

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.cu csrc/*.h

# Separate from lint, which stays seconds and needs no torch: mypy reads torch's stubs, so it needs the install.
typecheck: $(STAMP) $(LINT_STAMP)
	$(VENV)/bin/mypy

format: $(LINT_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i csrc/*.cpp csrc/*.cu csrc/*.h

dist: $(STAMP)
	$(PY) -m pip install $(PIP_FLAGS) build
	rm -rf dist
	$(PY) -m build --outdir dist .

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks

# `make -s print-TORCH_SPEC`: a variable's value, for scripts (.ci/run) that install the same torch.
print-%:
	@echo $($*)
