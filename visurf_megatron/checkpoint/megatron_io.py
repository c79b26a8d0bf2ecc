"""Megatron distributed checkpoints of the Qwen2.5-VL model: build, save, load, metadata.

A checkpoint directory is a megatron-core ``dist_checkpointing`` directory (reloadable under any
TP/PP) with the model under the ``model`` key, plus ``visurf_meta.json`` (the HF config it came
from, dtype, layout at save time) and ``hf_assets/`` (tokenizer, processor and generation files, so
the way back to HF needs nothing else). Training checkpoints add optimizer/RNG/data state under
other keys in the same directory; loaders here read the model only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

META_NAME = "visurf_meta.json"
ASSETS_DIR = "hf_assets"
LATEST_NAME = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
# Everything of an HF model directory except its weights.
HF_ASSET_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def transformer_overrides(model_cfg) -> dict[str, Any]:
    """TransformerConfig fields from a ``config.ModelConfig``: FP8 (language tower) and recompute."""
    from visurf_megatron.models.qwen2_5_vl.specs import fp8_overrides

    out = dict(fp8_overrides(model_cfg.fp8, model_cfg.fp8_recipe, model_cfg.fp8_bf16_first_last_layers))
    if model_cfg.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model_cfg.recompute == "selective":
        out.update(recompute_granularity="selective")
    return out


def build_model(hf_config: Any, tp: int, pp: int, dtype: torch.dtype, *, initialize: bool = False,
                sequence_parallel: bool = False, backend: str = "local", fp8_vision: bool = False,
                config_overrides: Optional[dict] = None, **model_kwargs):
    """The Qwen2.5-VL model chunk of this rank (parallel_state must be set up already).

    ``initialize=False`` skips random init: converters overwrite every weight anyway, and random
    init of a 72B shard costs minutes. ``config_overrides`` go to both TransformerConfigs (see
    ``transformer_overrides``).
    """
    from visurf_megatron.models.qwen2_5_vl.config import ParallelLayout, configs_from_hf
    from visurf_megatron.models.qwen2_5_vl.model import Qwen25VLModel

    lang, vision, extras = configs_from_hf(
        hf_config, ParallelLayout(tp=tp, pp=pp, sequence_parallel=sequence_parallel), params_dtype=dtype,
        perform_initialization=initialize, fp8_vision=fp8_vision, **(config_overrides or {}),
    )
    model = Qwen25VLModel(lang, vision, extras, backend=backend, **model_kwargs)
    if not initialize:
        mark_tensor_parallel_weights(model)
    return model, extras


def mark_tensor_parallel_weights(model) -> int:
    """Set the TP attributes megatron only sets inside its weight-init functions.

    With ``perform_initialization=False`` megatron-core 0.16 never marks Column/RowParallelLinear and
    VocabParallelEmbedding weights as tensor-parallel, and the grad-norm then counts only TP rank 0's
    shards (found by comparing TP1 and TP2 training). Returns the number of weights marked.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, set_tensor_model_parallel_attributes,
    )

    marked = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(weight, True, 0, getattr(module, "stride", 1))
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, getattr(module, "stride", 1))
        else:
            continue
        marked += 1
    return marked


def copy_hf_assets(src: Path, dst: Path) -> list[str]:
    """Copy the non-weight files of an HF model directory; returns the names copied."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_ASSET_PATTERNS:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_meta(directory: Path, hf_config: dict, dtype: torch.dtype, tp: int, pp: int, **extra: Any) -> None:
    meta = {"format_version": FORMAT_VERSION, "hf_config": hf_config, "dtype": dtype_name(dtype),
            "saved_layout": {"tp": tp, "pp": pp}, **extra}
    (directory / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a visurf_megatron checkpoint (no {META_NAME})")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')}")
    return meta


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a training run's checkpoint root (its latest iteration)."""
    path = Path(path)
    if (path / META_NAME).is_file():
        return path
    latest = path / LATEST_NAME
    if latest.is_file():
        iteration = int(latest.read_text().strip())
        candidate = path / f"iter_{iteration:07d}"
        if (candidate / META_NAME).is_file():
            return candidate
        raise FileNotFoundError(f"{latest} points at {candidate}, which is not a complete checkpoint")
    raise FileNotFoundError(f"no checkpoint at {path} (neither {META_NAME} nor {LATEST_NAME})")


def model_sharded_state_dict(model_chunks) -> dict:
    from visurf_megatron.checkpoint.mapping import unwrap

    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def save_model(model_chunks, directory: Path, extra_state: Optional[dict] = None) -> None:
    """Collective: every rank calls it with its chunks; megatron writes each shard once."""
    from megatron.core import dist_checkpointing

    state = model_sharded_state_dict(model_chunks)
    if extra_state:
        state.update(extra_state)
    dist_checkpointing.save(state, str(directory))


def load_model(model_chunks, directory: Path) -> None:
    """Collective: load the model weights (only) into this rank's chunks, whatever the saved layout."""
    from megatron.core import dist_checkpointing

    from visurf_megatron.checkpoint.mapping import unwrap

    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(directory))
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
