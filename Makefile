# `make demo` and `make test` work from a fresh clone: they create .venv, install the pinned
# dependencies (torch first, alone, so nothing pulls a newer CUDA build), build the extension, then run.
# The build step itself never reaches a package index (--no-index, no isolation, no dependencies): it
# compiles against what is installed, so it works on a machine without network, and every CI run proves it.
#
# On a machine that already holds torch, triton and transformers and reaches no index (a CUDA image):
#   make wheels                      here, with an index: soundfile and its needs for CPython 3.12 into .wheels/
#   make test PY=python3 OFFLINE=1   there: installs from .wheels/ what it lacks, builds, runs the suite
# (benchmarks/gpu_check.sh does the second step with logs.)
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
OFFLINE ?= 0
WHEELS ?= .wheels
# The packages a CUDA image may lack, with their needs (numpy is there): soundfile as pinned in
# requirements.txt, cffi and pycparser as pip resolves them for it here.
OFFLINE_WHEELS := soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
WHEEL_TARGET := --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
# Without a GPU the Triton kernels run under the interpreter; it must be set before they are imported.
TRITON_ENV := $(shell $(PY) -c "import torch; print('' if torch.cuda.is_available() else 'TRITON_INTERPRET=1')" 2>/dev/null || echo TRITON_INTERPRET=1)

ifeq ($(OFFLINE),1)
DEPS := offline-deps
else
DEPS := $(STAMP)
endif

.PHONY: demo test build clean wheels offline-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python requirements.txt
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	touch $@

# Only what is missing, only from $(WHEELS), never from an index.
offline-deps:
	$(PY) -c "import soundfile" 2>/dev/null || $(PIP) install --quiet --no-index --find-links $(WHEELS) soundfile || \
	  { echo "soundfile is missing and $(WHEELS)/ has no wheel for it: run 'make wheels' where an index is" \
	    "reachable and bring $(WHEELS)/ along" >&2; exit 1; }

build: $(DEPS)
	$(PIP) install --quiet --no-index --no-build-isolation --no-deps -e .

test: build
	$(TRITON_ENV) $(PY) -m pytest -q -p no:cacheprovider

demo: build
	$(TRITON_ENV) $(PY) -m enginepy demo --out demo.wav

wheels: $(VENV)/bin/python
	$(VENV)/bin/python -m pip download --quiet $(WHEEL_TARGET) -d $(WHEELS) $(OFFLINE_WHEELS)

clean:
	rm -rf build *.egg-info enginepy/*.so
