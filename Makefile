# Two entry points for a fresh machine:
#   make demo   set up .venv and embed / cluster the example images with the best bundled model
#   make test   set up .venv, lint, and run the whole test suite
VENV ?= .venv
PINS ?=  # packages installed before the project, e.g. an older torch (see test-min)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.carlzoo-installed

.PHONY: demo test test-min lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(strip $(PINS)),$(PY) -m pip install --quiet $(PINS))
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	$(PY) -m pytest -q

# The suite on the oldest torch / torchvision that pyproject.toml admits (not part of `make test`:
# it installs a second torch of several GB into .venv-min).
MIN_VENV := .venv-min

test-min:
	$(MAKE) --no-print-directory test VENV=$(MIN_VENV) PINS='"torch==2.11.*" "torchvision==0.26.*"'

clean:
	rm -rf $(VENV) $(MIN_VENV) build *.egg-info .pytest_cache .ruff_cache
