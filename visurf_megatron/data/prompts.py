"""Prompt templates per task: "detailed" (format spelled out, with a JSON example) and "plain"
("answer here" between the tags), each with and without a thinking block (ViSurf Table 5).

The detailed grounding text is the VisionReasoner/Seg-Zero training prompt verbatim, including its
missing spaces between sentences ("points.Compare"): the public checkpoints were trained on exactly
that string, and the rollout style it induces is what the GT rendering (``gt_style``) aligns to.
Templates hold the placeholder ``{question}`` and are filled with ``str.replace``, not ``format``:
math problems are full of braces.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .samples import Sample

PROMPT_STYLES = ("detailed", "plain")
PLACEHOLDER = "{question}"

# The authors' in-prompt example answer (two objects, compact inside the lists).
GROUNDING_EXAMPLE = ('[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}, '
                     '{"bbox_2d": [225,296,706,786], "point_2d": [302,410]}]')
GUI_EXAMPLE = '[{"bbox_2d": [10,100,200,210], "point_2d": [105,155]}]'
ANOMALY_EXAMPLE = '[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}]'

_THINK_TAGS = ("Output the thinking process in <think> </think> and final answer in <answer> </answer> "
               "tags.")
_NOTHINK_TAGS = "Output the final answer in <answer> </answer> tags."
NO_OBJECT_HINT = "If no object matches, output an empty list [] in the answer."

_GROUNDING_HEAD = ('Please find "{question}" with bboxs and points.'
                   "Compare the difference between object(s) and find the most closely matched object(s).")
_GROUNDING_BODY = ("Output the bbox(es) and point(s) inside the interested object(s) in JSON format."
                   + NO_OBJECT_HINT)

_GUI_HEAD = ('Please locate the UI element for the instruction "{question}" with a bbox and a point.'
             "Compare the elements on the screen and find the one the instruction refers to.")
_GUI_BODY = "Output the bbox of the element and the point to click inside it in JSON format."

_ANOMALY_HEAD = ('Please find the anomalous region(s) of "{question}" with bboxs and points.'
                 "Compare the object with a normal one and find every defect.")
_ANOMALY_BODY = ("Output the bbox(es) and point(s) inside the anomalous region(s) in JSON format."
                 "If there is no anomaly, output an empty list [] in the answer.")

_EXISTENCE_HEAD = 'Is there "{question}" in the image? Answer yes or no.'

_MATH_HEAD = "{question} First think about the question and then provide the answer. "
_MATH_NOTHINK_HEAD = "{question} "
_MATH_BODY = "The final answer is in latex format and wrapped using the \\boxed{} command. "

_QA_TAIL = "Answer the question using a single word or phrase."


def _grounding_like(head: str, body: str, example: str) -> dict:
    return {
        ("detailed", True): (head + _THINK_TAGS + body
                             + "i.e., <think> thinking process here </think>"
                             + f"<answer>{example}</answer>"),
        ("detailed", False): head + _NOTHINK_TAGS + body + f"i.e., <answer>{example}</answer>",
        ("plain", True): (head.split(".")[0] + "." + _THINK_TAGS
                          + "i.e., <think> thinking process here </think><answer> answer here </answer>"),
        ("plain", False): head.split(".")[0] + "." + _NOTHINK_TAGS + "i.e., <answer> answer here </answer>",
    }


TEMPLATES: dict[tuple[str, str, bool], str] = {}
for _task, _t in {
    "grounding": _grounding_like(_GROUNDING_HEAD, _GROUNDING_BODY, GROUNDING_EXAMPLE),
    "gui": _grounding_like(_GUI_HEAD, _GUI_BODY, GUI_EXAMPLE),
    "anomaly": _grounding_like(_ANOMALY_HEAD, _ANOMALY_BODY, ANOMALY_EXAMPLE),
    "math": {
        ("detailed", True): (_MATH_HEAD + _MATH_BODY
                             + "The thinking process and final answer are enclosed within <think> </think> "
                             "and <answer> </answer> tags, respectively. "
                             "i.e., <think> thinking process here </think><answer>\\boxed{2}</answer>"),
        ("detailed", False): (_MATH_NOTHINK_HEAD + _MATH_BODY
                              + "The final answer is enclosed within <answer> </answer> tags. "
                              "i.e., <answer>\\boxed{2}</answer>"),
        ("plain", True): (_MATH_HEAD + _THINK_TAGS
                          + " i.e., <think> thinking process here </think><answer> answer here </answer>"),
        ("plain", False): _MATH_NOTHINK_HEAD + _NOTHINK_TAGS + " i.e., <answer> answer here </answer>",
    },
}.items():
    for (_style, _think), _text in _t.items():
        TEMPLATES[(_task, _style, _think)] = _text

# Existence ("is the named object there"): a yes/no verdict, the same wording for both styles.
for _style in PROMPT_STYLES:
    TEMPLATES[("existence", _style, True)] = (_EXISTENCE_HEAD + " " + _THINK_TAGS
                                              + " i.e., <think> thinking process here </think><answer> yes </answer>")
    TEMPLATES[("existence", _style, False)] = _EXISTENCE_HEAD + " " + _NOTHINK_TAGS + " i.e., <answer> yes </answer>"

# The forgetting benchmarks (ChartQA, DocVQA) are evaluated, never trained: one QA form, the usual
# short-answer instruction, identical for both styles.
for _task in ("chartqa", "docvqa"):
    for _style in PROMPT_STYLES:
        TEMPLATES[(_task, _style, True)] = ("{question}\n" + _QA_TAIL + " " + _THINK_TAGS
                                            + " i.e., <think> thinking process here </think>"
                                            "<answer> answer here </answer>")
        TEMPLATES[(_task, _style, False)] = "{question}\n" + _QA_TAIL


def get_template(task: str, style: str = "detailed", think: bool = True) -> str:
    try:
        return TEMPLATES[(task, style, bool(think))]
    except KeyError:
        known = sorted({f"{t}/{s}" for t, s, _ in TEMPLATES})
        raise KeyError(f"no prompt template for task={task!r} style={style!r} (known: {known})") from None


def register_template(task: str, style: str, think: bool, text: str, *, overwrite: bool = False) -> None:
    """Add a template (e.g. from a config). It must contain ``{question}``."""
    if PLACEHOLDER not in text:
        raise ValueError(f"template must contain {PLACEHOLDER}")
    key = (task, style, bool(think))
    if key in TEMPLATES and not overwrite:
        raise KeyError(f"template {key} exists; pass overwrite=True")
    TEMPLATES[key] = text


def normalize_query(text: str) -> str:
    """Referring expressions are lower-cased and stripped of quotes and end punctuation, as the
    authors do before formatting (their data mixes "The red car." and "the red car")."""
    return text.strip().lower().strip('."?!').strip()


def format_question(sample: "Sample") -> str:
    if sample.task in ("grounding", "gui", "anomaly", "existence"):
        return normalize_query(sample.problem)
    q = sample.problem.strip()
    if sample.choices:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        # Inline, so the instruction that follows ("{question} First think...") reads on.
        q += " Choices: " + " ".join(f"({letters[i]}) {c}" for i, c in enumerate(sample.choices)) + "."
    return q


def build_prompt(sample: "Sample", *, style: str = "detailed", think: bool = True) -> str:
    """The user text for a sample (the image goes alongside in the chat template)."""
    return get_template(sample.task, style, think).replace(PLACEHOLDER, format_question(sample))
