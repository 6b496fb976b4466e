# The two commands a fresh machine needs (see README.md):
#   make demo    set up .venv if needed, then run the demo
#   make test    set up .venv if needed, then run the test suite
# Set-up keeps a torch the Python already has (the venv sees system packages); where there
# is none it installs torch==2.13.0 explicitly, so a bare "torch" requirement never pulls a
# multi-GB CUDA build onto a CPU machine. --no-build-isolation: building gradstats uses the
# environment's torch instead of fetching one into an isolated build environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEFAULT_TORCH := torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(DEFAULT_TORCH)"
	$(PY) -c "import setuptools" 2>/dev/null || $(PY) -m pip install setuptools
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	$(PY) -m pip install --no-deps timm
	touch $@

demo: setup
	$(PY) -m gradstats.demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
