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

# Lint and format check first: a style slip fails in seconds, not after the suite.
LINTED := inspectd engines calibration tests deploy

test: venv
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
