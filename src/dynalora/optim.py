"""Global and local optimisation (paper §3.4).

Global: one optimizer over every adapter tensor, built up front, so a module that is inactive
when the optimizer is built is still trained once selected (HF Trainer and most recipes build
the optimizer from whatever has ``requires_grad`` at that moment, which would leave frozen
modules out for good). Inactive tensors have ``grad is None``, which torch optimizers skip:
no weight decay, no momentum step.

Local: one optimizer and one LR schedule per module. A module's optimizer steps, and its
schedule advances, only on the steps that module is trained. Which modules were trained is
recorded by :meth:`LocalOptimizer.step` from the allocator's selection at that moment, never
inferred from ``param.grad is not None`` (``zero_grad`` sets grads to None, and a schedule gated
on that would stop advancing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

ActiveMask = Callable[[], torch.Tensor]


class LocalOptimizer:
    """One optimizer per module, plus one for the always-trained tensors; the usual torch interface.

    Args:
        groups: trainable tensors of each module, in module order.
        extra: tensors trained at every step (classifier head, ``modules_to_save``); may be empty.
        active: returns the current selection, a bool mask of shape ``(M,)``.
        optimizer_cls, **kwargs: e.g. ``torch.optim.AdamW, lr=1e-3``.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[nn.Parameter]],
        extra: Sequence[nn.Parameter],
        active: ActiveMask,
        optimizer_cls: type[Optimizer],
        **kwargs: Any,
    ) -> None:
        self.optimizers: list[Optimizer] = [optimizer_cls(list(params), **kwargs) for params in groups]
        self.extra: Optimizer | None = optimizer_cls(list(extra), **kwargs) if extra else None
        self._active = active
        self.last_stepped = torch.zeros(len(self.optimizers), dtype=torch.bool)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every inner optimizer's groups (the same dicts, so setting ``lr`` here reaches them)."""
        return [g for opt in self._all() for g in opt.param_groups]

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizers[0].defaults

    @property
    def state(self) -> dict[nn.Parameter, Any]:
        return {p: s for opt in self._all() for p, s in opt.state.items()}

    def _all(self) -> list[Optimizer]:
        return self.optimizers + ([self.extra] if self.extra is not None else [])

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        self.last_stepped = self._active().clone()
        for i in self.last_stepped.nonzero().flatten().tolist():
            self.optimizers[i].step()
        if self.extra is not None:
            self.extra.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._all():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": [opt.state_dict() for opt in self.optimizers],
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "last_stepped": self.last_stepped.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["modules"]) != len(self.optimizers):
            raise ValueError(
                f"optimizer state holds {len(state['modules'])} modules, this optimizer has {len(self.optimizers)}"
            )
        for opt, sd in zip(self.optimizers, state["modules"], strict=True):
            opt.load_state_dict(sd)
        if self.extra is not None and state["extra"] is not None:
            self.extra.load_state_dict(state["extra"])
        self.last_stepped = state["last_stepped"].clone()

    def __repr__(self) -> str:
        inner = type(self.optimizers[0]).__name__
        return f"LocalOptimizer({len(self.optimizers)} x {inner}, extra={self.extra is not None})"


class LocalScheduler:
    """One LR schedule per module; each advances only on the steps its module was trained, and spans
    the steps the module is expected to train, so that every module ends its run near the schedule's
    end value, however rarely it trains.

    With the run's length ``T`` known, module m's place on its schedule moves, on each step t it
    trains, by ``(T - v_m) / (f_m (T - t + 1))``: what is left of its schedule over the steps it can
    still expect to train, where ``f_m`` is the share of the steps so far that it trained (its
    expected share, re-estimated at every step, so reallocations re-scale it). A module trained at
    every step moves by exactly 1, as the global schedule does. This needs closed-form schedules
    (``LambdaLR``: every ``transformers.get_scheduler`` type but ``reduce_lr_on_plateau``); other
    schedulers, or an unknown ``T``, advance by one per trained step.

    Args:
        optimizer: the :class:`LocalOptimizer` whose inner optimizers are scheduled.
        make: builds a torch LR scheduler for one torch optimizer.
        total_steps: the run's length ``T`` in optimizer steps, or ``None``.
    """

    def __init__(
        self, optimizer: LocalOptimizer, make: Callable[[Optimizer], Any], total_steps: int | None = None
    ) -> None:
        self.optimizer = optimizer
        self.schedulers = [make(opt) for opt in optimizer.optimizers]
        self.extra = make(optimizer.extra) if optimizer.extra is not None else None
        self.total_steps = total_steps
        self.steps = 0  # optimizer steps of the run so far
        self.trained = torch.zeros(len(self.schedulers), dtype=torch.int64)  # steps each module trained
        self.position = torch.zeros(len(self.schedulers), dtype=torch.float64)  # v_m: place on its schedule

    def step(self) -> None:
        self.steps += 1
        for i in self.optimizer.last_stepped.nonzero().flatten().tolist():
            self.trained[i] += 1
            scheduler = self.schedulers[i]
            if self.total_steps is None or not isinstance(scheduler, LambdaLR):
                self.position[i] += 1
                scheduler.step()
                continue
            share = float(self.trained[i]) / self.steps
            left = max(self.total_steps - self.steps + 1, 1)
            move = (self.total_steps - float(self.position[i])) / (share * left)
            self.position[i] = min(float(self.position[i]) + max(move, 0.0), float(self.total_steps))
            scheduler.last_epoch = float(self.position[i]) - 1  # step() adds the 1 back and sets the rate
            scheduler.step()
        # Consumed: if the next optimizer step is skipped (fp16 overflow), no module schedule moves.
        self.optimizer.last_stepped = torch.zeros_like(self.optimizer.last_stepped)
        if self.extra is not None:
            self.extra.step()

    def get_last_lr(self) -> list[float]:
        """Learning rates of the always-trained group (first, when present) and of every module."""
        extra = self.extra.get_last_lr() if self.extra is not None else []
        return extra + [lr for s in self.schedulers for lr in s.get_last_lr()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": [s.state_dict() for s in self.schedulers],
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "steps": self.steps,
            "trained": self.trained.clone(),
            "position": self.position.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, sd in zip(self.schedulers, state["modules"], strict=True):
            s.load_state_dict(sd)
        if self.extra is not None and state["extra"] is not None:
            self.extra.load_state_dict(state["extra"])
        if "position" in state:  # saved before v0.4: one step per trained step, as then
            self.steps = int(state["steps"])
            self.trained = state["trained"].clone()
            self.position = state["position"].clone().to(torch.float64)


# ------------------------------------------------------------------------------------------ state policies
def _states(optimizer: Optimizer | LocalOptimizer, params: Sequence[nn.Parameter]) -> list[tuple[dict, nn.Parameter]]:
    """The optimizer-state dicts that hold ``params``, with the parameter each belongs to."""
    inner = optimizer._all() if isinstance(optimizer, LocalOptimizer) else [optimizer]
    return [(opt.state, p) for p in params for opt in inner if p in opt.state]


def keep_state(optimizer, deactivated: Sequence[nn.Parameter], activated: Sequence[nn.Parameter]) -> None:
    """The paper's behaviour: moments stay where they are and resume when the module is selected again."""


def reset_state(optimizer, deactivated: Sequence[nn.Parameter], activated: Sequence[nn.Parameter]) -> None:
    """Drop a deactivated module's moments (and step count); torch re-creates them on its next step."""
    for state, p in _states(optimizer, deactivated):
        del state[p]


def offload_state(optimizer, deactivated: Sequence[nn.Parameter], activated: Sequence[nn.Parameter]) -> None:
    """Move a deactivated module's moments to host memory, and a re-activated module's back to its device."""
    # Only the moments (dim > 0) travel; the 0-dim 'step' counter stays wherever torch keeps it.
    for state, p in _states(optimizer, deactivated):
        state[p] = {k: v.to("cpu") if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state[p].items()}
    for state, p in _states(optimizer, activated):
        state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state[p].items()}


StatePolicy = Callable[[Any, Sequence[nn.Parameter], Sequence[nn.Parameter]], None]
STATE_POLICIES: dict[str, StatePolicy] = {"keep": keep_state, "reset": reset_state, "offload": offload_state}
