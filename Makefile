# The two commands a user needs (README): `make demo` and `make test`. Both set everything up first:
# Debian packages, the project's virtual environment, and stock Caffe (cached by content hash).
SYSTEM_PYTHON ?= /usr/bin/python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
GPU           ?=
export PYTHONUNBUFFERED := 1

.PHONY: setup system-deps caffe demo test clean-venv
setup: caffe

system-deps:
	@bash tools/install-system-deps.sh

# the venv is made from the system interpreter, the one Debian's boost-python was built for
$(VENV)/.installed: pyproject.toml | system-deps
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	@echo "venv: installing Python dependencies into $(VENV)"
	@$(PY) -m pip install -q 'numpy>=2' -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c "import numpy, google.protobuf, h5py, tqdm, skimage, lmdb, pydot" || { echo "venv: dependency install failed" >&2; exit 1; }
	@touch $@

caffe: $(VENV)/.installed
	@bash tools/caffe/build.sh $(abspath $(PY)) $(if $(GPU),--gpu,)

demo: setup
	@$(PY) -m caffe_prune demo

test: setup
	@$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
