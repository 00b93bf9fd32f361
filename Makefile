# make demo : set up .venv, build the extension, train every method on the embedded dataset (mmfast demo)
# make bench: every benchmark, one JSON and one markdown table (bench/results/bench.{json,md})
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
	$(PY) bench/all.py --out bench/results


clean:
	rm -rf build *.egg-info mmfast/_C*.so
