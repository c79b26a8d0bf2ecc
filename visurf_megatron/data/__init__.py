"""Dataset records, prompt templates, ground-truth rendering and image sizing."""
from .gt_style import (GT_STYLES, NOTHINK_COMPACT, NOTHINK_SPACED, THINK_COMPACT, THINK_SPACED, GTStyle,
                       choose_gt_style, render_ground_truth)
from .images import qwen_pixel_budget, resize_square, scale_objects, unscale_objects
from .prompts import PROMPT_STYLES, TEMPLATES, build_prompt, get_template
from .samples import TASKS, DataValidationError, LoadResult, Sample, load_samples, save_samples_jsonl

__all__ = [
    "GT_STYLES", "NOTHINK_COMPACT", "NOTHINK_SPACED", "THINK_COMPACT", "THINK_SPACED", "GTStyle",
    "choose_gt_style", "render_ground_truth", "qwen_pixel_budget", "resize_square", "scale_objects",
    "unscale_objects", "PROMPT_STYLES", "TEMPLATES", "build_prompt", "get_template", "TASKS",
    "DataValidationError", "LoadResult", "Sample", "load_samples", "save_samples_jsonl",
]
