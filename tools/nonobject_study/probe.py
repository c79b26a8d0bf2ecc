"""The study's premise, checked: does the base model *see* that the named object is absent?

The paper's argument needs a base model that perceives absence but whose grounding rollouts never
contain the answer for it (``[]``). The behavioural half is read off the runs (greedy N-Acc of the
base model, the share of sampled rollouts answering ``[]`` at the first RL step). This module
measures the perceptual half with a linear probe: the hidden states of the model (every layer, at
the last prompt token, where the answer is decided) on study prompts, a logistic regression from
them to "the named object is present", fitted on the study train split and scored on the held-out
val split, balanced classes. The same probe on the random initial model is the control: what the
architecture alone makes linearly readable.

The models run in transformers (``HFRolloutEngine``'s model), from HF checkpoints.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch


def balanced_rows(jsonl: str | Path, per_class: int, seed: int = 0) -> list[dict]:
    """Up to ``per_class`` no-target rows and as many target rows (a fixed shuffle) of a split."""
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    absent = [r for r in rows if r["solution"] == []]
    present = [r for r in rows if r["solution"] != []]
    rng.shuffle(absent)
    rng.shuffle(present)
    n = min(per_class, len(absent), len(present))
    if n == 0:
        raise ValueError(f"{jsonl}: needs rows with and without a target (has {len(absent)} / {len(present)})")
    return absent[:n] + present[:n]


def prompt_features(hf_dir: str | Path, rows: Sequence[dict], root: str | Path, *, image_size: int,
                    prompt_style: str, think: bool) -> torch.Tensor:
    """[len(rows), (layers + 1) * hidden]: every hidden state (embeddings included) at the last
    prompt token, the prompts built exactly as the trainer builds them (``eval.runner.build_request``)."""
    from visurf_megatron.data.samples import row_to_sample
    from visurf_megatron.eval.runner import build_request
    from visurf_megatron.rollout.hf_engine import HFRolloutEngine

    engine = HFRolloutEngine(hf_dir, device="cpu")
    engine.load_checkpoint_weights()
    feats = []
    with torch.no_grad():
        for row in rows:
            sample = row_to_sample(row, default_task="grounding", root=Path(root))
            request, _ = build_request(sample, engine.processor, image_size=image_size, prompt_style=prompt_style,
                                       think=think)
            enc = engine.processor(text=[request.prompt], images=list(request.images) or None, return_tensors="pt")
            out = engine.model(**enc, output_hidden_states=True)
            feats.append(torch.cat([h[0, -1].float() for h in out.hidden_states]))
    return torch.stack(feats)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, iters: int = 200):
    """Weights (w, b) of an L2-regularised logistic regression on standardised features:
    min_w  mean_i log(1 + exp(-s_i (w . z_i + b))) + l2 |w|^2,  s_i = 2 y_i - 1,  z = (x - mu) / sd."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mu) / sd).double()
    s = (2 * y - 1).double()
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-s * (z @ w + b)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach(), b.detach(), mu, sd)


def predict(model, x: torch.Tensor) -> torch.Tensor:
    w, b, mu, sd = model
    return (((x - mu) / sd).double() @ w + b) > 0


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean of the per-class accuracies (present, absent)."""
    y = y.bool()
    return 0.5 * (pred[y].float().mean().item() + (~pred[~y]).float().mean().item())


def probe(models: dict[str, str | Path], train_jsonl: str | Path, val_jsonl: str | Path, *, per_class_train: int,
          per_class_val: int, image_size: int, prompt_style: str, think: bool) -> dict:
    """Probe accuracy (balanced, held-out) of "is the named object present" for every model."""
    train_rows = balanced_rows(train_jsonl, per_class_train)
    val_rows = balanced_rows(val_jsonl, per_class_val)
    y_train = torch.tensor([float(r["solution"] != []) for r in train_rows])
    y_val = torch.tensor([float(r["solution"] != []) for r in val_rows])
    out = {"train_per_class": len(train_rows) // 2, "val_per_class": len(val_rows) // 2, "models": {}}
    for name, hf_dir in models.items():
        kw = dict(image_size=image_size, prompt_style=prompt_style, think=think)
        x_train = prompt_features(hf_dir, train_rows, Path(train_jsonl).parent, **kw)
        x_val = prompt_features(hf_dir, val_rows, Path(val_jsonl).parent, **kw)
        fitted = fit_logistic(x_train, y_train)
        out["models"][name] = {"val_balanced_acc": balanced_accuracy(predict(fitted, x_val), y_val),
                               "train_balanced_acc": balanced_accuracy(predict(fitted, x_train), y_train),
                               "features": x_train.shape[1]}
    return out


def check_premise(work: Path, hf: Path, base_ckpt: Path, data: dict, *, image_size: int, prompt_style: str,
                  think: bool, per_class_train: int, per_class_val: int) -> dict:
    """The probe on the random initial model (control) and on the base model (its checkpoint
    converted to HF once, kept in ``work/base/hf``)."""
    from visurf_megatron.checkpoint.convert import launch

    base_hf = work / "base" / "hf"
    if not (base_hf / "config.json").is_file():
        launch("megatron_to_hf", 1, {"megatron_dir": str(base_ckpt), "out_dir": str(base_hf), "hf_template": str(hf),
                                     "overwrite": True, "progress": False}, timeout_s=1800)
    out = probe({"random init": hf, "base": base_hf}, data["study"]["train"], data["study"]["val"],
                per_class_train=per_class_train, per_class_val=per_class_val, image_size=image_size,
                prompt_style=prompt_style, think=think)
    predictions = work / "base" / "predictions_base_val.jsonl"
    if predictions.is_file():
        out["named_object"] = named_object_hits(data["base"]["val"], predictions)
    return out


def object_boxes(image_path: str | Path) -> list[tuple[int, int, int, int]]:
    """Inclusive-pixel boxes [x1, y1, x2, y2] (the datasets' and ``eval.metrics.box_iou``'s) of every
    object in a generated scene: the connected regions of each palette
    colour (the generator draws hard-edged single-colour shapes that do not touch; two objects may
    share a colour)."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage

    from tools.make_synthetic_grounding import COLORS

    img = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    out = []
    for rgb in COLORS.values():
        labels, _ = ndimage.label(np.all(img == np.array(rgb), -1))
        for sl in ndimage.find_objects(labels):
            out.append((sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1))
    return out


def named_object_hits(val_jsonl: str | Path, predictions_jsonl: str | Path) -> dict:
    """Does a model box the object its query names, or just some object? Over target samples with a
    predicted box: the share whose first box has IoU > 0.5 with the named object (the solution's
    box), the share with another object of the scene, and the named object's share if an object
    were picked at random."""
    from visurf_megatron.eval.metrics import box_iou

    root = Path(val_jsonl).parent
    rows = {r["id"]: r for r in (json.loads(line) for line in Path(val_jsonl).read_text().splitlines() if line.strip())}
    named = other = n = 0
    chance = 0.0
    for line in Path(predictions_jsonl).read_text().splitlines():
        pred = json.loads(line) if line.strip() else {}
        row = rows.get(pred.get("id"))
        if row is None or not row["solution"] or not pred.get("objects") or "bbox_2d" not in pred["objects"][0]:
            continue
        box, target = pred["objects"][0]["bbox_2d"], row["solution"][0]["bbox_2d"]
        scene = object_boxes(root / row["image"])
        others = [b for b in scene if box_iou(b, target) <= 0.5]
        n += 1
        named += box_iou(box, target) > 0.5
        other += any(box_iou(box, b) > 0.5 for b in others)
        chance += 1 / (len(others) + 1)
    return {"count": n, "named": named / n if n else None, "other": other / n if n else None,
            "random_pick_named": chance / n if n else None}
