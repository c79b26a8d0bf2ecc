"""Evaluate an HF checkpoint on one benchmark: greedy generation through a rollout engine, parsing,
coordinates back to the original image, masks, metrics (``python -m visurf_megatron.evaluate``).

Prompts are built exactly as the trainer builds them (``training/data_feed.PromptPreparer``): the
image resized to the ``image_size`` square, the task template (style, thinking on/off), one image in
the chat template. Outputs in ``out``:

* ``predictions.jsonl``: one record per sample (id, index, prompt, response, finish reason, parsed
  objects in original coordinates / short answer, per-sample stats), appended and fsync-ed per batch;
* ``metrics.json`` (no timings: a resumed run writes the same file as an uninterrupted one) and
  ``metrics.md``; ``run.json``: the run's settings and one timing entry per invocation;
* ``overlays/<index>_<id>.png`` for the first K samples.

Resuming: samples already in ``predictions.jsonl`` are skipped and the metrics are recomputed from
every record; a half-written last line (an interrupted write) is dropped. The out directory is
refused if it holds predictions of different settings (``--overwrite`` starts afresh).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from visurf_megatron.data.images import resize_square
from visurf_megatron.data.prompts import PROMPT_STYLES, build_prompt
from visurf_megatron.data.samples import TASKS
from visurf_megatron.rollout.base import RolloutRequest, SamplingConfig

from .datasets import load_eval_items
from .scoring import HEADLINE, metrics_from_records, score_sample
from .segmenter import build_segmenter

MASK_TASKS = ("grounding", "anomaly")
PREDICTIONS, METRICS, METRICS_MD, RUN = "predictions.jsonl", "metrics.json", "metrics.md", "run.json"
NAMES = {"giou": "gIoU", "ciou": "cIoU", "n_acc": "N-Acc", "t_acc": "T-Acc", "bbox_acc": "bbox acc",
         "roc_auc": "ROC-AUC", "acc": "yes/no acc", "accuracy": "accuracy", "relaxed_acc": "relaxed acc",
         "anls": "ANLS", "parse_fail_rate": "parse failures", "truncated_rate": "truncated", "count": "samples"}


class EvalError(RuntimeError):
    """A user-facing problem (missing input, conflicting out directory); the message says which."""


@dataclass
class EvalConfig:
    model: str
    data: str
    task: str
    out: str
    engine: str = "hf"
    prompt: str = "detailed"
    think: bool = True
    image_size: int = 840
    segmenter: Optional[str] = None  # sam2 | box; None: sam2 for mask tasks
    sam2_config: Optional[str] = None
    sam2_checkpoint: Optional[str] = None
    sam2_random_init: bool = False
    sam2_image_size: Optional[int] = None
    limit: Optional[int] = None
    max_new_tokens: int = 1024
    batch_size: int = 8
    overlays: int = 8
    benchmark: Optional[str] = None
    split: Optional[str] = None
    image_root: Optional[str] = None
    bbox_mode: str = "any"
    dtype: Optional[str] = None  # fp32 | bf16 | fp16; None: bf16 on CUDA, fp32 on CPU
    device: Optional[str] = None
    gpu_memory_utilization: float = 0.85
    max_model_len: Optional[int] = None
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.task not in TASKS:
            raise EvalError(f"unknown task {self.task!r} (expected one of {', '.join(TASKS)})")
        if self.engine not in ("hf", "vllm"):
            raise EvalError(f"unknown engine {self.engine!r} (expected hf or vllm)")
        if self.prompt not in PROMPT_STYLES:
            raise EvalError(f"unknown prompt style {self.prompt!r} (expected one of {', '.join(PROMPT_STYLES)})")
        if self.segmenter not in (None, "sam2", "box"):
            raise EvalError(f"unknown segmenter {self.segmenter!r} (expected sam2 or box)")
        if self.bbox_mode not in ("any", "union"):
            raise EvalError(f"bbox mode must be any or union, got {self.bbox_mode!r}")
        for name in ("image_size", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"limit must be >= 1, got {self.limit}")
        model = Path(self.model)
        if not model.is_dir():
            raise EvalError(f"model directory not found: {model}")
        if not (model / "config.json").is_file():
            raise EvalError(f"{model} is not an HF checkpoint directory (no config.json); convert a Megatron "
                            "checkpoint with checkpoint_converters/megatron_to_hf.py first")
        if not Path(self.data).exists():
            raise EvalError(f"evaluation data not found: {self.data}")

    @property
    def segmenter_kind(self) -> Optional[str]:
        if self.task not in MASK_TASKS:
            return None
        return self.segmenter or "sam2"

    @property
    def benchmark_name(self) -> str:
        if self.benchmark:
            return self.benchmark
        p = Path(self.data)
        stem = p.name if p.is_dir() else p.stem
        generic = {"val", "test", "train", "data", "testmini", "validation", "eval"}
        return f"{p.parent.name if p.is_file() else p.name}/{stem}" if stem in generic and p.is_file() else stem


# ----------------------------------------------------------------------------------------------
# Prompts and engines


def build_request(sample, processor, *, image_size: int, prompt_style: str, think: bool):
    """(``RolloutRequest``, the stored image or None): the trainer's prompt for ``sample``
    (``PromptPreparer._prepare_uncached``: square resize, template, one image in the chat)."""
    images, stored = [], None
    if sample.has_image:
        stored = sample.load_image()
        image, _, _ = resize_square(stored, image_size)
        images.append(image)
    text = build_prompt(sample, style=prompt_style, think=think)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return RolloutRequest(prompt, images), stored


def _torch_dtype(name: Optional[str], cuda: bool):
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name is None:
        return torch.bfloat16 if cuda else torch.float32
    if name not in table:
        raise EvalError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def build_engine(cfg: EvalConfig):
    """(engine, processor) with the checkpoint's own weights loaded."""
    import torch

    from visurf_megatron.rollout.processor import load_processor

    if cfg.engine == "hf":
        from visurf_megatron.rollout.hf_engine import HFRolloutEngine

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine = HFRolloutEngine(cfg.model, device=device, dtype=_torch_dtype(cfg.dtype, device.startswith("cuda")))
        engine.load_checkpoint_weights()
        return engine, engine.processor
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
    from visurf_megatron.rollout.vllm_engine import VLLMRolloutEngine  # lazy: imports vLLM (CUDA or CPU build)
    from visurf_megatron.runtime.spawn import init_single_process_world

    init_single_process_world()
    engine = VLLMRolloutEngine(cfg.model, tensor_parallel_size=1, gpu_memory_utilization=cfg.gpu_memory_utilization,
                               dtype={"fp32": "float32", "fp16": "float16"}.get(cfg.dtype or "bf16", "bfloat16"),
                               max_model_len=cfg.max_model_len)
    with open_hf_checkpoint(cfg.model) as reader:  # load_format="dummy": the weights come in here
        engine.update_weights((k, reader[k]) for k in reader.keys())
    return engine, load_processor(cfg.model)


# ----------------------------------------------------------------------------------------------
# predictions.jsonl


def read_predictions(path: str | Path, *, repair: bool = False) -> list[dict]:
    """Records of ``predictions.jsonl``. A last line without its newline (an interrupted write) is
    dropped, and with ``repair`` cut from the file so that appending continues cleanly; a bad
    complete line is corruption and raises."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{lineno}: not a JSON record ({e.msg}); remove the line or use --overwrite")
        if not isinstance(rec, dict) or "id" not in rec or "index" not in rec:
            raise EvalError(f"{path}:{lineno}: not a prediction record")
        records.append(rec)
    return records


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _settings(cfg: EvalConfig, segmenter_desc: Optional[str]) -> dict[str, Any]:
    """What the predictions depend on (a resumed run must match it)."""
    return {"model": str(Path(cfg.model).resolve()), "data": str(Path(cfg.data).resolve()), "split": cfg.split,
            "task": cfg.task, "prompt": cfg.prompt, "think": cfg.think, "image_size": cfg.image_size,
            "max_new_tokens": cfg.max_new_tokens, "segmenter": segmenter_desc, "bbox_mode": cfg.bbox_mode}


def _check_resume(out: Path, settings: dict, overwrite: bool) -> dict:
    run_file = out / RUN
    if overwrite:
        for name in (PREDICTIONS, METRICS, METRICS_MD, RUN):
            (out / name).unlink(missing_ok=True)
        return {"settings": settings, "invocations": []}
    if not run_file.exists():
        if (out / PREDICTIONS).exists():
            raise EvalError(f"{out} holds {PREDICTIONS} but no {RUN}; use another --out or --overwrite")
        return {"settings": settings, "invocations": []}
    run = json.loads(run_file.read_text())
    old = run.get("settings", {})
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in diff)
        raise EvalError(f"{out} holds predictions of different settings ({detail}); use another --out or --overwrite")
    return run


# ----------------------------------------------------------------------------------------------
# Metrics files


def metrics_markdown(payload: dict) -> str:
    lines = [f"# {payload['benchmark']} ({payload['task']})", "",
             f"- model: `{payload['model']}`", f"- samples: {payload['metrics']['count']}",
             f"- prompt: {payload['prompt']}{'' if payload['think'] else ' (no think)'}, image size "
             f"{payload['image_size']}, max new tokens {payload['max_new_tokens']}"]
    if payload.get("segmenter"):
        lines.append(f"- masks: {payload['segmenter']}")
    lines += ["", "| metric | value |", "| --- | ---: |"]
    for key, value in payload["metrics"].items():
        shown = "n/a" if value is None else (str(value) if key == "count" else f"{100 * value:.2f}")
        lines.append(f"| {NAMES.get(key, key)} | {shown} |")
    return "\n".join(lines) + "\n\n(percentages; `samples` is a count)\n"


def write_metrics(out: Path, cfg: EvalConfig, records: list[dict], segmenter_desc: Optional[str]) -> dict:
    payload = {"benchmark": cfg.benchmark_name, "task": cfg.task, "model": cfg.model, "data": cfg.data,
               "prompt": cfg.prompt, "think": cfg.think, "image_size": cfg.image_size,
               "max_new_tokens": cfg.max_new_tokens, "segmenter": segmenter_desc,
               "headline": list(HEADLINE[cfg.task]),
               "metrics": metrics_from_records(records, cfg.task, bbox_mode=cfg.bbox_mode)}
    _atomic_write(out / METRICS, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out / METRICS_MD, metrics_markdown(payload))
    return payload


# ----------------------------------------------------------------------------------------------
# The run


def run_evaluation(cfg: EvalConfig, *, engine=None, processor=None, segmenter=None) -> dict:
    """Evaluate and write the outputs; returns the ``metrics.json`` content. ``engine`` /
    ``processor`` / ``segmenter`` may be passed in (else built from ``cfg``)."""
    from tqdm import tqdm

    from .overlays import save_overlay

    started = time.time()
    cfg.validate()
    try:
        items = load_eval_items(cfg.data, task=cfg.task, split=cfg.split, image_root=cfg.image_root)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"cannot load {cfg.data}: {e}") from None
    selected = items[: cfg.limit] if cfg.limit else items
    if segmenter is None and cfg.segmenter_kind is not None:
        try:
            segmenter = build_segmenter(cfg.segmenter_kind, config=cfg.sam2_config, checkpoint=cfg.sam2_checkpoint,
                                        random_init=cfg.sam2_random_init, image_size=cfg.sam2_image_size)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise EvalError(str(e)) from None
    seg_desc = segmenter.description if segmenter is not None and cfg.task in MASK_TASKS else None

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run = _check_resume(out, _settings(cfg, seg_desc), cfg.overwrite)
    _atomic_write(out / RUN, json.dumps(run, indent=2) + "\n")
    pred_path = out / PREDICTIONS
    done = {r["id"] for r in read_predictions(pred_path, repair=True)}
    todo = [it for it in selected if it.id not in done]

    if todo and engine is None:
        engine, processor = build_engine(cfg)
    if todo and processor is None:
        from visurf_megatron.rollout.processor import load_processor

        processor = load_processor(cfg.model)
    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=0)
    bar = tqdm(total=len(selected), initial=len(selected) - len(todo), desc=f"eval {cfg.benchmark_name}",
               unit="sample", disable=not cfg.progress)
    with open(pred_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            built = [build_request(it.sample, processor, image_size=cfg.image_size, prompt_style=cfg.prompt,
                                   think=cfg.think) for it in batch]
            completions = engine.generate([r for r, _ in built], sampling)
            for it, (request, stored), group in zip(batch, built, completions):
                done_c = group[0]
                rec, visual = score_sample(it, done_c.text, image=stored, image_size=cfg.image_size,
                                           segmenter=segmenter, bbox_mode=cfg.bbox_mode)
                record = {"id": it.id, "index": it.index, "prompt": request.prompt, "response": done_c.text,
                          "finish_reason": done_c.finish_reason, **rec}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                if it.index < cfg.overlays:
                    caption = f"{it.sample.problem[:200]}\n{visual.pop('caption', '')}"
                    save_overlay(out / "overlays" / f"{it.index:05d}_{_safe(it.id)}.png", caption=caption, **visual)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()

    wanted = {it.id for it in selected}
    records = [r for r in read_predictions(pred_path) if r["id"] in wanted]
    payload = write_metrics(out, cfg, records, seg_desc)
    seconds = time.time() - started
    run["invocations"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                               "seconds": round(seconds, 3), "new_samples": len(todo),
                               "samples_per_s": round(len(todo) / seconds, 4) if seconds > 0 else None,
                               "limit": cfg.limit, "engine": cfg.engine, "batch_size": cfg.batch_size})
    _atomic_write(out / RUN, json.dumps(run, indent=2) + "\n")
    return payload


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
