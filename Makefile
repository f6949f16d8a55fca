# `make demo` and `make test` work from a fresh clone: they create .venv, install the pinned
# dependencies (torch first, alone, so nothing pulls a newer CUDA build), build the extension, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Without a GPU the Triton kernels run under the interpreter; it must be set before they are imported.
TRITON_ENV := $(shell $(PY) -c "import torch; print('' if torch.cuda.is_available() else 'TRITON_INTERPRET=1')" 2>/dev/null || echo TRITON_INTERPRET=1)

.PHONY: demo test build clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) requirements.txt
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	touch $@

build: $(STAMP)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .

test: build
	$(TRITON_ENV) $(PY) -m pytest -q -p no:cacheprovider

demo: build
	$(TRITON_ENV) $(PY) -m enginepy demo --out demo.wav

clean:
	rm -rf build *.egg-info enginepy/*.so
