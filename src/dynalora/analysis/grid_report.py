"""``dynalora report DIR``: the paper's Table 1 and Figures 1-5 from a folder of run folders.

Reads what ``dynalora train`` wrote (``config.json``, ``metrics.json``, ``log.jsonl``) in every
run folder under DIR, and ``sweep.json`` when ``dynalora sweep`` made the folder. Writes
``report.md`` and one PNG per figure. Runs are grouped into *configurations*: everything they
were trained with except the task and the seed. Each figure picks the configurations it
compares by what they vary in (the number of active modules, the period, ...), and a figure
whose runs are absent is skipped with a note, not an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dynalora.analysis.plots import module_activity_figure, read_jsonl, save_figure
from dynalora.analysis.report import BOOKKEEPING, _mean_std, load_run, main_result, render_table, run_label
from dynalora.config import DynamicConfig
from dynalora.errors import UsageError

logger = logging.getLogger(__name__)

# settings that run_label already names
_IN_LABEL = frozenset({"method", "dynamic", "measure", "allocator", "k", "k_modules", "budget", "memory_cap",
                       "cap_mode", "threshold", "preset"})  # fmt: skip
_MIB = 2**20


@dataclass
class Config:
    """Runs that differ only by task and seed."""

    settings: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    @property
    def dynamic(self) -> bool:
        return bool(self.settings.get("dynamic"))

    def tasks(self) -> list[str]:
        return sorted({str(r.get("task")) for r in self.runs})

    def of_task(self, task: str) -> list[dict[str, Any]]:
        return [r for r in self.runs if str(r.get("task")) == task]

    def split(self, task: str) -> str | None:
        """The split a task's cell reads: test when any of its runs has a test score, else validation."""
        splits = {main_result(r)[1] for r in self.of_task(task)} - {None}
        return "test" if "test" in splits else next(iter(splits), None)

    def scores(self, task: str) -> list[float]:
        """The main metric of the task's runs, on one split (:meth:`split`): a run without a score on
        it is left out (and logged), never averaged in from the other split."""
        split, scores = self.split(task), []
        for run in self.of_task(task):
            _, run_split, value = main_result(run)
            if value is not None and run_split == split:
                scores.append(value)
            elif value is not None:
                logger.warning("%s: no %s score; left out of %s on %s", run.get("run_dir"), split, self.label, task)
        return scores


def is_grid(path: str | os.PathLike[str]) -> bool:
    """A folder that is not a run itself but holds finished run folders."""
    folder = Path(path)
    return folder.is_dir() and not (folder / "metrics.json").exists() and any(_run_dirs(folder))


def _run_dirs(root: Path) -> Iterable[Path]:
    for metrics in sorted(root.rglob("metrics.json")):
        if "checkpoints" not in metrics.parts:
            yield metrics.parent


def settings_of(run: Mapping[str, Any]) -> dict[str, Any]:
    """What a run trained with, as one flat mapping: ``config.json`` with the dynamic settings resolved."""
    config = run.get("config") or {"method": run.get("method"), "model": run.get("model")}
    dynamic = run.get("dynamic") or {}
    flat = {k: v for k, v in config.items() if k not in BOOKKEEPING}
    flat = {k: v for k, v in flat.items() if k not in dynamic and k != "preset"}  # resolved values below
    flat["dynamic"] = bool(dynamic)
    flat.update({k: v for k, v in dynamic.items() if k != "seed"})
    return flat


def load_grid(root: str | os.PathLike[str]) -> list[Config]:
    """Every finished run under ``root``, grouped into configurations (in first-seen order).

    A setting that every run of a task shares, but that differs between tasks (the epochs or the
    subset of a task's recipe, and the steps that follow from them), belongs to the task: it does
    not split a configuration (:func:`task_settings` lists them).
    """
    runs = []
    for folder in _grid_runs(Path(root)):
        run = load_run(folder)
        config_path = folder / "config.json"
        run["config"] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        runs.append(run)
    per_task = task_settings(runs)
    recipe = {k for settings in per_task.values() for k in settings}
    shared = _shared_settings(runs)
    groups: dict[str, Config] = {}
    for run in runs:
        flat = settings_of(run)
        settings = {k: v for k, v in (shared[flat["dynamic"]] | flat).items() if k not in recipe}
        key = json.dumps(settings, sort_keys=True, default=str)
        groups.setdefault(key, Config(settings)).runs.append(run)
    configs = list(groups.values())
    for config in configs:  # a stale run beside its replacement would count as a second seed
        seen: dict[tuple[str, Any], str] = {}
        for run in config.runs:
            key = (str(run.get("task")), run["config"].get("seed", run.get("seed")))
            if key[1] is None:  # a run that recorded no seed: nothing to compare
                continue
            if key in seen:
                raise UsageError(
                    f"{seen[key]} and {run['run_dir']} are the same configuration, task and seed, and would count "
                    "as two seeds; allowed: one run each (move or delete the stale one)"
                )
            seen[key] = run["run_dir"]
    _name(configs)
    return configs


def _grid_runs(root: Path) -> list[Path]:
    """The finished run folders under ``root``: those ``sweep.json`` lists, when a sweep made it (a
    run of an earlier grid, left beside it, is not a result of this one)."""
    found = list(_run_dirs(root))
    index = root / "sweep.json"
    if not index.is_file():
        return found
    names = {r["name"] for r in json.loads(index.read_text()).get("runs", [])}
    kept = [f for f in found if f.relative_to(root).as_posix() in names]
    if len(kept) < len(found):
        left = [f.relative_to(root).as_posix() for f in found if f not in kept]
        logger.warning("%d finished runs under %s are not in its sweep.json, left out: %s", len(left), root,
                       ", ".join(left[:5]) + (", ..." if len(left) > 5 else ""))  # fmt: skip
    return kept


def _shared_settings(runs: Sequence[Mapping[str, Any]]) -> dict[bool, dict[str, Any]]:
    """Settings that every run recording them shares, with that one value, among the static and
    among the dynamic runs. A run written before a flag existed lacks it, and ran as its default
    did; when every run that records the flag has one value, the older runs take it, so that a flag
    added mid-grid does not split a configuration."""
    values: dict[bool, dict[str, set[str]]] = {False: {}, True: {}}
    for run in runs:
        flat = settings_of(run)
        for key, value in flat.items():
            values[flat["dynamic"]].setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))
    return {flag: {k: json.loads(next(iter(v))) for k, v in seen.items() if len(v) == 1}
            for flag, seen in values.items()}  # fmt: skip


def task_settings(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{task: {setting: value}}`` for the settings fixed per task that differ between tasks."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        flat = settings_of(run) | {"num_steps": run.get("num_steps")}
        by_task.setdefault(str(run.get("task")), []).append(flat)
    if len(by_task) < 2:
        return {}
    keys = {k for rows in by_task.values() for row in rows for k in row} - _WHAT_TRAINS
    fixed = {}
    for key in sorted(keys):
        values = {t: {json.dumps(r.get(key), default=str) for r in rows} for t, rows in by_task.items()}
        if all(len(v) == 1 for v in values.values()) and len({next(iter(v)) for v in values.values()}) > 1:
            fixed[key] = {t: json.loads(next(iter(v))) for t, v in values.items()}
    return {t: {k: fixed[k][t] for k in fixed} for t in sorted(by_task)}


def _name(configs: list[Config]) -> None:
    """``run_label`` plus every other setting that differs from its most common value among the
    configurations of the same method (dynamic settings: among the dynamic ones)."""
    for config in configs:
        peers = [c for c in configs if c.get("method") == config.get("method")]
        extras = []
        for key in sorted(set(config.settings) - _IN_LABEL):
            if key in _DYNAMIC_KEYS and not config.dynamic:
                continue
            pool = [c for c in peers if c.dynamic] if key in _DYNAMIC_KEYS else peers
            counts = Counter(json.dumps(c.settings.get(key), default=str) for c in pool for _ in c.runs)
            if len(counts) > 1 and json.dumps(config.settings.get(key), default=str) != counts.most_common(1)[0][0]:
                extras.append(f"{key}={config.settings.get(key)}")
        base = run_label(config.runs[0])
        config.label = f"{base} [{', '.join(extras)}]" if extras else base


# the dynamic settings (DynamicConfig's fields) and the module count they resolve to
_DYNAMIC_KEYS = frozenset({f.name for f in fields(DynamicConfig)} - {"seed"} | {"k_modules"})
# what a configuration's label names, never a task's recipe, even when each task ran with one value of it
# (a model or targets per task are a recipe, listed in the report's table of them)
_WHAT_TRAINS = _DYNAMIC_KEYS | {"method", "dynamic", "preset"}


def _distance(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = ()) -> int:
    skip = set(ignore)
    keys = (set(a) | set(b)) - skip
    return sum(json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str) for k in keys)


def _reference(configs: Sequence[Config]) -> dict[str, Any]:
    """The most common value of each setting over the runs: what "the other settings equal" means."""
    keys = {k for c in configs for k in c.settings}
    ref = {}
    for key in keys:
        counts = Counter(json.dumps(c.settings.get(key), default=str) for c in configs for _ in c.runs)
        ref[key] = json.loads(counts.most_common(1)[0][0])
    return ref


def _closest(candidates: Sequence[Config], ref: Mapping[str, Any], ignore: Iterable[str] = ()) -> Config | None:
    ignore = tuple(ignore)
    if not candidates:
        return None
    return min(candidates, key=lambda c: (_distance(c.settings, ref, ignore), -len(c.runs), c.label))


def _families(configs: Sequence[Config], vary: Sequence[str]) -> list[list[Config]]:
    """Configurations grouped by every setting but ``vary``."""
    groups: dict[str, list[Config]] = {}
    for c in configs:
        rest = {k: v for k, v in c.settings.items() if k not in vary}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(c)
    return list(groups.values())


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _errorbar(ax: Any, xs: Sequence[float], stats: Sequence[tuple[float, float]], **kw: Any) -> None:
    """Means ± std in percent; one seed has no bar."""
    means = [100 * m for m, _ in stats]
    errors = [100 * s if math.isfinite(s) else 0.0 for _, s in stats]
    ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, **kw)


def _metric_name(configs: Sequence[Config]) -> str:
    names = Counter(str(r.get("main_metric")) for c in configs for r in c.runs)
    return names.most_common(1)[0][0] if names else "metric"


# ------------------------------------------------------------------------------------------ Table 1
def table1(configs: Sequence[Config], *, fmt: str = "markdown") -> str:
    """Configurations x tasks: the main metric's mean ± std over seeds (test; validation if no test)."""
    tasks = sorted({t for c in configs for t in c.tasks()})
    header = ["Configuration", "Trainable params", "Mean active params"] + tasks + ["Mean"]
    rows = []
    for c in sorted(configs, key=lambda c: (str(c.get("method")), c.dynamic, c.label)):
        trainable = np.mean([r.get("trainable_params") or 0 for r in c.runs])
        active = [r.get("mean_active_trainable_params") for r in c.runs if r.get("mean_active_trainable_params")]
        cells = [c.label, f"{trainable:,.0f}", f"{np.mean(active):,.0f} ({100 * np.mean(active) / trainable:.0f}%)"
                 if active and trainable else "n/a"]  # fmt: skip
        means = []
        for task in tasks:
            scores = c.scores(task)
            mean, std = _mean_std(scores)
            means.append(mean)
            spread = f" ± {100 * std:.1f}" if math.isfinite(std) else ""
            where = ", validation" if c.split(task) == "validation" else ""
            cells.append(f"{100 * mean:.1f}{spread} ({len(scores)}{where})" if scores else "")
        cells.append(f"{100 * np.mean(means):.1f}" if all(math.isfinite(m) for m in means) else "")
        rows.append(cells)
    return render_table(header, rows, fmt=fmt, n_left=1)


# ------------------------------------------------------------------------------------------ figures
@dataclass
class Made:
    """A figure's file and what it shows, or why it was skipped."""

    title: str
    file: str | None
    text: str
    figure: Figure | None = None


def _task_axes(tasks: Sequence[str], width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Any]]:
    n = len(tasks)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _title(fig: Figure, text: str) -> None:
    width_in = fig.get_size_inches()[0]
    fig.suptitle("\n".join(textwrap.wrap(text, width=max(30, int(width_in * 11)))), fontsize=11)


def figure_loss(configs: Sequence[Config], out: Path) -> Made:
    """Figure 1: validation loss over steps, LoRA against DynaLoRA with forward and gradient importance."""
    title = "Figure 1: validation loss over training"
    lora = [c for c in configs if c.get("method") == "lora"]
    ref = _reference([c for c in lora if c.dynamic] or lora)
    lines = [("LoRA", _closest([c for c in lora if not c.dynamic], ref, _DYNAMIC_KEYS | {"dynamic"}))]
    for measure in ("forward", "gradient"):
        dyn = [c for c in lora if c.dynamic and c.get("measure") == measure]
        lines.append((f"DynaLoRA, {measure} importance", _closest(dyn, ref, {"measure"})))
    present = [(name, c) for name, c in lines if c is not None]
    if len(present) < 2 or all(not c.dynamic for _, c in present):
        return Made(title, None, "skipped: needs plain LoRA runs and dynamic LoRA runs with `forward` or "
                    "`gradient` importance, each with validation records in `log.jsonl`.")  # fmt: skip
    # tasks where a dynamic line has something to be compared with
    tasks = sorted(t for t in {t for _, c in present for t in c.tasks()} if sum(t in c.tasks() for _, c in present) > 1)
    fig, axes = _task_axes(tasks)
    for ax, task in zip(axes, tasks, strict=True):
        for i, (name, c) in enumerate(present):
            curves = [_val_loss(r) for r in c.of_task(task)]
            curves = [cv for cv in curves if cv]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(cv) for cv in curves)))
            values = np.array([[cv[s] for s in steps] for cv in curves])
            mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
            ax.plot(steps, mean, "o-", ms=3, color=f"C{i}", label=f"{name} ({_seeds(len(curves))})")
            if len(curves) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.15)
        ax.set_title(task)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _title(fig, f"{title} (mean over seeds, band: ±1 std)")
    save_figure(fig, out / "fig1_validation_loss.png")
    used = "; ".join(f"{name}: {c.label}" for name, c in present)
    return Made(title, "fig1_validation_loss.png", f"Configurations: {used}.", fig)


def _val_loss(run: Mapping[str, Any]) -> dict[int, float]:
    path = Path(run["run_dir"]) / "log.jsonl"
    if not path.is_file():
        return {}
    return {
        int(r["step"]): float(r["loss"])
        for r in read_jsonl(path)
        if r.get("type") == "eval" and r.get("split") == "validation" and r.get("loss") is not None
    }


def figure_memory(configs: Sequence[Config], out: Path) -> Made:
    """Figure 2: counted training memory (bars) and the metric (line) against the active modules."""
    title = "Figure 2: memory and quality against the number of active modules"
    by_k = [c for c in configs if c.get("method") == "lora" and c.dynamic and c.get("allocator") not in
            ("cutoff", "threshold") and all((r.get("memory") or {}) for r in c.runs)]  # fmt: skip
    families = [f for f in _families(by_k, ("k", "k_modules")) if len({c.get("k_modules") for c in f}) > 1]
    if not families:
        return Made(title, None, "skipped: needs dynamic LoRA runs (allocator other than cutoff or threshold) "
                    "at two or more numbers of active modules, with counted memory in `metrics.json`.")  # fmt: skip
    ref = _reference(by_k)

    def rank(f: list[Config]) -> tuple[int, int, int]:  # most numbers of modules, then most runs, then typical
        return (
            len({c.get("k_modules") for c in f}),
            sum(len(c.runs) for c in f),
            -_distance(f[0].settings, ref, ("k", "k_modules")),
        )

    family = max(families, key=rank)
    family = sorted(family, key=lambda c: c.get("k_modules"))
    plain = _closest([c for c in configs if c.get("method") == "lora" and not c.dynamic and
                      all((r.get("memory") or {}) for r in c.runs)], family[0].settings,
                     _DYNAMIC_KEYS | {"dynamic"})  # fmt: skip
    points = [(int(c.get("k_modules")), c) for c in family]
    if plain is not None:
        n_modules = next((r.get("num_modules") for c in family for r in c.runs if r.get("num_modules")), None)
        if n_modules:
            points.append((int(n_modules), plain))
    tasks = sorted({t for c in family for t in c.tasks()})  # where the family ran, not only the baseline
    metric = _metric_name([c for _, c in points])
    fig, axes = _task_axes(tasks, width=4.6)
    kinds = (("saved_activations", "saved activations"), ("gradients", "gradients"),
             ("optimizer_state", "optimizer state"))  # fmt: skip
    for ax, task in zip(axes, tasks, strict=True):
        xs = np.arange(len(points))
        bottom = np.zeros(len(points))
        for j, (kind, name) in enumerate(kinds):
            # NaN: the configuration has no run on this task, so no bar (not a bar of 0 MiB)
            heights = np.array([np.mean([r["memory"][f"peak_{kind}"] for r in c.of_task(task)] or [np.nan]) / _MIB
                                for _, c in points])  # fmt: skip
            ax.bar(xs, heights, bottom=bottom, color=f"C{j}", alpha=0.6, label=name)
            bottom += heights
        cuda = [
            np.mean(
                [r["peak_memory_bytes"] for r in c.of_task(task) if r.get("peak_memory_kind") == "cuda_max_allocated"]
                or [np.nan]
            )
            / _MIB
            for _, c in points
        ]
        if any(math.isfinite(v) for v in cuda):
            ax.plot(xs, cuda, "k_", ms=14, mew=2, label="CUDA peak allocated")
        ax.set_xticks(xs, labels=[f"{k}" + (" (LoRA)" if not c.dynamic else "") for k, c in points])
        ax.set_xlabel("active modules")
        ax.set_ylabel("peak counted training memory (MiB)")
        ax.set_title(task)
        twin = ax.twinx()
        stats = [_mean_std(c.scores(task)) for _, c in points]
        _errorbar(twin, xs, stats, color="k", label=metric)
        twin.set_ylabel(f"{metric} (%)")
        handles = ax.get_legend_handles_labels()
        twin_handles = twin.get_legend_handles_labels()
        ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=7, loc="lower right")
    _title(fig, f"{title} (bars: the peak of each kind over the run, stacked, mean over seeds; line: mean ± std)")
    save_figure(fig, out / "fig2_memory.png")
    return Made(title, "fig2_memory.png", f"Configurations: {'; '.join(c.label for _, c in points)}.", fig)


def figure_low_k(configs: Sequence[Config], out: Path) -> Made:
    """Figure 3: allocators at 1-4 active modules, per task."""
    title = "Figure 3: allocators at few active modules"
    low = [c for c in configs if c.get("method") == "lora" and c.dynamic and (c.get("k_modules") or 99) <= 4
           and c.get("allocator") not in ("cutoff", "threshold")]  # fmt: skip
    if not low:
        return Made(title, None, "skipped: needs dynamic LoRA runs at 1-4 active modules.")
    ref = _reference(low)
    lines: dict[str, list[list[Config]]] = {}
    for fam in _families(low, ("k", "k_modules")):
        c = fam[0]
        name = "random" if c.get("allocator") == "random" else f"{c.get('allocator')}, {c.get('measure')}"
        lines.setdefault(name, []).append(fam)
    chosen = {}
    for name, fams in lines.items():  # the family closest to the others' settings
        best = min(fams, key=lambda f: (_distance(f[0].settings, ref, _DYNAMIC_KEYS - {"period", "optimizer"}),
                                        -len(f)))  # fmt: skip
        chosen[name] = sorted(best, key=lambda c: c.get("k_modules"))
    tasks = sorted({t for f in chosen.values() for c in f for t in c.tasks()})
    metric = _metric_name(low)
    fig, axes = _task_axes(tasks)
    for ax, task in zip(axes, tasks, strict=True):
        for i, (name, fam) in enumerate(sorted(chosen.items())):
            ks = [int(c.get("k_modules")) for c in fam if c.scores(task)]
            stats = [_mean_std(c.scores(task)) for c in fam if c.scores(task)]
            if ks:
                _errorbar(ax, ks, stats, color=f"C{i}", label=name)
        ax.set_title(task)
        ax.set_xlabel("active modules k")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_xticks(sorted({int(c.get("k_modules")) for f in chosen.values() for c in f}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _title(fig, f"{title} (allocator, importance measure; mean ± std over seeds)")
    save_figure(fig, out / "fig3_allocators.png")
    text = "; ".join(f"{name}: {', '.join(c.label for c in fam)}" for name, fam in sorted(chosen.items()))
    return Made(title, "fig3_allocators.png", f"Configurations: {text}.", fig)


def figure_period(configs: Sequence[Config], out: Path) -> Made:
    """Figure 4: the effect of the reallocation period."""
    title = "Figure 4: reallocation period"
    dyn = [c for c in configs if c.dynamic and c.get("schedule", "periodic") == "periodic"]
    families = [f for f in _families(dyn, ("period",)) if len({c.get("period") for c in f}) > 1]
    if not families:
        return Made(title, None, "skipped: needs dynamic runs that differ only in `period`.")
    family = sorted(max(families, key=lambda f: (len(f), sum(len(c.runs) for c in f))), key=lambda c: c.get("period"))
    tasks = sorted({t for c in family for t in c.tasks()})
    metric = _metric_name(family)
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    periods = [int(c.get("period")) for c in family]
    for i, task in enumerate(tasks):
        stats = [_mean_std(c.scores(task)) for c in family]
        _errorbar(ax, periods, stats, color=f"C{i}", label=task)
    lengths = {r.get("num_steps") for c in family for r in c.runs}
    steps = next(iter(lengths)) if len(lengths) == 1 else None  # tasks of other lengths: no one count
    ax.set_xscale("log")
    labels = [f"{p}\n({steps // p}×)" if steps else str(p) for p in periods]
    ax.set_xticks(periods, labels=labels)
    ax.minorticks_off()
    ax.set_xlabel("period (optimizer steps; reallocations per run)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _title(fig, f"{title}: {family[0].label.split(' [')[0]}")
    save_figure(fig, out / "fig4_period.png")
    return Made(title, "fig4_period.png", f"Configurations: {'; '.join(c.label for c in family)}.", fig)


def figure_activity(configs: Sequence[Config], out: Path) -> Made:
    """Figure 5: how often each module trained, every linear layer of the blocks targeted."""
    title = "Figure 5: active steps per module, all linear layers"
    wide = [c for c in configs if c.dynamic and c.get("targets") == "all-linear"
            and any(r.get("module_active_steps") for r in c.runs)]  # fmt: skip
    if not wide:
        return Made(title, None, "skipped: needs a dynamic run with `targets: all-linear`.")
    c = _closest(wide, _reference(configs), ())
    task = c.tasks()[0]
    runs = [r for r in c.of_task(task) if r.get("module_active_steps")]
    names = runs[0]["module_active_steps"].keys()
    mean = {n: float(np.mean([r["module_active_steps"].get(n, 0) for r in runs])) for n in names}
    steps = int(np.mean([r["num_steps"] for r in runs]))
    fig = module_activity_figure(mean, total_steps=steps, title=f"{task}: share of {steps} steps each module trained "
                                 f"(mean of {_seeds(len(runs))})")  # fmt: skip
    save_figure(fig, out / "fig5_module_activity.png")
    return Made(title, "fig5_module_activity.png", f"Configuration: {c.label}, task {task}.", fig)


FIGURES: tuple[Callable[[Sequence[Config], Path], Made], ...] = (
    figure_loss, figure_memory, figure_low_k, figure_period, figure_activity
)  # fmt: skip


def write_report(root: str | os.PathLike[str], report_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``report.md`` and the figures for the runs under ``root``; returns the report's path.

    Raises:
        UsageError: ``root`` holds no finished run.
    """
    root = Path(root)
    configs = load_grid(root)
    if not configs:
        raise UsageError(f"{root}: no finished run folders (metrics.json) under it")
    out = Path(report_dir) if report_dir else root
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((root / "sweep.json").read_text()) if (root / "sweep.json").is_file() else {}
    n_runs = sum(len(c.runs) for c in configs)
    lines = [f"# {index.get('name') or root.name}: report", ""]
    if index.get("description"):
        lines += [index["description"].strip(), ""]
    pending = [r["name"] for r in index.get("runs", []) if r.get("status") != "done"]
    lines.append(f"{n_runs} finished runs in {len(configs)} configurations under `{root}`"
                 + (f"; {len(pending)} of the grid not finished." if pending else "."))  # fmt: skip
    per_task = task_settings([r for c in configs for r in c.runs])
    if per_task:
        keys = list(next(iter(per_task.values())))
        lines += ["", "Settings of each task's recipe (shared by every run of the task):", "",
                  render_table(["Task", *keys], [[t, *(str(v[k]) for k in keys)] for t, v in per_task.items()],
                               fmt="markdown")]  # fmt: skip
    lines += ["", "Generated by `dynalora report`. Scores are the main metric in percent, mean ± std over seeds "
              "(the number of seeds in brackets), on test where the task has test labels, else validation.", "",
              "## Table 1", "", table1(configs), ""]  # fmt: skip
    for made in (make(configs, out) for make in FIGURES):
        lines += [f"## {made.title}", ""]
        if made.file:
            lines += [f"![{made.title}]({made.file})", ""]
        lines += [made.text, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
