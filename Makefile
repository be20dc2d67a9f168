# make test   set up a .venv (torch, the package editable, the C++ extension) and run the tests
# make bench  set up the same way and run the main benchmark job (CPU: DiT-S/2; GPU: DiT-XL/2)
# On a machine without torch, the CPU build torch==$(TORCH_CPU_VERSION) is installed (it lies on local disk
# on our machines; an unpinned torch would pull a multi-GB CUDA build). A machine whose python already has
# torch (a GPU box) gets a venv that sees it, and nothing replaces it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
EXTRAS ?= test,bench,diffusers
PYTEST_ARGS ?=
BENCH_ARGS ?=
OUT ?= benchmarks/results

.PHONY: setup test bench gpu-check gpu-check-dry info clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	@if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "torch==$(TORCH_CPU_VERSION)"
	$(VPY) -m pip install -q setuptools wheel ninja
	$(VPY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $@

test: setup
	$(VPY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(VPY) -m dit_fast bench --out $(OUT) $(BENCH_ARGS)

gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)

gpu-check-dry: setup
	DIT_FAST_DRY_RUN=1 PYTHON=$(VPY) bash benchmarks/gpu_check.sh out/gpu-check-dry

info: setup
	$(VPY) -m dit_fast.info

clean:
	rm -rf $(VENV) build *.egg-info dit_fast/_C*.so
