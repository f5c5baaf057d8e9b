"""Quality and step time of dynamic allocation against plain LoRA on the embedded default recipe.

Variants (each one `dynalora train` recipe on rotten_tomatoes with MiniLM-L6, 1 epoch):
    dynalora      DynaLoRA, the CLI defaults (forward, discounted stochastic, k = 2/3, period 50)
    lora          plain PEFT LoRA (--no-dynamic)
    dynamic-full  dynamic full fine-tuning of the block linears, k = 1/3, state policy reset
    full          plain full fine-tuning

Targets: DynaLoRA's mean test accuracy >= LoRA's mean - 0.5 points and its median step time <= LoRA's
(issue #3); dynamic full fine-tuning's mean test accuracy >= LoRA's mean (issue #4). Variants named in
one invocation alternate seed by seed in one process (seed 0: A B, seed 1: A B, ...), so their step
times are comparable; run it with nothing else busy. Results accumulate in one JSON file: a later
invocation replaces the rows of the variants it runs and keeps the others.

    .venv/bin/python benchmarks/quality.py                              # dynalora + lora, ~25 min on 2 cores
    .venv/bin/python benchmarks/quality.py --variants dynamic-full      # adds dynamic full FT, ~15 min
    .venv/bin/python benchmarks/quality.py --max-steps 20 --seeds 0 --name smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dynalora.cli import _quiet_libraries  # noqa: E402
from dynalora.train import TrainArgs, run  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    "dynalora": {"dynamic": True},
    "lora": {"dynamic": False},
    "dynamic-full": {"method": "full", "dynamic": True, "k": "1/3", "state_policy": "reset", "lr": None},  # lr 3e-4
    "full": {"method": "full", "dynamic": False, "lr": None},
}
KEPT = ("variant", "seed", "invocation", "test", "validation", "median_step_ms", "train_runtime_s",
        "peak_memory_bytes", "peak_memory_kind", "mean_active_trainable_params", "trainable_params", "lr")  # fmt: skip


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        acc = [r["test"]["accuracy"] for r in runs]
        summary[variant] = {
            "seeds": [r["seed"] for r in runs],
            "test_accuracy_mean": statistics.mean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "median_step_ms": statistics.median(r["median_step_ms"] for r in runs),
            "trainable_params": runs[0].get("trainable_params"),
            "mean_active_trainable_params": runs[0]["mean_active_trainable_params"],
            "invocation": runs[0].get("invocation"),
        }
    return summary


def checks(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    lora = summary.get("lora")
    if lora is None:
        return ["- no plain LoRA runs: nothing to compare against"]
    dyn = summary.get("dynalora")
    if dyn:
        gap = 100 * (dyn["test_accuracy_mean"] - lora["test_accuracy_mean"])
        lines.append(f"- DynaLoRA accuracy - LoRA = {gap:+.2f} points (target >= -0.5): {_verdict(gap >= -0.5)}")
        ratio = dyn["median_step_ms"] / lora["median_step_ms"]
        same = dyn["invocation"] == lora["invocation"]
        note = "" if same else " (measured in different invocations: not comparable)"
        lines.append(f"- DynaLoRA step time / LoRA = {ratio:.3f} (target <= 1.0): {_verdict(ratio <= 1.0)}{note}")
    dfull = summary.get("dynamic-full")
    if dfull:
        gap = 100 * (dfull["test_accuracy_mean"] - lora["test_accuracy_mean"])
        lines.append(f"- dynamic full FT accuracy - LoRA = {gap:+.2f} points (target >= 0): {_verdict(gap >= 0)}")
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"# Dynamic allocation vs plain LoRA on rotten_tomatoes (MiniLM-L6, 1 epoch, seeds {seeds})",
        "",
        "| variant | lr | test accuracy (mean ± std) | trainable params | mean active params"
        " | median step (ms) | invocation |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for variant, s in summary.items():
        lr = next(r.get("lr") for r in rows if r["variant"] == variant)
        lines.append(
            f"| {variant} | {lr:g} | {s['test_accuracy_mean']:.4f} ± {s['test_accuracy_std']:.4f}"
            f" | {s['trainable_params']:,} | {s['mean_active_trainable_params']:,.0f}"
            f" | {s['median_step_ms']:.1f} | {s['invocation']} |"
        )
    lines += ["", "Per run:", "", "| variant | seed | test accuracy | validation accuracy | median step (ms) |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['test']['accuracy']:.4f} | {r['validation']['accuracy']:.4f}"
            f" | {r['median_step_ms']:.1f} |"
        )
    return "\n".join(lines + ["", "## Targets", "", *checks(summary)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["dynalora", "lora"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=None, help="shorten every run (smoke test)")
    parser.add_argument("--lr", type=float, default=None, help="override every variant's learning rate")
    parser.add_argument("--runs-dir", default="runs/bench-quality")
    parser.add_argument("--name", default="quality_rotten_tomatoes")
    ns = parser.parse_args()
    _quiet_libraries()
    logging.getLogger("dynalora").setLevel(logging.INFO)

    path = RESULTS / f"{ns.name}.json"
    previous = json.loads(path.read_text())["runs"] if path.exists() else []
    rows = [r for r in previous if r["variant"] not in ns.variants]
    invocation = time.strftime("%Y-%m-%d %H:%M")
    base = TrainArgs(eval_every=0, max_steps=ns.max_steps, overwrite=True)
    for seed in ns.seeds:
        for variant in ns.variants:
            # replace() re-runs __post_init__, which resolves method-dependent defaults such as lr
            overrides = VARIANTS[variant] | ({"lr": ns.lr} if ns.lr else {})
            args = replace(base, seed=seed, output_dir=f"{ns.runs_dir}/{variant}-seed{seed}", **overrides)
            metrics = run(args)
            rows.append({k: v for k, v in {**metrics, "variant": variant, "invocation": invocation,
                                           "lr": args.lr}.items() if k in KEPT})  # fmt: skip
    summary = summarise(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2) + "\n")
    text = render(rows, summary)
    (RESULTS / f"{ns.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
