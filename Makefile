# The two commands a fresh machine needs (see README.md):
#   make demo    set up .venv if needed, then run the demo
#   make test    set up .venv if needed (with the test extra), then run the test suite
# Set-up never replaces a torch the Python already has: the venv sees system packages, and
# every later install is constrained to that exact torch (pip fails instead of swapping it).
# Where there is no torch it installs torch==2.13.0. Which build that is depends on where pip
# looks: on this project's machines a local CPU wheel; on a stock Linux machine PyPI's CUDA
# build (several GB). Install the torch you want first (the CPU wheel from PyTorch's CPU
# index on a machine without a GPU) and set-up keeps it.
# --no-build-isolation: gradstats is built with the environment's own setuptools and torch.
# The plots extra (matplotlib) comes with set-up: the demo draws its figures.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEFAULT_TORCH := torch==2.13.0
TORCH_PIN := $(VENV)/torch-constraint.txt
PIP_INSTALL := $(PY) -m pip install -c $(TORCH_PIN)
comma := ,

.PHONY: setup demo test clean
# Both stamps' recipes create and install into the same .venv: never two at once (make -j).
.NOTPARALLEL:

setup: $(VENV)/.installed

# The venv with its torch pinned, then gradstats (editable, with the given extras) built once:
# each install of gradstats builds gradstats._C again (about 40 s), so `make test` on a fresh
# clone installs the demo's extra and the test extra in one go rather than in two.
# csrc/: an edited native source rebuilds gradstats._C (the editable install does not).
NATIVE_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h)
define install_gradstats
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(DEFAULT_TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(TORCH_PIN)
	$(PY) -c "import setuptools" 2>/dev/null || $(PIP_INSTALL) setuptools
	$(PIP_INSTALL) --no-build-isolation -e ".[$(1)]"
endef

$(VENV)/.installed: $(NATIVE_SOURCES)
	$(call install_gradstats,plots)
	touch $@

# The test extra adds the real trainers the integrations are tested against. timm goes in
# with --no-deps: it requires torchvision, whose PyPI wheels are CUDA builds tied to another
# torch (pip would replace a CPU torch, or they fail to import beside it).
$(VENV)/.test-installed: $(NATIVE_SOURCES)
	$(call install_gradstats,plots$(comma)test)
	$(PIP_INSTALL) --no-deps timm
	touch $(VENV)/.installed $@

demo: setup
	$(PY) -m gradstats demo

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
