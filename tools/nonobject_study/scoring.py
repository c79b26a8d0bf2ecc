"""Strict grounding metrics (a no-target sample counts only for a well-formed ``[]``) and greedy
evaluation of a trainer's current weights inside the training world."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence


def is_well_formed_empty(record: dict) -> bool:
    return record.get("parse_error") is None and not record.get("objects") and not record.get("n_invalid_objects")


def strict_grounding_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """The study's metrics from evaluation records (``eval/scoring.score_sample`` fields).

    A no-target sample is correct (IoU 1 in gIoU, a hit in N-Acc and bbox accuracy) only for a
    well-formed empty answer. Target samples as in the library: IoU of the box masks, bbox hit when
    a predicted box has IoU > 0.5 with the GT box, an unparseable answer predicts nothing. The
    library's own numbers (unparseable = empty) are added as ``lib_*``.
    """
    from visurf_megatron.eval.scoring import metrics_from_records

    n = n_target = n_none = n_none_ok = bbox_ok = target_pred = n_parse_fail = 0
    sum_iou = 0.0
    inter = union = 0
    for r in records:
        st = r["stats"]
        n += 1
        inter += st["inter"]
        union += st["union"]
        n_parse_fail += int(r.get("parse_error") is not None)
        if st["no_target"]:
            n_none += 1
            ok = is_well_formed_empty(r)
            n_none_ok += int(ok)
            sum_iou += float(ok)
            bbox_ok += int(ok)
        else:
            n_target += 1
            sum_iou += st["iou"]
            bbox_ok += int(st["bbox_hit"])
            target_pred += int(not st["pred_empty"])

    def ratio(a, b):
        return a / b if b else None

    target_iou = sum(r["stats"]["iou"] for r in records if not r["stats"]["no_target"])
    out = {"giou": ratio(sum_iou, n), "ciou": ratio(inter, union), "n_acc": ratio(n_none_ok, n_none),
           "t_acc": ratio(target_pred, n_target), "bbox_acc": ratio(bbox_ok, n),
           "target_giou": ratio(target_iou, n_target),
           "target_bbox_acc": ratio(sum(int(r["stats"]["bbox_hit"]) for r in records if not r["stats"]["no_target"]),
                                    n_target),
           "parse_fail_rate": ratio(n_parse_fail, n), "count": n, "no_target_count": n_none}
    lib = metrics_from_records(records, "grounding")
    out.update({f"lib_{k}": v for k, v in lib.items() if k != "count"})
    return out


def existence_verdict(response: str) -> Optional[str]:
    """"yes" / "no" from an answer's first word, None when there is no such answer."""
    from visurf_megatron.rewards.anomaly import first_word
    from visurf_megatron.rewards.parsing import extract_answer

    answer = extract_answer(response)
    word = first_word(answer) if answer is not None else None
    return word if word in ("yes", "no") else None


def existence_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """Existence questions ("is the named object in the image"): accuracy, balanced accuracy (mean of
    the present and absent classes'), each class's accuracy, the share answered "yes", and answers
    that give no verdict (counted wrong)."""
    def acc(rs):
        return sum(r["verdict"] == r["label"] for r in rs) / len(rs) if rs else None

    present = [r for r in records if r["label"] == "yes"]
    absent = [r for r in records if r["label"] == "no"]
    a_present, a_absent = acc(present), acc(absent)
    n = len(records)
    return {"accuracy": acc(records),
            "balanced_accuracy": (a_present + a_absent) / 2 if present and absent else None,
            "present_accuracy": a_present, "absent_accuracy": a_absent,
            "yes_rate": sum(r["verdict"] == "yes" for r in records) / n if n else None,
            "parse_fail_rate": sum(r["verdict"] is None for r in records) / n if n else None,
            "count": n, "absent_count": len(absent)}


def _file_task(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    return json.loads(first).get("task") or "grounding"


def evaluate_trainer(trainer, val_path: str, *, image_size: int, max_new_tokens: int,
                     predictions_path: Optional[str] = None, limit: Optional[int] = None) -> Optional[dict]:
    """Greedy evaluation of the trainer's current weights on ``val_path`` (grounding: the strict
    metrics; existence questions: ``existence_metrics``); collective (every rank calls it). The
    weights go into the rollout engine (``sync_weights``); each data-parallel replica answers its
    share of the samples; rank 0 gathers the records and returns the metrics (other ranks return
    None). Prompts, parsing, coordinate mapping and masks are the evaluation library's
    (``eval/runner.build_request``, ``eval/scoring.score_sample``, the box segmenter)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from visurf_megatron.eval.datasets import load_eval_items
    from visurf_megatron.eval.runner import build_request
    from visurf_megatron.eval.scoring import score_sample
    from visurf_megatron.eval.segmenter import build_segmenter
    from visurf_megatron.rollout.base import SamplingConfig

    cfg = trainer.cfg
    task = _file_task(val_path)
    items = load_eval_items(val_path, task=task)
    if limit:
        items = items[:limit]
    trainer.sync_weights()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    records = []
    if trainer.engine is not None:
        segmenter = build_segmenter("box")
        sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
        mine = items[dp_rank::dp_size]
        built = [build_request(it.sample, trainer.processor, image_size=image_size,
                               prompt_style=cfg.data.prompt_style, think=cfg.data.think) for it in mine]
        completions = trainer.engine.generate([r for r, _ in built], sampling) if built else []
        for it, (_, stored), group in zip(mine, built, completions):
            c = group[0]
            if task == "existence":
                rec = {"verdict": existence_verdict(c.text), "label": it.sample.solution}
            else:
                rec, _ = score_sample(it, c.text, image=stored, image_size=image_size, segmenter=segmenter)
            records.append({"id": it.id, "index": it.index, "query": it.sample.problem, "response": c.text,
                            "finish_reason": c.finish_reason, **rec})
        trainer.engine.sleep()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if dist.get_rank() != 0:
        return None
    by_id: dict[str, dict] = {}
    for part in gathered:
        for r in part:
            by_id.setdefault(r["id"], r)
    records = sorted(by_id.values(), key=lambda r: r["index"])
    if predictions_path:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        with open(predictions_path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return existence_metrics(records) if task == "existence" else strict_grounding_metrics(records)


