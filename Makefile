# Two targets do all the set-up on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,data,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nearest_etf ufm

test: $(STAMP)
	$(PY) -m ruff check nearest_etf tests benchmarks
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check nearest_etf tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/solver_speed.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
