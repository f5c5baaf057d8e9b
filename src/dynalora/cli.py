"""Command line: argument parsing only; the work happens in training/ and analysis/.

dynalora train [--task T] [--method M] [--no-dynamic] [--k 2/3] ...
dynalora compare [any train flag]      # DynaLoRA and plain LoRA side by side (the main job)
dynalora sweep CONFIG.yaml [--output-dir DIR] [--dry-run] [--jobs N]
dynalora report RUN_DIR [RUN_DIR ...]  # a table; a folder of run folders gets report.md and figures
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any

from dynalora.errors import Interrupted, RunError, UsageError
from dynalora.training.args import TrainParser


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        # a train flag it does not know reaches the top parser: a transformers/TRL one says why
        self.exit(2, f"{self.prog}: error: {TrainParser.explain(message)}\n")


def _subparser(train_flags: bool = False, **kwargs: Any) -> argparse.ArgumentParser:
    """``train`` and ``compare`` parse with transformers' HfArgumentParser (:class:`TrainParser`)."""
    return TrainParser(**kwargs) if train_flags else _Parser(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = _Parser(prog="dynalora", description="Dynamic low-rank module allocation (DynaLoRA) fine-tuning.")
    parser.add_argument("--version", action="version", version=f"dynalora {version('dynalora')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_subparser)
    train = sub.add_parser("train", help="fine-tune one model on one task, dynamic or plain", train_flags=True)
    config_help = "a YAML or JSON file of train flags (lr: 0.002, method: dora, ...); flags given here override it"
    train.add_argument("--config", metavar="FILE", help=config_help)
    compare = sub.add_parser(
        "compare",
        help="run DynaLoRA and plain LoRA (--no-dynamic) with the same recipe and print a table",
        train_flags=True,
    )
    compare.add_argument("--config", metavar="FILE", help=config_help)
    compare.add_argument(
        "--methods",
        help="comma-separated methods to compare side by side, each plain and, where it has one, dynamic "
        "(e.g. lora,dora,vera,dvora,adalora,dylora,hydra,full,bitfit; default: --method, dynamic and plain)",
    )
    sweep = sub.add_parser("sweep", help="train every run of a YAML grid, one folder each; skips finished runs")
    sweep.add_argument("config", metavar="CONFIG.yaml", help="name, base (train flags) and grid (lists of values)")
    sweep.add_argument("--output-dir", help="folder of the run folders (default: runs/<name>)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")
    sweep.add_argument(
        "--jobs", type=_positive, default=1, help="runs at a time (default: 1, which keeps timings honest)"
    )
    sweep.add_argument("--overwrite", action="store_true", help="train finished runs again")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    report = sub.add_parser(
        "report", help="a table of finished runs; a folder of run folders also gets report.md and figures"
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--format", choices=("markdown", "text"), default=None, help="(default: text)")
    report.add_argument(
        "--report-dir", help="where a grid's report.md and figures go (default: the grid folder itself)"
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1")
    return value


def _train_args(ns: argparse.Namespace):
    from dynalora.training import TrainArgs

    return TrainArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)})


def _cmd_train(ns: argparse.Namespace) -> int:
    from dynalora.analysis.report import compare_table, load_run
    from dynalora.training import run

    args = _train_args(ns)
    metrics = run(args)
    if metrics is not None:  # the main process (of one or several)
        print(compare_table([load_run(args.output_dir)], fmt="text"))
        memory = metrics.get("memory", {})
        if "peak_total_with_weights" in memory:
            mib = 2**20
            print(f"memory: {memory['peak_total_with_weights'] / mib:.1f} MiB at the peak step, of which weights "
                  f"{memory['peak_weights'] / mib:.1f} MiB (every parameter and buffer); training bytes (saved "
                  f"activations, gradients, optimizer state) {memory['peak_total'] / mib:.1f} MiB at their peak; "
                  "counted tensors of this process")  # fmt: skip
        print(f"outputs in {args.output_dir}")
    return 0


def _compare_variants(ns: argparse.Namespace) -> list[tuple[bool, str, str]]:
    """``(dynamic, method, folder name)`` of every run a comparison makes."""
    from dynalora.methods import METHODS, STATIC_ONLY

    if ns.methods is None:  # one recipe, its dynamic and plain variants
        if ns.dynamic is False:
            raise UsageError("compare runs the dynamic and the plain variant itself; drop --no-dynamic")
        if ns.method in STATIC_ONLY:
            raise UsageError(f"--method {ns.method} has no dynamic variant to compare with; allowed: --methods "
                             f"{ns.method},lora (each plain, and dynamic where it has one)")  # fmt: skip
        return [(True, ns.method, "dynamic"), (False, ns.method, "plain")]
    from dynalora.training import TrainArgs

    if ns.method != TrainArgs.__dataclass_fields__["method"].default:
        raise UsageError(f"--method {ns.method} and --methods both name what compare runs; list it in --methods, "
                         "and drop --method")  # fmt: skip
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(
            f"--methods {ns.methods!r}: unknown {', '.join(unknown) or 'empty'}; allowed: {', '.join(METHODS)}"
        )
    runs = []
    for m in dict.fromkeys(methods):
        if m not in STATIC_ONLY and ns.dynamic is not False:
            runs.append((True, m, f"{m}-dynamic"))
        runs.append((False, m, m))
    if ns.dynamic is True and not any(dynamic for dynamic, _, _ in runs):
        raise UsageError(f"--dynamic: none of --methods {ns.methods} has a dynamic variant; drop --dynamic")
    return runs


def _cmd_compare(ns: argparse.Namespace) -> int:
    from dynalora.analysis.report import compare_table, load_run
    from dynalora.methods import REGISTRY
    from dynalora.training import RUN_FILES, TrainArgs, run
    from dynalora.training.args import METHOD_ONLY
    from dynalora.training.sweep import dynamic_only

    root = Path(ns.output_dir)
    # The dynamic settings go to the dynamic variants only: a plain run refuses them.
    plain = {**vars(ns), **dict.fromkeys(dynamic_only() & vars(ns).keys())}
    # A method's own options (--rank, --dylora-frozen) go to the methods that read them, as in a sweep.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}

    def unread(method: str, dynamic: bool) -> dict[str, Any]:
        static_drops = () if dynamic else REGISTRY[method].dynamic_options
        return {o: defaults[o] for o, owners in METHOD_ONLY.items() if method not in owners or o in static_drops}

    runs = _compare_variants(ns)
    read = {o for dyn, m, _ in runs for o, owners in METHOD_ONLY.items()
            if m in owners and (dyn or o not in REGISTRY[m].dynamic_options)}  # fmt: skip
    if any(dynamic for dynamic, _, _ in runs):
        read |= dynamic_only()
    ignored = sorted(o for o in METHOD_ONLY.keys() | dynamic_only() if o not in read and vars(ns)[o] != defaults[o])
    if ignored:  # as in `dynalora train` and a sweep: an option no run reads is refused, not dropped
        flag = "--" + ignored[0].replace("_", "-")
        raise UsageError(f"{flag} is read by none of the runs this comparison makes; drop it")
    # Each variant resolves its own defaults (e.g. the learning rate of each method, dynamic or plain).
    variants = [
        _train_args(argparse.Namespace(**{**(vars(ns) if dynamic else plain), "method": method, "dynamic": dynamic,
                                          "output_dir": str(root / name), **unread(method, dynamic)}))
        for dynamic, method, name in runs
    ]  # fmt: skip
    held = [root / "compare.md"] + [Path(v.output_dir) / f for v in variants for f in RUN_FILES]
    if ns.resume:  # a finished variant is kept (with the same flags); the others continue or start
        from dynalora.training.resume import check_same_run

        done = [v for v in variants if (Path(v.output_dir) / "metrics.json").is_file()]
        for v in done:
            check_same_run(Path(v.output_dir), v)
        todo = [v for v in variants if v not in done]
    elif not ns.overwrite and any(p.exists() for p in held):  # refuse before the first run, not after it
        raise UsageError(f"--output-dir {root} already holds a comparison; choose another folder, pass --overwrite, "
                         "or --resume to continue it")  # fmt: skip
    else:
        todo = variants
    finished = [run(v) for v in todo]
    if any(m is None for m in finished):  # not the main process: it prints and writes nothing
        return 0
    runs = [load_run(v.output_dir) for v in variants]
    print(compare_table(runs, fmt="text"))
    (root / "compare.md").write_text(compare_table(runs, fmt="markdown") + "\n")
    print(f"outputs in {root}/<run>; table in {root}/compare.md")
    return 0


def _cmd_sweep(ns: argparse.Namespace) -> int:
    from dynalora.training.sweep import Sweep, describe, expand, load_config

    config = load_config(ns.config)
    root = Path(ns.output_dir or Path("runs") / config["name"])
    runs = expand(config, root)
    if ns.dry_run:
        if ns.jobs != 1:  # (--quiet is kept: a dry run shows no progress bar either)
            raise UsageError("--jobs is for training, and --dry-run trains nothing; drop one")
        print(describe(runs, root, overwrite=ns.overwrite))
        return 0
    sweep = Sweep(config, root, runs, jobs=ns.jobs, overwrite=ns.overwrite, progress=not ns.quiet)
    sweep.todo()  # a finished run with other settings is refused before anything trains
    code = sweep.run()
    failed = [o.run.name for o in sweep.outcomes.values() if o.returncode]
    if code > 128:
        again = "the same command without --overwrite" if ns.overwrite else "the same command again"
        print(f"dynalora: sweep stopped; run {again} to continue ({root})", file=sys.stderr)
    elif failed:
        print(f"dynalora: error: {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
    else:
        print(f"{len(runs)} runs in {root}; `dynalora report {root}` writes the report")
    return code


def _cmd_report(ns: argparse.Namespace) -> int:
    from dynalora.analysis.grid_report import is_grid, write_report
    from dynalora.analysis.report import compare_table, load_run

    if len(ns.run_dirs) == 1 and is_grid(ns.run_dirs[0]):
        if ns.format is not None:
            raise UsageError("--format chooses the table of run folders; a grid's report is report.md (markdown) "
                             "with figures; drop --format")  # fmt: skip
        written = write_report(ns.run_dirs[0], ns.report_dir)
        print(f"report in {written}")
        return 0
    if ns.report_dir:
        raise UsageError("--report-dir is for a folder of run folders; allowed: one such folder")
    print(compare_table([load_run(d) for d in ns.run_dirs], fmt=ns.format or "text"))
    return 0


def _quiet_libraries() -> None:
    """Keep the terminal for dynalora's own progress bar and table."""
    import warnings

    import datasets
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "sweep": _cmd_sweep, "report": _cmd_report}


def with_config_file(argv: list[str]) -> list[str]:
    """``train``/``compare`` with ``--config FILE``: the file's flags (a YAML or JSON mapping of flag
    names, as in a sweep's ``base``) go first, so that flags on the command line override them."""
    if len(argv) < 1 or argv[0] not in ("train", "compare") or "--config" not in argv:
        return argv
    i = argv.index("--config")
    if argv.count("--config") > 1:
        raise UsageError("--config is given twice; allowed: one file (flags on the command line override it)")
    if i + 1 >= len(argv):
        raise UsageError("--config needs a file: a YAML or JSON mapping of train flags, e.g. lr: 0.002")
    path = Path(argv[i + 1])
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    import yaml

    from dynalora.training.args import field_name, refuse_hf_flag
    from dynalora.training.sweep import to_argv

    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path}: not YAML or JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        what = type(values).__name__
        raise UsageError(f"--config {path}: must be a mapping of train flags (e.g. lr: 0.002), got {what}")
    flags = {}
    for key, value in values.items():
        name = field_name(key)  # HF's names too: learning_rate for lr
        if name is None:
            why = refuse_hf_flag(str(key)) or f"{key} is not a `dynalora train` flag; see `dynalora train --help`"
            raise UsageError(f"--config {path}: {why}")
        if name == "lr_scheduler_kwargs" and isinstance(value, dict):  # a mapping in YAML, JSON on the command line
            value = json.dumps(value)
        if not (value is None or isinstance(value, (str, int, float, bool))):
            raise UsageError(f"--config {path}: {key} = {value!r}; allowed: a string, number or boolean")
        if name in flags:  # two spellings of one flag (lr and learning_rate): which one was meant?
            raise UsageError(f"--config {path}: {key} and another key both set {name}; keep one")
        flags[name] = value
    return [argv[0], *to_argv(flags), *argv[1:i], *argv[i + 2 :]]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = with_config_file(argv)
    except UsageError as err:
        print(f"dynalora: error: {err}", file=sys.stderr)
        return 2
    ns = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[ns.command](ns)
    except UsageError as err:
        print(f"dynalora: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        err.report()
        return err.exit_code
    except RunError as err:
        print(f"dynalora: error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Under torchrun / accelerate launch: leave the group once every training released its DDP wrapper."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _entry() -> Any:  # console script
    sys.exit(main())
