# The two commands a newcomer needs: `make demo` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test corpus bench lint clean help

help:
	@echo "make demo   - install into $(VENV) if needed, then run the main job on the default corpus"
	@echo "make test   - install into $(VENV) if needed, then run the test suite"

# One pip command installs everything (torch pinned to the CPU wheel in the same resolution,
# so no dependency can pull a CUDA build), then the package itself in editable mode.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . \
	  || $(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m asrkd.cli demo

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q; status=$$?; if [ $$status -eq 5 ]; then exit 0; fi; exit $$status

corpus: $(STAMP)
	$(PY) -m asrkd.cli corpus --out data/default

bench: $(STAMP)
	$(PY) benchmarks/features.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
