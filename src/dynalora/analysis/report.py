"""Compare finished runs: read each run folder's ``metrics.json`` and write tables.

``python -m dynalora.analysis.report RUN_DIR [RUN_DIR ...]`` prints one row per run (markdown by default,
``--format text`` for aligned plain text); ``--aggregate`` prints mean ± std across seeds
instead. No training code here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dynalora.errors import UsageError

logger = logging.getLogger(__name__)

TableFormat = Literal["markdown", "text"]
FORMATS: tuple[str, ...] = ("markdown", "text")

# method -> (static label, dynamic label prefix)
_METHOD_LABELS: dict[str, tuple[str, str]] = {
    "lora": ("LoRA", "DynaLoRA"),
    "vera": ("VeRA", "DynaVeRA"),
    "dora": ("DoRA", "DynaDoRA"),
    "full": ("Full FT", "Dynamic full FT"),
    "bitfit": ("BitFit", "Dynamic BitFit"),
    "dvora": ("DVoRA", "DynaDVoRA"),
    "hydra": ("Hydra", "DynaHydra"),
    "dylora": ("DyLoRA", "Dynamic DyLoRA"),
    "adalora": ("AdaLoRA", "Dynamic AdaLoRA"),
}
_MEMORY_KINDS: dict[str, str] = {"cpu_peak_rss": "CPU RSS", "cuda_max_allocated": "CUDA alloc"}
_SPLIT_SHORT: dict[str, str] = {"test": "test", "validation": "val"}
_MISSING = "n/a"
# config.json keys that say how a run was kept or reported, not what it trained (resolved_dynamic:
# the same settings as metrics.json's "dynamic", with the run's seed)
BOOKKEEPING = frozenset({
    "output_dir", "overwrite", "resume", "quiet", "save_every", "keep_checkpoints", "model_path",
    "resolved_device", "num_processes", "eval_every", "seed", "task", "device", "glue_dir", "resolved_dynamic",
    "report_to", "logging_steps", "push_to_hub", "hub_model_id",
})  # fmt: skip


def load_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run folder's ``metrics.json``.

    Args:
        run_dir: Folder written by ``dynalora train``.

    Returns:
        The ``metrics.json`` object plus ``"run_dir"`` (the folder, as a string).

    Raises:
        UsageError: If the folder or its ``metrics.json`` is missing, not JSON, not an object,
            or has no ``"method"``.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UsageError(f"run dir not found: {folder}")
    path = folder / "metrics.json"
    if not path.is_file():
        raise UsageError(f"not a finished run (no metrics.json): {folder}")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(metrics, dict) or "method" not in metrics:
        raise UsageError(f"{path}: expected a JSON object with a 'method' key")
    return {**metrics, "run_dir": str(folder)}


def run_label(metrics: Mapping[str, Any]) -> str:
    """Name a run for tables and legends.

    ``"LoRA"`` for plain LoRA, ``"DynaLoRA (forward/discounted_stochastic, k=16)"`` for dynamic
    LoRA; likewise ``VeRA``/``DynaVeRA``, ``DoRA``/``DynaDoRA``, ``Full FT``/``Dynamic full FT``,
    ``BitFit``/``Dynamic BitFit``. The parenthesis lists the dynamic config's ``measure`` and
    ``allocator`` (joined by ``/``) and the budget: ``p`` for threshold, else ``k`` as "active of
    all modules" when the run recorded both, whichever are present; then ``cap=`` with the memory
    cap, and its mode unless it is ``exclude``.

    Args:
        metrics: A run's ``metrics.json`` content.

    Returns:
        The label.
    """
    method = str(metrics.get("method") or "unknown")
    static, dynamic_prefix = _METHOD_LABELS.get(method, (method, f"Dynamic {method}"))
    dynamic = metrics.get("dynamic")
    if not dynamic:
        return static
    parts = []
    strategy = "/".join(str(dynamic[key]) for key in ("measure", "allocator") if dynamic.get(key) is not None)
    if strategy:
        parts.append(strategy)
    if dynamic.get("allocator") == "cutoff" and dynamic.get("budget") is not None:
        parts.append(f"budget={dynamic['budget']:g}")
    elif dynamic.get("allocator") == "threshold" and dynamic.get("threshold") is not None:
        parts.append(f"p={dynamic['threshold']}")
    elif dynamic.get("k_modules") is not None and metrics.get("num_modules"):
        parts.append(f"k={dynamic['k_modules']}/{metrics['num_modules']}")
    elif dynamic.get("k") is not None:
        parts.append(f"k={dynamic['k']:.3g}" if isinstance(dynamic["k"], float) else f"k={dynamic['k']}")
    if dynamic.get("memory_cap") is not None:  # any allocator with cap_mode recompute; cutoff with exclude
        mode = dynamic.get("cap_mode") or "exclude"
        parts.append(f"cap={dynamic['memory_cap']:g}" + (f" {mode}" if mode != "exclude" else ""))
    return f"{dynamic_prefix} ({', '.join(parts)})" if parts else dynamic_prefix


def main_result(metrics: Mapping[str, Any]) -> tuple[str | None, str | None, float | None]:
    """The run's main metric, from the test split or, failing that, validation.

    Args:
        metrics: A run's ``metrics.json`` content.

    Returns:
        ``(metric name, split, value)``; split and value are None if neither split has a finite
        value for the main metric.
    """
    name = metrics.get("main_metric")
    if name is None:
        return None, None, None
    for split in ("test", "validation"):
        value = _number((metrics.get(split) or {}).get(name))
        if value is not None:
            if split == "validation" and metrics.get("test"):
                logger.warning("%s: test results lack %r; using validation", metrics.get("run_dir"), name)
            return name, split, value
    return name, None, None


def compare_table(runs: Sequence[Mapping[str, Any]], *, fmt: TableFormat = "markdown") -> str:
    """One row per run: main metric, parameter counts, speed and memory.

    Columns: run label (and task, when runs span several), the main metric on test (validation
    when a run has no test result; the split is in the header when all rows share it, else in
    the cell), trainable parameters, mean active trainable parameters (and their share of the
    trainable ones), train time (s), median step time (ms) and peak memory (MiB; its kind in the
    header when shared, else in the cell). Missing values read ``n/a``.

    Args:
        runs: ``metrics.json`` contents, e.g. from :func:`load_run`.
        fmt: ``"markdown"`` (pipe table) or ``"text"`` (space-aligned columns).

    Returns:
        The table, without a trailing newline.

    Raises:
        ValueError: If ``fmt`` is not one of :data:`FORMATS`.
    """
    _check_format(fmt)
    results = [main_result(run) for run in runs]
    metric_names = {name for name, _, _ in results}
    splits = {split for _, split, value in results if value is not None}
    kinds = {run.get("peak_memory_kind") for run in runs if _number(run.get("peak_memory_bytes")) is not None}
    tasks = {run.get("task") for run in runs}
    one_metric = len(metric_names) == 1
    one_split = len(splits) <= 1
    one_kind = len(kinds) <= 1

    only_name = next(iter(metric_names)) if one_metric else None
    metric_header = str(only_name) if only_name is not None else "main metric"
    if one_split and splits:
        metric_header += f" ({next(iter(splits))})"
    memory_header = "Peak memory (MiB"
    if one_kind and kinds:
        memory_header += f", {_memory_kind(next(iter(kinds)))}"
    memory_header += ")"

    header = ["Run"] + (["Task"] if len(tasks) > 1 else [])
    header += [metric_header, "Trainable params", "Mean active params", "Train time (s)", "Median step (ms)"]
    header += [memory_header]
    rows = []
    for run, (name, split, value) in zip(runs, results, strict=True):
        notes = [] if one_metric else [str(name)]
        if not one_split and split is not None:
            notes.append(_SPLIT_SHORT.get(split, split))
        metric_cell = _fmt(value, ".4f") + (f" ({', '.join(notes)})" if notes and value is not None else "")
        trainable = _number(run.get("trainable_params"))
        active = _number(run.get("mean_active_trainable_params"))
        active_cell = _fmt(active, ",.0f")
        if active is not None and trainable:
            active_cell += f" ({100.0 * active / trainable:.1f}%)"
        memory = _number(run.get("peak_memory_bytes"))
        memory_cell = _fmt(None if memory is None else memory / 2**20, ",.1f")
        if not one_kind and memory is not None:
            memory_cell += f" ({_memory_kind(run.get('peak_memory_kind'))})"
        row = [run_label(run)] + ([str(run.get("task", _MISSING))] if len(tasks) > 1 else [])
        row += [
            metric_cell,
            _fmt(trainable, ",.0f"),
            active_cell,
            _fmt(_number(run.get("train_runtime_s")), ",.1f"),
            _fmt(_number(run.get("median_step_ms")), ".1f"),
            memory_cell,
        ]
        rows.append(row)
    n_left = 2 if len(tasks) > 1 else 1
    return render_table(header, rows, fmt=fmt, n_left=n_left)


def aggregate(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group runs that differ only by seed and summarise each group.

    Runs group by task, model, label, main metric, the split it was read from, the dynamic
    config (minus any ``seed`` key) and the run folder's ``config.json`` settings (minus seed and
    bookkeeping), so runs whose labels coincide but whose recipes differ are not averaged together.

    Args:
        runs: ``metrics.json`` contents, e.g. from :func:`load_run`.

    Returns:
        One dict per group, in first-seen order, with keys ``task``, ``model``, ``label``,
        ``main_metric``, ``split``, ``n``, ``seeds``, ``metric_mean``, ``metric_std``,
        ``step_ms_mean``, ``step_ms_std`` and ``run_dirs``. Means are over the runs that have the
        value (NaN if none); stds are sample stds (``ddof=1``), NaN for fewer than two values.

    Raises:
        UsageError: two runs of one group have the same seed (a stale run beside its replacement).
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for run in runs:
        name, split, _ = main_result(run)
        dynamic = {k: v for k, v in (run.get("dynamic") or {}).items() if k != "seed"}
        config = run.get("run_dir") and Path(run["run_dir"]) / "config.json"
        trained = json.loads(config.read_text()) if config and config.is_file() else {}
        trained = {k: v for k, v in trained.items() if k not in BOOKKEEPING}  # lr, rank, epochs, ...: not seeds
        key = (
            run.get("task"),
            run.get("model"),
            run_label(run),
            name,
            split,
            json.dumps(dynamic, sort_keys=True),
            json.dumps(trained, sort_keys=True, default=str),
        )
        groups.setdefault(key, []).append(run)

    rows = []
    for (task, model, label, name, split, _, _), members in groups.items():
        seeds = [run.get("seed") for run in members]
        twice = next((seed for seed in seeds if seed is not None and seeds.count(seed) > 1), None)
        if twice is not None:
            dirs = [str(run.get("run_dir")) for run in members if run.get("seed") == twice]
            raise UsageError(f"{dirs[0]} and {dirs[1]} are one configuration with seed {twice}, and would count as "
                             "two seeds; allowed: one run each")  # fmt: skip
        values = [main_result(run)[2] for run in members]
        step_ms = [_number(run.get("median_step_ms")) for run in members]
        metric_mean, metric_std = _mean_std([v for v in values if v is not None])
        step_mean, step_std = _mean_std([v for v in step_ms if v is not None])
        rows.append(
            {
                "task": task,
                "model": model,
                "label": label,
                "main_metric": name,
                "split": split,
                "n": len(members),
                "seeds": [run.get("seed") for run in members],
                "metric_mean": metric_mean,
                "metric_std": metric_std,
                "step_ms_mean": step_mean,
                "step_ms_std": step_std,
                "run_dirs": [run.get("run_dir") for run in members],
            }
        )
    return rows


def aggregate_table(rows: Sequence[Mapping[str, Any]], *, fmt: TableFormat = "markdown") -> str:
    """Render :func:`aggregate` rows as a table (mean ± std across seeds).

    Args:
        rows: Output of :func:`aggregate`.
        fmt: ``"markdown"`` or ``"text"``.

    Returns:
        The table, without a trailing newline.

    Raises:
        ValueError: If ``fmt`` is not one of :data:`FORMATS`.
    """
    _check_format(fmt)
    header = ["Run", "Task", "Main metric", "Seeds", "Score (mean ± std)", "Median step (ms, mean ± std)"]
    body = []
    for row in rows:
        split = _SPLIT_SHORT.get(row["split"], row["split"]) if row["split"] else None
        metric = f"{row['main_metric']} ({split})" if split else str(row["main_metric"])
        body.append(
            [
                str(row["label"]),
                str(row["task"]),
                metric,
                str(row["n"]),
                _fmt_mean_std(row["metric_mean"], row["metric_std"], ".4f"),
                _fmt_mean_std(row["step_ms_mean"], row["step_ms_std"], ".1f"),
            ]
        )
    return render_table(header, body, fmt=fmt, n_left=3)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, fmt: TableFormat, n_left: int = 1) -> str:
    """Lay out string cells as a markdown pipe table or space-aligned text.

    Args:
        header: Column titles.
        rows: Cells, one sequence per row, each as long as ``header``.
        fmt: ``"markdown"`` or ``"text"``.
        n_left: The first ``n_left`` columns are left-aligned (names); the rest right-aligned
            (numbers).

    Returns:
        The table, without a trailing newline.

    Raises:
        ValueError: If ``fmt`` is unknown or a row's length differs from the header's.
    """
    _check_format(fmt)
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, header has {len(header)}: {row}")
    if fmt == "markdown":
        lines = [
            _md_row(header),
            "|" + "|".join(":---" if i < n_left else "---:" for i in range(len(header))) + "|",
        ]
        lines += [_md_row(row) for row in rows]
        return "\n".join(lines)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i < n_left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows])


def main(argv: Sequence[str] | None = None) -> int:
    """Print a comparison table for run folders.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 when a run folder is missing or invalid (one line on stderr).
    """
    parser = argparse.ArgumentParser(prog="python -m dynalora.analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `dynalora train`")
    parser.add_argument("--format", choices=FORMATS, default="markdown", help="table format (default: markdown)")
    parser.add_argument("--aggregate", action="store_true", help="mean ± std across seeds instead of one row per run")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(run_dir) for run_dir in args.run_dirs]
        rows = aggregate(runs) if args.aggregate else None
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(aggregate_table(rows, fmt=args.format) if rows is not None else compare_table(runs, fmt=args.format))
    return 0


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for missing, non-numeric or non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: float | None, spec: str) -> str:
    return _MISSING if value is None else format(value, spec)


def _fmt_mean_std(mean: float, std: float, spec: str) -> str:
    if math.isnan(mean):
        return _MISSING
    return format(mean, spec) if math.isnan(std) else f"{mean:{spec}} ± {std:{spec}}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
    return float(arr.mean()), std


def _memory_kind(kind: Any) -> str:
    return _MEMORY_KINDS.get(kind, str(kind)) if kind else "kind unknown"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


if __name__ == "__main__":
    raise SystemExit(main())
