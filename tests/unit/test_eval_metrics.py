"""Evaluation metrics against hand-computed values."""
import math

import numpy as np
import pytest

from visurf_megatron.eval.metrics import (GroundingMetrics, MaskStats, MeanMetric, anls, anls_score,
                                          anomaly_roc_auc, anomaly_score_from_mask, bbox_accuracy,
                                          bbox_hit, box_iou, ciou, extract_boxed, giou, gui_accuracy,
                                          gui_hit, levenshtein, mask_iou_stats, math_accuracy, math_correct,
                                          n_acc, relaxed_accuracy, relaxed_correctness, t_acc)


def _mask(shape, *rects):
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in rects:
        m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_stats_hand():
    gt = _mask((4, 4), (0, 2, 0, 2))            # 4 px
    pred = _mask((4, 4), (0, 2, 1, 3))          # 4 px, overlap one column of 2
    assert mask_iou_stats(pred, gt) == (2, 6)
    assert mask_iou_stats(np.zeros((4, 4)), np.zeros((4, 4))) == (0, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou_stats(np.zeros((4, 4)), np.zeros((4, 5)))


# Four samples on 10x10 images:
#   A target, pred overlaps:   gt 20 px (rows 0-1), pred 30 px (rows 0-2): I=20, U=30, IoU 2/3
#   B target, pred empty:      gt 10 px: I=0, U=10, IoU 0
#   C no target, pred empty:   I=0, U=0, IoU 1 (correct rejection)
#   D no target, pred 5 px:    I=0, U=5, IoU 0 (false positive)
SHAPE = (10, 10)
A = (_mask(SHAPE, (0, 3, 0, 10)), _mask(SHAPE, (0, 2, 0, 10)))
B = (_mask(SHAPE), _mask(SHAPE, (5, 6, 0, 10)))
C = (_mask(SHAPE), _mask(SHAPE))
D = (_mask(SHAPE, (9, 10, 0, 5)), _mask(SHAPE))


def test_grounding_metrics_with_no_target_samples():
    m = GroundingMetrics()
    ious = [m.update(p, g) for p, g in (A, B, C, D)]
    assert ious == pytest.approx([2 / 3, 0.0, 1.0, 0.0])
    r = m.compute()
    assert r["giou"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    assert r["ciou"] == pytest.approx(20 / (30 + 10 + 0 + 5))
    assert r["n_acc"] == 0.5          # C right, D wrong
    assert r["t_acc"] == 0.5          # A predicted something, B did not
    assert math.isnan(r["bbox_acc"])  # no boxes were given
    assert r["count"] == 4

    stats = [MaskStats.from_masks(p, g) for p, g in (A, B, C, D)]
    assert giou(stats) == pytest.approx(r["giou"]) and ciou(stats) == pytest.approx(r["ciou"])
    assert n_acc(stats) == 0.5 and t_acc(stats) == 0.5
    assert math.isnan(n_acc(stats[:2]))  # no no-target sample: undefined, not 0 or 1


def test_grounding_metrics_merge_and_explicit_empty_answer():
    left, right = GroundingMetrics(), GroundingMetrics()
    left.update(*A), left.update(*B)
    right.update(*C), right.update(*D)
    merged = left + right
    whole = GroundingMetrics()
    for p, g in (A, B, C, D):
        whole.update(p, g)
    assert merged.state_dict() == whole.state_dict()
    # An answer with boxes whose SAM masks came out empty is still a non-empty prediction.
    m = GroundingMetrics()
    m.update(_mask(SHAPE), _mask(SHAPE), pred_boxes=[[0, 0, 3, 3]], gt_boxes=[])
    assert m.compute()["n_acc"] == 0.0 and m.compute()["giou"] == 0.0 and m.compute()["bbox_acc"] == 0.0


def test_box_iou_inclusive_pixels():
    # 10x10 boxes shifted by 5 columns: I = 5*10 = 50, U = 150.
    assert box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(1 / 3)
    # One pixel boxes: area 1 under the inclusive convention, IoU 1.
    assert box_iou([3, 3, 3, 3], [3, 3, 3, 3]) == 1.0
    assert box_iou([0, 0, 1, 1], [5, 5, 6, 6]) == 0.0


def test_bbox_accuracy_any_vs_union():
    gt = [0, 0, 9, 9]
    halves = [[0, 0, 4, 9], [5, 0, 9, 9]]  # each IoU 50/100 = 0.5, not > 0.5
    assert bbox_hit(halves, gt, mode="any") is False
    assert bbox_hit(halves, gt, mode="union") is True
    assert bbox_hit([[0, 0, 9, 8]], gt) is True               # 90/100
    assert bbox_hit([], gt) is False
    assert bbox_hit([], None) is True and bbox_hit([[0, 0, 1, 1]], []) is False  # no-target
    # Multi-object GT is compared as its union box.
    assert bbox_hit([[0, 0, 9, 9]], [[0, 0, 4, 9], [5, 0, 9, 9]]) is True
    assert bbox_accuracy([halves, [[0, 0, 9, 8]], []], [gt, gt, None]) == pytest.approx(2 / 3)
    m = GroundingMetrics(bbox_mode="union")
    m.update(*A, pred_boxes=halves, gt_boxes=gt)
    assert m.compute()["bbox_acc"] == 1.0


def test_gui_accuracy():
    box = [10, 10, 20, 20]
    assert gui_hit(box, [[20, 20]]) and not gui_hit(box, [[21, 15]])
    assert gui_hit(box, [], [[12, 12, 18, 28]])      # no point: the box centre (15, 20) counts
    assert not gui_hit(box, [], [[12, 14, 18, 30]])  # centre (15, 22): outside
    assert gui_accuracy([box, box, box], [[[0, 0], [15, 15]], [[0, 0]], []]) == pytest.approx(1 / 3)


def test_anomaly_roc_auc_hand():
    labels = [0, 0, 1, 1]
    scores = [0.0, 0.05, 0.1, 0.3]  # every positive above every negative
    assert anomaly_roc_auc(labels, scores) == 1.0
    # Thresholded at > 0 as the authors do: [0, 1, 1, 1] -> pairs (1>0, 1=1 tie) x2 = 0.75.
    assert anomaly_roc_auc(labels, scores, binarize=True) == 0.75
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered.
    assert anomaly_roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert math.isnan(anomaly_roc_auc([1, 1], [0.2, 0.3]))
    # Ties count one half: positives 0.5, 0.9 vs negatives 0.5, 0.2 -> (0.5 + 1 + 1 + 1) / 4.
    assert anomaly_roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    assert anomaly_roc_auc([1, 0, 1, 0, 0], [0.1, 0.3, 0.2, 0.3, 0.4]) == 0.0
    assert anomaly_score_from_mask(_mask((4, 5), (0, 1, 0, 5))) == 0.25


def test_math_accuracy():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{3}") == "3"
    assert extract_boxed("x \\boxed {\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("none") is None
    resp = "<think>half</think><answer>\\boxed{\\frac{1}{2}}</answer>"
    assert math_correct("0.5", resp)
    assert not math_correct("0.6", resp)
    assert math_correct("42", "<answer>42</answer>")
    assert not math_correct("42", "I do not know")
    choices = ["3", "\\frac{1}{2}", "blue car"]
    assert math_correct("B", "<answer>\\boxed{B}</answer>", choices=choices)
    assert math_correct("blue car", "<answer>\\boxed{C}</answer>", choices=choices)
    assert math_correct("C", "<answer>\\boxed{blue car}</answer>", choices=choices)
    assert not math_correct("A", "<answer>\\boxed{B}</answer>", choices=choices)
    assert math_accuracy(["0.5", "2"], [resp, "\\boxed{3}"]) == 0.5


def test_chartqa_relaxed_accuracy():
    assert relaxed_correctness("10", "10.4")       # 4 %
    assert not relaxed_correctness("10", "10.6")   # 6 %
    assert relaxed_correctness("12%", "0.12")
    assert relaxed_correctness("1,000", "1020")
    assert relaxed_correctness("Yes", " yes ")
    assert not relaxed_correctness("Yes", "no")
    assert not relaxed_correctness("0", "0.0")     # zero target: string match, as in pix2struct
    assert relaxed_accuracy(["10", ["a", "7"], "x"], ["10.5", "7.1", "y"]) == pytest.approx(2 / 3)


def test_docvqa_anls():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert anls_score("hello", "helo") == pytest.approx(0.8)          # 1 - 1/5
    assert anls_score("hello", "abc") == 0.0                          # NL >= 0.5
    assert anls_score(["nope", "Hello  World"], " hello world ") == 1.0  # case, spaces, best answer
    assert anls_score("abcd", "ab") == 0.0                             # NL = 0.5 exactly: cut
    assert anls([["hello"], "abc"], ["helo", "abc"]) == pytest.approx(0.9)


def test_mean_metric_merges():
    a, b = MeanMetric(), MeanMetric()
    a.update(1), a.update(0)
    b.update(1)
    assert (a + b).compute() == pytest.approx(2 / 3)
    assert math.isnan(MeanMetric().compute())
