"""The one validated configuration: nested dataclasses, YAML files, dotted CLI overrides.

    python -m visurf_megatron.config examples/configs/tiny_visurf.yaml train.lr=1e-6 parallel.tp=2

prints the resolved configuration (or a clear error naming the offending key). Every field has the
default named in shared/VISURF.md where the paper fixes one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; the message names the key."""


@dataclass
class ModelConfig:
    hf_path: Optional[str] = None  # HF checkpoint directory (config.json, safetensors, tokenizer)
    megatron_path: Optional[str] = None  # converted dist checkpoint; None = convert on first use
    dtype: Literal["fp32", "bf16"] = "bf16"
    spec: Literal["auto", "local", "te"] = "auto"  # auto: Transformer Engine on GPU, local on CPU
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    # tensorwise (current) scaling: megatron refuses BF16 first/last layers with delayed scaling.
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    fp8_bf16_first_last_layers: int = 1  # keep this many first and last LM layers in BF16 (0 = none)
    # FP8 in the vision tower too; refused at build when its GEMM shapes break TE's FP8 rule (every
    # released Qwen2.5-VL: the vision MLP is 3420 wide, not a multiple of 16).
    fp8_vision: bool = False
    freeze_vision: bool = False
    freeze_merger: bool = False
    freeze_language: bool = False
    recompute: Optional[Literal["full", "selective"]] = None
    # Read from <hf_path>/config.json when None; set explicitly to validate a layout without files.
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    dp: Optional[int] = None  # None = world_size / (tp * pp)
    world_size: Optional[int] = None  # None = taken from the launcher at run time
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True


@dataclass
class AlgorithmConfig:
    paradigm: Literal["sft", "rlvr", "sft_then_rlvr", "visurf", "luffy", "chord", "hpt"] = "visurf"
    # Control 1: render the GT in the rollout style ("auto" = highest teacher-forced log-prob under
    # the policy, measured on the first batch with GT rows among gt_style_candidates; empty = all).
    align_gt_style: bool = True
    gt_style: str = "think_compact"
    gt_style_candidates: list[str] = field(default_factory=list)
    # Control 2: the GT row gets no thinking-format reward.
    gt_no_thinking_reward: bool = True
    # Control 3: smoothing, compared on the total reward (default) or the accuracy term.
    smooth: bool = True
    smooth_compare: Literal["total", "accuracy"] = "total"
    eps: float = 1e-6
    std_ddof: Literal[0, 1] = 1
    norm_by_std: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    loss_agg: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0  # ViSurf uses no KL; k3 KL against a reference is available but off
    filter_groups: bool = False
    sft_then_rlvr_switch_step: int = 0
    luffy_gamma: float = 0.1
    chord_mu_start: float = 0.9
    chord_mu_end: float = 0.05
    chord_mu_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    hpt_correct_threshold: float = 1.0


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    n: int = 8  # rollouts per prompt (G); the batch holds G+1 rows per prompt with ViSurf
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    seed: int = 0
    tp: int = 1  # rollout tensor parallel, independent of training TP
    gpu_memory_utilization: float = 0.5
    # vLLM's KV cache in MiB (None: gpu_memory_utilization sizes it on GPU; 256 MiB on CPU, where a
    # utilisation would mean a share of host RAM).
    kv_cache_mb: Optional[int] = None
    max_images_per_prompt: int = 1  # vLLM reserves encoder memory for this many images per prompt
    bucket_mb: int = 512  # weight-sync bucket size


@dataclass
class DataConfig:
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    image_root: Optional[str] = None
    task: Literal["grounding", "gui", "anomaly", "math"] = "grounding"
    prompt_style: Literal["detailed", "plain"] = "detailed"
    think: bool = True
    image_size: int = 840
    min_pixels: int = 3136
    max_pixels: int = 1003520
    prompts_per_step: int = 16
    shuffle: bool = True
    on_bad_row: Literal["error", "skip"] = "error"


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-6
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch_size: int = 1
    # 0 = off: padded micro-batches of micro_batch_size rows. N > 0: each micro-batch packs whole rows
    # into one stream of N tokens (training/packing.py; micro_batch_size is then unused).
    max_tokens_per_micro_batch: int = 0
    # Packed micro-batches only: encode each distinct prompt's images once per update (true) instead
    # of once per micro-batch that holds one of its rows (false); the numbers are the same either way.
    shared_vision_pass: bool = True
    mini_batches_per_step: int = 1
    epochs_per_batch: int = 1
    seed: int = 42
    max_nonfinite_steps: int = 3  # abort (after a checkpoint) after this many skipped steps in a row
    reward_workers: int = 2
    reward_timeout_s: float = 10.0


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    save_every: int = 0  # 0 = only at the end
    resume: bool = True
    keep_last: int = 2


@dataclass
class LoggingConfig:
    dir: str = "runs/visurf"
    tensorboard: bool = True
    jsonl: bool = True
    log_every: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Type coercion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        # A literal of ints given as a string on the command line, say.
        for choice in args:
            if str(value) == str(choice):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _fill(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; known keys here: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _fill(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Loading, overrides, validation


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-6`` -> (["train", "lr"], 1e-06); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def _heads_from_hf(hf_path: str) -> tuple[Optional[int], Optional[int]]:
    cfg_file = Path(hf_path) / "config.json"
    if not cfg_file.is_file():
        return None, None
    cfg = json.loads(cfg_file.read_text())
    text = cfg.get("text_config") or cfg
    heads = text.get("num_attention_heads", cfg.get("num_attention_heads"))
    groups = text.get("num_key_value_heads", cfg.get("num_key_value_heads", heads))
    return heads, groups


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Check cross-field constraints; fills ``parallel.dp`` when the world size is known."""
    par = cfg.parallel
    for key in ("tp", "pp"):
        if getattr(par, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(par, key)}")
    world = world_size if world_size is not None else par.world_size
    if world is not None:
        if world % (par.tp * par.pp) != 0:
            raise ConfigError(
                f"parallel: tp({par.tp}) * pp({par.pp}) = {par.tp * par.pp} does not divide world size {world}"
            )
        dp = world // (par.tp * par.pp)
        if par.dp is not None and par.dp != dp:
            raise ConfigError(
                f"parallel.dp: tp({par.tp}) * pp({par.pp}) * dp({par.dp}) = {par.tp * par.pp * par.dp} "
                f"!= world size {world}"
            )
        par.dp = dp
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
    if par.vpp is not None:
        # An interleaved schedule needs one model chunk per virtual stage (each built with its
        # vp_stage) and one data iterator per chunk; the trainer builds one chunk per rank.
        raise ConfigError(f"parallel.vpp={par.vpp} is not supported: the trainer runs one model chunk per "
                          "pipeline rank (no interleaved schedule); remove parallel.vpp")
    heads, groups = cfg.model.num_attention_heads, cfg.model.num_query_groups
    if cfg.model.hf_path and (heads is None or groups is None):
        hf_heads, hf_groups = _heads_from_hf(cfg.model.hf_path)
        heads = heads if heads is not None else hf_heads
        groups = groups if groups is not None else hf_groups
    if heads is not None and heads % par.tp != 0:
        raise ConfigError(f"parallel.tp={par.tp} does not divide the {heads} attention heads (model.num_attention_heads)")
    if groups is not None and groups % par.tp != 0:
        raise ConfigError(f"parallel.tp={par.tp} does not divide the {groups} query groups (model.num_query_groups)")
    if cfg.model.fp8 and cfg.model.fp8_recipe == "delayed" and cfg.model.fp8_bf16_first_last_layers > 0:
        raise ConfigError("model.fp8_recipe=delayed cannot keep first/last layers in BF16; "
                          "set model.fp8_bf16_first_last_layers=0 or another recipe")
    if cfg.model.fp8 and cfg.model.dtype != "bf16":
        raise ConfigError("model.fp8 needs model.dtype=bf16")
    if cfg.rollout.n < 1:
        raise ConfigError(f"rollout.n must be >= 1, got {cfg.rollout.n}")
    if cfg.rollout.engine == "vllm" and par.tp % cfg.rollout.tp != 0:
        # Rollout TP groups are consecutive ranks; megatron puts TP innermost, so a rollout group wider
        # than (or not dividing) the training TP group would mix data-parallel replicas' prompts.
        raise ConfigError(f"rollout.tp={cfg.rollout.tp} must divide parallel.tp={par.tp} with the vllm engine")
    if cfg.rollout.kv_cache_mb is not None and cfg.rollout.kv_cache_mb < 1:
        raise ConfigError(f"rollout.kv_cache_mb must be >= 1 (or null), got {cfg.rollout.kv_cache_mb}")
    if cfg.rollout.max_images_per_prompt < 1:
        raise ConfigError(f"rollout.max_images_per_prompt must be >= 1, got {cfg.rollout.max_images_per_prompt}")
    if heads is not None and heads % cfg.rollout.tp != 0:
        raise ConfigError(f"rollout.tp={cfg.rollout.tp} does not divide the {heads} attention heads")
    for key in ("clip_low", "clip_high"):
        if not 0 <= getattr(cfg.algorithm, key) < 1:
            raise ConfigError(f"algorithm.{key} must be in [0, 1), got {getattr(cfg.algorithm, key)}")
    if cfg.algorithm.dual_clip is not None and cfg.algorithm.dual_clip <= 1:
        raise ConfigError(f"algorithm.dual_clip must be > 1, got {cfg.algorithm.dual_clip}")
    if cfg.algorithm.gt_style_candidates and cfg.algorithm.gt_style != "auto":
        raise ConfigError(f"algorithm.gt_style_candidates is only used with algorithm.gt_style=auto "
                          f"(got gt_style={cfg.algorithm.gt_style!r})")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {cfg.train.lr}")
    if cfg.train.steps < 0:
        raise ConfigError(f"train.steps must be >= 0, got {cfg.train.steps}")
    if cfg.train.max_tokens_per_micro_batch < 0:
        raise ConfigError("train.max_tokens_per_micro_batch must be 0 (off: padded micro-batches) or a token "
                          f"budget > 0, got {cfg.train.max_tokens_per_micro_batch}")
    return cfg


def from_dict(data: dict[str, Any], world_size: Optional[int] = None) -> Config:
    return validate(_fill(Config, data or {}, ""), world_size)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    return from_dict(apply_overrides(data, list(overrides or [])), world_size)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visurf_megatron.config",
        description="Print the resolved visurf_megatron configuration (YAML file + dotted overrides).",
    )
    parser.add_argument("config", nargs="?", help="YAML config file (omit for the defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=1e-6 parallel.tp=2")
    parser.add_argument("--world-size", type=int, default=None, help="validate the layout for this many ranks")
    args = parser.parse_args(argv)
    config_path = args.config
    overrides = list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)
        config_path = None
    try:
        cfg = load_config(config_path, overrides, world_size=args.world_size)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    yaml.safe_dump(cfg.to_dict(), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
