# `make demo` and `make test` create (or reuse) a virtual environment in .venv with the pinned CPU stack.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

# setup.py builds the native sparse-op library (native/) into sparse_deploy/_sparse_ops.so; a change to it rebuilds.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard native/*.cpp native/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,plot]"
	$(PY) -c "from sparse_deploy.runtime import kernels as k; s = k.availability(); print('sparse kernels:', k.isa() if s.ok else s.reason)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build sparse_deploy/_sparse_ops.so sparse_deploy/_sparse_ops.unavailable
