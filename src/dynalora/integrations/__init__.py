"""Thin adapters that drive :class:`dynalora.DynamicAllocator` from other training loops."""

from dynalora.integrations.trainer import DynamicAllocationCallback

__all__ = ["DynamicAllocationCallback"]
