# The two commands (see README): `make demo` runs the pipeline end to end on generated logs;
# `make test` runs the tests. Both install the CPU stack into .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test test-fast install typecheck clean

install:
	@bash tools/bootstrap.sh

demo: install
	@bash tools/demo.sh

test: install
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

typecheck: install
	$(VENV)/bin/mypy

clean:
	rm -rf data/demo runs/demo
