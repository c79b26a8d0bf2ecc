"""``algorithm.gt_style: auto`` (VISURF.md reward control 1): the style is the one with the highest
teacher-forced log-prob under the current policy. The scores our megatron model computes (TP2, the
world's collective) are checked against transformers' Qwen2.5-VL on the same prompts and GT texts."""
import pytest
import torch

from tools.make_synthetic_grounding import generate
from tools.make_tiny_checkpoint import make_tiny_checkpoint
from visurf_megatron.config import ConfigError, from_dict
from visurf_megatron.runtime.spawn import run_world

from .trainer_world import gt_style_auto_step

CANDIDATES = ["think_compact", "think_spaced", "nothink_compact"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt_auto")
    hf = make_tiny_checkpoint(root / "hf", seed=3)
    generate(root / "data", train=8, val=2, size=56, seed=2, no_object_fraction=0.25, progress=False)
    base = {
        "model": {"hf_path": str(hf), "dtype": "fp32", "spec": "local"},
        "parallel": {"tp": 2, "pp": 1},
        "algorithm": {"paradigm": "visurf", "gt_style": "auto", "gt_style_candidates": CANDIDATES},
        "rollout": {"engine": "hf", "n": 2, "max_new_tokens": 8},
        "data": {"train_path": str(root / "data" / "train.jsonl"), "image_size": 56, "prompts_per_step": 3},
        "train": {"steps": 1, "lr": 1.0e-3, "micro_batch_size": 4},
        "logging": {"dir": str(root / "logs"), "tensorboard": False},
    }
    return root, base


def _reference_scores(base: dict, sample_ids: list[str]) -> dict[str, float]:
    """Mean over prompts of sum_t log p(y*_t | x, y*_<t), computed by transformers in fp32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from visurf_megatron.data.samples import load_samples
    from visurf_megatron.rollout.processor import load_processor
    from visurf_megatron.training import experience
    from visurf_megatron.training.data_feed import PromptPreparer

    cfg = from_dict(base)
    processor = load_processor(cfg.model.hf_path)
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    by_id = {s.id: s for s in load_samples(cfg.data.train_path, task=cfg.data.task).samples}
    prep = PromptPreparer(processor, image_size=cfg.data.image_size, prompt_style=cfg.data.prompt_style,
                          think=cfg.data.think)
    prompts = [prep(by_id[i]) for i in sample_ids]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.model.hf_path, torch_dtype=torch.float32).eval()
    out = {}
    for style in CANDIDATES:
        rows = experience.build_rows(prompts, None, with_gt=True, gt_style=style, tokenizer=tok, end_of_turn_id=eot)
        totals = []
        for row in rows:
            p = prompts[row.prompt]
            ids = torch.cat([p.input_ids, torch.tensor(row.response_ids)]).unsqueeze(0)
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            start = len(p.input_ids)
            targets = ids[0, start:]
            totals.append(float(logp[start - 1:-1].gather(-1, targets.unsqueeze(-1)).sum()))
        out[style] = sum(totals) / len(totals)
    return out


def test_auto_picks_the_style_the_policy_finds_most_likely(setup):
    root, base = setup
    res = run_world(gt_style_auto_step, 2, base, [], timeout_s=600)[0]
    ref = _reference_scores(base, res["sample_ids"])
    assert set(res["scores"]) == set(CANDIDATES)
    for style in CANDIDATES:
        assert res["scores"][style] == pytest.approx(ref[style], abs=2e-3), (style, res["scores"], ref)
    assert len({round(v, 1) for v in ref.values()}) > 1  # the candidates really differ
    best = max(CANDIDATES, key=lambda s: ref[s])
    assert res["before"] is None and res["chosen"] == best
    assert res["trainer_scores"] == pytest.approx(res["scores"], abs=1e-9)  # the step scored the same batch
    assert res["train_state"]["gt_style"] == best  # kept in checkpoints: a resumed run does not re-choose
    think = best.startswith("think")
    assert res["gt_texts"] and all(t.startswith("<think>") == think for t in res["gt_texts"])
    assert all((": " in t) == (best == "think_spaced") for t in res["gt_texts"] if "bbox_2d" in t)


def test_candidates_need_auto_and_unknown_styles_are_refused(setup):
    root, base = setup
    bad = {**base, "algorithm": {"paradigm": "visurf", "gt_style": "think_compact", "gt_style_candidates": ["x"]}}
    from visurf_megatron.config import validate

    with pytest.raises(ConfigError, match="gt_style_candidates"):
        validate(from_dict(bad), 2)
    from visurf_megatron.training.gt_style_choice import candidate_styles

    with pytest.raises(KeyError):
        candidate_styles(["think_compact", "no_such_style"])
