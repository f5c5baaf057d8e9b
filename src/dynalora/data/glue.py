"""GLUE: the Hugging Face ``glue`` dataset (online), or the official GLUE TSV download (``glue_dir``)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from dynalora.data.common import UNLABELLED, TaskData, _dataset, _features, _Options
from dynalora.data.tasks import GLUE_TASKS, TaskSpec
from dynalora.errors import UsageError

logger = logging.getLogger(__name__)


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
