# The two commands a user needs (README): `make demo` and `make test`. Both set everything up first:
# Debian packages, the project's virtual environment, and stock Caffe (cached by content hash).
SYSTEM_PYTHON ?= /usr/bin/python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
GPU           ?=
# with GPU=1: more tools/caffe/build.sh options, e.g. GPU_FLAGS='--no-cudnn --allow-tf32 --cuda-arch "75 80 90"'
GPU_FLAGS     ?=
TEST_JOBS     ?= 2
export PYTHONUNBUFFERED := 1
# Local mirrors of the data and the published weights, where a read-only copy sits beside the project
# (the library itself never looks there; see README "Data" and "Published models").
ifneq ($(wildcard ../shared/data/cifar10-subset/cifar-10-batches-bin),)
export CAFFE_PRUNE_DATA ?= $(abspath ../shared/data/cifar10-subset)
endif
ifneq ($(wildcard ../shared/models/published),)
export CAFFE_PRUNE_MODELS ?= $(abspath ../shared/models/published)
endif

.PHONY: setup system-deps caffe demo test test-fast clean-venv
setup: caffe

system-deps:
	@bash tools/install-system-deps.sh

# the venv is made from the system interpreter, the one Debian's boost-python was built for
$(VENV)/.installed: pyproject.toml | system-deps
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	@echo "venv: installing Python dependencies into $(VENV)"
	@$(PY) -m pip install -q 'numpy>=2' -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c "import numpy, google.protobuf, h5py, tqdm, skimage, lmdb, plyvel, pydot, threadpoolctl" || { echo "venv: dependency install failed" >&2; exit 1; }
	@touch $@

caffe: $(VENV)/.installed
	@bash tools/caffe/build.sh $(abspath $(PY)) $(if $(filter-out 0 no off,$(GPU)),--gpu $(GPU_FLAGS),)

demo: setup
	@$(PY) -m caffe_prune demo

# the tests spread over TEST_JOBS processes (tests/conftest.py says which files stay on one)
test: setup
	@$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup tests

# the fast tier for iterating: every test not marked slow, on the same processes
test-fast: setup
	@$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
