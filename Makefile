# Both targets build their own virtual environment: nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[train,test,plc]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/inspectd demo

# Lint, format and type checks first: a slip fails in seconds, not after the suite. mypy reads its package list and
# settings from pyproject.toml.
LINTED := inspectd engines calibration tests deploy

test: venv
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
