"""Whole runs under activation checkpointing, and the recompute memory cap, on MiniLM-L6 and SmolLM2-135M.

Each row is divided by its own baseline, measured in the same interleaving (step i of every
configuration runs before step i + 1 of any, in a new seeded order each step):

- LoRA with checkpointing against the default with checkpointing (what TRL's SFTConfig and every
  QLoRA recipe run): blocks below the cut run neither backward nor recomputation;
- the recompute cap (``memory_cap=0.5, cap_mode="recompute"``) and today's exclusion cap
  (``cap_mode="exclude"``) against LoRA without checkpointing;
- the default without checkpointing against LoRA, for reference;
- ``--budget 0.7`` (the setting the docs give for short runs) with and without checkpointing.

Every dynamic row reallocates every ``--period`` steps from its own measured importance. Memory:
counted bytes (saved activations kept by the forward + gradients + optimizer state) of every step
of a second, untimed run of fresh copies; peak = the highest step. A checkpointed block's
activations come back, one block at a time, while backward recomputes it: that transient is not in
the counted figure. Run alone, on idle cores:

    .venv/bin/python benchmarks/checkpointing.py                 # both models (~25 min on 2 cores)
    .venv/bin/python benchmarks/checkpointing.py --model minilm  # one
    .venv/bin/python benchmarks/checkpointing.py --memory-only   # count memory again; keep the step times

``--memory-only`` counts bytes (deterministic, so it may run beside other work) and keeps each row's
step times, cuts and recomputed blocks from the results file, whose ``meta`` then says so.

Writes benchmarks/results/checkpointing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cost  # noqa: E402  (benchmarks/cost.py)
import llm_cost  # noqa: E402

from dynalora import DynamicConfig  # noqa: E402
from dynalora.checkpointing import enable_checkpointing  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MiB = 2**20


@dataclass(frozen=True)
class Row:
    name: str
    baseline: str
    dynamic: DynamicConfig | None
    checkpointing: bool = False


def rows() -> list[Row]:
    recompute = {"cap_mode": "recompute"}
    return [
        Row("lora", "lora", None),
        Row("default", "lora", DynamicConfig()),
        Row("lora + checkpointing", "lora + checkpointing", None, True),
        Row("default + checkpointing", "lora + checkpointing", DynamicConfig(), True),
        Row("budget 0.7", "lora", DynamicConfig(budget=0.7)),
        Row("budget 0.7 + checkpointing", "lora + checkpointing", DynamicConfig(budget=0.7), True),
        Row("exclusion cap 0.5 (today)", "lora", DynamicConfig(memory_cap=0.5)),
        Row("recompute cap 0.5", "lora", DynamicConfig(memory_cap=0.5, **recompute)),
        Row("recompute cap 0.4", "lora", DynamicConfig(memory_cap=0.4, **recompute)),
    ]


def build(row: Row, model: str, base, period: int) -> cost.Setup:
    dynamic = replace(row.dynamic, period=period) if row.dynamic is not None else None
    if model == "minilm":
        setup = cost.build(cost.Spec(row.name, "lora", dynamic), base)
    else:
        setup = llm_cost.build(llm_cost.Spec(row.name, "lora", dynamic, targets=llm_cost.AL), base, period)
    if row.checkpointing:
        enable_checkpointing(setup.model)
        setup.model.train()
    return setup


def measure(model: str, args: argparse.Namespace, before: dict | None = None) -> dict:
    """The rows of ``model``; with ``before`` (that model's earlier results), memory only: the timed
    fields come from ``before``."""
    torch.manual_seed(0)
    if model == "minilm":
        tokenizer, base = cost.load_base(None, torch.device("cpu"))
        batch = cost.fixed_batch(tokenizer, args.batch_size or 32, args.max_length, torch.device("cpu"))
        steps, period = args.steps or 60, args.period or 5
    else:
        from dynalora.models import embedded_llm_path, load_causal_model

        tokenizer, base = load_causal_model(embedded_llm_path(), torch.device("cpu"))
        batch = llm_cost.fixed_batch(tokenizer, args.batch_size or 4, args.max_length)
        steps, period = args.steps or 30, args.period or 3
    specs = rows()
    if before is not None:
        return _count_again(model, specs, base, batch, period, args, before)
    warm = build(specs[0], model, base, period)
    for _ in range(2):  # the process's first steps (thread pools, allocator caches) are paid by nobody
        cost.train_step(warm, batch)
    del warm
    setups = [build(r, model, base, period) for r in specs]
    times: dict[str, list[float]] = {r.name: [] for r in specs}
    depth: dict[str, list[int]] = {r.name: [] for r in specs}
    recompute: dict[str, list[float]] = {r.name: [] for r in specs}
    order = random.Random(0)
    for i in range(steps):
        for s in order.sample(setups, len(setups)):
            if s.allocator is not None:
                depth[s.spec.name].append(s.allocator.cut if s.allocator.cut is not None else 0)
                recompute[s.spec.name].append(len(s.allocator.history[-1]["recompute"]))
            t0 = time.perf_counter()
            cost.train_step(s, batch)
            times[s.spec.name].append((time.perf_counter() - t0) * 1e3)
        print(f"  {model}: timed step {i + 1}/{steps}", file=sys.stderr, flush=True)
    del setups
    timed = {r.name: {"step_ms": times[r.name], "total_ms": sum(times[r.name]), "depth": depth[r.name],
                      "recomputed_blocks": recompute[r.name]} for r in specs}  # fmt: skip
    meta = {"batch": list(batch["input_ids"].shape), "steps": steps, "period": period,
            "memory_steps": args.memory_steps, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timed_on": time.strftime("%Y-%m-%d")}  # fmt: skip
    return {"meta": meta, "rows": _count(model, specs, base, batch, period, args, timed)}


def _count(model: str, specs: list[Row], base, batch, period: int, args, timed: dict[str, dict]) -> list[dict]:
    """Each row's counted bytes over a second, untimed run of a fresh copy, beside its ``timed`` fields."""
    out = []
    for r in specs:
        counted = cost.count_run(build(r, model, base, period), batch, args.memory_steps)
        memory = cost.run_memory(counted)
        out.append({"name": r.name, "baseline": r.baseline, "checkpointing": r.checkpointing,
                    "dynamic": r.dynamic.to_dict() if r.dynamic else None, **timed[r.name],
                    "counted": counted, **memory,
                    "peak_saved_activations": max(s["saved_activations"] for s in counted)})  # fmt: skip
        peak = memory["peak_counted_bytes"] / MiB
        print(f"  {model}: counted {r.name}: peak {peak:.1f} MiB", file=sys.stderr, flush=True)
    return out


def _count_again(model: str, specs: list[Row], base, batch, period: int, args, before: dict) -> dict:
    """--memory-only: the counted bytes again, each row's timed fields kept from ``before``."""
    old = {r["name"]: r for r in before["rows"]}
    missing = [r.name for r in specs if r.name not in old]
    if missing or list(batch["input_ids"].shape) != before["meta"]["batch"] or period != before["meta"]["period"]:
        raise SystemExit(f"--memory-only: the earlier {model} results do not match these rows and settings "
                         f"({missing[0] if missing else 'batch or period'}); run without --memory-only")  # fmt: skip
    keys = ("step_ms", "total_ms", "depth", "recomputed_blocks")
    timed = {r.name: {k: old[r.name][k] for k in keys} for r in specs}
    meta = before["meta"] | {"memory_steps": args.memory_steps, "counted_on": time.strftime("%Y-%m-%d"),
                             "counted_threads": torch.get_num_threads(),
                             "torch": torch.__version__}  # fmt: skip
    meta.setdefault("timed_on", "an earlier run")
    return {"meta": meta, "rows": _count(model, specs, base, batch, period, args, timed)}


NAMES = {"minilm": "MiniLM-L6 (6 blocks; LoRA on query, value)", "smollm2": "SmolLM2-135M (30 blocks; all-linear LoRA)"}


def render(results: dict) -> str:
    lines = [
        "# Checkpointing and the recompute memory cap",
        "",
        "Generated by `benchmarks/checkpointing.py`. Whole runs interleaved step by step in one process on"
        " 2 CPU cores; each row against its own baseline. Counted bytes = saved activations kept by the forward"
        " + gradients + optimizer state, peak over the steps of a second run; total: the same with the weights"
        " (every parameter and buffer), at its highest step.",
    ]
    for model, res in results.items():
        meta, by = res["meta"], {r["name"]: r for r in res["rows"]}
        lines += [
            "",
            f"## {NAMES[model]}",
            "",
            f"Batch {meta['batch'][0]} x {meta['batch'][1]} tokens, {meta['steps']} timed steps per row, reallocating"
            f" every {meta['period']} steps; memory over {meta['memory_steps']} steps."
            + (
                f" Step times from the timed run of {meta['timed_on']}; bytes counted again on {meta['counted_on']}"
                " (`--memory-only`)."
                if "counted_on" in meta
                else ""
            ),
            "",
            "| configuration | baseline | whole-run step x baseline | median step (ms) | mean cut | mean blocks"
            " recomputed | peak counted (MiB) | x baseline | peak saved activations x baseline | peak total (MiB)"
            " | total x baseline |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            b = by[r["baseline"]]
            cut = f"{statistics.mean(r['depth']):.2f}" if r["depth"] else ""
            again = f"{statistics.mean(r['recomputed_blocks']):.2f}" if r["recomputed_blocks"] else ""
            lines.append(
                f"| {r['name']} | {r['baseline']} | {r['total_ms'] / b['total_ms']:.3f}"
                f" | {statistics.median(r['step_ms']):,.0f} | {cut} | {again}"
                f" | {r['peak_counted_bytes'] / MiB:,.1f} | {r['peak_counted_bytes'] / b['peak_counted_bytes']:.3f}"
                f" | {r['peak_saved_activations'] / b['peak_saved_activations']:.3f}"
                + (
                    f" | {r['peak_total_bytes'] / MiB:,.1f} | {r['peak_total_bytes'] / b['peak_total_bytes']:.3f} |"
                    if "peak_total_bytes" in r and "peak_total_bytes" in b
                    else " | | |"
                )  # fmt: skip
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=("minilm", "smollm2"), default=["minilm", "smollm2"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (MiniLM), 4 (SmolLM2)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 60 MiniLM, 30 SmolLM2)")
    parser.add_argument("--period", type=int, default=None, help="reallocation period (default: 5 MiniLM, 3 SmolLM2)")
    parser.add_argument("--memory-steps", type=int, default=12)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--memory-only", action="store_true",
                        help="count bytes again; keep the step times of the results file")  # fmt: skip
    args = parser.parse_args()
    from dynalora.cli import _quiet_libraries

    _quiet_libraries()
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "checkpointing.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for model in args.model:
        if args.memory_only and model not in results:
            raise SystemExit(f"--memory-only: {path} has no {model} results to keep the step times of")
        results[model] = measure(model, args, results[model] if args.memory_only else None)
        path.write_text(json.dumps(results, indent=1) + "\n")
    (out / "checkpointing.md").write_text(render(results) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
