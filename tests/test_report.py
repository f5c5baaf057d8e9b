"""Tests for dynalora.analysis.report: labels, the comparison table, aggregation and the CLI entry."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dynalora.analysis.report import aggregate, aggregate_table, compare_table, load_run, main, main_result, run_label
from dynalora.errors import UsageError

MiB = 2**20
DYNAMIC = {"measure": "forward", "allocator": "discounted_stochastic", "k": 16, "interval": 50}


def _metrics(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task": "sst2",
        "model": "bert-base-uncased",
        "method": "lora",
        "dynamic": None,
        "validation": {"accuracy": 0.8, "f1": 0.7},
        "test": {"accuracy": 0.819, "f1": 0.75},
        "main_metric": "accuracy",
        "trainable_params": 147456,
        "mean_active_trainable_params": 147456.0,
        "train_runtime_s": 123.456,
        "median_step_ms": 45.67,
        "peak_memory_bytes": 1536 * MiB,
        "peak_memory_kind": "cpu_peak_rss",
        "module_active_steps": {"bert.encoder.layer.0.attention.self.query": 100},
        "num_steps": 100,
        "seed": 0,
    }
    base.update(overrides)
    return base


def _dyna(**overrides: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "dynamic": dict(DYNAMIC),
        "test": {"accuracy": 0.8255},
        "mean_active_trainable_params": 36864.0,
        "train_runtime_s": 80.0,
        "median_step_ms": 30.04,
        "peak_memory_bytes": 1200 * MiB + MiB // 2,
    }
    return _metrics(**{**defaults, **overrides})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "LoRA"),
        ({"dynamic": DYNAMIC}, "DynaLoRA (forward/discounted_stochastic, k=16)"),
        ({"method": "vera", "dynamic": DYNAMIC}, "DynaVeRA (forward/discounted_stochastic, k=16)"),
        ({"method": "vera"}, "VeRA"),
        (
            {"method": "dora", "dynamic": {"measure": "gradient", "allocator": "topk", "k": 4}},
            "DynaDoRA (gradient/topk, k=4)",
        ),
        (
            {"dynamic": {"measure": "gradient", "allocator": "cutoff", "budget": 0.5, "memory_cap": None, "k": 2 / 3}},
            "DynaLoRA (gradient/cutoff, budget=0.5)",
        ),
        (
            {"dynamic": {"measure": "gradient", "allocator": "cutoff", "budget": 0.5, "memory_cap": 0.4}},
            "DynaLoRA (gradient/cutoff, budget=0.5, cap=0.4)",
        ),
        ({"method": "full"}, "Full FT"),
        ({"method": "full", "dynamic": {"k": 2}}, "Dynamic full FT (k=2)"),
        ({"method": "bitfit"}, "BitFit"),
        ({"dynamic": {}}, "LoRA"),
        ({"method": "ia3"}, "ia3"),
    ],
)
def test_run_label(overrides: dict[str, Any], expected: str) -> None:
    assert run_label(_metrics(**overrides)) == expected


def test_compare_table_markdown_numbers() -> None:
    table = compare_table([_metrics(), _dyna()])
    lines = table.splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["Run", "accuracy (test)"]
    assert header[-1] == "Peak memory (MiB, CPU RSS)"
    assert lines[1].startswith("|:---|---:")
    lora = [c.strip() for c in lines[2].strip("|").split("|")]
    dyna = [c.strip() for c in lines[3].strip("|").split("|")]
    assert lora == ["LoRA", "0.8190", "147,456", "147,456 (100.0%)", "123.5", "45.7", "1,536.0"]
    assert dyna == [
        "DynaLoRA (forward/discounted_stochastic, k=16)",
        "0.8255",
        "147,456",
        "36,864 (25.0%)",
        "80.0",
        "30.0",
        "1,200.5",
    ]


def test_compare_table_falls_back_to_validation() -> None:
    runs = [_metrics(), _dyna(test={}, validation={"accuracy": 0.81})]
    assert main_result(runs[1]) == ("accuracy", "validation", 0.81)
    lines = compare_table(runs).splitlines()
    assert "| accuracy |" in lines[0]  # splits differ: named per cell, not in the header
    assert "| 0.8190 (test) |" in lines[2]
    assert "| 0.8100 (val) |" in lines[3]
    only_val = compare_table([runs[1]]).splitlines()
    assert "accuracy (validation)" in only_val[0]
    assert "| 0.8100 |" in only_val[2]


def test_compare_table_mixed_kinds_tasks_and_missing() -> None:
    runs = [
        _metrics(),
        _dyna(task="cola", main_metric="mcc", test={"mcc": 0.5}, peak_memory_kind="cuda_max_allocated"),
        _metrics(test={}, validation={}, median_step_ms=None),
    ]
    lines = compare_table(runs).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["Run", "Task", "main metric (test)"]
    assert header[-1] == "Peak memory (MiB)"
    assert "| cola | 0.5000 (mcc) |" in lines[3]
    assert "| 1,200.5 (CUDA alloc) |" in lines[3]
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert cells[2] == "n/a" and cells[6] == "n/a"


def test_compare_table_text_is_aligned() -> None:
    table = compare_table([_metrics(), _dyna()], fmt="text")
    lines = table.splitlines()
    assert "|" not in table
    assert set(lines[1]) <= {"-", " "}
    # right-aligned number columns end at the same position on every line
    assert len({len(line) for line in lines}) == 1
    assert lines[2].startswith("LoRA ")
    assert lines[2].index("0.8190") + len("0.8190") == lines[3].index("0.8255") + len("0.8255")


def test_compare_table_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="fmt"):
        compare_table([_metrics()], fmt="html")  # type: ignore[arg-type]


def test_aggregate_mean_std_against_numpy() -> None:
    lora_acc, lora_ms = [0.81, 0.82, 0.835], [45.0, 47.0, 44.0]
    dyna_acc, dyna_ms = [0.825, 0.83], [30.0, 31.5]
    runs = [
        _metrics(seed=s, test={"accuracy": a}, median_step_ms=m)
        for s, (a, m) in enumerate(zip(lora_acc, lora_ms, strict=True))
    ]
    runs += [
        _dyna(seed=s, test={"accuracy": a}, median_step_ms=m)
        for s, (a, m) in enumerate(zip(dyna_acc, dyna_ms, strict=True))
    ]
    # same label, different interval: must not be averaged with the k=16/interval=50 runs
    runs.append(_dyna(dynamic={**DYNAMIC, "interval": 10}, test={"accuracy": 0.5}))
    rows = aggregate(runs)
    assert [(r["label"], r["n"]) for r in rows] == [
        ("LoRA", 3),
        ("DynaLoRA (forward/discounted_stochastic, k=16)", 2),
        ("DynaLoRA (forward/discounted_stochastic, k=16)", 1),
    ]
    lora, dyna, single = rows
    assert lora["seeds"] == [0, 1, 2] and lora["split"] == "test"
    assert lora["metric_mean"] == pytest.approx(np.mean(lora_acc))
    assert lora["metric_std"] == pytest.approx(np.std(lora_acc, ddof=1))
    assert lora["step_ms_mean"] == pytest.approx(np.mean(lora_ms))
    assert lora["step_ms_std"] == pytest.approx(np.std(lora_ms, ddof=1))
    assert dyna["metric_mean"] == pytest.approx(np.mean(dyna_acc))
    assert dyna["metric_std"] == pytest.approx(np.std(dyna_acc, ddof=1))
    assert single["metric_mean"] == 0.5 and math.isnan(single["metric_std"])

    table = aggregate_table(rows, fmt="text")
    assert f"{np.mean(lora_acc):.4f} ± {np.std(lora_acc, ddof=1):.4f}" in table
    assert "accuracy (test)" in table


def test_aggregate_groups_by_the_recipe_and_refuses_a_seed_twice(tmp_path) -> None:
    # two seed-0 runs with other learning rates were averaged as "2 seeds"
    runs = []
    for lr, acc in ((1e-3, 0.6), (1e-1, 0.8)):
        folder = _write_run(tmp_path / f"lr{lr}", _metrics(seed=0, test={"accuracy": acc}))
        (folder / "config.json").write_text(json.dumps({"lr": lr, "seed": 0, "output_dir": str(folder)}))
        runs.append(load_run(folder))
    assert [r["n"] for r in aggregate(runs)] == [1, 1]
    twin = _write_run(tmp_path / "again", _metrics(seed=0, test={"accuracy": 0.7}))
    (twin / "config.json").write_text(json.dumps({"lr": 1e-3, "seed": 0, "output_dir": str(twin)}))
    with pytest.raises(UsageError, match="one configuration with seed 0"):
        aggregate([*runs, load_run(twin)])


def _write_run(folder: Path, metrics: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return folder


def test_load_run_adds_run_dir_and_validates(tmp_path: Path) -> None:
    folder = _write_run(tmp_path / "a", _metrics())
    run = load_run(folder)
    assert run["run_dir"] == str(folder) and run["trainable_params"] == 147456
    (tmp_path / "b").mkdir()
    with pytest.raises(UsageError, match="no metrics.json"):
        load_run(tmp_path / "b")
    (tmp_path / "b" / "metrics.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_run(tmp_path / "b")


def test_main_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write_run(tmp_path / "lora", _metrics())
    b = _write_run(tmp_path / "dyna", _dyna())
    assert main([str(a), str(b), "--format", "text"]) == 0
    out = capsys.readouterr().out
    assert "DynaLoRA (forward/discounted_stochastic, k=16)" in out and "36,864 (25.0%)" in out


def test_main_missing_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write_run(tmp_path / "lora", _metrics())
    assert main([str(a), str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "nope" in captured.err
