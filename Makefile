# make demo : set up .venv, build the extension, train every method on the embedded dataset (mmfast demo)
# make bench: the benchmarks
# make test : set up .venv, build the extension, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed

.PHONY: setup build test demo bench clean

setup: build

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

build: $(DEPS_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m mmfast demo

bench: build
	$(PY) bench/grad_modulation.py --json bench/results/grad_modulation.json
	$(PY) bench/scores.py --json bench/results/scores.json
	$(PY) bench/data.py --json bench/results/data.json
	$(PY) bench/imbalance.py --json bench/results/imbalance.json


clean:
	rm -rf build *.egg-info mmfast/_C*.so
