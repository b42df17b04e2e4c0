# A fresh machine needs two commands: `make demo` and `make test`. Both set up .venv first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: setup demo test bench clean gpu-check

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,diffusers]'
	@# timm without its torchvision requirement: PyPI's torchvision for torch 2.13.0 is a CUDA build that fails
	@# to load against the CPU torch. The tests import timm through tests/clients/_torchvision.py.
	$(PIP) install -q -c constraints.txt --no-deps timm
	@# Graphviz's `dot` renders the inspect SVGs; graftfx falls back to its own renderer without it.
	@command -v dot >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q graphviz >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q graphviz >/dev/null 2>&1; }; }; } || \
	  echo "note: graphviz not installed; inspect uses its built-in SVG renderer"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graftfx demo

test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests

bench: $(STAMP)
	$(PY) benchmarks/bench_trace.py

# On a GPU machine: its own python3 (torch + CUDA + Triton), no venv, no downloads.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
