"""What dynamic allocation costs and saves: step time and memory by category, side by side.

Every configuration is built in one process on one fixed batch. They are timed in interleaved
rounds after warm-up (every configuration once a round, in a new seeded order each round), so all of
them see the same machine and none is favoured by its place in the round. Memory is measured,
not derived from formulas:
- parameter, gradient and optimizer-state bytes are counted from the live tensors;
- saved activations are the distinct tensors autograd saves for backward;
- peak memory above the loaded model is read in a fresh subprocess per configuration
  (CUDA: max_memory_allocated; CPU: peak RSS), so one configuration's freed blocks cannot hide
  another's peak.

    .venv/bin/python benchmarks/cost.py                  # ~30 min on 2 CPU cores; run it alone
    .venv/bin/python benchmarks/cost.py --section runs   # only the whole runs (~15 min); the rest kept
    .venv/bin/python benchmarks/cost.py --quick          # a smoke run: few configurations, one round

Writes benchmarks/results/cost.{json,md,png} and depth.png (--quick: runs/bench-cost-quick/, so a
smoke run never replaces the committed results).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dynalora import DynamicAllocator, DynamicConfig  # noqa: E402
from dynalora.analysis.plots import parse_module_name  # noqa: E402
from dynalora.cost import FIXED_SHARE  # noqa: E402
from dynalora.metering import PeakMemory, step_memory_breakdown  # noqa: E402
from dynalora.methods import METHODS, Hooks, MethodOptions  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MiB = 2**20
# Reallocations before memory is read, so that `keep` has gathered the state of several selections.
CYCLES = 4


@dataclass(frozen=True)
class Spec:
    name: str
    method: str  # lora | full | bitfit | frozen
    dynamic: DynamicConfig | None = None
    lowest_layer: int | None = None  # depth curve: train only modules in layers >= this
    targets: tuple[str, ...] | None = None  # None: the method's default (LoRA: query, value)
    baseline: str = "lora"  # the row of the same interleaving it is divided by


@dataclass
class Setup:
    spec: Spec
    model: nn.Module
    optimizer: Any
    allocator: DynamicAllocator | None
    hooks: Hooks = field(default_factory=Hooks)  # what the method needs from the loop (methods_cost.py)
    steps_done: int = 0


def specs(quick: bool, device: torch.device) -> list[Spec]:
    # no reallocation while timing (hooks still run every step); k-based selection, as these rows measure
    fixed = {"period": 10**9, "seed": 0, "allocator": "discounted_stochastic"}
    out = [Spec("full", "full"), Spec("bitfit", "bitfit"), Spec("lora", "lora"), Spec("frozen", "frozen")]
    ks = {"all": 1.0, "2/3": 2 / 3, "1/3": 1 / 3}
    measures = ("forward", "adapter", "gradient", "random")
    for k_name, k in ks.items():
        for opt in ("global", "local"):
            for measure in measures:
                if quick and (opt == "local" or measure in ("adapter", "random")):
                    continue
                cfg = DynamicConfig(k=k, optimizer=opt, measure=measure, **fixed)
                out.append(Spec(f"dynalora k={k_name} {opt} {measure}", "lora", cfg))
    # offload moves the moments of inactive modules to host memory: a CUDA-only policy
    for policy in ("reset", "keep") + (("offload",) if device.type == "cuda" else ()):
        cfg = DynamicConfig(k=1 / 3, state_policy=policy, optimizer="global", **fixed)
        out.append(Spec(f"dynamic-full k=1/3 {policy}", "full", cfg))
    return out


def depth_specs(num_layers: int) -> list[Spec]:
    cfg = DynamicConfig(k=1.0, measure="random", allocator="topk", period=10**9)
    # plain LoRA in the same interleaving: every depth row is divided by it, not by another call's LoRA
    return [Spec("lora", "lora")] + [Spec(f"depth {d}", "lora", cfg, lowest_layer=d) for d in range(num_layers)]


ALL_LINEAR = ("all-linear",)


def run_specs() -> list[Spec]:
    """Whole runs with real reallocations (each configuration's own period), each with its baseline."""
    cutoff = {"allocator": "cutoff"}
    v02 = {"allocator": "discounted_stochastic", "optimizer": "global"}  # the v0.2 default's selection
    al = {"targets": ALL_LINEAR, "baseline": "all-linear lora"}
    full = {"baseline": "full"}
    return [
        Spec("lora", "lora"),
        Spec("default", "lora", DynamicConfig()),
        Spec("cutoff budget 0.5 global", "lora", DynamicConfig(**cutoff, budget=0.5, optimizer="global")),
        Spec("cutoff budget 0.35 global", "lora", DynamicConfig(**cutoff, budget=0.35, optimizer="global")),
        Spec("v0.2 default: discounted k=2/3 gradient", "lora", DynamicConfig(**v02, k=2 / 3)),
        Spec("memory cap 0.5", "lora", DynamicConfig(**cutoff, memory_cap=0.5)),
        Spec("all-linear lora", "lora", **al),
        Spec("all-linear k=1/3 discounted", "lora", DynamicConfig(**v02, k=1 / 3), **al),
        Spec("all-linear cutoff budget 1/3", "lora", DynamicConfig(**cutoff, budget=1 / 3), **al),
        Spec("all-linear memory cap 0.7", "lora", DynamicConfig(**cutoff, memory_cap=0.7), **al),
        Spec("all-linear memory cap 0.5", "lora", DynamicConfig(**cutoff, memory_cap=0.5), **al),
        Spec("full", "full", **full),
        Spec("dynamic-full k=1/3 reset", "full", DynamicConfig(**v02, k=1 / 3, state_policy="reset"), **full),
        Spec("dynamic-full default reset", "full", DynamicConfig(state_policy="reset"), **full),
        Spec("dynamic-full cutoff budget 0.35 reset", "full",
             DynamicConfig(**cutoff, budget=0.35, state_policy="reset", optimizer="global"), **full),
        Spec("dynamic-full memory cap 0.4 reset", "full",
             DynamicConfig(**cutoff, memory_cap=0.4, state_policy="reset", optimizer="global"), **full),
        Spec("dynamic-full memory cap 0.6 reset", "full",
             DynamicConfig(**cutoff, memory_cap=0.6, state_policy="reset", optimizer="global"), **full),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ set-up
def load_base(model: str | None, device: torch.device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dynalora.training import DEFAULT_MODEL, resolve_model_path

    path = resolve_model_path(model or DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device)
    return tokenizer, base


def fixed_batch(tokenizer, batch_size: int, max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Real review snippets, padded to exactly ``max_length``: every step has the same shape."""
    from dynalora.data import load_task

    train = load_task("rotten_tomatoes").splits["train"].select(range(batch_size))
    enc = tokenizer(
        list(train["text"]), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    enc["labels"] = torch.tensor(list(train["label"]))
    return {k: v.to(device) for k, v in enc.items()}


def build(spec: Spec, base: nn.Module, copy_base: bool = True) -> Setup:
    model = copy.deepcopy(base) if copy_base else base
    allocator = None
    if spec.method == "frozen":  # the floor: only the task head trains
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier"))
    else:
        options = MethodOptions(spec.targets, rank=8, alpha=16.0, dropout=0.1, dynamic=spec.dynamic is not None)
        model, modules = METHODS[spec.method](model, options)
        if spec.dynamic is not None:
            allocator = DynamicAllocator(model, spec.dynamic, modules=modules)
            if spec.lowest_layer is not None:
                allocator.set_active(
                    n for n in allocator.module_names if (parse_module_name(n)[0] or 0) >= spec.lowest_layer
                )
    if allocator is not None:
        optimizer = allocator.create_optimizer(torch.optim.AdamW, lr=1e-5, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)
    model.train()
    return Setup(spec, model, optimizer, allocator)


def train_step(s: Setup, batch: dict[str, torch.Tensor]) -> float:
    loss = s.model(**batch).loss
    loss.backward()
    s.optimizer.step()
    if s.hooks.on_optimizer_step is not None:  # as the training loop: after step(), before zero_grad()
        s.hooks.on_optimizer_step(s.model, s.steps_done, s.optimizer)
    s.optimizer.zero_grad(set_to_none=True)
    if s.allocator is not None:
        s.allocator.step()
    s.steps_done += 1
    return loss.detach().item()  # a sync point on CUDA: the step's time is real, not queued


def settle(s: Setup, batch: dict[str, torch.Tensor]) -> None:
    """Reach steady state: a few reallocations with a step each (the state policy at work)."""
    for _ in range(CYCLES if s.allocator is not None and s.spec.lowest_layer is None else 1):
        if s.allocator is not None and s.spec.lowest_layer is None:
            s.allocator.reallocate()
        train_step(s, batch)


# ------------------------------------------------------------------------------------------ measurements
def time_interleaved(setups: list[Setup], batch, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Step times (ms) per configuration: every configuration once per round, in a new order each round
    (seeded), so that drift and a configuration's place in the round do not favour any of them."""
    for s in setups:
        for _ in range(warmup):
            train_step(s, batch)
    times: dict[str, list[float]] = {s.spec.name: [] for s in setups}
    order = random.Random(0)
    for r in range(rounds):
        for s in order.sample(setups, len(setups)):
            for _ in range(steps):
                t0 = time.perf_counter()
                train_step(s, batch)
                times[s.spec.name].append((time.perf_counter() - t0) * 1e3)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return times


def with_period(spec: Spec, period: int) -> Spec:
    return spec if spec.dynamic is None else replace(spec, dynamic=replace(spec.dynamic, period=period))


def time_runs(setups: list[Setup], batch, steps: int) -> dict[str, dict[str, list[float]]]:
    """Whole runs, interleaved by step: step i of every configuration runs before step i + 1 of any,
    in a new seeded order each step. Each reallocates on its own schedule, so the total covers
    several selections. Returns per configuration the step times (ms) and the cost model's predicted
    step ratio of the selection each step trained."""
    out = {s.spec.name: {"step_ms": [], "predicted_step_ratio": [], "depth": []} for s in setups}
    order = random.Random(0)
    for i in range(steps):
        for s in order.sample(setups, len(setups)):
            if s.allocator is not None:
                mask = s.allocator.active_mask
                out[s.spec.name]["predicted_step_ratio"].append(s.allocator.cost.step_ratio(mask))
                out[s.spec.name]["depth"].append(s.allocator.cost.depth(mask))
            t0 = time.perf_counter()
            train_step(s, batch)
            out[s.spec.name]["step_ms"].append((time.perf_counter() - t0) * 1e3)
        if (i + 1) % 10 == 0:
            print(f"  run step {i + 1}/{steps} done", file=sys.stderr, flush=True)
    return out


TRAINING = ("saved_activations", "gradients", "optimizer_state")
"""The counted training bytes; ``weights`` (every parameter and buffer) is recorded beside them."""


def count_run(s: Setup, batch, steps: int) -> list[dict[str, int]]:
    """Bytes of every step of a run: saved activations, gradients, optimizer state, and the weights."""
    per_step = []
    for _ in range(steps):
        m = step_memory_breakdown(s.model, s.optimizer, batch)
        if s.allocator is not None:
            s.allocator.step()
        per_step.append({k: int(m[k]) for k in (*TRAINING, "weights")})
    return per_step


def run_memory(counted: list[dict[str, int]]) -> dict[str, float]:
    """Peak and mean counted training bytes of a run, and its peak total (weights included) over the steps."""
    training = [sum(step[k] for k in TRAINING) for step in counted]
    total = [t + step["weights"] for t, step in zip(training, counted, strict=True)]
    return {"peak_counted_bytes": max(training), "mean_counted_bytes": statistics.mean(training),
            "peak_weights_bytes": max(step["weights"] for step in counted), "peak_total_bytes": max(total)}  # fmt: skip


def measure_runs(base: nn.Module, batch, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time and count whole runs of :func:`run_specs`; memory in a second, untimed pass on fresh copies."""
    specs_ = [with_period(sp, args.run_period) for sp in run_specs()]
    warm = build(Spec("warm-up", "lora"), base)
    for _ in range(3):  # first steps of the process (allocator caches, thread pools): paid by nobody
        train_step(warm, batch)
    del warm
    setups = [build(sp, base) for sp in specs_]
    print(f"timing whole runs of {len(setups)} configurations, {args.run_steps} steps", file=sys.stderr)
    timed = time_runs(setups, batch, args.run_steps)
    del setups
    rows = []
    for sp in specs_:
        counted = count_run(build(sp, base), batch, args.memory_steps)
        memory = run_memory(counted)
        rows.append(
            {
                "name": sp.name,
                "baseline": sp.baseline,
                "dynamic": sp.dynamic.to_dict() if sp.dynamic else None,
                "targets": sp.targets,
                "total_ms": sum(timed[sp.name]["step_ms"]),
                **timed[sp.name],
                "counted": counted,
                **memory,
                "peak_saved_activations": max(step["saved_activations"] for step in counted),
            }
        )
        print(f"  counted {sp.name}: peak {memory['peak_counted_bytes'] / MiB:.1f} MiB", file=sys.stderr, flush=True)
    return rows


def render_runs(runs: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    by = {r["name"]: r for r in runs}
    lines = [
        "## Whole runs with reallocation, each against its own baseline",
        "",
        f"{meta['run_steps']} steps per configuration, interleaved step by step in one process; every dynamic"
        f" configuration reallocates every {meta['run_period']} steps (its other settings as named), so the"
        " total covers several selections. Step ratio: total time over the baseline's total. Predicted: the cost"
        " model's mean over the steps (`dynalora.cost`). Memory: counted bytes (saved activations + gradients +"
        f" optimizer state) of each of {meta['memory_steps']} steps of a fresh run; peak = the highest step."
        " Total: the same with the weights (every parameter and buffer at its storage dtype), at its highest step.",
        "",
        "| configuration | baseline | step ratio | predicted | mean depth | peak counted (MiB) | x baseline |"
        " mean counted x baseline | peak saved activations x baseline | peak total (MiB) | total x baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        b = by[r["baseline"]]
        predicted = f"{statistics.mean(r['predicted_step_ratio']):.3f}" if r["predicted_step_ratio"] else ""
        depth = f"{statistics.mean(r['depth']):.2f}" if r["depth"] else ""
        lines.append(
            f"| {r['name']} | {r['baseline']} | {r['total_ms'] / b['total_ms']:.3f} | {predicted} | {depth}"
            f" | {r['peak_counted_bytes'] / MiB:,.1f} | {r['peak_counted_bytes'] / b['peak_counted_bytes']:.3f}"
            f" | {r['mean_counted_bytes'] / b['mean_counted_bytes']:.3f}"
            f" | {r['peak_saved_activations'] / b['peak_saved_activations']:.3f}"
            + (f" | {r['peak_total_bytes'] / MiB:,.1f} | {r['peak_total_bytes'] / b['peak_total_bytes']:.3f} |"
               if "peak_total_bytes" in r and "peak_total_bytes" in b else " | | |")  # fmt: skip
        )
    return lines


def run_targets(runs: list[dict[str, Any]]) -> list[str]:
    by = {r["name"]: r for r in runs}
    out = []

    def ratio(name: str, key: str) -> float | None:
        r = by.get(name)
        return None if r is None else r[key] / by[r["baseline"]][key]

    def check(label: str, value: float | None, limit: float) -> None:
        if value is not None:
            out.append(f"- {label}: {'met' if value <= limit else 'NOT met'} ({value:.3f}, target <= {limit})")

    check("default: whole-run step time <= 0.85 x LoRA (stretch 0.75)", ratio("default", "total_ms"), 0.85)
    check("default: peak saved activations < LoRA's", ratio("default", "peak_saved_activations"), 0.9999)
    for name in ("all-linear k=1/3 discounted", "all-linear cutoff budget 1/3", "all-linear memory cap 0.7"):
        check(f"{name}: peak counted bytes <= 0.7 x all-linear LoRA", ratio(name, "peak_counted_bytes"), 0.7)
    check("all-linear memory cap 0.5: peak counted bytes <= 0.5 x all-linear LoRA",
          ratio("all-linear memory cap 0.5", "peak_counted_bytes"), 0.5)  # fmt: skip
    for name in ("dynamic-full k=1/3 reset", "dynamic-full default reset", "dynamic-full cutoff budget 0.35 reset",
                 "dynamic-full memory cap 0.4 reset", "dynamic-full memory cap 0.6 reset"):  # fmt: skip
        check(f"{name}: mean counted bytes <= 0.4 x full", ratio(name, "mean_counted_bytes"), 0.4)
        check(f"{name}: peak counted bytes <= 0.4 x full", ratio(name, "peak_counted_bytes"), 0.4)
    return out


def embeddings_need_grad(s: Setup, batch) -> bool:
    """Whether backward reaches the embeddings (it must not unless something trains there)."""
    seen = []
    emb = s.model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    s.model(**batch)
    handle.remove()
    return any(seen)


def peak_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--peak-of", name, "--batch-size", str(args.batch_size)]
    cmd += ["--max-length", str(args.max_length), "--device", args.device]
    cmd += ["--model", args.model] if args.model else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_of(name: str, args: argparse.Namespace) -> None:
    """Child process: peak memory above the loaded model for one configuration."""
    device = torch.device(args.device)
    tokenizer, base = load_base(args.model, device)
    batch = fixed_batch(tokenizer, args.batch_size, args.max_length, device)
    spec = next(s for s in specs(False, device) if s.name == name)
    setup = build(spec, base, copy_base=False)  # a copy would leave freed memory for the peak to hide in
    with PeakMemory(device) as peak:
        settle(setup, batch)
        for _ in range(3):
            train_step(setup, batch)
    print(json.dumps({"peak_above_model_bytes": peak.increase_bytes, "peak_bytes": peak.peak_bytes, "kind": peak.kind}))


# ------------------------------------------------------------------------------------------ report
def write_results(
    rows: list[dict[str, Any]],
    depth: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    meta: dict[str, Any],
    out: Path,
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    by = {r["name"]: r for r in rows}
    lora = by["lora"]
    for r in rows:
        r["ratio_to_lora"] = r["median_step_ms"] / lora["median_step_ms"]
    depth_lora = next(r for r in depth if r["lowest_layer"] is None)  # timed in the depth rows' own interleaving
    for r in depth:
        r["ratio_to_lora"] = r["median_step_ms"] / depth_lora["median_step_ms"]
    depth = [r for r in depth if r["lowest_layer"] is not None]

    def mib(x: float | None) -> str:
        return "n/a" if x is None else f"{x / MiB:,.1f}"

    def total(m: dict[str, int]) -> int | None:  # weights + training bytes, at the measured step
        return None if "weights" not in m else sum(m[k] for k in ("weights", *TRAINING))

    kind = next((r["peak"].get("kind") for r in rows if "kind" in r.get("peak", {})), "n/a")
    # state held in host memory: only with the model on an accelerator (offload, torch's step counters)
    host = any(r["memory"].get("optimizer_state_host") for r in rows)
    lines = [
        f"# Cost of dynamic allocation ({meta['model']}, batch {meta['batch_size']} x {meta['max_length']} tokens,"
        f" {meta['device']})",
        "",
        f"Median of {meta['rounds']} interleaved rounds x {meta['steps']} steps after warm-up; memory in MiB,"
        f" counted from live tensors; peak above the loaded model: {kind}, one fresh process per row.",
        "",
        "| configuration | median step (ms) | x LoRA | params | grads | optimizer"
        + (" | optimizer on host" if host else "")
        + " | saved activations | grads+opt | peak above model | weights | total |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if host else "") + "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["memory"]
        lines.append(
            f"| {r['name']} | {r['median_step_ms']:.1f} | {r['ratio_to_lora']:.3f} | {mib(m['parameters'])}"
            f" | {mib(m['gradients'])} | {mib(m['optimizer_state'])}"
            + (f" | {mib(m.get('optimizer_state_host', 0))}" if host else "")
            + f" | {mib(m['saved_activations'])}"
            f" | {mib(m['gradients'] + m['optimizer_state'])} | {mib(r['peak'].get('peak_above_model_bytes'))}"
            f" | {mib(m.get('weights'))} | {mib(total(m))} |"
        )
    lines += ["", "## Step time against the lowest trained layer (LoRA q,v; modules in layers >= d trained)", ""]
    lines += [
        f"Plain LoRA is timed in the same interleaving ({depth_lora['median_step_ms']:.1f} ms), and every row is"
        " divided by it. Predicted: the cost model (`dynalora.cost`, fixed share"
        f" {meta.get('fixed_share', FIXED_SHARE)}).",
        "",
        "| lowest trained layer | median step (ms) | x LoRA | predicted | backward reaches embeddings |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in depth:
        predicted = f"{r['predicted_step_ratio']:.3f}" if "predicted_step_ratio" in r else ""
        lines.append(
            f"| {r['lowest_layer']} | {r['median_step_ms']:.1f} | {r['ratio_to_lora']:.3f} | {predicted}"
            f" | {r['embeddings_grad']} |"
        )
    if runs:
        lines += [""] + render_runs(runs, meta)
    lines += ["", "## Targets", ""] + targets(by) + run_targets(runs)
    text = "\n".join(lines) + "\n"
    (out / "cost.md").write_text(text)
    depth_all = [depth_lora] + depth
    (out / "cost.json").write_text(
        json.dumps({"meta": meta, "configurations": rows, "depth": depth_all, "runs": runs}, indent=2)
    )
    plot(rows, depth, depth_lora, out)
    return text


def targets(by: dict[str, dict[str, Any]]) -> list[str]:
    lora = by["lora"]
    out = []

    def check(label: str, ok: bool, detail: str) -> None:
        out.append(f"- {label}: {'met' if ok else 'NOT met'} ({detail})")

    for measure in ("forward", "adapter", "gradient", "random"):
        r = by.get(f"dynalora k=all global {measure}")
        if r:
            check(f"k=all ({measure}) step <= 1.03 x LoRA", r["ratio_to_lora"] <= 1.03, f"{r['ratio_to_lora']:.3f}")
    for k in ("all", "2/3", "1/3"):  # hot path: what measuring costs over no measurement
        ref = by.get(f"dynalora k={k} global random")
        if ref:
            cost = ", ".join(
                f"{m} {by[name]['median_step_ms'] / ref['median_step_ms'] - 1:+.1%}"
                for m in ("forward", "adapter", "gradient")
                if (name := f"dynalora k={k} global {m}") in by
            )
            out.append(f"- measurement overhead against `random` at k={k}: {cost}")
    r = by.get("dynalora k=2/3 global forward")
    if r:
        check("k=2/3 step <= LoRA", r["ratio_to_lora"] <= 1.0, f"{r['ratio_to_lora']:.3f}")
        ra, la = r["memory"]["saved_activations"], lora["memory"]["saved_activations"]
        check("k=2/3 saved activations < LoRA", ra < la, f"{ra / MiB:.1f} vs {la / MiB:.1f} MiB")
        rg = r["memory"]["gradients"] + r["memory"]["optimizer_state"]
        lg = lora["memory"]["gradients"] + lora["memory"]["optimizer_state"]
        check("k=2/3 grads+optimizer < LoRA", rg < lg, f"{rg / MiB:.2f} vs {lg / MiB:.2f} MiB")
    full = by.get("full")
    for policy in ("reset", "keep", "offload"):  # only reset is a target; keep and offload for comparison
        dyn = by.get(f"dynamic-full k=1/3 {policy}")
        if dyn and full and "peak_above_model_bytes" in dyn["peak"] and "peak_above_model_bytes" in full["peak"]:
            ratio = dyn["peak"]["peak_above_model_bytes"] / full["peak"]["peak_above_model_bytes"]
            if policy == "reset":
                check("dynamic full k=1/3 reset: training memory <= 0.7 x full", ratio <= 0.7, f"{ratio:.3f}")
            else:
                out.append(f"- dynamic full k=1/3 {policy}: training memory {ratio:.3f} x full")
    return out


def plot(rows: list[dict[str, Any]], depth: list[dict[str, Any]], depth_lora: dict[str, Any], out: Path) -> None:
    from matplotlib.figure import Figure

    names = [r["name"] for r in rows]
    fig = Figure(figsize=(12, 0.32 * len(rows) + 1.5), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2, sharey=True)
    ax_t.barh(names, [r["ratio_to_lora"] for r in rows], color="tab:blue")
    ax_t.axvline(1.0, color="black", lw=0.8)
    ax_t.set_xlabel("median step time / plain LoRA")
    ax_t.invert_yaxis()
    left = [0.0] * len(rows)
    for key, color in (("gradients", "tab:orange"), ("optimizer_state", "tab:red"), ("saved_activations", "tab:green")):
        values = [r["memory"][key] / MiB for r in rows]
        ax_m.barh(names, values, left=left, color=color, label=key.replace("_", " "))
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax_m.set_xlabel("training memory beyond the weights (MiB, counted)")
    ax_m.legend(loc="lower right")
    fig.savefig(out / "cost.png", dpi=110)

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    layers = [r["lowest_layer"] for r in depth]
    ax.plot(layers, [r["median_step_ms"] for r in depth], marker="o", label="LoRA, layers >= d (measured)")
    if all("predicted_step_ratio" in r for r in depth):
        predicted = [r["predicted_step_ratio"] * depth_lora["median_step_ms"] for r in depth]
        ax.plot(layers, predicted, ls="--", color="tab:orange", label="cost model")
    # plain LoRA from the same interleaving as the depth rows, not from the steps table
    ax.axhline(depth_lora["median_step_ms"], ls=":", color="gray", label="plain LoRA, all layers")
    ax.set_xlabel("lowest trained layer d")
    ax.set_ylabel("median step (ms)")
    ax.legend()
    fig.savefig(out / "depth.png", dpi=110)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id or folder (default: embedded MiniLM-L6)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer configurations, one round, no subprocess peaks")
    parser.add_argument(
        "--results-dir", default=None, help="default: benchmarks/results (--quick: runs/bench-cost-quick)"
    )
    parser.add_argument(
        "--section",
        nargs="+",
        choices=("steps", "depth", "runs"),
        default=["steps", "depth", "runs"],
        help="what to measure; the others are kept from the existing cost.json",
    )
    parser.add_argument("--run-steps", type=int, default=60, help="steps of each whole run")
    parser.add_argument(
        "--run-period",
        type=int,
        default=5,
        help="reallocation period of the whole runs (a selection's cost does not depend on it;"
        " a short one covers more selections in fewer steps)",
    )
    parser.add_argument("--memory-steps", type=int, default=12, help="counted steps of each run's memory pass")
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from dynalora.cli import _quiet_libraries

    _quiet_libraries()
    if args.peak_of:
        return peak_of(args.peak_of, args)
    if args.quick:
        args.rounds = 1
    device = torch.device(args.device)
    tokenizer, base = load_base(args.model, device)
    batch = fixed_batch(tokenizer, args.batch_size, args.max_length, device)
    out = Path(args.results_dir or ("runs/bench-cost-quick" if args.quick else RESULTS))
    previous = json.loads((out / "cost.json").read_text()) if (out / "cost.json").exists() else {}
    meta = previous.get("meta", {}) | {
        "model": args.model or "embedded MiniLM-L6",
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    rows, depth, runs = previous.get("configurations"), previous.get("depth"), previous.get("runs", [])
    if "steps" in args.section or rows is None:
        rows = measure_steps(base, batch, args)
        meta |= {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup}
    if "depth" in args.section or depth is None:
        depth = measure_depth(base, batch, args)
        meta |= {"fixed_share": FIXED_SHARE}
    if "runs" in args.section:
        runs = measure_runs(base, batch, args)
        meta |= {"run_steps": args.run_steps, "run_period": args.run_period, "memory_steps": args.memory_steps}
    print(write_results(rows, depth, runs, meta, out))


def measure_steps(base: nn.Module, batch, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The per-selection table: median step of a fixed selection, memory by category, peak per process."""
    all_specs = specs(args.quick, torch.device(args.device))
    setups = [build(s, base) for s in all_specs]
    print(f"memory of {len(setups)} configurations", file=sys.stderr)
    memory = {}
    for s in setups:
        settle(s, batch)
        params = [p for p in s.model.parameters()]
        memory[s.spec.name] = {k: v for k, v in step_memory_breakdown(s.model, s.optimizer, batch).items() if k in (
            "weights", "parameters", "gradients", "optimizer_state", "optimizer_state_host", "saved_activations")} | {
            "trainable_params": sum(p.numel() for p in params if p.requires_grad)}  # fmt: skip
    print(f"timing {len(setups)} configurations", file=sys.stderr)
    times = time_interleaved(setups, batch, args.rounds, args.steps, args.warmup)
    del setups
    rows = []
    for spec in all_specs:
        peak = {} if args.quick else peak_in_subprocess(spec.name, args)
        rows.append(
            {
                "name": spec.name,
                "median_step_ms": statistics.median(times[spec.name]),
                "step_ms": times[spec.name],
                "memory": memory[spec.name],
                "peak": peak,
                "dynamic": spec.dynamic.to_dict() if spec.dynamic else None,
            }
        )
        print(f"  peak of {spec.name}: {peak}", file=sys.stderr, flush=True)
    return rows


def measure_depth(base: nn.Module, batch, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median step when only modules in layers >= d train, beside plain LoRA in the same interleaving."""
    setups = [build(s, base) for s in depth_specs(base.config.num_hidden_layers)]
    times = time_interleaved(setups, batch, args.rounds, args.steps, args.warmup)
    return [
        {
            "lowest_layer": s.spec.lowest_layer,
            "median_step_ms": statistics.median(times[s.spec.name]),
            "embeddings_grad": embeddings_need_grad(s, batch),
        }
        | (
            {
                "active_modules": len(s.allocator.active),
                "predicted_step_ratio": s.allocator.cost.step_ratio(s.allocator.active_mask),
            }
            if s.allocator is not None
            else {}
        )  # fmt: skip
        for s in setups
    ]


if __name__ == "__main__":
    main()
