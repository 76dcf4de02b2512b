# Two entry points (see README): `make demo` runs the main job, `make test` runs the suite.
# Both create .venv if it is missing and install zoo with the pinned constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zoo-installed

.PHONY: install demo test tables bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zoo tables
	$(VENV)/bin/zoo recipe check recipes/digits_kd.yaml --threads 1

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

tables: $(STAMP)
	$(VENV)/bin/zoo tables

bench: $(STAMP)
	$(PY) benchmarks/bench_forward.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
