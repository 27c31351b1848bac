"""Metrics against hand-computed values."""

import math

import numpy as np
import pytest

from ofa_unified import metrics


def test_vqa_accuracy_leave_one_out_formula():
    # 2 of 10 humans said "2" ("two" normalises to it). Leaving out one of those two leaves 1 match
    # (1/3), leaving out any of the other 8 leaves 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    answers = ["two", "2"] + ["3"] * 8
    assert metrics.vqa_score("2", answers) == pytest.approx(0.6)
    assert metrics.vqa_score("Two.", answers) == pytest.approx(0.6)
    # 3 matches: leaving one of them out gives 2/3, else 1: (3 * 2/3 + 7) / 10 = 0.9.
    assert metrics.vqa_score("3", ["3"] * 3 + ["4"] * 7) == pytest.approx(0.9)
    assert metrics.vqa_score("4", ["4"] * 10) == 1.0
    assert metrics.vqa_score("5", ["4"] * 10) == 0.0
    assert metrics.vqa_accuracy(["2", "4"], [answers, ["4"] * 10]) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Yes", "yes"),
        ("The red circle.", "red circle"),
        ("three", "3"),
        ("t-shirt", "t shirt"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("an apple!", "apple"),
        ("  left  side ", "left side"),
    ],
)
def test_vqa_normalisation(raw, normal):
    assert metrics.normalize_vqa_answer(raw) == normal


def test_box_iou_and_grounding_scores():
    assert metrics.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert metrics.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert metrics.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert metrics.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    got = metrics.grounding_scores([[0, 0, 10, 10], [5, 0, 15, 10]], [[0, 0, 10, 10]] * 2)
    assert got == {"acc@0.5": 0.5, "miou": pytest.approx((1 + 1 / 3) / 2)}


GT = [
    [{"box": [10, 10, 50, 50], "label": "circle"}, {"box": [60, 60, 90, 100], "label": "square"}],
    [{"box": [0, 0, 20, 30], "label": "circle"}],
]


def test_detection_map_perfect_and_degraded():
    perfect = metrics.detection_map(GT, GT)
    assert perfect == {"map@0.5": pytest.approx(1.0), "map@[.5:.95]": pytest.approx(1.0)}
    shifted = [[{"box": [30, 10, 70, 50], "label": "circle"}, GT[0][1]], GT[1]]  # IoU 1/3 with its gt
    worse = metrics.detection_map(shifted, GT)
    assert worse["map@0.5"] < 0.9 and worse["map@[.5:.95]"] < 0.9
    wrong_label = [[{**GT[0][0], "label": "square"}, GT[0][1]], GT[1]]
    assert metrics.detection_map(wrong_label, GT)["map@0.5"] < 0.9
    assert metrics.detection_map([[], []], GT) == {"map@0.5": 0.0, "map@[.5:.95]": 0.0}


def test_detection_map_is_silent(capfd):
    metrics.detection_map(GT, GT)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_caption_scores_prefer_the_right_caption(capfd):
    refs = [
        ["a red circle above a blue square", "a red circle and a blue square"],
        ["a small green triangle", "one green triangle"],
        ["two yellow stars on grass", "yellow stars"],
    ]
    exact = metrics.caption_scores([r[0] for r in refs], refs)
    wrong = metrics.caption_scores(["a purple star", "an orange square", "three circles"], refs)
    assert exact["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert exact["bleu4"] > wrong["bleu4"] and exact["cider"] > wrong["cider"] > -1e-9
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_accuracy_exact_match_and_lengths():
    assert metrics.accuracy([" yes", "no", "maybe"], ["yes", "yes", "Maybe"]) == pytest.approx(2 / 3)
    assert metrics.exact_match(["a red  Circle", "a cat"], ["a red circle", "a dog"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metrics.accuracy(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.exact_match([], [])


def test_code_accuracy_and_psnr():
    assert metrics.code_accuracy([[1, 2, 3, 4], [5]], [[1, 2, 0, 4], [5, 6, 7, 8]]) == pytest.approx(4 / 8)
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    assert metrics.psnr(a, a) == math.inf
    # MSE 1 on a 255 scale: 10 * log10(255^2) dB.
    assert metrics.psnr(a + 1, a) == pytest.approx(20 * math.log10(255))
    with pytest.raises(ValueError, match="shapes"):
        metrics.psnr(a, np.zeros((2, 2, 3)))
