"""The no-object study's analysis pieces (tools/nonobject_study): the premise probe's logistic
regression and the forgetting / settling summaries, on data whose answers are known."""
import torch

from tools.nonobject_study.probe import balanced_accuracy, fit_logistic, predict
from tools.nonobject_study.report import empty_answer_rates, forgetting, settling


def _blobs(n, d, shift, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g)
    x[:, 0] += shift * (2 * y - 1)
    return x, y.float()


def test_probe_reads_a_linear_feature_and_not_noise():
    x, y = _blobs(400, 16, 3.0, 0)
    xv, yv = _blobs(200, 16, 3.0, 1)
    assert balanced_accuracy(predict(fit_logistic(x, y), xv), yv) > 0.95
    # The same features with labels that carry nothing: held-out accuracy near chance.
    noise_y = (torch.randperm(400, generator=torch.Generator().manual_seed(2)) % 2).float()
    acc = balanced_accuracy(predict(fit_logistic(x[:, 1:], noise_y), xv[:, 1:]), yv)
    assert 0.35 < acc < 0.65


def test_balanced_accuracy_weights_classes_equally():
    y = torch.tensor([1.0, 1, 1, 0])
    pred = torch.tensor([True, True, True, True])  # all "present": 100 % of one class, 0 % of the other
    assert balanced_accuracy(pred, y) == 0.5


def _run(method, seed, reward, base_giou):
    return {"method": method, "seed": seed, "curves": {"step": list(range(len(reward))), "reward/total": reward},
            "evals": {"base_val": {"giou": base_giou, "bbox_acc": base_giou, "parse_fail_rate": 0.0}}}


def test_existence_verdicts_and_metrics():
    from tools.nonobject_study.scoring import existence_metrics, existence_verdict

    assert existence_verdict("<think>x</think><answer>Yes.</answer>") == "yes"
    assert existence_verdict("<answer>no</answer>") == "no"
    assert existence_verdict("<answer>[]</answer>") is None and existence_verdict("no tags") is None
    recs = [{"verdict": "yes", "label": "yes"}, {"verdict": "yes", "label": "yes"}, {"verdict": "yes", "label": "no"},
            {"verdict": None, "label": "no"}]
    m = existence_metrics(recs)
    assert (m["accuracy"], m["present_accuracy"], m["absent_accuracy"]) == (0.5, 1.0, 0.0)
    assert (m["balanced_accuracy"], m["yes_rate"], m["parse_fail_rate"], m["absent_count"]) == (0.5, 0.75, 0.25, 2)


def test_settling_windows_are_means_over_fifths_and_seeds():
    rising = [float(i) for i in range(10)]  # windows of 2: first 0.5, previous 6.5, last 8.5
    flat = [1.0] * 10
    st = settling([_run("rlvr", 0, rising, 0.5), _run("rlvr", 1, flat, 0.5)])
    w = st["rlvr"]["reward/total"]
    assert (w["window"], w["steps"]) == (2, 10)
    assert (w["first"], w["previous"], w["last"]) == ((0.5 + 1) / 2, (6.5 + 1) / 2, (8.5 + 1) / 2)


def test_forgetting_compares_each_method_with_the_base_model():
    base = {"evals": {"base_val": {"giou": 0.4, "bbox_acc": 0.5, "parse_fail_rate": 0.0}}}
    f = forgetting(base, [_run("sft", 0, [1.0], 0.2), _run("sft", 1, [1.0], 0.3)])["base_val"]
    assert f["before"]["giou"] == 0.4
    assert abs(f["after"]["sft"]["giou"]["mean"] - 0.25) < 1e-12 and f["after"]["sft"]["giou"]["n"] == 2
    assert "visurf" not in f["after"]


def test_named_object_hits_tells_the_named_object_from_the_others(tmp_path):
    import json

    from tools.make_synthetic_grounding import generate
    from tools.nonobject_study.probe import named_object_hits, object_boxes
    from visurf_megatron.eval.metrics import box_iou as _iou

    res = generate(tmp_path, train=0, val=8, size=48, seed=3, no_object_fraction=0.0, query_types=("single",),
                   min_objects=2, max_objects=3, progress=False)
    rows = [json.loads(line) for line in open(res["val"])]
    preds = []
    for k, row in enumerate(rows):
        target = row["solution"][0]["bbox_2d"]
        scene = object_boxes(tmp_path / row["image"])
        assert len(scene) >= 2 and max(_iou(b, target) for b in scene) > 0.5
        # Even rows: the named object's box; odd rows: another object's.
        box = target if k % 2 == 0 else next(b for b in scene if _iou(b, target) <= 0.5)
        preds.append({"id": row["id"], "objects": [{"bbox_2d": list(box)}]})
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in preds))
    hits = named_object_hits(res["val"], path)
    assert hits["count"] == 8 and hits["named"] == 0.5 and hits["other"] == 0.5
    assert 1 / 3 <= hits["random_pick_named"] <= 1 / 2


def test_empty_answer_rates_split_the_logged_shares_by_class():
    # f = 0.25 absent; last fifth (2 of 10 steps): 10 % of rollouts answer [], 5 % correctly.
    curves = {"step": list(range(10)), "study/rollout_empty_frac": [0.0] * 8 + [0.1, 0.1],
              "study/rollout_correct_empty_frac": [0.0] * 8 + [0.05, 0.05]}
    rates = empty_answer_rates([{"method": "visurf", "curves": curves}], 0.25)
    assert abs(rates["visurf"]["absent"]["mean"] - 0.2) < 1e-12  # 0.05 / 0.25
    assert abs(rates["visurf"]["present"]["mean"] - 0.05 / 0.75) < 1e-12
    assert "sft" not in rates
