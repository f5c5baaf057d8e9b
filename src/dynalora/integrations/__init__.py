"""Thin adapters that drive :class:`dynalora.DynamicAllocator` (and AdaLoRA) from other training loops."""

from dynalora.integrations.trainer import AdaLoraCallback, DynamicAllocationCallback, MethodStepCallback, attach

__all__ = ["AdaLoraCallback", "DynamicAllocationCallback", "MethodStepCallback", "attach"]
