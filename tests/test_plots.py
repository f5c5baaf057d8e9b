"""Tests for dynalora.analysis.plots: name parsing, the activity matrix, and PNG output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dynalora.analysis.plots import (
    activity_matrix,
    ema,
    loss_figure,
    module_activity_figure,
    parse_module_name,
    plot_loss,
    plot_module_activity,
    read_jsonl,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bert.encoder.layer.3.attention.self.query", (3, "attention.self.query")),
        ("roberta.encoder.layer.11.output.dense", (11, "output.dense")),
        ("model.layers.0.self_attn.q_proj", (0, "self_attn.q_proj")),
        ("transformer.h.5.attn.c_attn", (5, "attn.c_attn")),
        # the first numeric component wins, not a later one
        ("encoder.block.2.layer.1.SelfAttention.q", (2, "layer.1.SelfAttention.q")),
        ("classifier.dense", (None, "classifier.dense")),
        # digits inside a component do not count as an index
        ("model.layer2.fc1", (None, "model.layer2.fc1")),
    ],
)
def test_parse_module_name(name: str, expected: tuple[int | None, str]) -> None:
    assert parse_module_name(name) == expected


def _bert_steps() -> dict[str, int]:
    # layer 1 has no value module: that cell must stay NaN; layers listed out of order on purpose.
    return {
        "bert.encoder.layer.1.attention.self.query": 7,
        "bert.encoder.layer.0.attention.self.query": 3,
        "bert.encoder.layer.0.attention.self.value": 5,
        "bert.encoder.layer.10.attention.self.query": 11,
        "bert.encoder.layer.10.attention.self.value": 13,
        "classifier": 99,  # no layer index: skipped
    }


def test_activity_matrix_places_values() -> None:
    matrix, layers, types = activity_matrix(_bert_steps())
    assert layers == [0, 1, 10]
    assert types == ["attention.self.query", "attention.self.value"]
    expected = np.array([[3.0, 5.0], [7.0, np.nan], [11.0, 13.0]])
    np.testing.assert_array_equal(matrix, expected)  # NaNs compare equal here


def test_activity_matrix_rejects_colliding_cells() -> None:
    steps = {"encoder.block.0.layer.0.SelfAttention.q": 1, "decoder.block.0.layer.0.SelfAttention.q": 2}
    with pytest.raises(ValueError, match="both map to layer 0"):
        activity_matrix(steps)


def test_activity_matrix_needs_a_layer() -> None:
    with pytest.raises(ValueError, match="no module name"):
        activity_matrix({"classifier": 3})


def test_heatmap_figure_shape_and_fractions() -> None:
    fig = module_activity_figure(_bert_steps(), total_steps=20, title="t")
    image = fig.axes[0].images[0]
    array = image.get_array()
    assert array.shape == (3, 2)
    assert array[0, 1] == pytest.approx(5 / 20)
    assert bool(np.ma.getmaskarray(array)[1, 1])  # the missing cell is masked, not 0
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == sorted(["0.15", "0.25", "0.35", "0.55", "0.65"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1", "10"]


def test_heatmap_annotates_step_counts_without_total() -> None:
    fig = module_activity_figure(_bert_steps())
    assert sorted(int(t.get_text()) for t in fig.axes[0].texts) == [3, 5, 7, 11, 13]
    assert fig.axes[0].images[0].get_clim() == (0.0, 13.0)


def test_heatmap_rejects_bad_total_steps() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        module_activity_figure(_bert_steps(), total_steps=0)


def test_plot_module_activity_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "activity.png"
    plot_module_activity(_bert_steps(), out)
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000


def test_ema_matches_hand_computation() -> None:
    x = [1.0, 3.0, 2.0]
    alpha = 2 / (3 + 1)
    s1 = (1 - alpha) * 1.0 + alpha * 3.0
    s2 = (1 - alpha) * s1 + alpha * 2.0
    np.testing.assert_allclose(ema(x, span=3), [1.0, s1, s2])
    np.testing.assert_allclose(ema(x, span=1), x)


def _records() -> list[dict]:
    train = [
        {"type": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3, "num_active": 4, "step_ms": 5.0} for s in range(1, 41)
    ]
    train[5]["loss"] = math.nan  # must not poison the smoothed curve
    evals = [
        {"type": "eval", "step": s, "split": "validation", "loss": 1.0 / s, "metrics": {"accuracy": s / 40}}
        for s in (10, 20, 30, 40)
    ]
    test = [{"type": "eval", "step": 40, "split": "test", "loss": 0.1, "metrics": {"accuracy": 0.9}}]
    return train + evals + test


def test_loss_figure_series() -> None:
    fig = loss_figure(_records())
    assert len(fig.axes) == 2
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines][0] == "train loss"
    raw, smooth, val = lines
    assert len(raw.get_xdata()) == 39  # the NaN step dropped
    assert np.all(np.isfinite(smooth.get_ydata()))
    np.testing.assert_allclose(val.get_xdata(), [10, 20, 30, 40])
    np.testing.assert_allclose(val.get_ydata(), [0.1, 0.05, 1 / 30, 0.025])
    (metric_line,) = fig.axes[1].get_lines()
    np.testing.assert_allclose(metric_line.get_ydata(), [0.25, 0.5, 0.75, 1.0])


def test_loss_figure_without_metrics_has_one_panel() -> None:
    records = [r for r in _records() if r["type"] == "train"]
    assert len(loss_figure(records).axes) == 1


def test_loss_figure_errors() -> None:
    with pytest.raises(ValueError, match="no training or validation loss"):
        loss_figure([{"type": "eval", "split": "test", "step": 1, "loss": 0.3}])
    # a metric with no finite value (absent, or NaN like an early Pearson) leaves only the loss panel
    assert len(loss_figure(_records(), metric="f1").axes) == 1
    assert len(loss_figure(_records()).axes) == 2


def test_plot_loss_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "loss.png"
    plot_loss(_records(), out)
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_read_jsonl_roundtrip_and_truncated_tail(tmp_path: Path) -> None:
    records = _records()[:3]
    path = tmp_path / "log.jsonl"
    text = "\n".join(json.dumps(r) for r in records) + "\n\n" + '{"type": "train", "st'
    path.write_text(text, encoding="utf-8")
    assert read_jsonl(path) == records


def test_read_jsonl_rejects_bad_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"log\.jsonl:2"):
        read_jsonl(path)
