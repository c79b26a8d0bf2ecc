"""Rollout engines (vLLM on GPU and CPU; transformers as the reference) and the Megatron -> HF weight sync.

Nothing heavy is imported here: transformers and vLLM are imported inside the engines.
"""
from .base import Completion, RolloutEngine, RolloutRequest, SamplingConfig
from .hf_engine import HFRolloutEngine
from .sync import ExportStats, export_hf_weights, refresh_engine_weights, token_mult_prob_error
from .vllm_engine import VLLMRolloutEngine


def build_engine(rollout_config, checkpoint_dir, **kwargs):
    """The engine ``RolloutConfig.engine`` names ("hf" or "vllm"), with its tp / memory settings."""
    if rollout_config.engine == "hf":
        return HFRolloutEngine(checkpoint_dir, **kwargs)
    if rollout_config.engine == "vllm":
        kwargs.setdefault("tensor_parallel_size", rollout_config.tp)
        kwargs.setdefault("gpu_memory_utilization", rollout_config.gpu_memory_utilization)
        kwargs.setdefault("seed", rollout_config.seed)
        if rollout_config.kv_cache_mb is not None:
            kwargs.setdefault("kv_cache_bytes", int(rollout_config.kv_cache_mb) << 20)
        kwargs.setdefault("max_images_per_prompt", rollout_config.max_images_per_prompt)
        return VLLMRolloutEngine(checkpoint_dir, **kwargs)
    raise ValueError(f"unknown rollout engine {rollout_config.engine!r} (expected 'hf' or 'vllm')")


__all__ = [
    "Completion", "ExportStats", "HFRolloutEngine", "RolloutEngine", "RolloutRequest", "SamplingConfig",
    "VLLMRolloutEngine", "build_engine", "export_hf_weights", "refresh_engine_weights", "token_mult_prob_error",
]
