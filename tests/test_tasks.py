"""Metrics against values computed by hand, and the task table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynalora.data.tasks import (
    GLUE_TASKS,
    METRICS,
    ROTTEN_TOMATOES,
    TaskSpec,
    compute_metrics,
    custom_spec,
)

# preds  1 1 1 1 0 0
# labels 1 1 0 0 1 0
# class 1: TP=2 FP=2 FN=1 -> F1 = 2*2 / (2*2 + 2 + 1) = 4/7
# class 0: TP=1 FP=1 FN=2 -> F1 = 2*1 / (2*1 + 1 + 2) = 2/5
PREDS = np.array([1, 1, 1, 1, 0, 0])
LABELS = np.array([1, 1, 0, 0, 1, 0])


def test_accuracy_three_of_four() -> None:
    spec = GLUE_TASKS["sst2"]
    out = compute_metrics(spec, np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
    assert out == {"accuracy": 0.75}
    assert type(out["accuracy"]) is float


def test_binary_f1_uses_positive_class_one() -> None:
    out = compute_metrics(GLUE_TASKS["mrpc"], PREDS, LABELS)
    assert list(out) == ["accuracy", "f1"]
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["f1"] == pytest.approx(4 / 7)


def test_macro_f1_averages_both_classes() -> None:
    out = compute_metrics(ROTTEN_TOMATOES, PREDS, LABELS)
    assert out["f1_macro"] == pytest.approx((4 / 7 + 2 / 5) / 2)


def test_matthews_correlation_matches_formula() -> None:
    preds = np.array([1, 1, 1, 0, 0, 0, 1])
    labels = np.array([1, 1, 0, 0, 0, 1, 1])
    tp, fp, tn, fn = 3, 1, 2, 1  # counted by hand
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert expected == pytest.approx(5 / 12)
    out = compute_metrics(GLUE_TASKS["cola"], preds, labels)
    assert out == {"matthews_correlation": pytest.approx(expected)}


def test_pearson_and_spearman_by_hand() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([2.0, 4.0, 9.0, 5.0])
    # deviations: dx = -1.5 -0.5 0.5 1.5, dy = -3 -1 4 0 -> sum dx*dy = 7, sum dx^2 = 5, sum dy^2 = 26
    # ranks of y: 1 2 4 3 -> sum d^2 = 2 -> spearman = 1 - 6*2 / (4 * 15) = 0.8
    out = compute_metrics(GLUE_TASKS["stsb"], x, y)
    assert out["pearson"] == pytest.approx(7 / math.sqrt(5 * 26))
    assert out["spearman"] == pytest.approx(0.8)
    assert all(type(v) is float for v in out.values())


def test_regression_accepts_column_predictions() -> None:
    x = np.array([[1.0], [2.0], [3.0]])
    out = compute_metrics(custom_spec("t", None, 1, regression=True), x, np.array([3.0, 2.0, 1.0]))
    assert out["pearson"] == pytest.approx(-1.0)


def test_logits_are_reduced_by_argmax() -> None:
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])  # -> 1, 0, 1
    out = compute_metrics(GLUE_TASKS["sst2"], logits, np.array([1, 1, 1]))
    assert out["accuracy"] == pytest.approx(2 / 3)


def test_shape_mismatch_and_empty_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(GLUE_TASKS["sst2"], np.array([1, 0]), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(GLUE_TASKS["sst2"], np.array([]), np.array([]))


def test_glue_table() -> None:
    assert set(GLUE_TASKS) == {"sst2", "mrpc", "cola", "qnli", "rte", "stsb", "mnli", "qqp"}
    main = {name: spec.main_metric for name, spec in GLUE_TASKS.items()}
    assert main == {
        "sst2": "accuracy",
        "mrpc": "f1",
        "cola": "matthews_correlation",
        "qnli": "accuracy",
        "rte": "accuracy",
        "stsb": "pearson",
        "mnli": "accuracy",
        "qqp": "f1",
    }
    columns = {name: (spec.text_column, spec.text_pair_column) for name, spec in GLUE_TASKS.items()}
    assert columns["qnli"] == ("question", "sentence")
    assert columns["mnli"] == ("premise", "hypothesis")
    assert columns["qqp"] == ("question1", "question2")
    assert columns["cola"] == ("sentence", None)
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["stsb"].is_regression and GLUE_TASKS["stsb"].num_labels == 1
    assert all(m in METRICS for spec in GLUE_TASKS.values() for m in spec.metrics)


def test_custom_spec_metrics() -> None:
    cls = custom_spec("review", None, 3, regression=False)
    assert (cls.num_labels, cls.metrics, cls.main_metric) == (3, ("accuracy", "f1_macro"), "accuracy")
    reg = custom_spec("a", "b", 5, regression=True)
    assert (reg.num_labels, reg.is_regression, reg.main_metric) == (1, True, "pearson")


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="main_metric"):
        TaskSpec("x", "text", None, 2, False, ("accuracy",), "f1")
    with pytest.raises(ValueError, match="unknown"):
        TaskSpec("x", "text", None, 2, False, ("bleu",), "bleu")
    with pytest.raises(ValueError, match="num_labels"):
        TaskSpec("x", "text", None, 2, True, ("pearson",), "pearson")
