"""Custom tasks from the user's CSV / JSON / JSONL files."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from dynalora.data.common import SPLITS, TaskData, _dataset, _Options
from dynalora.data.tasks import custom_spec
from dynalora.errors import UsageError


def _read_json(path: Path) -> pd.DataFrame:
    try:
        return pd.read_json(path, orient="records", dtype=False)  # a list of records
    except ValueError:
        return pd.read_json(path, lines=True, dtype=False)  # or JSON lines


_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    # Every CSV cell is text ("NA" or "007" stay as written); labels become numbers in _as_number.
    ".csv": lambda path: pd.read_csv(path, keep_default_na=False, dtype=str),
    ".json": _read_json,
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False),
}


def _read_table(path_str: str, flag: str) -> pd.DataFrame:
    path = Path(path_str).expanduser()
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UsageError(f"{flag} {path_str} has an unsupported extension; allowed: {', '.join(_READERS)}")
    if not path.is_file():
        raise UsageError(f"{flag} {path_str} not found")
    try:
        frame = reader(path)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UsageError(f"{flag} {path_str} could not be read: {str(err).splitlines()[0]}") from err
    if frame.empty:
        raise UsageError(f"{flag} {path_str} has no rows; every split needs at least one example")
    return frame


def _check_columns(frame: pd.DataFrame, opts: _Options, path: str) -> None:
    wanted = {
        "--text-column": opts.text_column,
        "--text-pair-column": opts.text_pair_column,
        "--label-column": opts.label_column,
    }
    for flag, column in wanted.items():
        if column is not None and column not in frame.columns:
            available = ", ".join(map(str, frame.columns))
            raise UsageError(f"{flag} {column!r} not found in {Path(path).name}; columns are: {available}")


def _texts(series: pd.Series) -> list[str]:
    return series.fillna("").astype(str).tolist()


def _as_number(value: Any) -> Any:
    """A label as a number where it is one: numeric strings (CSV) to int or float, bools to int."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if not isinstance(value, str):
        return value
    for parse in (int, float):
        try:
            number = parse(value)
        except ValueError:
            continue
        return number if math.isfinite(number) else value
    return value


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


def _regression_labels(values: list[Any], where: str) -> list[float]:
    try:
        labels = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise UsageError(f"{where}: --regression needs numeric labels; found {err}") from err
    if not all(map(math.isfinite, labels)):
        raise UsageError(f"{where}: --regression needs finite labels; found inf or nan")
    return labels


def _class_kind(values: list[Any], where: str) -> str:
    """``"str"`` for string labels, ``"int"`` for integer ids; float labels are an error."""
    if any(isinstance(v, str) for v in values):
        return "str"
    odd = next((v for v in values if not isinstance(v, (int, float, np.number))), None)
    if odd is not None:
        raise UsageError(f"{where}: label {odd!r} is neither a string nor a number")
    bad = next((v for v in values if not math.isfinite(v) or v != int(v)), None)
    if bad is not None:
        raise UsageError(f"{where}: label {bad!r} is not an integer class id; pass --regression for float labels")
    return "int"


def _label_vocab(train: list[Any], where: str) -> tuple[dict[Any, int], list[str] | None]:
    """Map training labels to ids: strings in sorted order, integers as given (must be 0..n-1)."""
    if _class_kind(train, where) == "str":
        names = sorted({str(v) for v in train})
        return {n: i for i, n in enumerate(names)}, names
    ids = sorted({int(v) for v in train})
    if ids != list(range(len(ids))):
        raise UsageError(f"{where}: integer labels must be 0..n-1 with every class present; found {ids}")
    return {i: i for i in ids}, None


def _encode(values: list[Any], vocab: dict[Any, int], where: str) -> list[int]:
    as_str = any(isinstance(k, str) for k in vocab)

    def key(v: Any) -> Any:
        if not as_str and isinstance(v, (int, float, np.number)) and math.isfinite(v) and v == int(v):
            return int(v)
        return str(v)  # never a key of an integer vocabulary

    unseen = sorted({str(v) for v in values if key(v) not in vocab})
    if unseen:
        known = ", ".join(map(str, vocab))
        raise UsageError(f"{where}: labels {', '.join(unseen)} do not occur in training; training labels are: {known}")
    return [vocab[key(v)] for v in values]


def _load_custom(task: str, opts: _Options) -> TaskData:
    if "train" not in opts.files or "validation" not in opts.files:
        raise UsageError("--task custom needs --train-file and --validation-file (--test-file is optional)")
    frames = {}
    for split in SPLITS:
        if split in opts.files:
            frames[split] = _read_table(opts.files[split], f"--{split}-file")
            _check_columns(frames[split], opts, opts.files[split])
    raw_labels: dict[str, list[Any]] = {}
    where = {s: f"--label-column {opts.label_column!r} in {Path(opts.files[s]).name}" for s in frames}
    for split, frame in frames.items():
        values = frame[opts.label_column].tolist()
        missing = next((i for i, v in enumerate(values) if _is_missing(v)), None)
        if missing is not None:
            raise UsageError(f"{where[split]}: row {missing} has no label; every example needs one")
        raw_labels[split] = [_as_number(v) for v in values]
    label_names: list[str] | None = None
    if opts.regression:
        labels = {s: _regression_labels(v, where[s]) for s, v in raw_labels.items()}
        num_labels = 1
    else:
        vocab, label_names = _label_vocab(raw_labels["train"], where["train"])
        labels = {s: _encode(v, vocab, where[s]) for s, v in raw_labels.items()}
        num_labels = len(vocab)
        if num_labels < 2:
            raise UsageError(f"{where['train']}: found one class only; classification needs at least two")
    splits = datasets.DatasetDict()
    for split, frame in frames.items():
        pair = _texts(frame[opts.text_pair_column]) if opts.text_pair_column else None
        splits[split] = _dataset(_texts(frame[opts.text_column]), pair, labels[split], opts.regression)
    spec = custom_spec(opts.text_column, opts.text_pair_column, num_labels, opts.regression)
    return TaskData(spec, splits, label_names, has_test_labels=True)
