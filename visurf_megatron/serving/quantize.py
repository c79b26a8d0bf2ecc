"""Quantised serving export of a Qwen2.5-VL (or Qwen2-VL) Hugging Face checkpoint with nvidia-modelopt.

HF directory in (``checkpoint_converters/megatron_to_hf.py``'s output), a directory vLLM / TensorRT-LLM
load out: ``model.safetensors`` with quantised weights and their scales, ``hf_quant_config.json``, the
source's tokenizer / processor files, and ``export_report.json`` (format, calibration, modules quantised
and kept, fidelity). The steps:

1. held-out prompts through the unquantised model: reference log-probabilities;
2. ``mtq.quantize`` with the format's config, calibrated on N prompts of the user's dataset (the vision
   tower's quantizers disabled unless asked for: its activations are what grounding answers hang on);
3. the same held-out prompts through the (fake-)quantised model: mean KL per token and top-1 agreement;
4. ``export_hf_checkpoint`` into a temporary directory beside the target, checked, then renamed.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..models.families import FAMILIES
from .calibration import (PromptSettings, Progress, calibration_loop, encode_prompts, load_prompt_samples,
                          measure_fidelity, no_progress, reference_logprobs)

REPORT_NAME = "export_report.json"


@dataclass(frozen=True)
class QuantFormat:
    name: str
    mtq_config: str  # attribute of modelopt.torch.quantization
    quant_algo: str  # what hf_quant_config.json declares (modelopt's name)
    needs_cuda: bool  # modelopt's calibration for it only runs on CUDA tensors
    engines: str  # who loads it, with the flag


# Formats whose modelopt HF export a serving engine loads (vLLM's ModelOpt loader: FP8,
# FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, MXFP8; TensorRT-LLM reads hf_quant_config.json).
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("fp8", "FP8_DEFAULT_CFG", "FP8", False,
                "vLLM `--quantization modelopt` (Hopper/Ada/Blackwell); TensorRT-LLM `trtllm-serve DIR` "
                "(reads hf_quant_config.json, no flag); SGLang `--quantization modelopt`"),
    QuantFormat("fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN", False,
                "vLLM `--quantization modelopt`; TensorRT-LLM `trtllm-serve DIR`"),
    QuantFormat("fp8_pb_wo", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "fp8_pb_wo", False,
                "vLLM `--quantization modelopt` (128x128 block-scaled weight-only FP8)"),
    QuantFormat("nvfp4", "NVFP4_DEFAULT_CFG", "NVFP4", True,
                "vLLM `--quantization modelopt_fp4` (Blackwell); TensorRT-LLM `trtllm-serve DIR`; "
                "SGLang `--quantization modelopt_fp4`"),
    QuantFormat("mxfp8", "MXFP8_DEFAULT_CFG", "MXFP8", True, "vLLM `--quantization modelopt_mxfp8` (Blackwell)"),
    QuantFormat("int4_awq", "INT4_AWQ_CFG", "W4A16_AWQ", False, "TensorRT-LLM `trtllm-serve DIR`"),
    QuantFormat("w4a8_awq", "W4A8_AWQ_BETA_CFG", "W4A8_AWQ", False, "TensorRT-LLM `trtllm-serve DIR`"),
)}

# modelopt formats refused by name: vLLM's ModelOpt loader takes FP8, FP8_PER_CHANNEL_PER_TOKEN,
# FP8_PB_WO, NVFP4 and MXFP8 only, and TensorRT-LLM's AWQ formats are the two above.
_LOADER = "no vLLM ModelOpt loader for it, and not one of the TensorRT-LLM AWQ formats exported here"
REFUSED = {name: _LOADER for name in ("int8", "int8_sq", "int8_wo", "int4", "mxfp4", "mxfp6", "mxint8",
                                      "nvfp4_awq", "nvfp4_svdquant", "w4a8_nvfp4_fp8", "w4a8_mxfp4_fp8")}


def resolve_format(name: str) -> QuantFormat:
    key = name.strip().lower().replace("-", "_")
    if key in FORMATS:
        return FORMATS[key]
    why = f" ({REFUSED[key]})" if key in REFUSED else ""
    raise ValueError(f"format {name!r} is not exported{why}; supported: {', '.join(FORMATS)}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(fmt: QuantFormat, device: torch.device) -> None:
    if fmt.needs_cuda and device.type != "cuda":
        raise ValueError(
            f"{fmt.name} needs a CUDA device: modelopt calibrates {fmt.name} with dynamic block quantisation "
            f"kernels that only take CUDA tensors (on CPU it fails with 'amax must be a CUDA tensor' or "
            f"'CUDA is not available'). Run this export on a GPU machine (--device cuda); "
            f"on CPU the formats are: {', '.join(f for f, q in FORMATS.items() if not q.needs_cuda)}")


def quant_config(fmt: QuantFormat, quantize_vision: bool) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, fmt.mtq_config))
    if not quantize_vision:
        # The last matching entry wins: this disables the weight and input quantizers of every module
        # under the vision tower and merger (both live under ``*visual*``). modelopt <= 0.4x keeps
        # ``quant_cfg`` as a pattern dict, newer releases (0.47: the gpu extra) as an ordered list.
        entries = cfg["quant_cfg"]
        if isinstance(entries, dict):
            entries["*visual*"] = {"enable": False}
        else:
            entries.append({"quantizer_name": "*visual*", "enable": False})
    return cfg


# -- source checkpoint ------------------------------------------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Written by export_hf_checkpoint; everything else in the source directory (tokenizer, processor and
# chat-template files) is copied as is.
_WRITTEN_BY_EXPORT = {"config.json", "generation_config.json", "hf_quant_config.json", REPORT_NAME}


def read_source_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a Hugging Face checkpoint directory)")
    config = json.loads(path.read_text())
    if config.get("model_type") not in FAMILIES:  # Qwen2.5-VL or Qwen2-VL (models/families.py)
        raise ValueError(f"{src}: model_type {config.get('model_type')!r}, expected one of {', '.join(FAMILIES)}")
    if config.get("quantization_config") or (src / "hf_quant_config.json").exists():
        raise ValueError(f"{src}: already quantised; export from the unquantised checkpoint")
    return config


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(".bin") or name.endswith(".safetensors.index.json") \
        or name.endswith(".bin.index.json")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and not _is_weight_file(item.name) and item.name not in _WRITTEN_BY_EXPORT:
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied


# -- module accounting ---------------------------------------------------------------------------------

# In-memory (transformers >= 5) module prefixes -> the Hub naming save_pretrained writes.
_SAVED_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def saved_name(name: str) -> str:
    for old, new in _SAVED_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def module_plan(model) -> tuple[list[str], list[str]]:
    """(quantised, kept): weight-bearing Linear / Conv / Embedding modules, by their saved names.
    A module is quantised when its weight quantizer is enabled."""
    quantised, kept = [], []
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is not None and wq.is_enabled:
            quantised.append(saved_name(name))
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Embedding)):
            kept.append(saved_name(name))
    return quantised, kept


def fix_exclude_modules(patterns: list[str], quantised: list[str], kept_linear: list[str]) -> list[str]:
    """Exclusion patterns in the checkpoint's own module naming, covering every unquantised Linear.

    modelopt <= 0.46 names the vision tower ``model.visual*`` while the saved keys say ``visual.*``:
    an engine matching the list against the file would then expect FP8 vision weights. Patterns are
    moved to the saved naming, and every kept Linear no pattern covers is added by name.
    """
    out = []
    for p in patterns:
        p = saved_name(p) if not p.endswith("*") else saved_name(p[:-1] + ".")[:-1] + "*"
        if p not in out:
            out.append(p)
    for name in kept_linear:
        if not any(fnmatch.fnmatchcase(name, p) for p in out):
            out.append(name)
    clash = [n for n in quantised if any(fnmatch.fnmatchcase(n, p) for p in out)]
    if clash:
        raise RuntimeError(f"quantised modules match the exclusion list {out}: {clash[:5]}")
    return out


def _rewrite_exclusions(export_dir: Path, exclude: list[str]) -> None:
    hf_quant = export_dir / "hf_quant_config.json"
    data = json.loads(hf_quant.read_text())
    data["quantization"]["exclude_modules"] = exclude
    hf_quant.write_text(json.dumps(data, indent=4) + "\n")
    config_path = export_dir / "config.json"
    config = json.loads(config_path.read_text())
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        for key in ("ignore", "exclude_modules"):
            if key in qc:
                qc[key] = exclude
        config_path.write_text(json.dumps(config, indent=2) + "\n")


# -- quiet library output ----------------------------------------------------------------------------

@contextlib.contextmanager
def quiet(verbose: bool):
    """modelopt prints a line per registered attention class and per export step, transformers warns
    about deprecated arguments modelopt passes: none of it is actionable for a user of this export."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            hf_logging.enable_progress_bar()


# -- the export ------------------------------------------------------------------------------------------

@dataclass
class ExportOptions:
    format: str = "fp8"
    data: Optional[str] = None
    eval_data: Optional[str] = None  # held-out prompts; default: the rows after the calibration rows
    image_root: Optional[str] = None
    calib_samples: int = 32
    eval_samples: int = 8
    prompts: PromptSettings = PromptSettings()
    quantize_vision: bool = False
    dtype: str = "bf16"
    device: Optional[str] = None
    overwrite: bool = False
    verbose: bool = False


def _atomic_target(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def _readable(directory: Path) -> None:
    """Files get the umask's permissions: the safetensors writer leaves 0600, which a serving container
    running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for item in directory.iterdir():
        if item.is_file():
            os.chmod(item, 0o666 & ~umask)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an existing target is moved aside first and removed
    only after the rename, so a reader sees the old export or the new one, never a partial one."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_quantized(src: str | Path, out: str | Path, options: ExportOptions,
                     progress: Progress = no_progress, log=print) -> dict:
    """Quantise ``src`` and write the serving checkpoint to ``out``; returns the report."""
    src, out = Path(src), Path(out)
    fmt = resolve_format(options.format)
    device = torch.device(options.device) if options.device else default_device()
    check_device(fmt, device)
    if options.dtype not in _DTYPES:
        raise ValueError(f"dtype {options.dtype!r}: expected one of {', '.join(_DTYPES)}")
    if options.data is None:
        raise ValueError("a calibration dataset is required (--data)")
    if options.calib_samples < 1 or options.eval_samples < 1:
        raise ValueError("calibration and held-out sample counts must be >= 1")
    source_config = read_source_config(src)
    tmp = _atomic_target(out, options.overwrite)
    started = time.perf_counter()

    with quiet(options.verbose):
        import modelopt
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
        from visurf_megatron.models.families import transformers_class

        from visurf_megatron.rollout.processor import load_processor

        processor = load_processor(src)
        settings = options.prompts
        calib = load_prompt_samples(options.data, count=options.calib_samples, task=settings.task,
                                    image_root=options.image_root)
        held_out_src = options.eval_data or options.data
        held_out = load_prompt_samples(held_out_src, count=options.eval_samples, task=settings.task,
                                       image_root=options.image_root,
                                       skip=0 if options.eval_data else options.calib_samples)
        calib_enc = encode_prompts(calib, processor, settings)
        eval_enc = encode_prompts(held_out, processor, settings)
        # Image placeholders are scored nowhere: a served model never samples at them.
        skip_ids = [t for t in (source_config.get("image_token_id"), source_config.get("video_token_id"))
                    if t is not None]

        dtype = _DTYPES[options.dtype]
        model_class = transformers_class(source_config["model_type"], "model")
        model = model_class.from_pretrained(src, dtype=dtype).to(device).eval()
        reference = reference_logprobs(model, eval_enc, skip_ids, progress)
        mtq.quantize(model, quant_config(fmt, options.quantize_vision), calibration_loop(calib_enc, progress))
        fidelity = measure_fidelity(model, eval_enc, reference, skip_ids, progress)
        quantised, kept = module_plan(model)
        kept_linear = [saved_name(n) for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and getattr(m, "weight_quantizer", None) is not None
                       and not m.weight_quantizer.is_enabled]
        if not quantised:
            raise RuntimeError(f"{fmt.name}: modelopt quantised no module")
        try:
            export_hf_checkpoint(model, dtype=dtype, export_dir=tmp)
            hf_quant = json.loads((tmp / "hf_quant_config.json").read_text())["quantization"]
            exclude = fix_exclude_modules(list(hf_quant.get("exclude_modules") or []), quantised, kept_linear)
            _rewrite_exclusions(tmp, exclude)
            copied = copy_side_files(src, tmp)
            report = {
                "format": fmt.name,
                "quant_algo": hf_quant.get("quant_algo"),
                "engines": fmt.engines,
                "modelopt_version": modelopt.__version__,
                "source": str(src.resolve()),
                "dtype": options.dtype,
                "device": str(device),
                "quantize_vision": options.quantize_vision,
                "calibration": {"data": str(options.data), "samples": len(calib_enc),
                                "sample_ids": [s.id for s in calib], "task": settings.task,
                                "image_size": settings.image_size, "prompt_style": settings.prompt_style,
                                "think": settings.think},
                "held_out": {"data": str(held_out_src), "samples": len(eval_enc),
                             "sample_ids": [s.id for s in held_out]},
                "modules": {"quantised": quantised, "kept": kept,
                            "num_quantised": len(quantised), "num_kept": len(kept)},
                "exclude_modules": exclude,
                "fidelity": fidelity,
                "copied_files": copied,
                "seconds": round(time.perf_counter() - started, 2),
            }
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
            _readable(tmp)
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"{fmt.name} export written to {out}: {len(quantised)} modules quantised, {len(kept)} kept; "
        f"held-out fidelity over {fidelity['tokens']} tokens: mean KL {fidelity['mean_kl_per_token']:.3g} "
        f"nats/token, top-1 agreement {fidelity['top1_agreement']:.4f}")
    return report
