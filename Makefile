# Tessera: the two commands are `make demo` and `make test`. Both create .venv and install
# the pinned dependencies themselves, so a machine with python3 and make is enough.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench mpy-check clean venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tessera demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

bench: $(STAMP)
	$(PY) bench/run.py

# Compile every firmware module with mpy-cross for each board's arch and check the flash budget.
mpy-check: $(STAMP)
	$(VENV)/bin/tessera board build --all

clean:
	rm -rf build .pytest_cache .hypothesis var
