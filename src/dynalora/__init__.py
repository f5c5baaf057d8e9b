"""dynalora: dynamic low-rank module allocation (DynaLoRA) over PEFT adapters.

Only the most important subset of adapter modules trains at any time, re-chosen on a schedule
("Dynamic Low-Rank Module Allocation", §3).
"""

from dynalora.adapters import AdapterModule, find_adapter_modules, find_linear_modules
from dynalora.config import DynamicConfig
from dynalora.controller import DynamicAllocator

__all__ = [
    "AdapterModule",
    "attach",
    "DynamicAllocator",
    "DynamicConfig",
    "find_adapter_modules",
    "find_linear_modules",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # attach needs transformers' Trainer: imported on first use only
    if name == "attach":
        from dynalora.integrations.trainer import attach

        return attach
    raise AttributeError(f"module 'dynalora' has no attribute {name!r}")
