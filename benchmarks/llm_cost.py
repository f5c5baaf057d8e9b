"""Counted training memory (and, on idle cores, step time) on the embedded LLM, SmolLM2-135M-Instruct.

The decoder counterpart of ``cost.py``'s whole runs: LoRA on every linear layer of the 30 blocks
against DynaLoRA at k = 1/3 and 2/3 and the cost-aware default, and dynamic full fine-tuning
against full fine-tuning. Each configuration trains a fresh copy for ``--steps`` steps on one fixed
batch of the embedded instruction task (padded to exactly ``--max-length`` tokens), reallocating
every ``--period`` steps; memory is counted from live tensors (saved activations + gradients +
optimizer state) at every step, peak = the highest step. ``--time`` also times the steps,
interleaved step by step in one process; run it alone, on idle cores.

    .venv/bin/python benchmarks/llm_cost.py            # counted bytes (~10 min on 2 cores)
    .venv/bin/python benchmarks/llm_cost.py --time     # and step time

Writes benchmarks/results/llm_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cost import MiB, Setup, Spec, count_run, run_memory, train_step  # noqa: E402  (benchmarks/cost.py)

from dynalora import DynamicAllocator, DynamicConfig  # noqa: E402
from dynalora.data import load_task, tokenize  # noqa: E402
from dynalora.methods import METHODS, MethodOptions  # noqa: E402
from dynalora.models import embedded_llm_path, load_causal_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
AL = ("all-linear",)


def specs() -> list[Spec]:
    v02 = {"allocator": "discounted_stochastic", "optimizer": "global"}
    lora = {"targets": AL, "baseline": "all-linear lora"}
    full = {"baseline": "full"}
    return [
        Spec("all-linear lora", "lora", targets=AL, baseline="all-linear lora"),
        Spec("DynaLoRA k=2/3 discounted", "lora", DynamicConfig(**v02, k=2 / 3), **lora),
        Spec("DynaLoRA k=1/3 discounted", "lora", DynamicConfig(**v02, k=1 / 3), **lora),
        Spec("DynaLoRA default (cutoff 0.5, local)", "lora", DynamicConfig(), **lora),
        Spec("DynaLoRA memory cap 0.5", "lora", DynamicConfig(memory_cap=0.5), **lora),
        Spec("full", "full", **full),
        Spec("dynamic full k=1/3 reset", "full", DynamicConfig(**v02, k=1 / 3, state_policy="reset"), **full),
        Spec("dynamic full memory cap 0.4 reset", "full",
             DynamicConfig(memory_cap=0.4, state_policy="reset", optimizer="global"), **full),
    ]  # fmt: skip


def fixed_batch(tokenizer, batch_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """The first examples of the embedded instruction task, cut or padded to exactly max_length."""
    data = load_task("rotten_tomatoes_instruct")
    rows = tokenize(data, tokenizer, max_length)["train"].select(range(batch_size))
    pad = tokenizer.pad_token_id
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        n = len(r["input_ids"])
        out["input_ids"].append(r["input_ids"] + [pad] * (max_length - n))
        out["attention_mask"].append([1] * n + [0] * (max_length - n))
        out["labels"].append(r["labels"] + [-100] * (max_length - n))
    return {k: torch.tensor(v) for k, v in out.items()}


def build(spec: Spec, base, period: int) -> Setup:
    model = copy.deepcopy(base)
    options = MethodOptions(spec.targets, 8, 16.0, 0.0, spec.dynamic is not None, task_type="CAUSAL_LM")
    model, modules = METHODS[spec.method](model, options)
    allocator = None
    if spec.dynamic is not None:
        allocator = DynamicAllocator(model, replace(spec.dynamic, period=period), modules=modules)
        optimizer = allocator.create_optimizer(torch.optim.AdamW, lr=1e-5, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    return Setup(spec, model, optimizer, allocator)


def time_steps(setups: list[Setup], batch, steps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {s.spec.name: [] for s in setups}
    for i in range(steps):
        for s in setups:
            t0 = time.perf_counter()
            train_step(s, batch)
            out[s.spec.name].append((time.perf_counter() - t0) * 1e3)
        print(f"  timed step {i + 1}/{steps}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="counted steps of each configuration")
    parser.add_argument("--period", type=int, default=2, help="reallocation period of the dynamic rows")
    parser.add_argument("--time", action="store_true", help="also time --time-steps interleaved steps")
    parser.add_argument("--time-steps", type=int, default=6)
    args = parser.parse_args()
    from dynalora.cli import _quiet_libraries

    _quiet_libraries()
    torch.manual_seed(0)
    tokenizer, base = load_causal_model(embedded_llm_path(), torch.device("cpu"))
    batch = fixed_batch(tokenizer, args.batch_size, args.max_length)
    rows = []
    for spec in specs():
        counted = count_run(build(spec, base, args.period), batch, args.steps)
        memory = run_memory(counted)
        rows.append({"name": spec.name, "baseline": spec.baseline, "counted": counted, **memory})
        print(f"  counted {spec.name}: peak {memory['peak_counted_bytes'] / MiB:.1f} MiB", file=sys.stderr, flush=True)
    if args.time:
        setups = [build(spec, base, args.period) for spec in specs()]
        times = time_steps(setups, batch, args.time_steps)
        for row in rows:
            row["step_ms"] = times[row["name"]]
    meta = {k: getattr(args, k) for k in ("batch_size", "max_length", "steps", "period")}
    (RESULTS / "llm_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / "llm_cost.md").write_text(render(rows, meta) + "\n")
    print(render(rows, meta))


def render(rows: list[dict], meta: dict) -> str:
    by = {r["name"]: r for r in rows}
    timed = all("step_ms" in r for r in rows)
    lines = [
        "# Counted training memory on SmolLM2-135M-Instruct (30 blocks, hidden 576)",
        "",
        f"Batch {meta['batch_size']} x {meta['max_length']} tokens of the embedded instruction task; "
        f"{meta['steps']} steps of a fresh copy per configuration, reallocating every {meta['period']} steps. "
        "Counted from live tensors: saved activations + gradients + optimizer state (MiB); peak = the highest "
        "step; total: the same with the weights (every parameter and buffer at its storage dtype), at its highest step."
        " Generated by `benchmarks/llm_cost.py`."
        + (f" Step times: {meta['step_ms_from']}." if timed and "step_ms_from" in meta else ""),
        "",
        "| configuration | baseline | peak counted (MiB) | x baseline | mean counted x baseline | saved activations"
        " (peak MiB) | gradients + optimizer (peak MiB) | peak total (MiB) | total x baseline |"
        + (" median step (ms) | x baseline |" if timed else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if timed else ""),
    ]
    for r in rows:
        b = by[r["baseline"]]
        saved = max(s["saved_activations"] for s in r["counted"]) / MiB
        state = max(s["gradients"] + s["optimizer_state"] for s in r["counted"]) / MiB
        line = (
            f"| {r['name']} | {r['baseline']} | {r['peak_counted_bytes'] / MiB:,.1f}"
            f" | {r['peak_counted_bytes'] / b['peak_counted_bytes']:.3f}"
            f" | {r['mean_counted_bytes'] / b['mean_counted_bytes']:.3f} | {saved:,.1f} | {state:,.1f}"
            f" | {r['peak_total_bytes'] / MiB:,.1f} | {r['peak_total_bytes'] / b['peak_total_bytes']:.3f} |"
        )
        if timed:
            med, base_med = statistics.median(r["step_ms"]), statistics.median(b["step_ms"])
            line += f" {med:,.0f} | {med / base_med:.3f} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
