"""Task specifications (GLUE, Rotten Tomatoes, custom files) and their metrics.

Metrics follow the GLUE definitions (Wang et al., 2019) and use scikit-learn and scipy only, so that
evaluation works offline (``evaluate.load`` needs the Hub).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

MetricFn = Callable[[np.ndarray, np.ndarray], float]
"""A metric: ``fn(predictions, labels) -> value``, both arrays of shape (N,)."""


class Kind(StrEnum):
    """What a task's model learns, with the name each library gives it; equal to its value
    (``spec.kind == "causal_lm"`` holds), so it reads and writes as plain text in JSON."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    CAUSAL_LM = "causal_lm"

    @property
    def generates(self) -> bool:
        """Next tokens (language modelling, instruction tuning) rather than a task head."""
        return self is Kind.CAUSAL_LM

    @property
    def objective(self) -> str:
        """``--objective``: classification (a task head, floats with --regression) or causal-lm."""
        return "causal-lm" if self.generates else "classification"

    @property
    def peft_task_type(self) -> str:
        return "CAUSAL_LM" if self.generates else "SEQ_CLS"

    @property
    def problem_type(self) -> str:
        """transformers' ``config.problem_type`` (what a saved ``model/`` folder was trained for)."""
        return {"classification": "single_label_classification"}.get(self.value, self.value)

    @classmethod
    def of_problem_type(cls, problem_type: str) -> Kind:
        return next(k for k in cls if k.problem_type == problem_type)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its inputs, label space and metrics.

    Column names in a standardised dataset (see :mod:`dynalora.data`) are always ``"text"``,
    ``"text_pair"`` and ``"label"``; ``text_column`` and ``text_pair_column`` record the original
    source column names, for messages and documentation.
    """

    name: str
    """Task name, e.g. ``"sst2"``."""
    text_column: str
    """Source column holding the (first) text."""
    text_pair_column: str | None
    """Source column holding the second text of a pair task, or ``None`` for single-text tasks."""
    num_labels: int
    """Number of classes; 1 for regression."""
    is_regression: bool
    """True when labels and predictions are floats."""
    metrics: tuple[str, ...]
    """Names of the metrics :func:`compute_metrics` returns (keys of :data:`METRICS`)."""
    main_metric: str
    """The metric a results table shows; one of ``metrics``."""
    kind: Kind | str = ""
    """What the model learns (a :class:`Kind`; its value is accepted): ``classification``,
    ``regression`` (both through a task head) or ``causal_lm`` (next tokens: language modelling or
    instruction tuning, :mod:`dynalora.data.instruct`). Empty: from ``is_regression``."""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", Kind.REGRESSION if self.is_regression else Kind.CLASSIFICATION)
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} unknown; allowed: {', '.join(KINDS)}")
        object.__setattr__(self, "kind", Kind(self.kind))
        allowed = CAUSAL_METRICS if self.kind.generates else tuple(METRICS)
        unknown = [m for m in self.metrics if m not in allowed]
        if unknown:
            raise ValueError(f"metrics {unknown} unknown; allowed: {', '.join(allowed)}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"main_metric {self.main_metric!r} must be one of metrics {self.metrics}")
        if self.kind.generates:
            if self.num_labels != 0 or self.is_regression:
                raise ValueError("a causal_lm task has no labels: num_labels 0, is_regression False")
            return
        if self.is_regression and self.num_labels != 1:
            raise ValueError(f"num_labels must be 1 for a regression task, got {self.num_labels}")
        if not self.is_regression and self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2 for a classification task, got {self.num_labels}")


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(accuracy_score(labels, predictions))


def _f1_binary(predictions: np.ndarray, labels: np.ndarray) -> float:
    # GLUE's F1 for MRPC/QQP: the positive class is 1 (equivalent / duplicate).
    return float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0))


def _f1_macro(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(f1_score(labels, predictions, average="macro", zero_division=0))


def _matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(matthews_corrcoef(labels, predictions))


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    # NaN (with a scipy warning) when either input is constant.
    return float(pearsonr(predictions, labels)[0])


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(spearmanr(predictions, labels)[0])


METRICS: dict[str, MetricFn] = {
    "accuracy": _accuracy,
    "f1": _f1_binary,
    "f1_macro": _f1_macro,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearman": _spearman,
}
"""Metric name -> function of ``(predictions, labels)``."""

KINDS: tuple[str, ...] = tuple(k.value for k in Kind)
CAUSAL_METRICS: tuple[str, ...] = ("exact_match", "perplexity", "loss")
"""What a causal-LM evaluation measures (:func:`dynalora.data.instruct.evaluate_causal`): greedy
answers equal to the reference after stripping whitespace, and the per-token loss on the labelled
tokens and its exponential."""

CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "f1_macro")
"""Metrics for Rotten Tomatoes and custom classification data."""
REGRESSION_METRICS: tuple[str, ...] = ("pearson", "spearman")
"""Metrics for STS-B and custom regression data."""


def _glue(name: str, text: str, pair: str | None, num_labels: int, metrics: tuple[str, ...], main: str) -> TaskSpec:
    return TaskSpec(name, text, pair, num_labels, num_labels == 1, metrics, main)


GLUE_TASKS: dict[str, TaskSpec] = {
    "sst2": _glue("sst2", "sentence", None, 2, ("accuracy",), "accuracy"),
    "mrpc": _glue("mrpc", "sentence1", "sentence2", 2, ("accuracy", "f1"), "f1"),
    "cola": _glue("cola", "sentence", None, 2, ("matthews_correlation",), "matthews_correlation"),
    "qnli": _glue("qnli", "question", "sentence", 2, ("accuracy",), "accuracy"),
    "rte": _glue("rte", "sentence1", "sentence2", 2, ("accuracy",), "accuracy"),
    "stsb": _glue("stsb", "sentence1", "sentence2", 1, REGRESSION_METRICS, "pearson"),
    "mnli": _glue("mnli", "premise", "hypothesis", 3, ("accuracy",), "accuracy"),
    "qqp": _glue("qqp", "question1", "question2", 2, ("accuracy", "f1"), "f1"),
}
"""GLUE tasks with the column names of the Hugging Face ``glue`` dataset."""

ROTTEN_TOMATOES = TaskSpec("rotten_tomatoes", "text", None, 2, False, CLASSIFICATION_METRICS, "accuracy")
"""The embedded default task: review snippets labelled rotten (0) / fresh (1)."""


def custom_spec(text_column: str, text_pair_column: str | None, num_labels: int, regression: bool) -> TaskSpec:
    """Spec for user-supplied files.

    Args:
        text_column: Source column of the first text.
        text_pair_column: Source column of the second text, or ``None``.
        num_labels: Number of classes (ignored for regression, which always has 1).
        regression: Whether labels are floats.

    Returns:
        A spec named ``"custom"`` with accuracy and macro-F1 (classification) or Pearson and
        Spearman (regression).
    """
    if regression:
        return TaskSpec("custom", text_column, text_pair_column, 1, True, REGRESSION_METRICS, "pearson")
    return TaskSpec("custom", text_column, text_pair_column, num_labels, False, CLASSIFICATION_METRICS, "accuracy")


def compute_metrics(spec: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute every metric of ``spec``.

    Args:
        spec: The task.
        predictions: Class ids, shape (N,), or logits, shape (N, C), for classification (logits are
            reduced by argmax); floats of shape (N,) or (N, 1) for regression.
        labels: Gold labels, shape (N,).

    Returns:
        Metric name -> plain Python float, in the order of ``spec.metrics``.

    Raises:
        ValueError: If the shapes do not match or the arrays are empty.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if spec.is_regression:
        predictions = predictions.reshape(-1).astype(np.float64)
        labels = labels.astype(np.float64)
    elif predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)  # (N, C) logits -> (N,) class ids
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions shape {predictions.shape} does not match labels shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("cannot compute metrics on empty arrays")
    return {name: METRICS[name](predictions, labels) for name in spec.metrics}
