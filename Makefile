# make demo : set up .venv, build the extension, train every method on the embedded dataset (mmfast demo)
# make bench: every benchmark, one dated results file (bench/results/<date>-<machine>.md, and its .json)
# make test : set up .venv, build the extension and the docs site (strict), run the test suite (what CI runs)
# make docs : build the documentation site into build/site (mkdocs serve: a live preview)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed

.PHONY: setup build test docs demo bench clean

setup: build

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

build: $(DEPS_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .

test: docs
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile --durations=15 tests

# The documentation site (build/site); --strict: a broken link or reference fails the build.
docs: build
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

demo: build
	$(PY) -m mmfast demo

bench: build
	$(PY) bench/all.py --out bench/results


clean:
	rm -rf build *.egg-info mmfast/_C*.so
