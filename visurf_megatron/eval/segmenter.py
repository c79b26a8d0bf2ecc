"""Predicted objects -> one boolean mask per sample (VISURF.md "Metrics").

``Sam2Segmenter`` follows the authors' evaluation: SAM2 is prompted once per predicted object with
its box and its point as a positive click, returns 3 masks (``multimask_output=True``), the one with
the highest predicted IoU is kept, and the kept masks are OR-ed. ``BoxSegmenter`` fills the
predicted boxes: a dependency-free baseline (and what a run without a SAM2 checkpoint can do).

SAM2 without torchvision. ``sam2.SAM2ImagePredictor`` imports torchvision (through
``sam2.utils.transforms``), which does not import beside the CPU torch wheel. The model itself
(``sam2.build_sam.build_sam2``) needs no torchvision, so this module drives it directly, mirroring
``SAM2ImagePredictor.set_image`` / ``predict`` with its default settings (mask threshold 0, no
hole/sprinkle post-processing): ToTensor (/255), bilinear antialiased resize to
``model.image_size`` square (torchvision's ``Resize`` on tensors), ImageNet normalisation,
``forward_image``, ``_prepare_backbone_features`` (+ ``no_mem_embed``), prompt encoder on
``[box corners (labels 2, 3), point (label 1)]`` scaled to the model's input frame, mask decoder
with the high-resolution features, bilinear upsampling of the low-resolution logits to the original
size, ``> 0``. Nothing is downloaded: the config is one of the package's own, the weights a local file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .datasets import boxes_to_mask

SAM2_INSTALL_HINT = ("install SAM2 without CUDA and without its torchvision dependency: "
                     "SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2==1.1.0 && "
                     "pip install hydra-core iopath")
RANDOM_INIT_LABEL = "sam2 (random init: numbers meaningless)"
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class Segmenter(Protocol):
    description: str

    def segment(self, image, objects: Sequence[dict]) -> np.ndarray:
        """``image``: PIL RGB in the frame of ``objects`` (``bbox_2d`` / ``point_2d`` pixel
        coordinates); returns a bool mask [height, width] (all False for no objects)."""


class BoxSegmenter:
    """Each predicted box filled (inclusive pixels); an object with only a point marks that pixel."""

    description = "box (predicted boxes filled, no SAM2)"

    def segment(self, image, objects: Sequence[dict]) -> np.ndarray:
        w, h = image.size
        boxes = [o["bbox_2d"] for o in objects if o.get("bbox_2d") is not None]
        for o in objects:
            if o.get("bbox_2d") is None and o.get("point_2d") is not None:
                x, y = (int(round(v)) for v in o["point_2d"])
                boxes.append([x, y, x, y])
        return boxes_to_mask(boxes, w, h)


def sam2_available() -> tuple[bool, str]:
    """(importable, reason) for the SAM2 model builder."""
    try:
        import sam2.build_sam  # noqa: F401
    except Exception as e:  # ImportError, or hydra missing
        return False, f"sam2 is not importable ({type(e).__name__}: {e}); {SAM2_INSTALL_HINT}"
    return True, ""


def package_configs() -> list[str]:
    import sam2

    base = Path(sam2.__file__).parent
    return sorted(p.relative_to(base).as_posix() for p in base.glob("configs/**/*.yaml"))


def resolve_config(config: str | None, checkpoint: str | os.PathLike | None) -> str:
    """A hydra config name of the sam2 package: given as ``configs/sam2.1/sam2.1_hiera_t.yaml``,
    its file name, or a path inside the package; None infers it from the official checkpoint file
    name (``sam2_hiera_large.pt`` -> ``configs/sam2/sam2_hiera_l.yaml``)."""
    import sam2
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    known = package_configs()
    if config is None:
        name = Path(checkpoint).name if checkpoint is not None else ""
        for cfg, ckpt in HF_MODEL_ID_TO_FILENAMES.values():
            if ckpt == name:
                return cfg
        raise ValueError(f"cannot infer the SAM2 config from the checkpoint name {name!r}; pass --sam2-config "
                         f"(one of {known})")
    c = str(config)
    base = Path(sam2.__file__).parent
    if os.path.isabs(c) and Path(c).resolve().is_relative_to(base.resolve()):
        c = Path(c).resolve().relative_to(base.resolve()).as_posix()
    if c in known:
        return c
    matches = [k for k in known if Path(k).name in (c, c + ".yaml")]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"unknown SAM2 config {config!r}: it must be one of the sam2 package's configs {known}")


class Sam2Segmenter:
    """SAM2 from a package config and a local checkpoint (see module doc).

    ``random_init=True`` builds the model with random weights and no checkpoint: only for tests of
    the pipeline, its masks (and every metric from them) are meaningless. ``image_size`` overrides
    the model's input resolution: for fast tests only (a real checkpoint expects its config's size).
    """

    def __init__(self, config: str | None = None, checkpoint: str | os.PathLike | None = None, *,
                 device=None, random_init: bool = False, image_size: int | None = None,
                 mask_threshold: float = 0.0, seed: int = 0):
        import torch

        if not random_init:
            if checkpoint is None:
                raise ValueError("SAM2 needs a local checkpoint (--sam2-checkpoint FILE, e.g. sam2_hiera_large.pt); "
                                 "nothing is downloaded. Use --segmenter box to evaluate without SAM2.")
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(f"SAM2 checkpoint not found: {checkpoint} (nothing is downloaded; "
                                        "pass the path of a local .pt file, or --segmenter box)")
        ok, reason = sam2_available()
        if not ok:
            raise ImportError(reason)
        from sam2.build_sam import build_sam2

        if config is None and random_init:
            config = "configs/sam2.1/sam2.1_hiera_t.yaml"
        self.config = resolve_config(config, checkpoint)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        overrides = [f"++model.image_size={int(image_size)}"] if image_size else []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_sam2(self.config, None if random_init else str(checkpoint), device=str(self.device),
                                    hydra_overrides_extra=overrides)
        self.random_init = random_init
        self.mask_threshold = float(mask_threshold)
        self.description = (RANDOM_INIT_LABEL if random_init
                            else f"sam2 ({self.config}, {Path(checkpoint).name})")
        self._mean = torch.tensor(_MEAN, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(_STD, device=self.device).view(3, 1, 1)

    # -- the SAM2ImagePredictor path, without torchvision ----------------------------------------
    def _autocast(self):
        import contextlib

        import torch

        if self.device.type == "cuda":  # as the authors' evaluation runs SAM2
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def embed(self, image) -> dict:
        """``SAM2ImagePredictor.set_image``: image features for one PIL image."""
        import torch
        import torch.nn.functional as F

        res = self.model.image_size
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).to(self.device)
        x = x.permute(2, 0, 1).float().div(255)  # torchvision ToTensor
        x = F.interpolate(x[None], size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self._mean) / self._std
        backbone_out = self.model.forward_image(x)
        _, feats, _, sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + self.model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(1, -1, *s) for f, s in zip(feats[::-1], sizes[::-1])][::-1]
        return {"image_embed": maps[-1], "high_res_feats": maps[:-1], "orig_hw": (image.size[1], image.size[0])}

    def predict(self, features: dict, box=None, point=None):
        """``SAM2ImagePredictor.predict(point_coords=[point], point_labels=[1], box=box,
        multimask_output=True)``: (masks bool [3, H, W], iou scores [3]) as numpy."""
        import torch
        import torch.nn.functional as F

        h, w = features["orig_hw"]
        res = self.model.image_size
        coords, labels = [], []
        if box is not None:
            coords += [[box[0], box[1]], [box[2], box[3]]]
            labels += [2, 3]
        if point is not None:
            coords.append([point[0], point[1]])
            labels.append(1)
        pts = torch.tensor(coords, dtype=torch.float, device=self.device)
        pts = torch.stack([pts[:, 0] / w * res, pts[:, 1] / h * res], dim=-1)[None]
        lab = torch.tensor(labels, dtype=torch.int, device=self.device)[None]
        sparse, dense = self.model.sam_prompt_encoder(points=(pts, lab), boxes=None, masks=None)
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features["image_embed"], image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            repeat_image=False, high_res_features=features["high_res_feats"])
        masks = F.interpolate(low_res.float(), (h, w), mode="bilinear", align_corners=False) > self.mask_threshold
        return masks[0].cpu().numpy(), iou[0].float().cpu().numpy()

    def segment(self, image, objects: Sequence[dict]) -> np.ndarray:
        import torch

        w, h = image.size
        out = np.zeros((h, w), bool)
        prompts = [(o.get("bbox_2d"), o.get("point_2d")) for o in objects]
        prompts = [p for p in prompts if p[0] is not None or p[1] is not None]
        if not prompts:
            return out
        with torch.inference_mode(), self._autocast():
            features = self.embed(image)
            for box, point in prompts:
                masks, scores = self.predict(features, box, point)
                out |= masks[int(np.argmax(scores))]
        return out


def build_segmenter(kind: str, *, config: str | None = None, checkpoint=None, random_init: bool = False,
                    image_size: int | None = None, device=None) -> Segmenter:
    if kind == "box":
        return BoxSegmenter()
    if kind == "sam2":
        return Sam2Segmenter(config, checkpoint, random_init=random_init, image_size=image_size, device=device)
    raise ValueError(f"unknown segmenter {kind!r} (expected sam2 or box)")
