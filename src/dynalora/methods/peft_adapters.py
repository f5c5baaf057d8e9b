"""The PEFT-backed adapters: LoRA, DoRA (``use_dora``) and VeRA."""

from __future__ import annotations

from peft import LoraConfig, VeraConfig, get_peft_model
from torch import nn

from dynalora.methods.common import Built, Method, MethodOptions, adapter_targets


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


# LoRA's rates were measured: on encoders with benchmarks/quality.py (seeds 0-2); on decoders on
# validation exact match of the embedded LLM on the embedded instruction task (docs/results.md;
# 3 seeds): 5e-4 0.870 for LoRA and DynaLoRA, 2e-3 0.847 and 0.833. Validation perplexity
# preferred 2e-3 there; on drugreview_instruct, at the same recipe, both rates stayed at the
# majority answer. The smaller rate is also the safer one with every linear layer adapted.
LORA = Method("lora", lora, lr=2e-3, lr_causal=5e-4, dynamic=True, shardable=True)
DORA = Method("dora", dora, lr=2e-3, lr_causal=5e-4, dynamic=True, shardable=True)  # LoRA's rates
# VeRA: chosen on the validation split of one epoch of Rotten Tomatoes (benchmarks/results/backbones.md):
# 2e-3 0.654, 3e-2 0.779, 1e-1 0.779; the smaller of the tied two. Its trained scaling vectors take
# the place of alpha.
VERA = Method("vera", vera, lr=3e-2, dynamic=True, shardable=True, options=("targets", "rank", "adapter_dropout"))
