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

# Offline data from Debian, installed when missing and apt is usable: FashionMNIST (70k) for
# `fastff train/experiment`, fortunes (English sentences) for `fastff convert-minilm`.
FORTUNES = /usr/share/games/fortunes/cookie
data:
	@test -f $(FASHION) -a -f $(FORTUNES) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist fortunes) \
	  || echo "warning: data missing; install it with: apt-get update && apt-get install -y dataset-fashion-mnist fortunes"; }

demo: install
	$(VENV)/bin/fastff demo

test: install data
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
