"""AdaLoRA (Zhang et al., 2023) through PEFT's ``AdaLoraConfig``.

PEFT's AdaLoRA trains as plain LoRA unless ``update_and_allocate(step)`` runs after every
``optimizer.step()`` and before ``zero_grad()`` (it reads the gradients), counting optimizer steps,
not micro-batches (peft #1327, #3373, #1801). The CLI loop calls it through :data:`HOOKS`; HF
Trainer users add :class:`dynalora.integrations.AdaLoraCallback`.

Schedule (PEFT's names): ranks start at ``init_r = ceil(1.5 r)`` and are pruned to an average of
``target_r = r``; the first ``tinit`` = 10% of the steps only train, the budget then falls
(cubically) until the last ``tfinal`` = 20%, where the ranks are fixed; reallocation every
``deltaT`` = 10 steps. The paper's GLUE settings use the same shape.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from dynalora.errors import UsageError
from dynalora.methods.common import Built, Hooks, Method, MethodOptions, adapter_targets

TINIT, TFINAL, DELTA_T = 0.1, 0.2, 10


def schedule(total_steps: int) -> dict[str, int]:
    tinit, tfinal = int(TINIT * total_steps), int(TFINAL * total_steps)
    if tinit >= total_steps - tfinal:  # too short for a budgeting phase: shrink the warm-up
        tinit = max(0, total_steps - tfinal - 1)
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, min(DELTA_T, total_steps // 10))}


STATIC = "--method adalora allocates ranks itself, from its own importance and budget; use it with --no-dynamic"


def build(model: nn.Module, opts: MethodOptions) -> Built:
    if opts.dynamic:
        raise UsageError(STATIC)
    if not opts.total_steps or opts.total_steps < 3:
        raise UsageError(f"--method adalora needs at least 3 optimizer steps, got {opts.total_steps}")
    config = AdaLoraConfig(
        init_r=math.ceil(1.5 * opts.rank),
        target_r=opts.rank,
        total_step=opts.total_steps,
        **schedule(opts.total_steps),
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=adapter_targets(model, opts.targets),
        task_type=opts.task_type,
    )
    return get_peft_model(model, config), None


def on_optimizer_step(model: nn.Module, step: int, optimizer: Any = None) -> None:
    model.base_model.update_and_allocate(step)


def ranks(model: nn.Module) -> dict[str, int]:
    """Each adapted layer's rank now: its singular values (``lora_E``) that are not masked to zero."""
    return {
        name.removeprefix("base_model.model.").removesuffix(".lora_E.default"): int((p != 0).sum())
        for name, p in model.named_parameters()
        if name.endswith("lora_E.default")
    }


def state_dict(model: nn.Module) -> dict[str, Any]:
    """The rank allocator's importance averages, which PEFT itself never saves."""
    alloc = model.base_model.rankallocator
    pattern = model.peft_config["default"].rank_pattern
    return {"ipt": dict(alloc.ipt), "exp_avg_ipt": dict(alloc.exp_avg_ipt), "exp_avg_unc": dict(alloc.exp_avg_unc),
            "rank_pattern": {k: torch.as_tensor(v) for k, v in (pattern or {}).items()}}  # fmt: skip


def load_state_dict(model: nn.Module, state: dict[str, Any], optimizer: Any = None) -> None:
    alloc = model.base_model.rankallocator
    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (
        dict(state["ipt"]),
        dict(state["exp_avg_ipt"]),
        dict(state["exp_avg_unc"]),
    )
    model.peft_config["default"].rank_pattern = {k: v.tolist() for k, v in state["rank_pattern"].items()} or None


HOOKS = Hooks(on_optimizer_step, state_dict, load_state_dict, summary=lambda model: {"ranks": ranks(model)})


# Validation (benchmarks/results/methods.md, seed 0): 2e-3 0.589 (it does not learn in one epoch),
# 5e-3 0.787, 1e-2 0.798, 2e-2 0.806; at 100 steps 5e-3 0.578 (the majority class), 1e-2 0.633,
# 2e-2 0.784 (benchmarks/results/short_runs.md): 2e-2 holds at both lengths.
METHOD = Method("adalora", build, lr=2e-2, static=STATIC, hooks=HOOKS)
