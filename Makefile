# megasink: the two commands of README.md.
#   make quickstart   set up .venv, build a small real-text corpus, train, evaluate
#   make test         set up .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast test-slurm quickstart bench clean

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

test-slurm: venv
	$(PY) -m pytest -q -ra tests/test_slurm.py

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow" tests

quickstart: venv
	@# real English text that ships in a Debian package (no hub downloads); optional
	@test -d /usr/share/doc/python3.11/html/_sources || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q python3.11-doc >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q python3.11-doc >/dev/null 2>&1; }; }; } || \
	  echo "python3.11-doc not installable here: the quickstart corpus falls back to stdlib docstrings"
	$(PY) -m megasink.quickstart

bench: venv
	$(PY) benchmarks/aux_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache runs .quickstart
