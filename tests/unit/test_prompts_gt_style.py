"""Prompt templates and ground-truth rendering: exact strings."""
import math

import pytest

from visurf_megatron.data.gt_style import (GT_STYLES, NOTHINK_COMPACT, NOTHINK_SPACED, THINK_COMPACT,
                                           THINK_SPACED, GTStyle, choose_gt_style, register_gt_style,
                                           render_ground_truth)
from visurf_megatron.data.prompts import TEMPLATES, build_prompt, get_template, register_template
from visurf_megatron.data.samples import Sample

EXAMPLE = ('[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}, '
           '{"bbox_2d": [225,296,706,786], "point_2d": [302,410]}]')


def _g(solution, problem="the red circle", task="grounding", **kw):
    return Sample(id="s", task=task, image="x.png", problem=problem, solution=solution, **kw)


TWO = [{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]},
       {"point_2d": [10.5, 20.49], "bbox_2d": [5.5, 6.4, 7.5, 8]}]  # key order and floats normalised


def test_grounding_prompts_exact():
    s = _g([], problem='  The Red Circle."  ')
    assert build_prompt(s) == (
        'Please find "the red circle" with bboxs and points.'
        "Compare the difference between object(s) and find the most closely matched object(s)."
        "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
        "Output the bbox(es) and point(s) inside the interested object(s) in JSON format."
        "If no object matches, output an empty list [] in the answer."
        "i.e., <think> thinking process here </think>"
        "<answer>" + EXAMPLE + "</answer>")
    assert build_prompt(s, think=False) == (
        'Please find "the red circle" with bboxs and points.'
        "Compare the difference between object(s) and find the most closely matched object(s)."
        "Output the final answer in <answer> </answer> tags."
        "Output the bbox(es) and point(s) inside the interested object(s) in JSON format."
        "If no object matches, output an empty list [] in the answer."
        "i.e., <answer>" + EXAMPLE + "</answer>")
    assert build_prompt(s, style="plain") == (
        'Please find "the red circle" with bboxs and points.'
        "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
        "i.e., <think> thinking process here </think><answer> answer here </answer>")
    assert build_prompt(s, style="plain", think=False) == (
        'Please find "the red circle" with bboxs and points.'
        "Output the final answer in <answer> </answer> tags.i.e., <answer> answer here </answer>")


def test_math_prompt_keeps_braces_and_case():
    s = Sample(id="m", task="math", image=None, problem="What is \\frac{A}{b}?", solution="2",
               choices=["1", "{2}"])
    assert build_prompt(s) == (
        "What is \\frac{A}{b}? Choices: (A) 1 (B) {2}. First think about the question and then provide "
        "the answer. The final answer is in latex format and wrapped using the \\boxed{} command. "
        "The thinking process and final answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively. i.e., <think> thinking process here </think><answer>\\boxed{2}</answer>")


@pytest.mark.parametrize("task", ["grounding", "gui", "anomaly", "math"])
@pytest.mark.parametrize("style", ["detailed", "plain"])
def test_every_paper_task_has_four_templates(task, style):
    q = "Zq9 query"
    s = Sample(id="t", task=task, image="x.png", problem=q, solution="1")
    with_think = build_prompt(s, style=style, think=True)
    without = build_prompt(s, style=style, think=False)
    assert q.lower() in with_think.lower() and q.lower() in without.lower()
    assert "<think> </think>" in with_think and "<think>" not in without
    assert "<answer> </answer>" in with_think and "<answer> </answer>" in without
    if style == "plain":
        assert "answer here" in with_think and "answer here" in without
    else:
        assert "answer here" not in with_think


def test_template_registry():
    with pytest.raises(KeyError, match="no prompt template"):
        get_template("grounding", "fancy")
    with pytest.raises(ValueError):
        register_template("grounding", "fancy", True, "no placeholder")
    register_template("grounding", "fancy", True, "Find {question}!")
    try:
        assert build_prompt(_g([], problem="The Cat."), style="fancy") == "Find the cat!"
        with pytest.raises(KeyError, match="exists"):
            register_template("grounding", "fancy", True, "x {question}")
    finally:
        del TEMPLATES[("grounding", "fancy", True)]


def test_gt_styles_exact():
    s = _g(TWO)
    assert render_ground_truth(s, THINK_COMPACT) == (
        '<think></think><answer>[{"bbox_2d":[1,2,3,4],"point_2d":[2,3]},'
        '{"bbox_2d":[6,6,8,8],"point_2d":[11,20]}]</answer>')
    assert render_ground_truth(s, THINK_SPACED) == (
        '<think></think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}, '
        '{"bbox_2d": [6, 6, 8, 8], "point_2d": [11, 20]}]</answer>')
    assert render_ground_truth(s, NOTHINK_COMPACT) == (
        '<answer>[{"bbox_2d":[1,2,3,4],"point_2d":[2,3]},{"bbox_2d":[6,6,8,8],"point_2d":[11,20]}]</answer>')
    assert render_ground_truth(s, NOTHINK_SPACED) == (
        '<answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}, '
        '{"bbox_2d": [6, 6, 8, 8], "point_2d": [11, 20]}]</answer>')


def test_gt_no_object_and_other_tasks():
    assert render_ground_truth(_g([]), THINK_COMPACT) == "<think></think><answer>[]</answer>"
    assert render_ground_truth(_g([]), NOTHINK_SPACED) == "<answer>[]</answer>"
    math_s = Sample(id="m", task="math", image=None, problem="?", solution="\\frac{1}{2}")
    assert render_ground_truth(math_s, THINK_SPACED) == "<think></think><answer>\\boxed{\\frac{1}{2}}</answer>"
    gui = _g([10, 20, 31, 40], task="gui")  # box -> box and its centre (20.5, 30 -> 21, 30)
    assert render_ground_truth(gui, NOTHINK_COMPACT) == '<answer>[{"bbox_2d":[10,20,31,40],"point_2d":[21,30]}]</answer>'
    assert render_ground_truth(_g("yes", task="anomaly"), THINK_COMPACT) == "<think></think><answer>yes</answer>"
    assert render_ground_truth(_g([], task="anomaly"), THINK_COMPACT) == "<think></think><answer>[]</answer>"
    doc = Sample(id="d", task="docvqa", image="x", problem="?", solution=["1999", "1999."])
    assert render_ground_truth(doc, NOTHINK_COMPACT) == "<answer>1999</answer>"
    with pytest.raises(KeyError, match="unknown GT style"):
        render_ground_truth(_g([]), "fancy")


def test_custom_style_registry():
    register_gt_style(GTStyle("think_note", think=True, compact=True, think_text="GT"))
    try:
        assert render_ground_truth(_g([]), "think_note") == "<think>GT</think><answer>[]</answer>"
        with pytest.raises(KeyError):
            register_gt_style(GTStyle("think_note", think=False, compact=False))
    finally:
        del GT_STYLES["think_note"]


def test_choose_gt_style_picks_max():
    s = _g(TWO)
    calls = []

    def score(sample, text):
        calls.append(text)
        # Stand-in for a log-prob: prefers spaced JSON, and thinking blocks a little.
        return 1.0 * text.count(", ") + 0.5 * text.startswith("<think>")

    best, scores = choose_gt_style(score, s)
    assert best == THINK_SPACED
    assert set(scores) == set(GT_STYLES) and len(calls) == len(GT_STYLES)
    assert scores[THINK_SPACED] == scores[NOTHINK_SPACED] + 0.5
    assert scores[THINK_COMPACT] == 0.5 and scores[NOTHINK_COMPACT] == 0.0

    # Ties keep the caller's order; NaN never wins.
    best, _ = choose_gt_style(lambda s_, t: 1.0, s, [NOTHINK_COMPACT, THINK_COMPACT])
    assert best == NOTHINK_COMPACT
    best, scores = choose_gt_style(lambda s_, t: math.nan if "<think>" in t else -3.0, s,
                                   [THINK_COMPACT, NOTHINK_SPACED])
    assert best == NOTHINK_SPACED and math.isnan(scores[THINK_COMPACT])
    with pytest.raises(ValueError, match="NaN"):
        choose_gt_style(lambda s_, t: math.nan, s, [THINK_COMPACT])


def test_existence_task_from_row_to_prompt_answer_and_reward(tmp_path):
    """The yes/no "is the named object there" task: rows validate to yes/no, the prompt asks the
    question about the normalised query, the GT answer is the verdict, and the registry's reward
    scores agreement with it."""
    from pathlib import Path

    from visurf_megatron.data.samples import row_to_sample
    from visurf_megatron.rewards.registry import get_reward_fn

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    row = {"id": "e", "task": "existence", "problem": "The red circle.", "image": "a.png"}
    for given, want in ((True, "yes"), (" No", "no"), ("yes", "yes")):
        assert row_to_sample(row | {"solution": given}, default_task=None, root=Path(tmp_path),
                             check_images=False).solution == want
    with pytest.raises(ValueError, match="existence answer"):
        row_to_sample(row | {"solution": "maybe"}, default_task=None, root=Path(tmp_path), check_images=False)
    sample = _g("no", task="existence", problem="The red circle.")
    for style in ("plain", "detailed"):
        prompt = build_prompt(sample, style=style, think=True)
        assert prompt.startswith('Is there "the red circle" in the image? Answer yes or no.'), prompt
    gt = render_ground_truth(sample, THINK_COMPACT)
    assert gt == "<think></think><answer>no</answer>"
    reward = get_reward_fn("existence")
    assert reward(gt, "no", is_ground_truth=True).accuracy == 1.0
    assert reward("<think>a</think><answer>yes</answer>", "no").accuracy == 0.0
