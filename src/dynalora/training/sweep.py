"""``dynalora sweep``: a YAML grid of ``dynalora train`` runs, one folder each, run one at a time.

The config::

    name: embedded
    description: free text for the report (optional)
    base:            # any `dynalora train` flag, underscores or dashes
      task: rotten_tomatoes
    grid:            # the cross product of these lists; or a list of such mappings, whose runs are joined
      method: [lora, vera]
      dynamic: [true, false]
      seed: [0, 1, 2]

A run keeps only the settings that apply to it: a plain run drops the dynamic settings (``k``,
``allocator``, ...) and a method drops the flags of other methods, so the grid does not train the
same run twice. Runs are told apart by what they resolve to (``TrainArgs`` with every default
filled in), not by how the grid spelled them.

A run folder with ``metrics.json`` is finished and skipped; any other is started again with
``--resume`` (from its newest checkpoint, or from step 0 when it has none). Each run is a
``python -m dynalora train`` subprocess: a failure or a crash stays in its folder
(``sweep.log``) and the grid goes on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from queue import Queue
from typing import Any

import yaml
from tqdm.auto import tqdm

from dynalora.config import DynamicConfig
from dynalora.errors import UsageError
from dynalora.methods import REGISTRY
from dynalora.training.args import METHOD_ONLY

logger = logging.getLogger(__name__)

SECTIONS = ("name", "description", "base", "grid")
# set by the sweep for every run, never by the config
OWNED = ("output_dir", "overwrite", "resume", "quiet")
# applies to one method only: dropped from the runs of the others
LOG_NAME = "sweep.log"


def _train_fields() -> dict[str, Any]:
    from dynalora.training import TrainArgs

    return {f.name: f for f in fields(TrainArgs)}


def dynamic_only() -> frozenset[str]:
    """``TrainArgs`` fields that mean nothing to a plain run: the dynamic settings and the preset."""
    train = _train_fields()
    return frozenset({f.name for f in fields(DynamicConfig)} - {"seed"}) & train.keys() | {"preset"}


@dataclass(frozen=True)
class Run:
    """One run of a grid.

    Attributes:
        name: its folder under the sweep's output folder.
        flags: the ``TrainArgs`` fields the config set for it (base and grid point, minus what
            does not apply), as YAML gave them.
        args: the resolved ``TrainArgs`` (output folder included).
    """

    name: str
    flags: Mapping[str, Any]
    args: Any

    def argv(self) -> list[str]:
        """``dynalora train`` flags, without the ones the sweep sets."""
        return to_argv(self.flags)

    def identity(self) -> str:
        """What the run resolves to: two grid points with the same identity are the same run."""
        only_dynamic = dynamic_only()  # as given ("1/3" or "0.333..."): the resolved config stands for them
        values = {k: v for k, v in self.args.to_dict().items() if k not in OWNED and k not in only_dynamic}
        if self.args.dynamic:
            values["dynamic_config"] = self.args.dynamic_config().to_dict()
        return json.dumps(values, sort_keys=True, default=str)


def to_argv(flags: Mapping[str, Any]) -> list[str]:
    """``{"k": "1/3", "dynamic": False}`` -> ``["--k", "1/3", "--no-dynamic"]``."""
    argv = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a sweep config; every problem is one line naming the key.

    Returns:
        ``{"name", "description", "base", "grids"}``, the keys normalised to ``TrainArgs``
        field names and ``grids`` always a list of mappings of non-empty lists.

    Raises:
        UsageError: the file is missing or not YAML, or a key or value is not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping with the keys {', '.join(SECTIONS)}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    if "grid" not in raw:
        raise UsageError(f"{path}: no 'grid'; allowed: a mapping of flag -> list of values, or a list of them")
    base = _flags(path, "base", raw.get("base") or {})
    grids = raw["grid"] if isinstance(raw["grid"], list) else [raw["grid"]]
    if not grids:
        raise UsageError(f"{path}: grid is empty; allowed: a mapping of flag -> list of values, or a list of them")
    checked = []
    for i, grid in enumerate(grids):
        where = "grid" if len(grids) == 1 and not isinstance(raw["grid"], list) else f"grid[{i}]"
        grid = _flags(path, where, grid)
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UsageError(f"{path}: {where}.{key} = {values!r}; allowed: a non-empty list of values")
            if key in base:
                raise UsageError(f"{path}: {key!r} is in both base and {where}; allowed: one of them")
        checked.append(grid)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{path}: name = {name!r}; allowed: a non-empty string")
    return {"name": name, "description": str(raw.get("description") or ""), "base": base, "grids": checked}


def _flags(path: Path, where: str, section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise UsageError(f"{path}: {where} must be a mapping of `dynalora train` flags, got {type(section).__name__}")
    from dynalora.training.args import field_name, refuse_hf_flag

    out = {}
    for key, value in section.items():
        name = field_name(key) or str(key)  # HF's names too: learning_rate for lr
        if name in OWNED:
            raise UsageError(f"{path}: {where}.{key}: the sweep sets it for each run; allowed: any other train flag")
        if field_name(key) is None:
            why = refuse_hf_flag(str(key)) or "not a `dynalora train` flag; see `dynalora train --help`"
            raise UsageError(f"{path}: {where}.{key}: {why}")
        if name == "lr_scheduler_kwargs":  # a mapping in YAML, JSON on the command line
            value = [json.dumps(v) if isinstance(v, dict) else v for v in value] if isinstance(value, list) else (
                json.dumps(value) if isinstance(value, dict) else value)  # fmt: skip
        if where == "base" and isinstance(value, list):  # one flag, one value: every run would get the list
            raise UsageError(f"{path}: base.{key} = {value!r}: base gives every run one value; allowed: one value "
                             "here, or the list under grid")  # fmt: skip
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not (v is None or isinstance(v, (str, int, float, bool))):
                raise UsageError(f"{path}: {where}.{key} = {v!r}; allowed: a string, number or boolean")
        out[name] = value
    return out


def expand(config: Mapping[str, Any], output_dir: str | os.PathLike[str]) -> list[Run]:
    """Every run of the grid, in order, each checked as ``dynalora train`` would check it.

    Raises:
        UsageError: a run's flags are not valid (the message names the run and the flag).
    """
    from dynalora.training import TrainArgs
    from dynalora.training.args import TrainParser

    class Raising(TrainParser):  # a bad run of the grid names itself: the caller adds the run
        def error(self, message: str) -> Any:
            raise UsageError(self.explain(message))

    parser = Raising(prog="dynalora train", add_help=False)
    only_dynamic = dynamic_only()
    points = []
    for grid in config["grids"]:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            points.append({**config["base"], **dict(zip(keys, values, strict=True))})
    varying = _varying(config)
    runs, seen, kept = [], set(), set()
    default_method = _train_fields()["method"].default
    for point in points:
        flags = {k: v for k, v in point.items() if v is not None}
        method = flags.get("method", default_method)
        flags = {k: v for k, v in flags.items() if k not in METHOD_ONLY or method in METHOD_ONLY[k]}
        # a static run (dynamic false, or a method that is static by default) drops the grid's dynamic keys,
        # which `dynalora train` would refuse for it
        dynamic_by_default = getattr(REGISTRY.get(method), "dynamic", False)  # an unknown method: refused below
        static = flags.get("dynamic") is False or ("dynamic" not in flags and not dynamic_by_default)
        if static:
            dropped = only_dynamic | set(getattr(REGISTRY.get(method), "dynamic_options", ()))
            flags = {k: v for k, v in flags.items() if k not in dropped}
        kept |= flags.keys()
        name = run_name(flags, varying)
        args = _parse(parser, TrainArgs, flags, Path(output_dir) / name, name)
        run = Run(name, flags, args)
        if run.identity() in seen:
            continue
        seen.add(run.identity())
        runs.append(run)
    given = {k for point in points for k, v in point.items() if v is not None}
    unread = sorted(given - kept)
    if unread:  # a key that every run drops (a method's option, a dynamic setting of static runs) does nothing
        where = "base" if unread[0] in config["base"] else "grid"
        raise UsageError(f"{where}.{unread[0]} is read by none of the sweep's runs (each drops the options its "
                         "method or a static run does not read); drop it")  # fmt: skip
    runs.sort(key=lambda r: r.args.seed)  # stable: every configuration's first seed first, so half a grid reports
    names = [r.name for r in runs]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:  # two different runs, same varying values: a base key differs between grids
        raise UsageError(f"two different runs would share the folder {clash!r}; put the key they differ in in grid")
    return runs


def _varying(config: Mapping[str, Any]) -> list[str]:
    """Grid keys in config order (first grid first) that take more than one value over all grids."""
    seen: dict[str, set[str]] = {}
    for grid in config["grids"]:
        for key, values in grid.items():
            seen.setdefault(key, set()).update(json.dumps(v) for v in values)
    present = [set(g) for g in config["grids"]]
    return [k for k, v in seen.items() if len(v) > 1 or any(k not in p for p in present)]


def run_name(flags: Mapping[str, Any], varying: Sequence[str]) -> str:
    """``method=lora,dynamic=true,k=1_3,seed=0``: the grid keys whose value tells runs apart."""
    parts = []
    for key in varying:
        if key in flags:
            value = flags[key]
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            parts.append(f"{key}={text.replace('/', '_').replace(' ', '')}")
    return ",".join(parts) or "run"


def _parse(parser: argparse.ArgumentParser, train_args: type, flags: Mapping[str, Any], out: Any, name: str) -> Any:
    try:
        ns = parser.parse_args(to_argv(flags) + ["--output-dir", str(out)])
        return train_args(**vars(ns))
    except UsageError as err:
        raise UsageError(f"run {name}: {err}") from None


# ----------------------------------------------------------------------------------------------- running
def status(run: Run, root: Path) -> str:
    """``done`` (metrics.json), ``resume`` (a folder with something in it) or ``new``.

    Raises:
        UsageError: a finished run in the folder was trained with other settings.
    """
    from dynalora.training.resume import RESUME_FREE

    folder = root / run.name
    if (folder / "metrics.json").is_file():
        config_path = folder / "config.json"
        began = json.loads(config_path.read_text()) if config_path.is_file() else {}
        for key, value in run.args.to_dict().items():
            if key not in RESUME_FREE and key not in OWNED and began.get(key, value) != value:
                raise UsageError(
                    f"{folder} holds a finished run with --{key.replace('_', '-')} {began.get(key)!r}, the grid "
                    f"says {value!r}; allowed: the same settings, or --overwrite to train it again"
                )
        return "done"
    return "resume" if folder.is_dir() and any(folder.iterdir()) else "new"


@dataclass
class Outcome:
    run: Run
    returncode: int
    seconds: float


class Sweep:
    """Run a grid's runs as subprocesses, ``jobs`` at a time, writing ``sweep.json`` as it goes."""

    def __init__(self, config: Mapping[str, Any], root: Path, runs: list[Run], *, jobs: int = 1,
                 overwrite: bool = False, progress: bool = True) -> None:  # fmt: skip
        self.config, self.root, self.runs, self.jobs, self.overwrite = config, root, runs, jobs, overwrite
        self.progress = progress
        self._stop = threading.Event()
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.RLock()  # re-entrant: a second signal can arrive inside stop()
        self._devices: Queue[str | None] = Queue()
        for device in _devices(jobs):
            self._devices.put(device)
        self.outcomes: dict[str, Outcome] = {}

    def todo(self) -> list[tuple[Run, str]]:
        states = [(r, "new" if self.overwrite else status(r, self.root)) for r in self.runs]
        return [(r, s) for r, s in states if s != "done"]

    def run(self) -> int:
        """Train every unfinished run; 0 when all finished, 1 when some failed, 128+n on signal n.

        ``overwrite`` clears every run's old results first, and then trains as a sweep that continues:
        stopped part-way, the same command without ``--overwrite`` continues it, with no result from
        before the overwrite counted as done."""
        if self.overwrite:
            from dynalora.training.job import clear_run

            for run in self.runs:
                if (self.root / run.name).is_dir():
                    clear_run(self.root / run.name)
            self.overwrite = False
        todo = self.todo()
        done = len(self.runs) - len(todo)
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_index()
        bar = tqdm(total=len(self.runs), initial=done, unit="run", disable=not self.progress, desc=self.config["name"],
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}<{remaining}]{postfix}")  # fmt: skip
        signum = 0

        def on_signal(num: int, _frame: Any) -> None:
            nonlocal signum
            signum = num
            self.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with bar, ThreadPoolExecutor(max_workers=self.jobs) as pool:
                futures = [pool.submit(self._train, run, state) for run, state in todo]
                for future in futures:
                    while not future.done():  # the main thread stays free to take signals
                        time.sleep(0.2)
                    outcome = future.result()
                    if outcome is None:
                        continue
                    self.outcomes[outcome.run.name] = outcome
                    bar.update(1)
                    if outcome.returncode:
                        bar.write(f"failed: {outcome.run.name} (exit {outcome.returncode}; "
                                  f"see {self.root / outcome.run.name / LOG_NAME})")  # fmt: skip
                    self._write_index()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if signum:
            return 128 + signum
        return 1 if any(o.returncode for o in self.outcomes.values()) else 0

    def stop(self) -> None:
        """Start no new run and ask the running ones to checkpoint and stop."""
        self._stop.set()
        with self._lock:
            for child in self._children:
                child.send_signal(signal.SIGTERM)

    def _train(self, run: Run, state: str) -> Outcome | None:
        if self._stop.is_set():
            return None
        device = self._devices.get()
        try:
            folder = self.root / run.name
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "dynalora", "train", *run.argv(), "--output-dir", str(folder), "--quiet"]
            cmd.append("--resume")  # a new run's folder is empty: it starts at step 0
            env = {**os.environ, **_child_env(self.jobs, device)}
            start = time.perf_counter()
            with open(folder / LOG_NAME, "a") as log:
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                with self._lock:
                    if self._stop.is_set():
                        return None
                    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)  # fmt: skip
                    self._children.add(child)
                try:
                    returncode = child.wait()
                finally:
                    with self._lock:
                        self._children.discard(child)
            if self._stop.is_set() and returncode:
                return None  # stopped by us: it resumes next time
            return Outcome(run, returncode, time.perf_counter() - start)
        finally:
            self._devices.put(device)

    def _write_index(self) -> None:
        index = {
            "name": self.config["name"],
            "description": self.config["description"],
            "runs": [
                {
                    "name": r.name,
                    "flags": dict(r.flags),
                    "status": _state_of(self.root / r.name, self.outcomes.get(r.name)),
                }
                | ({"seconds": round(self.outcomes[r.name].seconds, 1)} if r.name in self.outcomes else {})
                for r in self.runs
            ],
        }
        tmp = self.root / "sweep.json.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        tmp.replace(self.root / "sweep.json")


def _state_of(folder: Path, outcome: Outcome | None) -> str:
    if (folder / "metrics.json").is_file():
        return "done"
    if outcome is not None and outcome.returncode:
        return f"failed (exit {outcome.returncode})"
    return "pending"


def _devices(jobs: int) -> list[str | None]:
    """One slot per job: a GPU each (round robin) when there are several, else no pinning."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 1:
        return [str(i % count) for i in range(jobs)]
    return [None] * jobs


def _child_env(jobs: int, device: str | None) -> dict[str, str]:
    env = {}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # N jobs share the cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def describe(runs: Sequence[Run], root: Path, *, overwrite: bool = False) -> str:
    """What ``--dry-run`` prints: one line per run with its state and flags."""
    lines = []
    for run in runs:
        state = "new" if overwrite else status(run, root)
        lines.append(f"{state:6}  {run.name}  {' '.join(run.argv())}")
    counts = {s: sum(line.startswith(s) for line in lines) for s in ("done", "resume", "new")}
    lines.append(f"{len(runs)} runs: {counts['done']} done, {counts['resume']} to resume, {counts['new']} new")
    return "\n".join(lines)
