"""The PEFT-backed adapters: LoRA, DoRA (``use_dora``) and VeRA."""

from __future__ import annotations

from peft import LoraConfig, VeraConfig, get_peft_model
from torch import nn

from dynalora.methods.common import Built, MethodOptions, adapter_targets


def lora(model: nn.Module, opts: MethodOptions, *, dora: bool = False) -> Built:
    targets = adapter_targets(model, opts.targets)
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=list(targets),
        use_dora=dora,
        task_type=opts.task_type,
    )
    return get_peft_model(model, config), None


def vera(model: nn.Module, opts: MethodOptions) -> Built:
    targets = adapter_targets(model, opts.targets)
    config = VeraConfig(r=opts.rank, vera_dropout=opts.dropout, target_modules=list(targets), task_type=opts.task_type)
    return get_peft_model(model, config), None


def dora(model: nn.Module, opts: MethodOptions) -> Built:
    return lora(model, opts, dora=True)
