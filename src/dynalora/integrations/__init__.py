"""Thin adapters that drive :class:`dynalora.DynamicAllocator` (and AdaLoRA) from other training loops."""

from dynalora.integrations.trainer import AdaLoraCallback, DynamicAllocationCallback

__all__ = ["AdaLoraCallback", "DynamicAllocationCallback"]
