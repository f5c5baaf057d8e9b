"""Keep the saving of a partial selection under activation checkpointing, and cap saved activations
by recomputation.

Autograd stops backward below the lowest tensor that requires grad, so blocks under the lowest
trained block (the *cut*) should run forward only. Two things undo that:

- ``enable_input_require_grads()``, which transformers' ``gradient_checkpointing_enable`` and
  ``PeftModel`` (whenever the base model checkpoints) call, makes the embedding output require grad.
  Backward, and under checkpointing the recomputation, then run through every block at every step.
- Reentrant checkpointing (``use_reentrant=True``) gives a block's parameters no gradient unless one
  of its inputs requires grad (transformers #16276, #21381), which is why that hook exists.

:class:`BlockGuard` fixes both per block, with forward pre-hooks. transformers' per-layer
checkpointing (``GradientCheckpointingLayer``) wraps ``forward``, so module hooks run *before* the
checkpoint decides anything:

- below the cut, every tensor input is detached and the block runs without checkpointing (as
  LLaMA-Factory runs frozen blocks): no backward, no recomputation;
- at the cut, inputs are detached too (nothing below needs their gradient); when the block
  checkpoints reentrantly its hidden state becomes a leaf that requires grad, so its own
  parameters still get gradients;
- above the cut nothing changes.

The cut is re-read at every forward (it moves with each reallocation), and checkpointing is read from
the blocks at every forward, so it does not matter whether checkpointing was enabled before or after
the allocator was built, or who registered the embedding hook (BAdam's
``gradient_checkpointing_enable_for_bcd`` and ms-swift #10142 met the same problems).

**Recompute cap.** With ``memory_cap`` and ``cap_mode="recompute"``, the selection is left as the
allocator made it, and the lowest trained blocks are checkpointed (non-reentrant, only on steps where
they train) until the blocks that keep their activations hold at most ``memory_cap`` of them
(:meth:`dynalora.cost.CostModel.recompute_blocks`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dynalora.adapters import AdapterModule, find_block_list

logger = logging.getLogger(__name__)

# Cache arguments a block must not see while it is checkpointed: the recomputation would update a
# cache twice (the same set transformers' GradientCheckpointingLayer drops).
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    if isinstance(value, tuple | list):
        return type(value)(_detach(v) for v in value)
    return value


def _is_hidden(args: tuple) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()


def _checkpoints(block: nn.Module) -> bool:
    """Whether transformers will checkpoint this block's next training forward."""
    return bool(getattr(block, "gradient_checkpointing", False))


def is_reentrant(block: nn.Module) -> bool:
    """Whether the block's checkpoint function is reentrant; unknown functions count as reentrant
    (making the input require grad is then needed, and harmless otherwise)."""
    keywords = getattr(getattr(block, "_gradient_checkpointing_func", None), "keywords", None)
    if isinstance(keywords, dict) and "use_reentrant" in keywords:
        return bool(keywords["use_reentrant"])
    return True


def _module_order(model: nn.Module) -> dict[int, int]:
    return {id(m): i for i, (_, m) in enumerate(model.named_modules(remove_duplicate=False))}


class BlockGuard:
    """Per-block forward pre-hooks that keep backward and recomputation out of blocks below the cut.

    Args:
        model: the model holding the modules.
        modules: the units of allocation, in order.
        extra: parameters trained at every step outside the modules (classifier head ...).
        blocks: block index of each module (:attr:`dynalora.cost.CostModel.blocks`).
        recompute: install the recompute-cap wrapper on every block.
        measure: the importance measure, when it reads forward passes (``forward``, ``adapter``):
            reentrant checkpointing runs them without gradients and again inside backward, where no
            training pass is counted, so such a block would score 0; its first forward then raises.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[AdapterModule],
        extra: Sequence[nn.Parameter],
        blocks: Sequence[int],
        recompute: bool = False,
        measure: str | None = None,
    ) -> None:
        self._forward_measure = measure
        found = find_block_list(model, [m.layer for m in modules])
        self.blocks: list[nn.Module] = list(found[1]) if found is not None else []
        self._module_blocks = list(blocks)
        self._cut: int | None = None
        self._recompute: frozenset[int] = frozenset()
        self._handles: list[Any] = []
        self._forwards: list[tuple[nn.Module, Any]] = []
        # Anything trainable below the blocks (a module or parameter before the block list, e.g. an
        # adapter on the embedding) needs backward through every block: no cut then.
        self._before: list[bool] = [False] * len(modules)
        self._floor: int | None = len(self.blocks)
        if found is None:
            self._floor = None
        else:
            order = _module_order(model)
            position = order[id(found[1])]
            inside = {id(sub): b for b, block in enumerate(self.blocks) for sub in block.modules()}
            self._before = [id(m.layer) not in inside and order[id(m.layer)] < position for m in modules]
            always = {id(p) for p in extra}
            for name, owner in model.named_modules():
                for p in owner.parameters(recurse=False):
                    if id(p) not in always:
                        continue
                    if id(owner) in inside:
                        self._floor = None if self._floor is None else min(self._floor, inside[id(owner)])
                    elif order[id(owner)] < position:
                        logger.warning(
                            "%s trains at every step below the transformer blocks, so backward runs through every "
                            "block whatever the selection; freeze it to get the saving",
                            name,
                        )
                        self._floor = None
        self._paused: set[int] = set()  # blocks whose checkpointing is off for the current forward
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._pre, index), with_kwargs=True))
            self._handles.append(block.register_forward_hook(functools.partial(self._post, index), always_call=True))
            if recompute:
                self._wrap(index, block)

    @property
    def cut(self) -> int | None:
        """The lowest block that trains now; blocks below it run forward only. ``None``: no cut."""
        return self._cut

    @property
    def recompute(self) -> frozenset[int]:
        """Blocks checkpointed by the recompute cap for the current selection."""
        return self._recompute

    def update(self, mask: torch.Tensor, recompute: Sequence[int] = ()) -> None:
        """Set the cut from a selection (bool mask over the modules) and the blocks to recompute."""
        on = mask.tolist()
        if self._floor is None or any(b and a for b, a in zip(self._before, on, strict=True)):
            self._cut = None
        else:
            trained = [blk for blk, a in zip(self._module_blocks, on, strict=True) if a]
            self._cut = min([*trained, self._floor])
        self._recompute = frozenset(recompute)

    def _pre(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cut = self._cut
        if not (block.training and torch.is_grad_enabled()):
            return None
        if self._forward_measure and _checkpoints(block) and is_reentrant(block) and (cut is None or index >= cut):
            raise RuntimeError(
                f"measure={self._forward_measure!r} reads each module's training forward, which reentrant "
                "activation checkpointing (use_reentrant=True) runs without gradients and repeats inside backward, "
                "so the checkpointed blocks would score 0; allowed: gradient_checkpointing_kwargs="
                "{'use_reentrant': False} (transformers' default), or measure='gradient'"
            )
        if self._forwards and _checkpoints(block):  # the recompute cap's wrapper would stand aside: no cap
            raise RuntimeError(
                "memory_cap with cap_mode='recompute' checkpoints the lowest trained blocks itself, and gradient "
                "checkpointing already checkpoints every block, so the cap would do nothing (and the history would "
                "record recomputation that did not happen); allowed: gradient checkpointing off with the cap, or the "
                "cap dropped"
            )
        if cut is None or index > cut:
            return None
        if _checkpoints(block) and type(block).__call__ is not nn.Module.__call__:
            # transformers < 5 checkpointed __call__: these hooks would run inside the checkpoint.
            raise RuntimeError(
                f"{type(block).__name__} checkpoints around its hooks (an old transformers), so dynalora cannot keep "
                "backward out of frozen blocks; upgrade transformers (>= 5) or turn gradient checkpointing off"
            )
        args = _detach(args)
        kwargs = _detach(kwargs)
        if index < cut and _checkpoints(block):  # nothing to recompute: run it plainly, this once
            block.gradient_checkpointing = False
            self._paused.add(index)
        elif index == cut and _checkpoints(block) and is_reentrant(block) and _is_hidden(args):
            # reentrant checkpointing gives parameters no gradient unless an input requires grad
            args = (args[0].detach().requires_grad_(True), *args[1:])
        return args, kwargs

    def _post(self, index: int, block: nn.Module, args: tuple, output: Any) -> None:
        if index in self._paused:
            self._paused.discard(index)
            block.gradient_checkpointing = True

    def _wrap(self, index: int, block: nn.Module) -> None:
        inner: Callable[..., Any] = block.forward
        own = block.__dict__.get("forward")  # someone else's instance-level forward, restored on close

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if index in self._recompute and block.training and torch.is_grad_enabled() and not _checkpoints(block):
                for name in _CACHE_KWARGS:
                    if kwargs.get(name) is not None:
                        kwargs[name] = None
                if kwargs.get("use_cache"):
                    kwargs["use_cache"] = False
                return checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)

        block.forward = forward
        self._forwards.append((block, own))

    def close(self) -> None:
        """Remove the hooks and restore every wrapped ``forward``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block, own in self._forwards:
            if own is not None:
                block.forward = own
            else:
                block.__dict__.pop("forward", None)
        self._forwards.clear()
        self._cut = None


def enable_checkpointing(model: nn.Module, reentrant: bool = False) -> nn.Module:
    """Switch on transformers' activation checkpointing in the outermost model that supports it
    (a ``PeftModel`` or an own method's wrapper holds one); returns that model.

    Raises:
        ValueError: no module of ``model`` supports activation checkpointing.
    """
    kwargs = {"use_reentrant": reentrant}
    for module in model.modules():
        if not getattr(module, "supports_gradient_checkpointing", False):
            continue
        enable = getattr(module, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return module
    raise ValueError(
        f"{type(model).__name__} has no module that supports activation checkpointing; "
        "allowed: transformers models whose blocks checkpoint (supports_gradient_checkpointing)"
    )
