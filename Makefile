# Both targets build their own virtual environment: nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := train,test,plc
# The exact versions the tests passed with; every install goes through them (see `constraints` below).
CONSTRAINTS := constraints.txt
# The oldest Python those versions install on, as `make constraints` recorded it in the file's header.
PYTHON_MIN := $(shell sed -n 's/^. requires-python: >=\([0-9.]*\).*/\1/p' $(CONSTRAINTS))
# Where torch and torchvision come from. Empty: PyPI, whose Linux wheels carry CUDA (most of the venv's ~6 GB). A
# machine without an NVIDIA GPU can take the CPU-only wheels instead (after `make clean`):
#     make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: venv demo test system-packages constraints clean

# Checked before anything is created, each failure in one line: the interpreter, its version, its venv module.
CHECK_VERSION = import sys; need = tuple(int(p) for p in "$(PYTHON_MIN)".split(".")); \
    sys.exit(0 if sys.version_info[:2] >= need else "make: $(PYTHON) is Python " + sys.version.split()[0] + \
    "; $(CONSTRAINTS) needs Python >= $(PYTHON_MIN): make PYTHON=python$(PYTHON_MIN) ...")
NO_VENV = make: $(PYTHON) cannot create a virtualenv; install its venv module (Debian/Ubuntu: apt install python3-venv)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; needs Python >= $(PYTHON_MIN)" >&2; exit 1; }
	@$(PYTHON) -c '$(CHECK_VERSION)'
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { echo "$(NO_VENV)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install -q -c $(CONSTRAINTS) --index-url $(TORCH_INDEX) torch torchvision)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/inspectd demo

# Lint, format and type checks first: a slip fails in seconds, not after the suite. mypy reads its package list and
# settings from pyproject.toml.
LINTED := inspectd engines calibration tests deploy

# What the tests drive for real and Debian provides: a headless browser (the web view's test), strace (the power-cut
# tests read a daemon's fsyncs), systemd-analyze (the units are verified), ip (a subscriber's path cut in a network
# namespace of its own) and Aravis with its fake GigE Vision camera
# (the genicam tests; deploy/aravis.sh names its packages). Installed when missing, as root (CI runs as root);
# otherwise one line says what to install, and nothing runs: a suite that skipped their tests is not a pass.
system-packages:
	@missing=""; \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing="$$missing chromium"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	aravis=$$(deploy/aravis.sh --missing --fake); [ -z "$$aravis" ] || missing="$$missing $$aravis"; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] || { \
		echo "make: missing Debian packages:$$missing; run make test as root, or apt-get install$$missing" >&2; \
		exit 1; }; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; }

# pytest runs three workers (pytest-xdist) on CI's two cores, as its tests spend much of their time waiting on
# children and sockets; each worker takes whole files, so a module's fixtures are built once and a file's tests that
# share a fixed resource (the fake GigE camera's UDP port) never run side by side. Tests with tight bounds on time run
# alone (tests/conftest.py, `exclusive`). The suite must stay under 15 min on CI: every run names its 25 slowest tests.
TEST_WORKERS ?= 3

test: venv system-packages
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy
	deploy/aravis.sh $(VENV) --fake  # GenICam: Debian's PyGObject linked into the venv, or a line saying what to do
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# Rewrite constraints.txt from what the venv holds now. To move a version: install it into the venv (or change
# pyproject.toml and `$(PY) -m pip install -e '.[$(EXTRAS)]'`, without -c), run make test, then make constraints.
# ALSO="NAME ...": distributions to pin with their dependencies that pyproject.toml does not list yet.
constraints:
	@test -x $(PY) || { echo "make: no $(VENV) to read versions from; run make venv first" >&2; exit 1; }
	$(PY) deploy/freeze_constraints.py --extras $(EXTRAS) --keep $(CONSTRAINTS) $(ALSO) > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The venv only: runs/ holds what was trained and measured (the demo's model, eval-suite's tables and bundles), which
# a rebuild of the venv (`make clean && make test PYTHON=...`) must not throw away.
clean:
	rm -rf $(VENV)
