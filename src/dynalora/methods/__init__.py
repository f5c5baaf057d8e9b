"""Fine-tuning methods the CLI offers, one small file each, and the registry.

Each file holds its builder and one :class:`Method` record (default learning rates and where they
were measured, whether it can be dynamic and why not, its hooks and options). Everything else is
read from :data:`REGISTRY`: the CLI's choices and defaults, the sweep's keys, the loop's hooks.

A builder takes a loaded model and returns the model to train plus, for dynamic allocation, the
units of allocation (``None``: found by structure, as the model's tuner layers).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dynalora.methods import adalora, dvora, dylora, galore, hydra, l1ra
from dynalora.methods.common import Built, Hooks, Method, MethodOptions
from dynalora.methods.full import BITFIT, FULL
from dynalora.methods.peft_adapters import DORA, LORA, VERA
from dynalora.methods.tuner import is_own, load_trained, merge, save_adapter

_ALL = (LORA, DORA, VERA, dvora.METHOD, hydra.METHOD, adalora.METHOD, dylora.METHOD, galore.METHOD, l1ra.METHOD)
REGISTRY: dict[str, Method] = {m.name: m for m in (*_ALL, FULL, BITFIT)}
# views of the registry
METHODS: dict[str, Callable[[nn.Module, MethodOptions], Built]] = {n: m.build for n, m in REGISTRY.items()}
ADAPTER_METHODS = tuple(n for n, m in REGISTRY.items() if m.dynamic)  # dynamic allocation by default
STATIC_ONLY: dict[str, str] = {n: m.static for n, m in REGISTRY.items() if m.static}  # why each refuses --dynamic
HOOKS: dict[str, Hooks] = {n: m.hooks for n, m in REGISTRY.items() if m.hooks != Hooks()}

__all__ = [
    "ADAPTER_METHODS",
    "HOOKS",
    "METHODS",
    "REGISTRY",
    "STATIC_ONLY",
    "Built",
    "Hooks",
    "Method",
    "MethodOptions",
    "is_own",
    "load_trained",
    "merge",
    "save_adapter",
]
