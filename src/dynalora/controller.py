"""DynamicAllocator: one ``step()`` per optimizer step ties measures, allocators and schedules together."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from dynalora import distributed
from dynalora.adapters import DTYPES, AdapterModule, find_adapter_modules, other_trainable_params, set_trainable
from dynalora.allocators import (
    ALLOCATORS,
    COST_AWARE,
    AllocationRequest,
    initial_count,
    lowest_allowed,
    normalize,
    paced_budget,
    seed_offset,
)
from dynalora.checkpointing import BlockGuard
from dynalora.config import DynamicConfig
from dynalora.cost import CHECKPOINT_KEEP, CostModel
from dynalora.importance import MEASURES, GradientNorm, normalize_within, type_groups
from dynalora.optim import STATE_POLICIES, LocalOptimizer, LocalScheduler
from dynalora.schedules import SCHEDULES

logger = logging.getLogger(__name__)


class DynamicAllocator:
    """Trains only a selected subset of a model's adapter modules, re-selected on a schedule.

    Construction discovers the modules, makes the initial selection and freezes the rest. Before
    any importance exists, the initial selection is drawn uniformly at random from the seeded
    generator: k modules (``threshold``: ceil(p * M), what uniform importance would need). The
    cost-aware ``cutoff`` allocator makes its own first selection, from uniform importance. The
    first reallocation then uses measured importance.

    :attr:`cost` predicts what each selection costs a step (:class:`~dynalora.cost.CostModel`);
    every entry of :attr:`history` carries its depth, backward share and predicted step ratio.

    Call :meth:`step` once per optimizer step, before or after ``zero_grad``.

    Args:
        model: any model containing PEFT tuner layers (a ``PeftModel`` or a model that
            ``inject_adapter_in_model`` changed), or any model when ``modules`` is given.
        config: what to measure, how to select, when.
        modules: units of allocation to use instead of the model's PEFT tuner layers, e.g.
            :func:`dynalora.adapters.find_linear_modules` for dynamic full fine-tuning.
    """

    def __init__(self, model: nn.Module, config: DynamicConfig, modules: Sequence[AdapterModule] | None = None) -> None:
        self.model = model
        self.config = config
        self.modules = list(modules) if modules is not None else find_adapter_modules(model)
        if not self.modules:
            raise ValueError(
                "model has no trainable adapter modules; allowed: a model with PEFT tuner layers "
                "(LoRA, DoRA, VeRA, ...) or an explicit `modules` list"
            )
        # Read before freezing anything: what is trainable now and outside the modules stays trainable.
        self._extra = other_trainable_params(model, self.modules)
        num = len(self.modules)
        # threshold and cutoff ignore k; any k is then as good as the number of modules
        ignores_k = config.allocator == "threshold" or config.allocator in COST_AWARE
        self.k = min(config.resolve_k_unchecked(num), num) if ignores_k else config.resolve_k(num)
        self.cost = CostModel.from_model(model, self.modules)
        trades_blocks = config.allocator in COST_AWARE or config.memory_cap is not None
        if trades_blocks and len(set(self.cost.blocks.tolist())) < 2:
            what = f"allocator={config.allocator!r}" if config.allocator in COST_AWARE else "memory_cap"
            raise ValueError(
                f"{what} chooses how deep backward runs through the transformer blocks (an nn.ModuleList), and the "
                "modules here lie in one block or none, so it would train every module at every step; allowed: "
                "another allocator (topk, stochastic, ...) without memory_cap"
            )
        # exclude: the allocator keeps the cap; recompute: the guard checkpoints blocks to keep it
        self._recompute_cap = config.memory_cap if config.cap_mode == "recompute" else None
        if self._recompute_cap is not None and self._recompute_cap < CHECKPOINT_KEEP:
            raise ValueError(
                f"memory_cap={self._recompute_cap!r} is below what checkpointed blocks keep (their inputs, about "
                f"{CHECKPOINT_KEEP:g} of the activations); allowed with cap_mode='recompute': [{CHECKPOINT_KEEP:g}, 1]"
            )
        self._exclude_cap = config.memory_cap if config.cap_mode == "exclude" else None
        # Keeps backward (and recomputation under checkpointing) out of blocks below the lowest trained one.
        self._guard = BlockGuard(
            model,
            self.modules,
            self._extra,
            self.cost.blocks.tolist(),
            recompute=self._recompute_cap is not None,
            measure=config.measure if config.measure in ("forward", "adapter") else None,
        )
        self._state_policy = STATE_POLICIES[config.state_policy]
        if config.state_policy == "offload" and any(p.device.type != "cuda" for m in self.modules for p in m.params):
            raise ValueError("state_policy='offload' needs CUDA parameters; allowed on CPU: keep, reset")
        self._inactive_dtype = DTYPES[config.inactive_dtype] if config.inactive_dtype != "fp32" else None
        if self._inactive_dtype is not None:
            if distributed.is_distributed():
                raise ValueError(
                    f"inactive_dtype={config.inactive_dtype!r} changes parameters' storage, which DDP and FSDP hold "
                    "in their buffers; allowed with several processes: inactive_dtype='fp32'"
                )
            if any(p.dtype != torch.float32 for m in self.modules for p in m.params if p.is_floating_point()):
                raise ValueError(
                    f"inactive_dtype={config.inactive_dtype!r} needs float32 modules to round; allowed: a float32 "
                    "model (adapters or layers), or inactive_dtype='fp32'"
                )
        self._generator = torch.Generator().manual_seed(config.seed)
        if config.importance_ema is not None:
            self._measure = GradientNorm(self.modules, self._generator, ema=config.importance_ema)
        else:
            self._measure = MEASURES[config.measure](self.modules, self._generator)
        self._types = type_groups(self.module_names) if config.normalize_types else None
        self._schedule = SCHEDULES[config.schedule](config.period)
        self._allocate = ALLOCATORS[config.allocator]
        self._optimizer: Optimizer | LocalOptimizer | None = None  # set by create_optimizer, for the state policy
        self._mask = torch.zeros(num, dtype=torch.bool)
        self._active_steps = torch.zeros(num, dtype=torch.int64)
        self._step = 0
        self._stepped = False
        self._total_steps: int | None = None  # the run's length, for budget_schedule="linear"
        self.history: list[dict[str, Any]] = []
        if config.allocator in COST_AWARE:
            first = self._allocate(self._request(torch.zeros(num)))  # also checks memory_cap against the model
            self._check_budget()
        else:
            n = initial_count(config.allocator, self.k, config.threshold, num)
            first = torch.zeros(num, dtype=torch.bool)
            first[torch.randperm(num, generator=self._generator)[:n]] = True
        self._deferred: RemovableHandle | None = None
        if distributed.is_distributed():
            # DDP registers only what requires grad when it wraps the model: keep every module
            # trainable until the first training forward, which comes after the wrapping.
            self._record(distributed.broadcast_mask(first))
            self._deferred = model.register_forward_pre_hook(self._freeze_at_first_forward)
        else:
            self._apply(first)

    # ----------------------------------------------------------------------------- read-only views
    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def active(self) -> frozenset[str]:
        return self._active_names

    @property
    def active_mask(self) -> torch.Tensor:
        """Bool mask over :attr:`module_names`, shape ``(M,)``."""
        return self._mask

    @property
    def cut(self) -> int | None:
        """The lowest transformer block that trains now: blocks below it run forward only, with no
        backward and, under activation checkpointing, no recomputation. ``None``: backward runs
        through every block (something below the blocks trains, or no block list was found)."""
        return self._guard.cut

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules)

    @property
    def num_active_params(self) -> int:
        return self._num_active_params

    @property
    def num_extra_params(self) -> int:
        """Trainable parameters outside the modules (classifier head ...): trained at every step."""
        return sum(p.numel() for p in self._extra)

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def active_steps(self) -> dict[str, int]:
        """C of eq. 3: optimizer steps each module was trained."""
        return dict(zip(self.module_names, self._active_steps.tolist(), strict=True))

    def scores(self) -> dict[str, float]:
        """Raw importance measured so far (eq. 1), which the next reallocation normalises and uses."""
        return dict(zip(self.module_names, self._measure.scores().tolist(), strict=True))

    # ----------------------------------------------------------------------------- optimisation
    def _trainable(self) -> list[nn.Parameter]:
        owned = {id(p) for m in self.modules for p in m.params} | {id(p) for p in self._extra}
        return [p for p in self.model.parameters() if id(p) in owned]

    def create_optimizer(self, optimizer_cls: type[Optimizer], **kwargs: Any) -> Optimizer | LocalOptimizer:
        """The optimizer over every module, active or not (§3.4), and the always-trained tensors.

        ``global``: one ``optimizer_cls`` over all of them, in model order. ``local``: a
        :class:`~dynalora.optim.LocalOptimizer` with one ``optimizer_cls`` per module. The allocator
        keeps a reference to apply ``config.state_policy`` to modules it deactivates.
        """
        if self.config.optimizer == "local":
            groups = [m.params for m in self.modules]
            self._optimizer = LocalOptimizer(groups, self._extra, lambda: self._mask, optimizer_cls, **kwargs)
        else:
            self._optimizer = optimizer_cls(self._trainable(), **kwargs)
        return self._optimizer

    def create_scheduler(self, optimizer: Optimizer | LocalOptimizer, name: str = "linear", **kwargs: Any) -> Any:
        """An LR schedule from ``transformers.get_scheduler`` (e.g. ``num_warmup_steps``, ``num_training_steps``).

        For ``local`` optimisation, one schedule per module that advances only on the steps the
        module is trained: by one each (``local_schedule="steps"``), or spanning the steps it is
        expected to train, so that every module ends near the schedule's end value
        (``local_schedule="run"``; needs ``num_training_steps``; :class:`~dynalora.optim.LocalScheduler`).
        Schedules stepped on a metric (``reduce_lr_on_plateau``, ``greedy``) are refused there.
        """
        from transformers import get_scheduler

        if kwargs.get("num_training_steps"):
            self.set_total_steps(int(kwargs["num_training_steps"]))
        if isinstance(optimizer, LocalOptimizer):
            kind = str(getattr(name, "value", name))
            if kind in ("reduce_lr_on_plateau", "greedy"):  # they step on a metric, not once per trained step
                raise ValueError(
                    f"{kind} is not supported with optimizer='local' (it steps on a metric, and each module's "
                    "schedule advances on the steps it trains); allowed: optimizer='global', or a schedule by step "
                    "(linear, cosine, ...)"
                )
            if self.config.local_schedule == "run" and not kwargs.get("num_training_steps"):
                raise ValueError(
                    "local_schedule='run' spans each module's schedule over the run, and needs its length; allowed: "
                    "create_scheduler(..., num_training_steps=N), or local_schedule='steps'"
                )
            total = kwargs.get("num_training_steps") if self.config.local_schedule == "run" else None
            return LocalScheduler(optimizer, lambda opt: get_scheduler(name, opt, **kwargs), total)
        return get_scheduler(name, optimizer, **kwargs)

    def set_total_steps(self, total: int) -> None:
        """The run's length in optimizer steps, for ``budget_schedule="linear"`` (``create_scheduler``
        and the Trainer callback set it)."""
        if total < 1:
            raise ValueError(f"total={total!r} is out of range; allowed: an int >= 1")
        if total <= self.config.period and self._total_steps != total:  # a smoke test, most likely: said once
            logger.warning("the run's %d optimizer steps end before its first reallocation (period %d): no module is "
                           "chosen by importance in it", total, self.config.period)  # fmt: skip
        self._total_steps = total

    def _check_own_optimizer(self) -> None:
        """An optimizer not built by :meth:`create_optimizer` is one global optimizer the allocator cannot see."""
        needs = [f"optimizer={self.config.optimizer!r}"] if self.config.optimizer == "local" else []
        if self.config.state_policy != "keep":
            needs.append(f"state_policy={self.config.state_policy!r}")
        if needs:
            raise ValueError(
                f"{' and '.join(needs)} need the optimizer that create_optimizer() builds, and this run steps "
                "an optimizer of its own; allowed: opt = allocator.create_optimizer(torch.optim.AdamW, lr=...), "
                "or DynamicConfig(optimizer='global', state_policy='keep') with an optimizer over every module"
            )

    def _check_budget(self) -> None:
        """``cutoff``: a budget outside what the model can spend is said once; every step spends the nearest
        share it can: at least the top block's (which trains at every step), and under ``memory_cap`` with
        ``cap_mode="exclude"`` at most what the cap leaves reachable."""
        depth_share = self.cost.above[torch.unique(self.cost.blocks)]  # backward share of each candidate cutoff
        top = float(depth_share[-1])
        reach = float(depth_share[lowest_allowed(depth_share, self._exclude_cap)])
        budget = self.config.budget
        if budget < top - 1e-9:
            logger.warning("budget=%g is below the backward share of the top block alone (%.3f on this model), which "
                           "trains at every step: every step spends %.3f", budget, top, top)  # fmt: skip
        if self._exclude_cap is not None and budget > reach + 1e-9:
            logger.warning("budget=%g is more than the backward share memory_cap=%g lets any step reach on this model "
                           "(%.3f): every step spends at most %.3f, and the blocks within the cap train at every step",
                           budget, self._exclude_cap, reach, reach)  # fmt: skip

    def _budget(self) -> float:
        if self.config.budget_schedule == "constant":
            return self.config.budget
        if self._total_steps is None:
            if self._step > 0:  # the first selection trains as deep as allowed whatever the budget
                raise ValueError(
                    "budget_schedule='linear' paces the budget over the run, and the run's length is unknown; "
                    "allowed: create_scheduler(..., num_training_steps=N) or set_total_steps(N) before training"
                )
            return self.config.budget
        floor = float(self.cost.above[int(self.cost.blocks.max())]) if self.cost.blocks.numel() else 0.0
        return paced_budget(self.config.budget, floor, self._step / self._total_steps)

    # ----------------------------------------------------------------------------- the step
    def step(self) -> None:
        """Account for one optimizer step; reallocate when the schedule says so."""
        if not self._stepped and self._optimizer is None:  # the first step in this process (a resume too)
            self._check_own_optimizer()
        self._stepped = True
        self._active_steps += self._mask
        self._measure.end_step()
        self._step += 1
        if self._schedule.due(self._step):
            self.reallocate()

    def reallocate(self) -> None:
        """Select modules from the importance measured so far, and freeze the others.

        Under torch.distributed, scores are averaged over ranks and rank 0's selection is
        broadcast, so every rank trains the same modules.
        """
        raw = distributed.mean_over_ranks(self._measure.scores())
        scores = raw if self._types is None else normalize_within(raw, self._types)
        mask = distributed.broadcast_mask(self._allocate(self._request(scores)))
        self._measure.after_reallocation()
        self._apply(mask, raw)
        if self._schedule.finished(self._step):
            self._measure.close()  # nothing will read importance again: stop paying for it

    def _request(self, raw: torch.Tensor) -> AllocationRequest:
        return AllocationRequest(
            importance=normalize(raw),
            k=self.k,
            threshold=self.config.threshold,
            active_steps=self._active_steps,
            generator=self._generator,
            cost=self.cost,
            budget=self._budget(),
            memory_cap=self._exclude_cap,
            coverage=self.config.coverage,
            round=len(self.history),
            offset=seed_offset(self.config.seed),
        )

    def set_active(self, names: Iterable[str]) -> None:
        """Train exactly these modules from now on: a manual selection (experiments, warm starts).

        The state policy applies and the selection is recorded in :attr:`history`; the schedule
        carries on and replaces it at the next reallocation.
        """
        wanted = set(names)
        unknown = wanted - set(self.module_names)
        if unknown:
            raise ValueError(f"unknown modules {sorted(unknown)[:3]}; allowed: names from module_names")
        if not wanted:
            raise ValueError("set_active needs at least one module; allowed: names from module_names")
        self._apply(torch.tensor([n in wanted for n in self.module_names], dtype=torch.bool))

    def apply_state_policy(self) -> None:
        """Apply the state policy to every inactive module, e.g. after ``optimizer.load_state_dict``
        (which moves all state back to the parameters' devices, undoing ``offload``)."""
        if self._optimizer is not None:
            inactive = [p for m, on in zip(self.modules, self._mask.tolist(), strict=True) if not on for p in m.params]
            self._state_policy(self._optimizer, inactive, [])

    def _freeze_at_first_forward(self, model: nn.Module, args: Any) -> None:
        if model.training and torch.is_grad_enabled() and self._deferred is not None:
            self._deferred.remove()
            self._deferred = None
            self._set_trainable(self._mask)

    def _apply(self, mask: torch.Tensor, raw: torch.Tensor | None = None) -> None:
        if self._optimizer is not None:
            pairs = list(zip(self.modules, self._mask.tolist(), mask.tolist(), strict=True))
            off = [p for m, was, now in pairs if was and not now for p in m.params]
            on = [p for m, was, now in pairs if now and not was for p in m.params]
            self._state_policy(self._optimizer, off, on)
        if self._deferred is None:
            self._set_trainable(mask)
        self._record(mask, raw)

    def _set_trainable(self, mask: torch.Tensor) -> None:
        """Freeze and unfreeze; with ``inactive_dtype``, store inactive modules at it and active ones at float32."""
        set_trainable(self.modules, mask)
        if self._inactive_dtype is None:
            return
        for module, on in zip(self.modules, mask.tolist(), strict=True):
            target = torch.float32 if on else self._inactive_dtype
            for param in module.params:
                if param.is_floating_point() and param.dtype != target:
                    param.data = param.data.to(target)  # the same Parameter: optimizers keep their reference

    def _record(self, mask: torch.Tensor, raw: torch.Tensor | None = None) -> None:
        """Make ``mask`` the selection and log it in the history, without touching the tensors."""
        self._select(mask)
        cost = self.cost.estimate(mask, self._guard.recompute)
        self.history.append(
            {
                "step": self._step,
                "scores": dict(zip(self.module_names, raw.tolist(), strict=True)) if raw is not None else {},
                "active": [m.name for m in self.modules if m.name in self._active_names],
                "depth": cost.depth,
                "backward_share": cost.backward_share,
                "step_ratio": cost.step_ratio,
                "activation_share": cost.activation_share,
                "recompute": sorted(self._guard.recompute),
            }
        )
        logger.debug("step %d: %d of %d modules active", self._step, len(self._active_names), len(self.modules))

    def _select(self, mask: torch.Tensor) -> None:
        self._mask = mask
        on = mask.tolist()
        self._active_names = frozenset(m.name for m, a in zip(self.modules, on, strict=True) if a)
        self._num_active_params = sum(m.num_params for m, a in zip(self.modules, on, strict=True) if a)
        self._guard.update(mask, self.cost.recompute_blocks(mask, self._recompute_cap))

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: step, selection, counters, scores, RNG state, history."""
        return {
            "module_names": self.module_names,
            "config": self.config.to_dict(),
            "step": self._step,
            "mask": self._mask.clone(),
            "active_steps": self._active_steps.clone(),
            "generator": self._generator.get_state(),
            "measure": self._measure.state_dict(),
            "history": [dict(h) for h in self.history],
            "total_steps": self._total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["module_names"] != self.module_names:
            raise ValueError(
                "allocator state was saved for other modules "
                f"({len(state['module_names'])} saved, {len(self.modules)} here); allowed: the same model and adapters"
            )
        current = self.config.to_dict()
        differ = [k for k, v in state["config"].items() if k in current and current[k] != v]  # older: fewer keys
        if differ:  # the selections, scores and schedules would continue under other rules
            k = differ[0]
            raise ValueError(
                f"allocator state was saved with {k}={state['config'][k]!r}, and this allocator has "
                f"{k}={current[k]!r}; allowed: the DynamicConfig the run began with"
            )
        self._step = int(state["step"])
        self._active_steps = state["active_steps"].clone()
        self._generator.set_state(state["generator"])
        self._measure.load_state_dict(state["measure"])
        self.history = [dict(h) for h in state["history"]]
        if self._total_steps is None:  # the run's length as now set (a longer run) wins over the saved one
            self._total_steps = state.get("total_steps")
        self._select(state["mask"].clone())
        if self._deferred is None:
            self._set_trainable(self._mask)
        if self._schedule.finished(self._step):
            self._measure.close()

    def close(self) -> None:
        """Remove every hook this allocator installed. Trainability stays as it is."""
        self._measure.close()
        self._guard.close()
        if self._deferred is not None:
            self._deferred.remove()
            self._deferred = None

    def __enter__(self) -> DynamicAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DynamicAllocator({len(self.modules)} modules, k={self.k}, step={self._step}, "
            f"active={int(self._mask.sum())}, config={self.config})"
        )
