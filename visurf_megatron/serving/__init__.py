"""Serving exports: quantised Hugging Face checkpoints for vLLM / TensorRT-LLM (nvidia-modelopt)."""
