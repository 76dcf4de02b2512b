# Two entry points (see README): `make demo` runs the main job, `make test` runs the suite.
# Both create .venv if it is missing and install zoo with the pinned constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zoo-installed
# zoo finds the shared datasets only through $ZOO_DATA; in this checkout layout they sit in ../shared/data
ZOO_DATA ?= $(abspath ../shared/data)
export ZOO_DATA

.PHONY: install demo test tables bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

REAL_TABLES := recipes/mnist_han.md recipes/mnist_hinton.md recipes/cifar10_compress.md recipes/cifar10_quant.md recipes/cifar10_quant_mbv2.md recipes/cifar10_prune.md recipes/tflite_transfer_050.md

demo: $(STAMP)
	$(VENV)/bin/zoo tables
	@for t in $(REAL_TABLES); do echo; head -1 $$t; grep '^|' $$t; done
	@# real-data quick check: re-measure the committed MNIST weights (skipped, with why, without $$ZOO_DATA/mnist)
	$(VENV)/bin/zoo weights verify --evaluate
	$(VENV)/bin/zoo recipe check recipes/digits_kd.yaml --threads 1

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

tables: $(STAMP)
	$(VENV)/bin/zoo tables

bench: $(STAMP)
	$(PY) benchmarks/bench_forward.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
