"""Fine-tuning methods the CLI offers, one small file each, and the registry.

Each builder takes a loaded ``AutoModelForSequenceClassification`` and returns the model to train
plus, for dynamic allocation, the units of allocation (``None``: found by structure, as the
model's tuner layers).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dynalora.methods import adalora, dvora, dylora, galore, hydra, l1ra
from dynalora.methods.common import Built, Hooks, MethodOptions
from dynalora.methods.full import BITFIT_STATIC, bitfit, full
from dynalora.methods.peft_adapters import dora, lora, vera
from dynalora.methods.tuner import is_own, load_trained, merge, save_adapter

METHODS: dict[str, Callable[[nn.Module, MethodOptions], Built]] = {
    "lora": lora,
    "dora": dora,
    "vera": vera,
    "dvora": dvora.build,
    "hydra": hydra.build,
    "adalora": adalora.build,
    "dylora": dylora.build,
    "galore": galore.build,
    "l1ra": l1ra.build,
    "full": full,
    "bitfit": bitfit,
}
ADAPTER_METHODS = ("lora", "dora", "vera", "dvora", "hydra", "dylora")  # dynamic allocation by default
# methods that allocate by their own rule, or have nothing to allocate: why each refuses --dynamic
STATIC_ONLY: dict[str, str] = {
    "adalora": adalora.STATIC,
    "galore": galore.STATIC,
    "l1ra": l1ra.STATIC,
    "bitfit": BITFIT_STATIC,
}
# what a method needs from the training loop; the others need nothing
HOOKS: dict[str, Hooks] = {
    "adalora": adalora.HOOKS,
    "dylora": dylora.HOOKS,
    "galore": galore.HOOKS,
    "l1ra": l1ra.HOOKS,
}

__all__ = [
    "ADAPTER_METHODS",
    "HOOKS",
    "METHODS",
    "STATIC_ONLY",
    "Hooks",
    "Built",
    "MethodOptions",
    "is_own",
    "load_trained",
    "merge",
    "save_adapter",
]
