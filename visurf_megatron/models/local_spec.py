"""Pure-PyTorch (local) layer specs for megatron-core, usable on CPU and with sequence parallel.

megatron-core's local spec uses ``WrappedTorchNorm``, which refuses sequence parallel; Qwen also
needs its norm computed in fp32 exactly as transformers does. ``RMSNorm`` below covers both, and the
spec builders swap it in for every norm (per layer and the final one).
"""
from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back (as transformers' Qwen2).

    Under sequence parallel each TP rank sees a different slice of the sequence, so the (replicated)
    weight gets different gradients per rank; the ``sequence_parallel`` attribute tells megatron's
    grad finalisation to all-reduce it over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(torch.nn.Module):
    """torch's LayerNorm with weight and bias (Qwen2-VL's vision blocks and merger), computed in the
    input dtype as transformers' ``nn.LayerNorm`` is; SP-aware like ``RMSNorm`` (megatron's
    ``WrappedTorchNorm`` refuses sequence parallel)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(hidden, self.weight.shape, self.weight, self.bias, self.eps)


NORMS = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}


def local_layer_spec(norm: str = "RMSNorm") -> ModuleSpec:
    """megatron's local GPT layer spec (separate norm + linear) with our ``norm`` in both norm slots."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.input_layernorm = NORMS[norm]
    spec.submodules.pre_mlp_layernorm = NORMS[norm]
    return spec


def block_spec_for_stage(
    layer_spec: ModuleSpec,
    config: TransformerConfig,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The block spec of this pipeline stage: its layers plus ``RMSNorm`` as the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=RMSNorm)
