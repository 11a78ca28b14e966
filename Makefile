# Everything runs in a virtual environment: the active one, or else .venv (created here from python3), so that
# the commands work on a system Python whose pip refuses to install (externally managed).
# The environment is pinned by constraints/demo.txt, the one the README's numbers come from.
#   make test CONSTRAINTS=constraints/lowest.txt VENV=.venv-lowest   # at the lowest versions pyproject.toml allows
#   make test CONSTRAINTS= VENV=.venv-newest                          # at the newest versions pip resolves today
# CPU set-up by default: torch 2.13.0 (CPU build, no CUDA wheels). On a GPU machine: make install TORCH=torch
VENV ?= .venv
ifdef VIRTUAL_ENV
PYTHON ?= python
else
PYTHON ?= $(VENV)/bin/python
endif
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints/demo.txt
PIP = $(PYTHON) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install demo real-model quickstart test test-slow bench

# A fresh Debian/Ubuntu Python may lack ensurepip (package python3-venv): then bootstrap pip with the system's pip.
$(VENV)/bin/python:
	python3 -m venv $(VENV) || { rm -rf $(VENV) && python3 -m venv --without-pip $(VENV) \
	    && python3 -m pip --python $(VENV)/bin/python install -q pip; } \
	  || { rm -rf $(VENV); echo "Could not create $(VENV): install python3-venv (apt install python3-venv)."; exit 1; }

install: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PIP) $(TORCH)
	$(PIP) -e ".[test]"

# The floating-point path of the demo's numbers: torch's AVX2 kernels, oneDNN's and MKL's AVX2 code paths, the ones
# any x86-64 CPU with AVX2 runs (by default each library picks the widest the CPU has, e.g. AVX-512 here, and the
# numbers change with the CPU). Measured in docs/demo.md ("Reproducible").
FLOAT_PATH = ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2

demo: install
	$(FLOAT_PATH) $(PYTHON) -m hf_l2.tools.cli demo --output_dir runs/demo

# SmolLM2-135M-Instruct (Q4_1, dequantized) with every method and baseline: about 90 minutes on 2 idle cores,
# resumable (docs/real_model.md).
real-model: install
	$(FLOAT_PATH) $(PYTHON) -m hf_l2.tools.cli real-model --output_dir runs/real_model

quickstart: install
	$(PYTHON) -m hf_l2.examples.quickstart --output_dir runs/quickstart --l2_mode l2_sp --l2_coef 0.1

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q tests

# The wheel installed into a fresh venv, then the CLI, a recipe and a reduced demo run from it (minutes; CI runs it).
test-slow: install
	$(PYTHON) -m pytest -q -m slow tests

bench: install
	$(PYTHON) benchmarks/bench_penalty.py
	$(PYTHON) benchmarks/bench_step.py
