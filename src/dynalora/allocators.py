"""Module selection (paper §3.2): near-pure functions of (importance, budget, rng).

Every allocator takes an :class:`AllocationRequest` and returns a bool mask of shape ``(M,)``
over the modules, in module order. Importance arrives already normalised (eq. 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AllocationRequest:
    """What an allocator sees.

    Attributes:
        importance: normalised importance ``ŷ`` (eq. 2), shape ``(M,)``, float64, sums to 1.
        k: number of modules to select (not used by ``threshold``).
        threshold: p of the threshold allocator.
        active_steps: ``C``, optimizer steps each module was trained so far, shape ``(M,)``, int64.
        generator: the allocator's seeded RNG; the only source of randomness.
    """

    importance: torch.Tensor
    k: int
    threshold: float
    active_steps: torch.Tensor
    generator: torch.Generator


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``ŷ = y / Σ y``; uniform when nothing has been measured (all zero) or scores are invalid."""
    scores = scores.to(torch.float64).clamp_min(0)
    total = scores.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(scores, 1.0 / scores.numel())
    return scores / total


def _mask(indices: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[indices] = True
    return mask


def _sample(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices, drawn with probability ∝ ``weights`` without replacement.

    Modules of weight zero are drawn (uniformly) only when fewer than k have positive weight.
    """
    positive = (weights > 0).nonzero().flatten()
    if positive.numel() >= k:
        return torch.multinomial(weights, k, replacement=False, generator=generator)
    zero = (weights <= 0).nonzero().flatten()
    fill = zero[torch.randperm(zero.numel(), generator=generator)[: k - positive.numel()]]
    return torch.cat([positive, fill])


def topk(req: AllocationRequest) -> torch.Tensor:
    """The k most important modules; ties go to the module that comes first in the model."""
    order = torch.sort(req.importance, descending=True, stable=True).indices
    return _mask(order[: req.k], req.importance.numel())


def threshold_count(importance: torch.Tensor, p: float) -> int:
    """The smallest n >= 1 such that the n largest normalised importances sum to at least p."""
    cumulative = torch.cumsum(torch.sort(importance, descending=True).values, 0)
    # searchsorted(left) finds the first position whose running sum reaches p: that module is included.
    # Rounding can leave the full sum a hair below p = 1; then every module is selected.
    n = int(torch.searchsorted(cumulative, torch.tensor([p], dtype=cumulative.dtype)).item()) + 1
    return min(max(n, 1), importance.numel())


def threshold(req: AllocationRequest) -> torch.Tensor:
    """The fewest most important modules whose normalised importance sums to >= p (crossing module included)."""
    order = torch.sort(req.importance, descending=True, stable=True).indices
    return _mask(order[: threshold_count(req.importance, req.threshold)], req.importance.numel())


def stochastic(req: AllocationRequest) -> torch.Tensor:
    """k distinct modules, each draw with probability ∝ normalised importance."""
    return _mask(_sample(req.importance, req.k, req.generator), req.importance.numel())


def discounted_stochastic(req: AllocationRequest) -> torch.Tensor:
    """As ``stochastic`` with importance / (C + 1) (eq. 3; +1 so that untrained modules are defined)."""
    weights = req.importance / (req.active_steps.to(torch.float64) + 1.0)
    return _mask(_sample(weights, req.k, req.generator), req.importance.numel())


def random(req: AllocationRequest) -> torch.Tensor:
    """k modules uniformly at random, ignoring importance."""
    size = req.importance.numel()
    return _mask(torch.randperm(size, generator=req.generator)[: req.k], size)


Allocator = Callable[[AllocationRequest], torch.Tensor]

ALLOCATORS: dict[str, Allocator] = {
    "topk": topk,
    "threshold": threshold,
    "stochastic": stochastic,
    "discounted_stochastic": discounted_stochastic,
    "random": random,
}


def initial_count(allocator: str, k: int, p: float, num_modules: int) -> int:
    """How many modules the first selection holds, before any importance exists.

    k for every allocator but ``threshold``, which under uniform importance needs ceil(p * M).
    """
    if allocator == "threshold":
        return min(num_modules, max(1, math.ceil(p * num_modules - 1e-9)))
    return k
