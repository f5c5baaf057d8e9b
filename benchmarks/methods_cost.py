"""Every ``--method`` side by side: trained parameters, step time and counted memory, in one process.

Each configuration is built as ``dynalora train --method M [--dynamic]`` builds it: ``TrainArgs``
resolves the defaults (targets, rank, learning rate, the dynamic preset) and the method's hooks run
where the training loop runs them (AdaLoRA's ``update_and_allocate``, DyLoRA's rank draw, L1RA's
pruning, GaLore's optimizer). The whole runs are interleaved step by step in one process
(``cost.time_runs``), so every configuration sees the same machine; each dynamic one reallocates on
a short period so that the steps cover several selections. Counted bytes (saved activations,
gradients, optimizer state) come from a second, untimed pass on fresh copies.

The accuracy of the same methods is ``quality.py --name methods``; the table of methods in docs/results.md
joins the two.

    .venv/bin/python benchmarks/methods_cost.py           # ~15 min on 2 CPU cores; run it alone
    .venv/bin/python benchmarks/methods_cost.py --quick   # a smoke run: 3 steps, runs/bench-methods-cost-quick/

Writes benchmarks/results/methods_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import cost  # benchmarks/cost.py: the same batch, interleaving and counting as the cost tables
import torch
from torch import nn

from dynalora import DynamicAllocator
from dynalora.metering import step_memory_breakdown
from dynalora.methods import HOOKS, METHODS, STATIC_ONLY, Hooks
from dynalora.training import TrainArgs
from dynalora.training.job import method_options, trainable_params

MiB = 2**20
# one epoch of the embedded task (8,530 reviews, batch 32): AdaLoRA's and L1RA's schedules are
# scaled to it, so the timed steps are steps of the run the quality table measures
RUN_STEPS = 267


def configurations() -> list[tuple[str, bool]]:
    """(method, dynamic): every method plain, and dynamic where it can be."""
    plain = [(m, False) for m in METHODS]
    return plain + [(m, True) for m in METHODS if m not in STATIC_ONLY]


def label(method: str, dynamic: bool) -> str:
    return f"{method} dynamic" if dynamic else method


def build(method: str, dynamic: bool, base: nn.Module, period: int) -> cost.Setup:
    args = TrainArgs(method=method, dynamic=dynamic, output_dir="runs/bench-methods-cost", quiet=True)
    model = copy.deepcopy(base)
    options = method_options(args, RUN_STEPS)
    model, modules = METHODS[method](model, options)
    hooks = HOOKS.get(method, Hooks())
    allocator, spec = None, cost.Spec(label(method, dynamic), method)
    if dynamic:
        config = replace(args.dynamic_config(), period=period)
        allocator = DynamicAllocator(model, config, modules=modules)
        optimizer = allocator.create_optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=args.weight_decay)
        spec = replace(spec, dynamic=config)
    else:  # the training loop's rule: the method's own optimizer, else AdamW
        if hooks.make_optimizer is not None:
            optimizer = hooks.make_optimizer(model, options, args.lr, args.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable_params(model), lr=args.lr, weight_decay=args.weight_decay)
    model.train()
    return cost.Setup(spec, model, optimizer, allocator, hooks)


def counted_pass(s: cost.Setup, batch, steps: int) -> tuple[list[int], list[int]]:
    """Per step of an untimed pass: counted bytes (saved activations + gradients + optimizer state)
    and the parameters trainable at that step (head included)."""
    totals, active = [], []
    for _ in range(steps):
        if s.allocator is not None:
            active.append(s.allocator.num_active_params + s.allocator.num_extra_params)
        else:
            active.append(sum(p.numel() for p in trainable_params(s.model)))
        m = step_memory_breakdown(s.model, s.optimizer, batch)
        totals.append(sum(int(m[k]) for k in ("saved_activations", "gradients", "optimizer_state")))
        if s.allocator is not None:
            s.allocator.step()
    return totals, active


def measure(base: nn.Module, batch, args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = configurations()
    warm = build("lora", False, base, args.period)
    for _ in range(3):  # the process's first steps (allocator caches, thread pools): paid by nobody
        cost.train_step(warm, batch)
    del warm
    setups = [build(m, d, base, args.period) for m, d in configs]
    params = {  # what the run trains: for a dynamic run, all of its modules (and the head)
        s.spec.name: s.allocator.num_params + s.allocator.num_extra_params if s.allocator is not None
        else sum(p.numel() for p in trainable_params(s.model))
        for s in setups
    }  # fmt: skip
    print(f"timing {len(setups)} configurations, {args.steps} steps each, interleaved", file=sys.stderr)
    timed = cost.time_runs(setups, batch, args.steps)
    del setups
    rows = []
    for method, dynamic in configs:
        s = build(method, dynamic, base, args.period)
        cost.settle(s, batch)
        totals, active = counted_pass(s, batch, args.memory_steps)
        name = label(method, dynamic)
        rows.append(
            {
                "name": name,
                "method": method,
                "dynamic": dynamic,
                "trained_params": params[name],
                "mean_active_params": statistics.mean(active),
                "step_ms": timed[name]["step_ms"],
                "total_ms": sum(timed[name]["step_ms"]),
                "mean_counted_bytes": statistics.mean(totals),
                "peak_counted_bytes": max(totals),
            }
        )
        print(f"  counted {name}: mean {statistics.mean(totals) / MiB:.1f} MiB", file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {r["name"]: r for r in rows}
    lora = by["lora"]
    lines = [
        "# Every method side by side: trained parameters, step time, counted memory",
        "",
        f"{meta['model']}, batch {meta['batch_size']} x {meta['max_length']} tokens, {meta['device']},"
        f" torch {meta['torch']}, {meta['threads']} threads. {meta['steps']} steps of each configuration,"
        " interleaved step by step in one process (`benchmarks/methods_cost.py`); each built with the"
        " defaults of `dynalora train --method M` (targets, rank 8, learning rate, dynamic preset), its"
        f" loop hooks included; dynamic runs reallocate every {meta['period']} steps. Step ratio: total"
        " time over LoRA's total. Counted bytes: saved activations + gradients + optimizer state, mean"
        f" over {meta['memory_steps']} steps of an untimed pass.",
        "",
        "| method | trained params | mean trainable at a step | median step | step vs LoRA |"
        " mean counted | vs LoRA | peak counted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['trained_params']:,} | {r['mean_active_params']:,.0f} |"
            f" {statistics.median(r['step_ms']):.0f} ms | {r['total_ms'] / lora['total_ms']:.3f} |"
            f" {r['mean_counted_bytes'] / MiB:,.1f} MiB | {r['mean_counted_bytes'] / lora['mean_counted_bytes']:.3f} |"
            f" {r['peak_counted_bytes'] / MiB:,.1f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each configuration")
    parser.add_argument("--period", type=int, default=5, help="reallocation period of the dynamic runs")
    parser.add_argument("--memory-steps", type=int, default=6, help="counted steps of each memory pass")
    parser.add_argument("--quick", action="store_true", help="3 steps, 2 counted, results under runs/")
    args = parser.parse_args()
    from dynalora.cli import _quiet_libraries

    _quiet_libraries()
    if args.quick:
        args.steps, args.memory_steps = 3, 2
    device = torch.device("cpu")
    tokenizer, base = cost.load_base(None, device)
    batch = cost.fixed_batch(tokenizer, args.batch_size, args.max_length, device)
    rows = measure(base, batch, args)
    meta = {
        "model": "embedded MiniLM-L6",
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "period": args.period,
        "memory_steps": args.memory_steps,
    }
    out = Path("runs/bench-methods-cost-quick") if args.quick else cost.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods_cost.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    text = render(rows, meta)
    (out / "methods_cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
