"""The study's fixed design: sizes and step counts (full and ``--quick``), the methods compared,
the table rows and the metrics reported."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    seeds: int
    warmup_train: int  # curriculum stage of the base model: one-object scenes
    base_train: int  # base split (no no-object queries): training images
    base_val: int
    study_train: int  # study split (no_object_fraction of no-object queries)
    study_val: int
    existence_steps: Optional[int]  # None: base_existence.yaml's train.steps
    warmup_steps: Optional[int]  # None: base_warmup.yaml's train.steps
    base_steps: Optional[int]  # None: base_sft.yaml's train.steps
    steps: Optional[int]  # None: the method configs' train.steps
    existence_train: int = 2000  # base curriculum: yes/no "is it there" questions (half absent)
    existence_val: int = 300
    existence_copies: int = 3  # base model's last stage: copies of each existence question per base-split row
    probe_train: int = 300  # premise probe: rows per class (present / absent) to fit on, study train split
    probe_val: int = 150  # ... and to score on, study val split
    data_size: int = 48  # images are drawn this size (the generator's smallest), fed at data.image_size
    object_frac: tuple = (0.2, 0.35)  # object side / image side: IoU of a few pixels' error stays readable
    # Position painted next to each object (shade_background): the tiny model has no absolute
    # position embedding (rotary only), so without it no pixel tells it where an object is.
    shade_strength: int = 200
    halo: int = 4
    no_object_fraction: float = 0.25
    # A no-object query names a colour the image does not hold (the generator's absent="colour"):
    # the base model finds objects by colour first, so absence is something it can see.
    absent: str = "colour"
    max_objects: int = 3
    data_seed: int = 0
    model_seed: int = 0
    init_std: float = 0.1
    # tiny Qwen2.5-VL (make_tiny_checkpoint keyword arguments); two heads of 32 because vLLM's CPU
    # attention (the rollout engine) takes head sizes of 32 and up
    model: tuple = (("hidden", 64), ("layers", 4), ("heads", 2), ("kv_heads", 2), ("intermediate", 128),
                    ("vision_depth", 4), ("vision_hidden", 32), ("vision_heads", 2), ("vision_intermediate", 64))


FULL = Profile("full", seeds=3, warmup_train=3000, base_train=4000, base_val=150, study_train=2000, study_val=600,
               existence_steps=None, warmup_steps=None, base_steps=None, steps=None)
QUICK = Profile("quick", seeds=1, warmup_train=200, base_train=200, base_val=32, study_train=200, study_val=48,
                existence_steps=20, warmup_steps=40, base_steps=40, steps=8, existence_train=100, existence_val=32,
                probe_train=12, probe_val=8)

# (key, table label, config file, what differs from ViSurf)
METHODS: list[tuple[str, str, str]] = [
    ("sft", "SFT", "sft.yaml"),
    ("rlvr", "RLVR", "rlvr.yaml"),
    ("sft_then_rlvr", "SFT→RLVR", "sft_then_rlvr.yaml"),
    ("visurf", "ViSurf", "visurf.yaml"),
    ("visurf_no_align_gt", "ViSurf w/o GT-style alignment", "visurf_no_align_gt.yaml"),
    ("visurf_no_gt_nothink", "ViSurf w/o no-thinking reward for GT", "visurf_no_gt_nothink.yaml"),
    ("visurf_no_smooth", "ViSurf w/o smoothing", "visurf_no_smooth.yaml"),
]
PARADIGM_ROWS = ["base", "sft", "rlvr", "sft_then_rlvr", "visurf"]
ABLATION_ROWS = ["visurf", "visurf_no_align_gt", "visurf_no_gt_nothink", "visurf_no_smooth"]
LABELS = {"base": "Base (SFT curriculum, ending on existence questions)", **{k: label for k, label, _ in METHODS}}
METRICS = ("giou", "ciou", "n_acc", "t_acc", "bbox_acc", "parse_fail_rate")
CURVE_KEYS = ("reward/total", "reward/accuracy", "reward_gt/total", "entropy", "gt_logp", "visurf/mean_adv_gt",
              "visurf/frac_groups_smoothed", "study/rollout_empty_frac", "study/rollout_correct_empty_frac",
              "response_length", "loss")

