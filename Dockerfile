# GPU image for visurf_megatron: megatron-core 0.16.1 + Transformer Engine 2.11 (FP8) for training,
# vLLM 0.33.0 for rollouts, nvidia-modelopt, SAM 2 for evaluation, all on ONE torch (2.14.0, CUDA 13.0).
#
# Every Python pin comes from setup.py (install_requires + extras gpu,eval,data,sam2), read by
# docker/gpu_pins.py into a pip constraints file; tools/check_gpu_env.sh resolves the same set on a CPU
# machine. Build (from the repository root; needs network, no GPU; ~10 GB of wheels to download and
# ~30 CPU-minutes of C++ for Transformer Engine's PyTorch extension):
#     docker build -t visurf-megatron:gpu .
# This Dockerfile has not been built here (the dev machines have no Docker engine and no GPU). Its steps
# were replayed in a CPython 3.12 venv on a CPU dev machine (same constraints, the TE extension compiled
# against torch 2.14.0 with pip's CUDA 13.0 headers, then docker/check_image.py): see the README's
# "GPU environment" section for that and for what a first real build must confirm.
#
# Why this base (versions as of vLLM 0.33.0):
# - vLLM 0.33.0 pins torch==2.14.0, torchvision==0.29.0, torchaudio==2.11.0, flashinfer-python==0.7.2.post1
#   (its wheel metadata). PyPI's torch 2.14.0 is a CUDA 13.0 build (cuda-toolkit==13.0.3,
#   nvidia-cudnn-cu13 9.24, nvidia-nccl-cu13 2.30.7). So the torch is vLLM's, from PyPI.
# - NGC PyTorch images are rejected: they ship pre-release torch builds (25.12: 2.10.0a0+b4e4ee81d3, CUDA
#   13.1) that `torch==2.14.0` never matches, so pip would replace torch and the image's Transformer
#   Engine and apex (compiled against the old torch) would stop importing; and since 25.03 NGC pins every
#   package in /etc/pip/constraint.txt, which would have to be edited first. Building vLLM from source
#   against NGC's torch instead would cost hours per build and leave vLLM on an untested torch.
# - vLLM's own image (vllm/vllm-openai) would work too, but it pins nothing we control (Python packages
#   installed with uv, its own layout); adding TE there is the same work as here.
# - So: the CUDA 13.0 *devel* image (nvcc + headers: TE's extension is compiled here, and vLLM's
#   flashinfer compiles kernels just in time with nvcc, which is also why vLLM's image keeps a devel
#   base), Ubuntu 24.04 (Python 3.12, glibc 2.39), a venv, torch/vLLM wheels from PyPI.
# - Transformer Engine 2.11.0: the newest below megatron-core 0.16.1's declared <2.12. Its core library
#   is a binary wheel (transformer_engine_cu13, matching torch's CUDA 13); its PyTorch extension
#   (transformer_engine_torch) is an sdist, compiled below against this torch with --no-build-isolation.
# - apex is dropped: megatron-core 0.16.1 takes FusedAdam/FusedSGD, multi_tensor_applier/l2norm/scale
#   from Transformer Engine first and apex only as a fallback, and our GPU layer specs are TE specs
#   (TENorm, not apex's FusedLayerNorm). apex is not on PyPI, would be one more ~20 min CUDA build per
#   torch version, and nothing here imports it.
# - flash-attn (the PyPI sdist) is not installed: vLLM ships its own flash-attention kernels, and TE uses
#   cuDNN fused attention on H100; building flash-attn from source takes hours.
# - sam2 1.1.0 is an sdist whose setup.py imports torch: built with --no-build-isolation and
#   SAM2_BUILD_CUDA=0 (its optional CUDA extension only post-processes masks; the evaluation does not
#   need it), as on CPU.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

# Parallel C++ jobs for the TE extension (~1.5 GB of memory each). The extension is host C++ only
# (a CppExtension): TE's GPU kernels come prebuilt in the transformer_engine_cu13 wheel (its fatbin holds
# SASS for sm_75/80/89/90/100/103/120, read from the 2.11.0 wheel on the dev machine).
ARG MAX_JOBS=8

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3064 flags TOKENIZERS_PARALLELISM for the word TOKEN; it is a tokenizers switch, not a secret.
# hadolint ignore=DL3064
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    CUDA_HOME=/usr/local/cuda \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NCCL_NVLS_ENABLE=0 \
    TOKENIZERS_PARALLELISM=false

# Python 3.12 (Ubuntu 24.04's own), a compiler for the extension builds, and the InfiniBand user-space
# libraries NCCL needs for multi-node runs. Versions come from the Ubuntu 24.04 archive of the build date.
# hadolint ignore=DL3008
RUN apt-get update && \
    apt-get install -y --no-install-recommends \
        python3.12 python3.12-dev python3.12-venv g++ git ca-certificates \
        libibverbs1 ibverbs-providers librdmacm1 && \
    rm -rf /var/lib/apt/lists/* && \
    python3.12 -m venv /opt/venv && \
    pip install --no-cache-dir 'pip>=25.1,<27'

WORKDIR /opt/visurf_megatron

# The pins, as a constraints file (extras stripped): every later pip call installs exactly setup.py's pins.
COPY setup.py README.md ./
COPY docker/gpu_pins.py docker/
RUN python docker/gpu_pins.py constraints > /opt/gpu-constraints.txt && cat /opt/gpu-constraints.txt

# 1. The binary wheels around the one torch: torch 2.14.0 and torchvision 0.29.0 (vLLM's pins, also in
#    setup.py's gpu extra), vLLM with its dependencies; `wheel` because TE's setup.py imports it.
#    Versions: /opt/gpu-constraints.txt.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c /opt/gpu-constraints.txt torch torchvision vllm wheel

# 2. Transformer Engine: core library wheel (CUDA 13) + the PyTorch extension compiled against the
#    torch above (the sdist's own build isolation would compile it against whatever torch pip fetched
#    into a temporary environment). Its headers: the CUDA toolkit's, plus the cuDNN and NCCL headers of
#    the very wheels torch loads at run time.
# hadolint ignore=DL3013
RUN SITE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
    CPLUS_INCLUDE_PATH="$SITE/nvidia/cudnn/include:$SITE/nvidia/nccl/include" \
    NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS="${MAX_JOBS}" \
    pip install --no-cache-dir --no-build-isolation -c /opt/gpu-constraints.txt \
        'transformer-engine[pytorch,core_cu13]'

# 3. The package itself with the rest of its extras. sam2 (and the pure-Python sdists iopath and
#    antlr4-python3-runtime) build here without isolation, against the installed torch and setuptools.
COPY visurf_megatron ./visurf_megatron
COPY checkpoint_converters ./checkpoint_converters
COPY tools ./tools
COPY examples ./examples
COPY docker ./docker
RUN SAM2_BUILD_CUDA=0 pip install --no-cache-dir --no-build-isolation -c /opt/gpu-constraints.txt \
        -e '.[gpu,eval,data,sam2]'

# 4. Last step: everything imports, every setup.py pin is what got installed, and `pip check` agrees the
#    environment is consistent (check_image.py runs it; one mislabelled TE wheel is allowed, see there).
#    Its own RUN on purpose (DL3059), so a failure names this step.
# hadolint ignore=DL3059
RUN python docker/check_image.py

CMD ["bash"]
