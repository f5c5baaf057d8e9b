"""Figures from a run folder: module-activity heatmap (paper Fig. 5) and loss curves.

Reads what ``dynalora train`` writes (``metrics.json``'s ``module_active_steps`` and the
``log.jsonl`` records); no training code. Figures are built on ``matplotlib.figure.Figure``
objects rather than ``pyplot``, so nothing here touches pyplot's global figure list or needs a
display: ``savefig`` renders PNG with the Agg canvas.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_NUMERIC = re.compile(r"[0-9]+")
_DPI = 120


def parse_module_name(name: str) -> tuple[int | None, str]:
    """Split a module name into (layer index, module type).

    The layer index is the first purely numeric dotted component; the type is the dotted path
    after it. ``"bert.encoder.layer.3.attention.self.query"`` -> ``(3, "attention.self.query")``,
    ``"transformer.h.5.attn.c_attn"`` -> ``(5, "attn.c_attn")``. A name without a numeric
    component -> ``(None, name)``; a name that ends in its index (``"h.5"``) -> ``(5, "")``.

    Args:
        name: Fully qualified module name, as in ``model.named_modules()``.

    Returns:
        ``(layer, module_type)``.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _NUMERIC.fullmatch(part):
            return int(part), ".".join(parts[i + 1 :])
    return None, name


def activity_matrix(module_active_steps: Mapping[str, int]) -> tuple[np.ndarray, list[int], list[str]]:
    """Arrange per-module active-step counts as a (layers x module types) matrix.

    Names without a layer index (e.g. a classifier head) have no cell and are skipped with a log
    message.

    Args:
        module_active_steps: ``{module_name: number of steps the module was trainable}``.

    Returns:
        ``(matrix, layers, types)``: ``matrix`` is float of shape ``(len(layers), len(types))``
        with NaN where a layer has no module of that type; ``layers`` sorted ascending; ``types``
        in first-seen order.

    Raises:
        ValueError: If no name has a layer index, or two names map to the same cell (e.g. an
            encoder-decoder model whose encoder and decoder blocks share indices).
    """
    cells: dict[tuple[int, str], str] = {}
    types: list[str] = []
    skipped: list[str] = []
    for name in module_active_steps:
        layer, mtype = parse_module_name(name)
        if layer is None:
            skipped.append(name)
            continue
        if (layer, mtype) in cells:
            raise ValueError(
                f"modules {cells[(layer, mtype)]!r} and {name!r} both map to layer {layer}, "
                f"type {mtype!r}; the heatmap needs one module per (layer, type)"
            )
        cells[(layer, mtype)] = name
        if mtype not in types:
            types.append(mtype)
    if skipped:
        logger.info("activity heatmap skips %d module(s) without a layer index: %s", len(skipped), skipped)
    if not cells:
        raise ValueError("no module name has a numeric layer index; nothing to place in the heatmap")

    layers = sorted({layer for layer, _ in cells})
    row = {layer: i for i, layer in enumerate(layers)}
    col = {mtype: j for j, mtype in enumerate(types)}
    matrix = np.full((len(layers), len(types)), np.nan)
    for (layer, mtype), name in cells.items():
        matrix[row[layer], col[mtype]] = float(module_active_steps[name])
    return matrix, layers, types


def module_activity_figure(
    module_active_steps: Mapping[str, int],
    *,
    total_steps: int | None = None,
    title: str | None = None,
    label: str = "steps active",
) -> Figure:
    """Build the module-activity heatmap of the paper's Figure 5.

    Layers run down the y axis (layer 0 at the top), module types along x. Each cell is
    annotated with the number of steps the module was active or, when ``total_steps`` is given,
    the fraction of steps (colour scale fixed to [0, 1] so runs compare). Cells with no module
    are left blank (grey).

    Args:
        module_active_steps: ``{module_name: active steps}`` from ``metrics.json``.
        total_steps: Number of optimizer steps in the run; switches cells to fractions.
        title: Figure title.
        label: the colour bar's label for counts (e.g. ``"rank"`` for a map of final ranks).

    Returns:
        The figure; its first axes holds the image, whose array has shape
        ``(num_layers, num_types)``.

    Raises:
        ValueError: If ``total_steps`` is not positive, or see :func:`activity_matrix`.
    """
    if total_steps is not None and total_steps <= 0:
        raise ValueError(f"total_steps must be a positive number of steps, got {total_steps}")
    matrix, layers, types = activity_matrix(module_active_steps)
    if total_steps is not None:
        matrix = matrix / total_steps
        vmin, vmax, cbar_label = 0.0, 1.0, "fraction of steps active"
    else:
        finite_max = float(np.nanmax(matrix))
        vmin, vmax, cbar_label = 0.0, max(finite_max, 1.0), label

    n_rows, n_cols = matrix.shape
    fig = Figure(figsize=(2.5 + 1.1 * n_cols, 1.5 + 0.3 * n_rows), layout="constrained")
    ax = fig.add_subplot()
    cmap = _cmap_with_grey_nan("viridis")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_cols), labels=[t or "(block)" for t in types], rotation=40, ha="right")
    ax.set_yticks(range(n_rows), labels=[str(layer) for layer in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    if title:  # wrapped to the figure's width: a narrow map (query, value) would cut a long title
        chars = max(24, int(9 * (1.5 + 1.1 * n_cols)))  # about 9 characters an inch at 10 pt
        ax.set_title("\n".join(textwrap.wrap(title, width=chars)), fontsize=10)
    fig.colorbar(image, ax=ax, label=cbar_label)

    fontsize = max(5.0, min(9.0, 180.0 / max(n_rows, 1)))
    for i in range(n_rows):
        for j in range(n_cols):
            value = matrix[i, j]
            if math.isnan(value):
                continue
            text = f"{value:.2f}" if total_steps is not None else f"{int(round(value))}"
            # Dark text on light cells and vice versa, from the cell colour's luminance.
            r, g, b, _ = cmap(image.norm(value))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    return fig


def plot_module_activity(
    module_active_steps: Mapping[str, int],
    path: str | os.PathLike[str],
    *,
    total_steps: int | None = None,
    title: str | None = None,
    label: str = "steps active",
) -> None:
    """Save the module-activity heatmap (see :func:`module_activity_figure`) as a PNG.

    Args:
        module_active_steps: ``{module_name: active steps}`` from ``metrics.json``.
        path: Output PNG path; parent folders are created.
        total_steps: Number of optimizer steps; annotate fractions instead of step counts.
        title: Figure title.
    """
    fig = module_activity_figure(module_active_steps, total_steps=total_steps, title=title, label=label)
    save_figure(fig, path)


def ema(values: Sequence[float] | np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with smoothing ``alpha = 2 / (span + 1)``.

    ``s_0 = x_0`` and ``s_t = (1 - alpha) * s_{t-1} + alpha * x_t``; ``span=1`` returns the input.

    Args:
        values: Series of shape ``(T,)``.
        span: Effective window in points (>= 1).

    Returns:
        Smoothed series of shape ``(T,)``.

    Raises:
        ValueError: If ``span < 1``.
    """
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    x = np.asarray(values, dtype=float)
    out = np.empty_like(x)
    alpha = 2.0 / (span + 1.0)
    for t, v in enumerate(x):
        out[t] = v if t == 0 else (1.0 - alpha) * out[t - 1] + alpha * v
    return out


def loss_figure(
    records: Sequence[Mapping[str, Any]],
    *,
    metric: str | None = None,
    title: str | None = None,
) -> Figure:
    """Build the loss-curve figure from ``log.jsonl`` records.

    Top panel: training loss per step (raw, faint, and an EMA over about 1/20 of the points)
    and validation loss at each evaluation (markers), on one y axis. Bottom panel, when the
    validation records carry metrics: the validation ``metric`` over steps.

    Args:
        records: Parsed ``log.jsonl`` records (``type`` ``"train"`` or ``"eval"``); others are
            ignored, as are non-finite losses.
        metric: Validation metric for the second panel; default: the first metric name in the
            first validation record.
        title: Figure title.

    Returns:
        The figure: one axes, or two (loss, metric) sharing the x axis.

    Raises:
        ValueError: If there is neither a training nor a validation loss to plot, or ``metric``
            is named but absent from every validation record.
    """
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and _finite(r.get("loss"))]
    evals = [r for r in records if r.get("type") == "eval" and r.get("split") == "validation"]
    val_loss = [(r["step"], r["loss"]) for r in evals if _finite(r.get("loss"))]
    if not train and not val_loss:
        raise ValueError("no training or validation loss in the records; nothing to plot")

    if metric is None:
        metric = next((name for r in evals for name in (r.get("metrics") or {})), None)
    metric_points = [
        (r["step"], r["metrics"][metric])
        for r in evals
        if metric is not None and _finite((r.get("metrics") or {}).get(metric))
    ]
    if metric is not None and not metric_points and any(r.get("metrics") for r in evals):
        # e.g. a Pearson correlation that is NaN for constant predictions early in training
        logger.info("metric %r has no finite validation value; plotting the loss only", metric)

    n_panels = 2 if metric_points else 1
    fig = Figure(figsize=(7.0, 3.2 * n_panels), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    if train:
        steps, losses = (np.asarray(v, dtype=float) for v in zip(*train, strict=True))
        ax.plot(steps, losses, color="C0", alpha=0.25, linewidth=0.8, label="train loss")
        span = max(1, len(losses) // 20)
        ax.plot(steps, ema(losses, span), color="C0", linewidth=1.8, label=f"train loss (EMA, span {span})")
    if val_loss:
        steps, losses = zip(*val_loss, strict=True)
        ax.plot(steps, losses, "o-", color="C1", markersize=4, linewidth=1.0, label="validation loss")
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if metric_points:
        steps, values = zip(*metric_points, strict=True)
        axes[1].plot(steps, values, "s-", color="C2", markersize=4, linewidth=1.0)
        axes[1].set_ylabel(f"validation {metric}")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig


def plot_loss(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
    title: str | None = None,
) -> None:
    """Save the loss curves (see :func:`loss_figure`) as a PNG.

    Args:
        records: Parsed ``log.jsonl`` records.
        path: Output PNG path; parent folders are created.
        metric: Validation metric for the second panel (default: the first one logged).
        title: Figure title.
    """
    save_figure(loss_figure(records, metric=metric, title=title), path)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read one JSON object per line, skipping blank lines.

    A malformed *last* line is skipped with a warning (a run killed mid-write leaves one);
    a malformed line elsewhere is an error.

    Args:
        path: A ``log.jsonl`` file.

    Returns:
        The records, in file order.

    Raises:
        ValueError: On a malformed line before the last, or a line that is not a JSON object.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last:
                logger.warning("%s:%d: skipping a truncated last line (%s)", path, i + 1, err)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({err})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cmap_with_grey_nan(name: str) -> Colormap:
    return colormaps[name].with_extremes(bad="#d9d9d9")


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=_DPI)
    logger.info("wrote %s", out)
