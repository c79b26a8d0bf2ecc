# GPU image for multi-node H100 training. Cannot be built on the CPU dev machines (no Docker engine,
# no CUDA); keep it consistent with setup.py, which holds every pin.
#
# The NGC PyTorch image ships CUDA, NCCL, cuDNN, apex and Transformer Engine built against its own
# torch. vLLM pins an exact torch (vllm==0.33.0 -> torch==2.14.0): pick an NGC tag whose torch is that
# version, or pip will replace the image's torch and Transformer Engine will no longer import.
ARG NGC_TAG=26.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ENV PIP_NO_CACHE_DIR=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NCCL_NVLS_ENABLE=0 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/visurf_megatron
COPY setup.py README.md ./
COPY visurf_megatron ./visurf_megatron
COPY checkpoint_converters ./checkpoint_converters
COPY tools ./tools
COPY examples ./examples

# The image's Transformer Engine satisfies the `gpu` extra's pin; pip keeps it. sam2 needs no CUDA
# build for inference with SAM2ImagePredictor.
RUN pip install -e '.[gpu,eval,data]' && \
    SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'sam2==1.1.0' && \
    python -c "import megatron.core, transformer_engine.pytorch, vllm, visurf_megatron; print('ok')"

CMD ["bash"]
