# megasink: the two commands of README.md.
#   make quickstart   set up .venv, build a small real-text corpus, train, evaluate
#   make test         set up .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast quickstart bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on disk, never an unpinned CUDA download
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow" tests

quickstart: venv
	$(PY) -m megasink.quickstart

bench: venv
	$(PY) benchmarks/aux_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache runs .quickstart
