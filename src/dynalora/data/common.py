"""Standard columns shared by every loader: a task's splits as ``text``, [``text_pair``], ``label``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from dynalora.data.tasks import TaskSpec

SPLITS: tuple[str, ...] = ("train", "validation", "test")
UNLABELLED = -1
"""Label of GLUE test examples, whose gold labels are not public."""


@dataclass
class TaskData:
    """A task's splits in standard columns."""

    spec: TaskSpec
    """What the task is and how it is scored."""
    splits: datasets.DatasetDict
    """Keys among ``train``, ``validation``, ``test``; columns ``text``, [``text_pair``], ``label``."""
    label_names: list[str] | None = None
    """Class names in id order, when known (string labels, Rotten Tomatoes, GLUE)."""
    has_test_labels: bool = True
    """False for GLUE test splits, whose labels are all -1."""


@dataclass(frozen=True)
class _Options:
    """The arguments of :func:`load_task`, passed to one loader."""

    glue_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # split -> path, custom only
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    regression: bool = False
    prompt_column: str | None = None  # custom causal-LM files: instruction tuning
    response_column: str | None = None
    causal: bool = False  # custom files are causal-LM data (prompt/response or text)


# --------------------------------------------------------------------------- standard columns


def _features(has_pair: bool, regression: bool) -> datasets.Features:
    columns = {"text": datasets.Value("string")}
    if has_pair:
        columns["text_pair"] = datasets.Value("string")
    columns["label"] = datasets.Value("float32" if regression else "int64")
    return datasets.Features(columns)


def _dataset(
    text: Sequence[str], text_pair: Sequence[str] | None, labels: Sequence[Any], regression: bool
) -> datasets.Dataset:
    columns: dict[str, list[Any]] = {"text": list(text)}
    if text_pair is not None:
        columns["text_pair"] = list(text_pair)
    columns["label"] = list(labels)
    return datasets.Dataset.from_dict(columns, features=_features(text_pair is not None, regression))
