"""What a selection of modules costs a training step, predicted from the model's structure.

Autograd stops backward below the lowest tensor that requires grad: blocks under the lowest active
module run forward only and save nothing for backward. So a selection's cost is set mostly by its
*depth*, the lowest transformer block holding an active module, and hardly by how many modules
above it train (adapters are tiny next to the frozen path backward runs through anyway).

:class:`CostModel` turns that into numbers, per selection (a bool mask over the modules):

- ``backward_share``: the share of the blocks' work that backward passes through, each block
  weighted by its parameter count (compute and saved activations both grow with it);
- ``step_ratio``: predicted step time over a step that trains every module,
  ``fixed_share + (1 - fixed_share) * backward_share``: forward, head, optimizer and data do not
  depend on the selection;
- ``activation_share``: predicted saved activations over training every module (the backward share,
  less the blocks a recompute cap checkpoints);
- ``recompute_share``: the share of the blocks' work whose forward a recompute cap runs twice;
- gradient and optimizer-state bytes of the active modules' tensors, counted exactly.

``benchmarks/cost.py`` checks the predictions against measured step times and counted bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynalora.adapters import AdapterModule, find_block_list

FIXED_SHARE = 0.6
"""Share of a LoRA step's time that does not depend on the selection. Fitted to the depth table of
``benchmarks/results/cost.md`` (MiniLM-L6 on 2 CPU cores, batch 32 x 64): training only blocks
>= d takes 0.93, 0.86, 0.80, 0.73, 0.67 of the d = 0 step for d = 1..5, and 0.6 + 0.4 (6 - d) / 6
gives 0.93, 0.87, 0.80, 0.73, 0.67. Other hardware has its own share: pass ``fixed_share``."""

RECOMPUTE_COST = 1.0
"""A block's recomputed forward over its backward. Adapters leave the frozen weights without
gradients, so backward does about one forward's work. Measured on 2 CPU cores as checkpointed
LoRA's extra time over the blocks' backward share: 1.05 on SmolLM2-135M, 1.6 on MiniLM-L6
(``benchmarks/results/checkpointing.md``)."""

CHECKPOINT_KEEP = 0.1
"""Share of a block's saved activations that it still keeps when checkpointed: its input hidden
state (and position tensors). Counted with saved-tensor hooks: 0.07 on a tiny llama (hidden 32);
the more tensors a block saves per hidden state, the less (``tests/test_checkpointing.py``)."""


def module_blocks(model: nn.Module, modules: Sequence[AdapterModule]) -> tuple[list[int], list[float]]:
    """The transformer block of each module, and each block's share of the blocks' parameters.

    Blocks are the children of the ``nn.ModuleList`` holding most of the modules
    (:func:`~dynalora.adapters.find_block_list`), so the index comes from the module tree, for any
    family. A module outside that list counts as block 0 if it comes before the list in the model
    (training it needs backward through every block) and as the last block otherwise (the head side).
    Without any list, all modules are in one block.

    Returns:
        ``(block index per module, share per block)``; shares sum to 1.
    """
    found = find_block_list(model, [m.layer for m in modules])
    if found is None:
        return [0] * len(modules), [1.0]
    list_name, blocks = found
    # Identify blocks by object, not name: named_modules() visits a shared module once.
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules(remove_duplicate=False))}
    owner = {id(sub): b for b, block in enumerate(blocks) for sub in block.modules()}
    list_position = order[id(blocks)]
    index = [
        owner[id(m.layer)] if id(m.layer) in owner else (0 if order[id(m.layer)] < list_position else len(blocks) - 1)
        for m in modules
    ]
    sizes = torch.tensor([sum(p.numel() for p in block.parameters()) for block in blocks], dtype=torch.float64)
    if sizes.sum() <= 0:
        sizes = torch.ones(len(blocks), dtype=torch.float64)
    return index, (sizes / sizes.sum()).tolist()


@dataclass(frozen=True)
class SelectionCost:
    """Predicted cost of one selection; shares and ratios are relative to training every module."""

    depth: int
    """Lowest block holding an active module (the number of blocks if none is active)."""
    backward_share: float
    step_ratio: float
    activation_share: float
    gradient_bytes: int
    optimizer_bytes: int
    """Optimizer state of the active modules' tensors (AdamW: two moments per element)."""
    recompute_share: float = 0.0
    """Share of the blocks' work checkpointed (forward run twice) by a recompute cap."""


class CostModel:
    """Predicts what training a selection of modules costs a step (see the module docstring).

    Args:
        blocks: block index of each module, shape ``(M,)``.
        block_share: each block's share of the blocks' work, shape ``(L,)``, summing to 1.
        module_bytes: bytes of each module's trainable tensors, shape ``(M,)``.
        fixed_share: share of a step's time that does not depend on the selection.
        states_per_element: optimizer-state tensors per trained element (AdamW: 2).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        block_share: Sequence[float],
        module_bytes: Sequence[int],
        fixed_share: float = FIXED_SHARE,
        states_per_element: int = 2,
    ) -> None:
        self.blocks = torch.as_tensor(list(blocks), dtype=torch.int64)
        self.block_share = torch.as_tensor(list(block_share), dtype=torch.float64)
        self.module_bytes = torch.as_tensor(list(module_bytes), dtype=torch.int64)
        if not 0.0 <= fixed_share < 1.0:
            raise ValueError(f"fixed_share={fixed_share!r} is out of range; allowed: a number in [0, 1)")
        if self.blocks.numel() != self.module_bytes.numel():
            raise ValueError("blocks and module_bytes must have one entry per module")
        if self.blocks.numel() and (self.blocks.min() < 0 or self.blocks.max() >= self.block_share.numel()):
            raise ValueError(f"block indices must lie in 0..{self.block_share.numel() - 1}")
        self.fixed_share = fixed_share
        self.states_per_element = states_per_element
        # above[l] = share of blocks l..L-1; above[L] = 0: what backward passes through from depth l
        tail = torch.flip(torch.cumsum(torch.flip(self.block_share, [0]), 0), [0])
        self.above = torch.cat([tail, torch.zeros(1, dtype=torch.float64)])

    @classmethod
    def from_model(
        cls, model: nn.Module, modules: Sequence[AdapterModule], fixed_share: float = FIXED_SHARE
    ) -> CostModel:
        blocks, share = module_blocks(model, modules)
        sizes = [sum(p.numel() * p.element_size() for p in m.params) for m in modules]
        return cls(blocks, share, sizes, fixed_share)

    @property
    def num_blocks(self) -> int:
        return self.block_share.numel()

    def depth(self, mask: torch.Tensor) -> int:
        active = self.blocks[mask]
        return int(active.min()) if active.numel() else self.num_blocks

    def backward_share(self, mask: torch.Tensor) -> float:
        return float(self.above[self.depth(mask)])

    def step_ratio(self, mask: torch.Tensor) -> float:
        return self._ratio(self.backward_share(mask))

    def _ratio(self, backward_share: float, recompute_share: float = 0.0) -> float:
        return self.fixed_share + (1.0 - self.fixed_share) * (backward_share + RECOMPUTE_COST * recompute_share)

    def recompute_blocks(self, mask: torch.Tensor, memory_cap: float | None) -> list[int]:
        """Blocks to checkpoint so that the saved activations, those of the blocks that keep theirs plus
        the inputs the checkpointed ones keep (:data:`CHECKPOINT_KEEP`), are at most ``memory_cap`` of
        training every block: the lowest trained blocks, upwards (their recomputation comes last in
        backward, when the activations above are already freed). Empty without a cap or when the
        selection fits; every trained block when even that does not fit."""
        depth = self.depth(mask)
        if memory_cap is None:
            return []
        top = depth
        while top < self.num_blocks and self._kept(depth, top) > memory_cap + 1e-9:
            top += 1
        return list(range(depth, top))

    def _kept(self, depth: int, top: int) -> float:
        """Saved share when blocks ``depth..top-1`` are checkpointed and blocks ``top..`` are not."""
        return float(self.above[top]) + CHECKPOINT_KEEP * float(self.above[depth] - self.above[top])

    def estimate(self, mask: torch.Tensor, recompute: Sequence[int] = ()) -> SelectionCost:
        """Everything predicted for ``mask`` (bool, shape ``(M,)``), with ``recompute`` blocks checkpointed."""
        depth = self.depth(mask)
        share = float(self.above[depth])
        again = float(self.block_share[list(recompute)].sum()) if len(recompute) else 0.0
        grads = int(self.module_bytes[mask].sum())
        return SelectionCost(
            depth=depth,
            backward_share=share,
            step_ratio=self._ratio(share, again),
            activation_share=share - (1.0 - CHECKPOINT_KEEP) * again,
            gradient_bytes=grads,
            optimizer_bytes=self.states_per_element * grads,
            recompute_share=again,
        )
