# Both entry points build the venv on first use: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install -c constraints.txt
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -q -e '.[test,data,models,onnx]'
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/fastff demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
