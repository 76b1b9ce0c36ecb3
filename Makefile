# Thin wrappers; each target works in a fresh clone on a Debian machine.
PYTHON ?= python3
WORKDIR ?= runs/fashion_mnist

.PHONY: setup demo test test-all bench

setup:
	bash scripts/setup.sh

demo: setup
	$(PYTHON) -m dp_jax.main --config=configs/fashion_mnist.py --workdir=$(WORKDIR)

test: setup
	$(PYTHON) -m pytest -q

test-all: setup
	$(PYTHON) -m pytest -q -m ""

bench: setup
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) benchmarks/train_throughput.py
