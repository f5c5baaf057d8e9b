"""The work of cost.py's whole-run rows, counted rather than timed: FLOPs, aten operations and
Python calls per step.

Step times on a shared 2-core machine move by several hundredths between runs of the same code;
these counts do not move at all unless the code does. When a whole-run ratio of ``cost.py
--section runs`` changes between two commits, run this at both: equal counts mean the machine
moved, not the code. It may run beside other work (one thread, nothing timed)::

    .venv/bin/python benchmarks/work_count.py          # the rows below, 60 steps each
    git worktree add /tmp/old <commit> && cp benchmarks/work_count.py /tmp/old/benchmarks/
    (cd /tmp/old && PYTHONPATH=src $OLDPWD/.venv/bin/python benchmarks/work_count.py --out /tmp/old.json)

Each row trains as in ``cost.py --section runs`` (its batch, reallocation period and seed), after
the same 2 warm-up steps. FLOPs are ``torch.utils.flop_counter``'s (matrix products and attention);
aten operations are every operator dispatched in forward, backward and the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import cost  # noqa: E402  (benchmarks/cost.py beside this file)
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dynalora import DynamicConfig  # noqa: E402

ROWS = ("lora", "default", "memory cap 0.5", "cutoff budget 0.35 global", "all-linear lora",
        "all-linear cutoff budget 1/3", "full")  # fmt: skip
_FULL_PRESET = {"allocator": "discounted_stochastic", "optimizer": "global", "k": 1 / 3, "state_policy": "reset"}
EXTRA = (
    # the price of a memory cap kept by recomputation (what `--memory-cap 0.35 --cap-mode recompute` adds to
    # `--method full --dynamic`): the capped blocks' forward runs again in backward; FLOPs do not depend on
    # the storage dtype, so fp32 storage stands for --inactive-dtype bf16 here
    cost.Spec("dynamic-full preset", "full", DynamicConfig(**_FULL_PRESET), baseline="full"),
    cost.Spec("dynamic-full preset cap 0.35 recompute", "full",
              DynamicConfig(**_FULL_PRESET, memory_cap=0.35, cap_mode="recompute"), baseline="full"),
)  # fmt: skip
"""Rows beyond cost.py's: ``--rows`` may name them."""


def specs(period: int) -> dict[str, cost.Spec]:
    """Every row by name (cost.py's whole runs and :data:`EXTRA`), reallocating every ``period`` steps."""
    return {sp.name: cost.with_period(sp, period) for sp in (*cost.run_specs(), *EXTRA)}


class _Ops(TorchDispatchMode):
    """Counts every aten operator dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class _Calls:
    """Counts Python function calls (``sys.setprofile``): the allocator's own overhead shows here."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, frame, event, arg) -> None:
        if event == "call":
            self.count += 1


def count(name: str, base, batch, steps: int, period: int) -> dict[str, float]:
    spec = specs(period)[name]
    setup = cost.build(spec, base)
    for _ in range(2):
        cost.train_step(setup, batch)
    calls, active = _Calls(), []
    with FlopCounterMode(display=False) as flops, _Ops() as ops:
        sys.setprofile(calls)
        try:
            for _ in range(steps):
                cost.train_step(setup, batch)
                if setup.allocator is not None:
                    active.append(len(setup.allocator.active))
        finally:
            sys.setprofile(None)
    return {"gflops_per_step": flops.get_total_flops() / steps / 1e9, "aten_ops_per_step": ops.count / steps,
            "python_calls_per_step": calls.count / steps,
            "mean_active_modules": sum(active) / len(active) if active else None}  # fmt: skip


def time_rows(names: list[str], base, batch, steps: int, period: int) -> dict[str, list[float]]:
    """Step times (ms) of whole runs of the rows, interleaved step by step (:func:`cost.time_runs`)."""
    by_name = specs(period)
    warm = cost.build(cost.Spec("warm-up", "lora"), base)
    for _ in range(3):  # the process's first steps (thread pools, caches): paid by nobody
        cost.train_step(warm, batch)
    del warm
    setups = [cost.build(by_name[n], base) for n in names]
    return {n: t["step_ms"] for n, t in cost.time_runs(setups, batch, steps).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--steps", type=int, default=60, help="counted steps per row (cost.py's run_steps)")
    parser.add_argument("--period", type=int, default=5, help="reallocation period (cost.py's run_period)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "work_count.json"))
    parser.add_argument("--time", action="store_true",
                        help="also time the rows as cost.py's whole runs do (interleaved step by step in this "
                             "process), after counting; only on a quiet machine")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer, base = cost.load_base(None, torch.device("cpu"))
    batch = cost.fixed_batch(tokenizer, 32, 64, torch.device("cpu"))
    baselines = {name: sp.baseline for name, sp in specs(args.period).items()}
    rows = {}
    for name in args.rows:
        rows[name] = count(name, base, batch, args.steps, args.period)
        print(name, rows[name], file=sys.stderr, flush=True)
    meta = {"steps": args.steps, "period": args.period, "batch": [32, 64], "torch": torch.__version__}
    if args.time:
        timed = time_rows(args.rows, base, batch, args.steps, args.period)
        meta["threads"] = torch.get_num_threads()
        for name in args.rows:
            rows[name] |= {"median_step_ms": statistics.median(timed[name]), "total_ms": sum(timed[name])}
            if baselines[name] in timed:
                rows[name]["total_vs_baseline"] = sum(timed[name]) / sum(timed[baselines[name]])
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    for name, r in rows.items():
        base_row = rows.get(baselines[name])
        ratio = f"x {baselines[name]} {r['gflops_per_step'] / base_row['gflops_per_step']:.3f}" if base_row else ""
        time_ratio = f"  time x {baselines[name]} {r['total_vs_baseline']:.3f}" if "total_vs_baseline" in r else ""
        print(f"{name:32s} {r['gflops_per_step']:8.2f} GFLOP  {ratio}  {r['aten_ops_per_step']:7.1f} ops  "
              f"{r['python_calls_per_step']:8.0f} calls{time_ratio}")  # fmt: skip


if __name__ == "__main__":
    main()
