"""Module selection (paper §3.2): near-pure functions of (importance, budget, rng).

Every allocator takes an :class:`AllocationRequest` and returns a bool mask of shape ``(M,)``
over the modules, in module order. Importance arrives already normalised (eq. 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dynalora.cost import CostModel


@dataclass(frozen=True)
class AllocationRequest:
    """What an allocator sees.

    Attributes:
        importance: normalised importance ``ŷ`` (eq. 2), shape ``(M,)``, float64, sums to 1.
        k: number of modules to select (not used by ``threshold``).
        threshold: p of the threshold allocator.
        active_steps: ``C``, optimizer steps each module was trained so far, shape ``(M,)``, int64.
        generator: the allocator's seeded RNG; the only source of randomness.
        cost: what a selection costs (``cutoff`` only).
        budget: ``cutoff``: expected backward share per step, in (0, 1].
        memory_cap: ``cutoff``: largest saved-activation share of any step, or ``None``.
        coverage: ``cutoff``: the lowest probability with which any block within the cap trains.
        round: how many selections were made before this one (0 for the first).
        offset: ``cutoff``: the seed's shift of its low-discrepancy sequence (:func:`seed_offset`).
    """

    importance: torch.Tensor
    k: int
    threshold: float
    active_steps: torch.Tensor
    generator: torch.Generator
    cost: CostModel | None = None
    budget: float = 1.0
    memory_cap: float | None = None
    coverage: float = 0.0
    round: int = 0
    offset: float = 0.0


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


def lowest_allowed(depth_share: torch.Tensor, memory_cap: float | None) -> int:
    """The lowest candidate depth whose backward share keeps within the cap.

    Args:
        depth_share: backward share of each candidate depth, non-increasing, shape ``(n,)``.
        memory_cap: largest allowed share, or ``None`` for no cap.

    Raises:
        ValueError: if even the top candidate exceeds the cap.
    """
    if memory_cap is None:
        return 0
    allowed = (depth_share <= memory_cap + 1e-9).nonzero().flatten()
    if allowed.numel() == 0:
        top = float(depth_share[-1])
        raise ValueError(
            f"memory_cap={memory_cap:g} is below the share of the top block alone ({top:.3f}); "
            f"allowed: a cap >= {top:.3f}, or none"
        )
    return int(allowed.min())


def training_profile(
    block_importance: torch.Tensor,
    block_share: torch.Tensor,
    budget: float,
    coverage: float = 0.0,
    lowest: int = 0,
) -> torch.Tensor:
    """How often each block trains under the ``cutoff`` allocator: ``p``, shape ``(L,)``.

    Training block l needs backward through every block above it, so ``p`` never decreases
    upwards, and the top block always trains (``p[L-1] = 1``). Below the top,
    ``p_l = clamp(a * g_l, coverage, 1)`` with ``g`` the running maximum of block importance from
    the bottom (a block above an important one rides on its backward pass for free), scaled by ``a``
    so that the expected backward share ``sum_l share_l p_l`` equals ``budget``. (A cutoff at block
    d costs the shares of blocks d..L-1, and block l is among them exactly when d <= l, which
    happens with probability ``p_l``.) Blocks below ``lowest`` (the memory cap) never train. If the
    budget cannot pay for the coverage floor, the floor gives way: every allowed block below the
    top gets the same ``p`` that the budget affords.

    Args:
        block_importance: importance per block (any non-negative scale), shape ``(L,)``.
        block_share: the backward share each block adds when backward reaches it, shape ``(L,)``
            (with identical blocks, ``1 / L`` each).
        budget: expected backward share per step, in (0, 1].
        coverage: the lowest ``p`` of any allowed block, in [0, 1].
        lowest: the lowest block allowed to train.
    """
    num_blocks = block_share.numel()
    share = block_share.to(torch.float64)
    p = torch.zeros(num_blocks, dtype=torch.float64)
    p[num_blocks - 1] = 1.0
    below = torch.arange(num_blocks) < num_blocks - 1
    free = below & (torch.arange(num_blocks) >= lowest)  # allowed, and not the top block
    if not free.any():
        return p
    rest = budget - float(share[num_blocks - 1])  # what the budget leaves after the top block
    if rest <= 0:
        return p
    if rest >= float(share[free].sum()) * (1 - 1e-6):  # budget 1 is exactly "every block, every step"
        p[free] = 1.0
        return p
    if coverage * float(share[free].sum()) >= rest:  # the floor alone spends the budget
        p[free] = rest / float(share[free].sum())
        return p
    g = block_importance.to(torch.float64).clamp_min(0).clone()
    g[~free] = 0.0
    g = torch.cummax(g, 0).values
    if float(g[free].max()) <= 0:
        g[free] = 1.0

    def spent(a: float) -> float:
        return float((share[free] * (a * g[free]).clamp(coverage, 1.0)).sum())

    lo, hi = 0.0, 1.0
    while spent(hi) < rest:  # spent() rises with a, to share[free].sum() > rest
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) < rest else (lo, mid)
    p[free] = (hi * g[free]).clamp(coverage, 1.0)
    return p


def paced_budget(budget: float, floor: float, progress: float) -> float:
    """The budget of a reallocation at ``progress`` (fraction of the run done) under ``budget_schedule="linear"``.

    Spends the backward budget where the learning rate is high: ``clamp(c * (1 - progress), floor, 1)``
    with ``c`` chosen so that the mean over the run is ``budget``. With a linearly decaying learning
    rate, a block trained early gets more of the run's learning-rate sum for the same cost.

    Args:
        budget: mean backward share over the run, in (0, 1].
        floor: the least any selection costs (the top block's share).
        progress: optimizer steps done over the run's total, in [0, 1].
    """
    if budget >= 1.0 or budget <= floor:
        return budget
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000

    def mean(c: float) -> float:
        return float((c * (1 - grid)).clamp(floor, 1.0).mean())

    lo, hi = 0.0, 2.0
    while mean(hi) < budget:
        hi *= 2.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < budget else (lo, mid)
    return min(1.0, max(floor, hi * (1.0 - min(max(progress, 0.0), 1.0))))


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SILVER = math.sqrt(2.0) - 1.0


def seed_offset(seed: int) -> float:
    """The shift of the ``cutoff`` allocator's sequence for a seed: ``frac(seed * (sqrt(2) - 1))``.

    A shifted Kronecker sequence ``frac(t * 0.618... + offset)`` is as evenly spread as the unshifted
    one, so every seed keeps the low-discrepancy property; seed 0 has no shift."""
    return (seed * _SILVER) % 1.0


def cutoff(req: AllocationRequest) -> torch.Tensor:
    """Every module at or above a cutoff block trains; the cutoff is drawn so that the expected
    backward share is the budget (cost-aware allocation).

    Candidate cutoffs are the blocks that hold modules. Block importance is the mean normalised
    importance of its modules; :func:`training_profile` turns it into ``p_i``, how often candidate
    i trains, with each candidate weighted by the backward share it adds. The cutoff of round t is
    the lowest candidate with ``p_i > u_t``, where ``u_t = frac(t * 0.618... + offset)`` is a
    low-discrepancy sequence shifted by the seed (:func:`seed_offset`): over a run the cutoffs hit the
    profile's frequencies closely. Round 0 reaches as low as the cap allows (every module, without a
    cap) on any model, whatever the budget, so every module is measured before importance is trusted.
    """
    if req.cost is None:
        raise ValueError("the cutoff allocator needs a cost model (AllocationRequest.cost)")
    blocks = req.cost.blocks
    occupied = torch.unique(blocks)  # sorted candidate depths, shape (n,)
    depth_share = req.cost.above[occupied]  # backward share when the cutoff is at each candidate
    added = depth_share - torch.cat([depth_share[1:], depth_share.new_zeros(1)])  # what each adds
    position = torch.searchsorted(occupied, blocks)  # candidate index of each module's block
    importance = req.importance.to(torch.float64)
    sums = torch.zeros(occupied.numel(), dtype=torch.float64).index_add_(0, position, importance)
    counts = torch.zeros(occupied.numel(), dtype=torch.float64).index_add_(0, position, torch.ones_like(importance))
    lowest = lowest_allowed(depth_share, req.memory_cap)
    if req.round == 0:
        return blocks >= int(occupied[lowest])
    p = training_profile(sums / counts, added, req.budget, req.coverage, lowest)
    u = (req.round * _GOLDEN + req.offset) % 1.0
    depth = int(occupied[int((p > u).nonzero().flatten().min())])
    return blocks >= depth


Allocator = Callable[[AllocationRequest], torch.Tensor]

ALLOCATORS: dict[str, Allocator] = {
    "topk": topk,
    "threshold": threshold,
    "stochastic": stochastic,
    "discounted_stochastic": discounted_stochastic,
    "random": random,
    "cutoff": cutoff,
}
COST_AWARE = frozenset({"cutoff"})
"""Allocators that select by cost: they ignore ``k`` and make the first selection themselves."""


def initial_count(allocator: str, k: int, p: float, num_modules: int) -> int:
    """How many modules the first selection holds, before any importance exists.

    k for every allocator but ``threshold``, which under uniform importance needs ceil(p * M).
    """
    if allocator == "threshold":
        return min(num_modules, max(1, math.ceil(p * num_modules - 1e-9)))
    return k
