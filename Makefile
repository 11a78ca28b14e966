# CPU set-up by default: torch 2.13.0 (CPU build, no CUDA wheels). On a GPU machine: make install TORCH=torch
PYTHON ?= python
TORCH ?= torch==2.13.0

.PHONY: install demo quickstart test bench

install:
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m hf_l2.cli demo --output_dir runs/demo

quickstart: install
	$(PYTHON) examples/quickstart.py --output_dir runs/quickstart --l2_mode l2_sp --l2_coef 0.1

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/bench_penalty.py
	$(PYTHON) benchmarks/bench_step.py
