"""Importance measures (paper §3.1) behind one small Protocol.

A measure watches training-mode passes only: forward hooks look at ``module.training`` and
``torch.is_grad_enabled()``, so evaluation passes (``model.eval()`` or ``torch.no_grad()``) never
count. All accumulation stays on the module's device; nothing synchronises with the host until
:meth:`ImportanceMeasure.scores` is read at a reallocation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from dynalora import distributed
from dynalora.adapters import AdapterModule


class ImportanceMeasure(Protocol):
    def scores(self) -> torch.Tensor:
        """Raw importance ``y`` (eq. 1) per module, shape ``(M,)``, float64 on the CPU."""
        ...

    def end_step(self) -> None:
        """Called once per optimizer step, after the step's backward passes."""
        ...

    def after_reallocation(self) -> None:
        """Called after every (re)allocation."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Remove every hook this measure installed."""
        ...


def _device(module: AdapterModule) -> torch.device:
    return module.params[0].device


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# -1 outside a backward pass; activation checkpointing re-runs forwards inside backward, and those
# recomputations must not count twice (torch.utils.checkpoint uses the same test).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _is_training_pass(layer: torch.nn.Module) -> bool:
    return layer.training and torch.is_grad_enabled() and _graph_task_id() == -1


def _finite(v: torch.Tensor) -> torch.Tensor:
    """0 for an inf/NaN measurement (an fp16 overflow), which would otherwise poison a running sum forever."""
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def _vector_norm_sum(h: torch.Tensor) -> torch.Tensor:
    """Σ over every output vector of ``||h||_2``: h is (..., d_out), the result a 0-dim float32 tensor.

    Padding positions count like any other output vector.
    """
    return _finite(torch.linalg.vector_norm(h.detach(), dim=-1, dtype=torch.float32).sum())


def _to_cpu(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack 0-dim tensors into one CPU tensor, with one transfer when they share a device."""
    if len({v.device for v in values}) == 1:
        return torch.stack(list(values)).cpu()
    return torch.stack([v.cpu() for v in values])


class _Accumulating:
    """Per-module running sums, one 0-dim float64 tensor per module on that module's device."""

    def __init__(self, modules: Sequence[AdapterModule]) -> None:
        self.modules = list(modules)
        self.totals = [torch.zeros((), dtype=torch.float64, device=_device(m)) for m in self.modules]
        self.handles: list[RemovableHandle] = []

    def scores(self) -> torch.Tensor:
        return _to_cpu(self.totals)

    def end_step(self) -> None:
        pass

    def after_reallocation(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.scores()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for total, value in zip(self.totals, state["totals"], strict=True):
            total.copy_(value)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class ForwardNorm(_Accumulating):
    """``y = Σ_x ||(W + ΔW) x||_2`` over every output vector of the adapted layer (eq. 1)."""

    def __init__(self, modules: Sequence[AdapterModule], generator: torch.Generator | None = None) -> None:
        super().__init__(modules)
        for total, module in zip(self.totals, self.modules, strict=True):
            self.handles.append(module.layer.register_forward_hook(self._hook(total)))

    @staticmethod
    def _hook(total: torch.Tensor):
        def hook(layer, args, output):
            if _is_training_pass(layer):
                with torch.no_grad():
                    total.add_(_vector_norm_sum(_output_tensor(output)))

        return hook


class AdapterNorm(_Accumulating):
    """``y = Σ_x ||ΔW x||_2``: the adapter's own contribution, i.e. the tuner layer's output minus its base layer's.

    Works for any tuner that adds its update to the base layer's output (LoRA, DoRA, VeRA, ...).
    """

    def __init__(self, modules: Sequence[AdapterModule], generator: torch.Generator | None = None) -> None:
        super().__init__(modules)
        for total, module in zip(self.totals, self.modules, strict=True):
            layer = module.layer
            if not isinstance(layer, BaseTunerLayer):
                raise ValueError(
                    f"measure='adapter' needs PEFT adapter layers, but {module.name} is a plain "
                    f"{type(layer).__name__}; allowed for it: forward, gradient, random"
                )
            stash: dict[str, torch.Tensor] = {}
            self.handles.append(layer.get_base_layer().register_forward_hook(self._stash_hook(layer, stash)))
            self.handles.append(layer.register_forward_hook(self._hook(total, stash)))

    @staticmethod
    def _stash_hook(tuner: torch.nn.Module, stash: dict[str, torch.Tensor]):
        def hook(base, args, output):
            if _is_training_pass(tuner):
                stash["base"] = _output_tensor(output)

        return hook

    @staticmethod
    def _hook(total: torch.Tensor, stash: dict[str, torch.Tensor]):
        def hook(layer, args, output):
            base = stash.pop("base", None)
            if base is None and _is_training_pass(layer):
                raise RuntimeError(
                    f"measure='adapter' subtracts the base layer's output, and {type(layer).__name__} computed its "
                    "output without calling its base layer; allowed for it: measure='forward' or 'gradient'"
                )
            if base is not None and _is_training_pass(layer):
                with torch.no_grad():
                    total.add_(_vector_norm_sum(_output_tensor(output) - base))

        return hook


class GradientNorm(_Accumulating):
    """L2 norm of the module's adapter-weight gradients, one measurement per optimizer step it trained.

    The norm is that of the gradient the optimizer sees: a post-accumulate-grad hook keeps a
    reference to each ``.grad`` (with gradient accumulation, the one tensor all micro-batches add
    into), and :meth:`end_step` reads it after backward, when DDP has written the gradient averaged
    over processes into it. Under FSDP2 each process holds a shard of the averaged gradient; the
    squared norms of the shards are summed over processes. Either way the score does not depend on
    the number of processes. ``zero_grad()`` (``set_to_none=True``, torch's default) may run before
    :meth:`end_step`: the reference keeps the values; ``zero_grad(set_to_none=False)`` must not.

    A module that is not trained gets no gradient, so there is nothing to measure. Its score is
    the **mean gradient norm over the steps it was trained** (with ``ema``, a moving average over
    them; summing, as eq. 1 does for forward
    activations, would punish modules for having been inactive): a module inactive lately keeps
    the mean it had when last trained, and a module never trained scores the mean of the trained
    ones (neutral, so that every allocator can still pick it).
    """

    def __init__(
        self, modules: Sequence[AdapterModule], generator: torch.Generator | None = None, ema: float | None = None
    ) -> None:
        super().__init__(modules)
        self.ema = ema
        # Steps measured per module (with ``ema``: their decayed weight), on the module's device like
        # the totals (no host sync per step).
        self.counts = [torch.zeros((), dtype=torch.float64, device=_device(m)) for m in self.modules]
        # Squared norms of the current step, one slot per tensor of the module; overwritten (not
        # added) by each accumulation, so the slot ends up holding the accumulated gradient's.
        self.grads: list[dict[int, torch.Tensor]] = [{} for _ in self.modules]  # this step's .grad tensors
        for i, module in enumerate(self.modules):
            for j, param in enumerate(module.params):
                self.handles.append(param.register_post_accumulate_grad_hook(self._hook(i, j, module.layer)))

    def _hook(self, i: int, j: int, layer: torch.nn.Module):
        def hook(param):
            if layer.training:
                self.grads[i][j] = param.grad

        return hook

    def end_step(self) -> None:
        seen = [i for i, grads in enumerate(self.grads) if grads]
        if not seen:
            return
        squares, sharded = [], False
        for i in seen:
            parts = []
            for grad in self.grads[i].values():
                if isinstance(grad, DTensor):  # FSDP2: this process's shard of the averaged gradient
                    grad, sharded = grad.to_local(), True
                parts.append(torch.linalg.vector_norm(grad, dtype=torch.float32).square())
            squares.append(torch.stack(parts).sum())
            self.grads[i] = {}
        if sharded:
            squares = distributed.sum_over_ranks(torch.stack(squares)).unbind()
        for i, square in zip(seen, squares, strict=True):
            norm = square.to(self.totals[i].device).sqrt()
            ok = torch.isfinite(norm)  # an overflowed (fp16) step is not a measurement
            if self.ema is not None:  # older measurements fade: weight beta**age
                decay = torch.where(ok, torch.full_like(norm, self.ema), torch.ones_like(norm)).double()
                self.totals[i].mul_(decay)
                self.counts[i].mul_(decay)
            self.totals[i].add_(torch.where(ok, norm, torch.zeros_like(norm)))
            self.counts[i].add_(ok)

    def scores(self) -> torch.Tensor:
        totals, counts = _to_cpu(self.totals), _to_cpu(self.counts)
        measured = counts > 0
        if not measured.any():
            return totals
        means = torch.zeros_like(totals)
        means[measured] = totals[measured] / counts[measured]
        means[~measured] = means[measured].mean()
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"totals": _to_cpu(self.totals), "counts": _to_cpu(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for count, value in zip(self.counts, state["counts"], strict=True):
            count.copy_(value)


class RandomScores:
    """No measurement: every module gets a fresh U(0, 1) score from the allocator's seeded generator.

    Scores are drawn at the start and after each reallocation, so :meth:`scores` always shows what
    the next reallocation will use, and any allocator then picks at random (``topk`` becomes a
    uniform choice of k modules).
    """

    def __init__(self, modules: Sequence[AdapterModule], generator: torch.Generator) -> None:
        self.generator = generator
        self.size = len(modules)
        self.next = torch.rand(self.size, generator=generator, dtype=torch.float64)

    def scores(self) -> torch.Tensor:
        return self.next.clone()

    def end_step(self) -> None:
        pass

    def after_reallocation(self) -> None:
        self.next = torch.rand(self.size, generator=self.generator, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next = state["next"].clone().to(torch.float64)

    def close(self) -> None:
        pass


def type_groups(names: Sequence[str]) -> torch.Tensor:
    """Per module, the index of its type: its name with the block number taken out, so that
    ``encoder.layer.3.attention.self.value`` and ``encoder.layer.5.attention.self.value`` share one."""
    keys = [re.sub(r"\.\d+(?=\.|$)", ".#", name, count=1) for name in names]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return torch.tensor([index[key] for key in keys], dtype=torch.int64)


def normalize_within(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each score divided by the mean score of its group (a group whose mean is 0 keeps its zeros)."""
    scores = scores.to(torch.float64)
    n = int(groups.max()) + 1
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, groups, scores)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, groups, torch.ones_like(scores))
    means = (sums / counts)[groups]
    return torch.where(means > 0, scores / means.clamp_min(torch.finfo(torch.float64).tiny), scores)


MEASURES: dict[str, type[ImportanceMeasure]] = {
    "forward": ForwardNorm,
    "adapter": AdapterNorm,
    "gradient": GradientNorm,
    "random": RandomScores,
}
