"""Configuration of dynamic module allocation (paper §3)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MEASURES = ("forward", "adapter", "gradient", "random")
ALLOCATORS = ("topk", "threshold", "stochastic", "discounted_stochastic", "random", "cutoff")
SCHEDULES = ("periodic", "once")
BUDGET_SCHEDULES = ("constant", "linear")
OPTIMIZERS = ("global", "local")
STATE_POLICIES = ("keep", "reset", "offload")
LOCAL_SCHEDULES = ("steps", "run")
CAP_MODES = ("exclude", "recompute")
INACTIVE_DTYPES = ("fp32", "bf16", "fp16")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed: {', '.join(allowed)}")


# Which allocator reads which field; any other allocator refuses a non-default value (trap 8).
READ_BY: dict[str, frozenset[str]] = {
    "k": frozenset({"topk", "stochastic", "discounted_stochastic", "random"}),
    "threshold": frozenset({"threshold"}),
    "budget": frozenset({"cutoff"}),
    "budget_schedule": frozenset({"cutoff"}),
    "coverage": frozenset({"cutoff"}),
}


def _setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field with its allowed values (checked on construction) and the line ``dynalora train --help``
    shows for its flag (HfArgumentParser reads ``help`` and ``choices``; the docstring below it says more)."""
    return dataclasses.field(default=default, metadata={"help": help} | ({"choices": choices} if choices else {}))


def _check_share(field: str, value: Any, *, zero_ok: bool = False, extra: str = "") -> None:
    """A number in (0, 1], or [0, 1] with ``zero_ok``; ``extra`` adds to what the message allows."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    low_ok = number and (value >= 0.0 if zero_ok else value > 0.0)
    if not low_ok or value > 1.0:
        allowed = "a number in [0, 1]" if zero_ok else "a number in (0, 1]"
        raise ValueError(f"{field}={value!r} is out of range; allowed: {allowed}{extra}")


@dataclass(frozen=True)
class DynamicConfig:
    """How many adapter modules train at a time, which ones, and when the choice is renewed.

    Every field is validated on construction; a bad value raises ``ValueError`` naming the field,
    the value and what is allowed.
    """

    measure: str = _setting("gradient", "importance measure", MEASURES)
    """Importance measure (§3.1): ``forward`` = sum over output vectors of ``||(W + ΔW)x||_2`` (eq. 1),
    ``adapter`` = the same for the adapter's own output ``||ΔW x||_2``, ``gradient`` = L2 norm of the
    module's adapter-weight gradients (mean over the steps it trained), ``random`` = no measurement
    (fresh uniform scores each time). The default is ``gradient``, chosen on the validation splits of
    the quality suite (``benchmarks/results/quality.md``); ``forward`` mostly measures the pretrained
    W, since LoRA's B starts at zero."""

    allocator: str = _setting("cutoff", "module allocator", ALLOCATORS)
    """Module selection (§3.2): ``topk`` (ties go to the earlier module), ``threshold``, ``stochastic``
    (k drawn in proportion to importance), ``discounted_stochastic`` (the same with importance / (C + 1),
    C the steps a module trained: eq. 3) or ``random`` (k uniformly); or the cost-aware ``cutoff`` (the
    default, docs/options.md "Cost-aware allocation"): every module at or above
    a cutoff block trains, the cutoff drawn from importance so that the expected backward share is
    ``budget`` (:func:`dynalora.allocators.cutoff`; it ignores ``k``). ``cutoff`` with ``local``
    optimisation was chosen on the quality suite's validation splits: a whole run's step costs
    0.8-0.9 of LoRA's, at 1.4 points of test accuracy below LoRA at its best rate per task (four
    tasks, three seeds; ``benchmarks/results/frontier.md``, docs/results.md)."""

    k: int | float = _setting(
        2 / 3,
        "topk, stochastic, discounted_stochastic and random allocators: active modules, an int, a fraction in "
        "(0, 1], or a ratio like 2/3",
    )
    """Number of active modules: an int >= 1, or a float in (0, 1] meaning that fraction of the modules
    (rounded, at least 1). Read by ``topk``, ``stochastic``, ``discounted_stochastic`` and ``random``;
    the others refuse a value other than the default."""

    threshold: float = _setting(0.9, "threshold allocator: p, in (0, 1]")
    """p of the ``threshold`` allocator, in (0, 1]: the fewest most important modules whose normalised
    importance (eq. 2) sums to at least p; the module that crosses p is included, and at least one
    module is always selected. Read by ``threshold`` only."""

    budget: float = _setting(
        0.5,
        "cutoff allocator: expected share of the blocks that backward runs through per step, in (0, 1]",
    )
    """``cutoff``: expected share of the transformer blocks' work that backward runs through per step,
    in (0, 1]; 1 trains every module every step, as LoRA. A step spends at least the top block's
    share (it trains at every step) and, under ``memory_cap`` with ``cap_mode="exclude"``, at most the
    share the cap leaves reachable: a budget outside is held to the nearest of the two, and the
    allocator says so when it is built. The step time is about
    ``f + (1 - f) * budget`` of LoRA's, with f the selection-independent share
    (:data:`dynalora.cost.FIXED_SHARE`, 0.6 on CPU)."""

    budget_schedule: str = _setting(
        "constant",
        "cutoff allocator: spend the budget evenly (constant) or where the learning rate is high (linear)",
        BUDGET_SCHEDULES,
    )
    """``cutoff``: ``constant`` spends ``budget`` evenly over the run; ``linear`` spends it where the
    learning rate is high, from up to every block early to the top block late, with the same mean
    (:func:`dynalora.allocators.paced_budget`; needs the run's length: ``create_scheduler`` or
    :meth:`~dynalora.DynamicAllocator.set_total_steps`)."""

    memory_cap: float | None = _setting(
        None,
        "saved activations in the blocks of any step at most this share of training every module, in (0, 1] "
        "(default: no cap; see --cap-mode)",
    )
    """Hard cap on any step's saved activations in the transformer blocks, as a share of training every
    module, in (0, 1]; ``None``: no cap. What keeps a step under it is ``cap_mode``."""

    cap_mode: str = _setting(
        "exclude",
        "how --memory-cap is kept: exclude (cutoff allocator: blocks over the cap never train) or recompute "
        "(any allocator: every block trains; the lowest trained blocks are checkpointed)",
        CAP_MODES,
    )
    """How ``memory_cap`` is kept: ``exclude`` (``cutoff`` only): blocks whose training would exceed the
    cap never train; ``recompute`` (any allocator): every block trains as the allocator chooses, and
    on the steps a selection would exceed the cap, its lowest trained blocks are checkpointed
    (recomputed in backward) until the rest fit (:class:`dynalora.checkpointing.BlockGuard`).
    ``recompute`` with gradient checkpointing (every block checkpointed already) is refused."""

    coverage: float = _setting(0.2, "cutoff allocator: lowest probability that any block trains at a reallocation")
    """``cutoff``: the lowest probability with which any block within the cap trains at a
    reallocation, in [0, 1], so that every block learns even when importance ranks it low. The
    budget comes first: where it cannot pay for this floor at every block (or, under
    ``budget_schedule="linear"``, late in the run, when the paced budget is low), every allowed
    block below the top trains with the one probability the budget affords."""

    schedule: str = _setting("periodic", "reallocation schedule", SCHEDULES)
    """When to reallocate (§3.3): ``periodic`` every ``period`` optimizer steps, or ``once`` at step ``period``
    (not with ``cutoff``, whose budget is a mean over many draws)."""

    period: int = _setting(
        10,
        "optimizer steps between reallocations (with --schedule once: the step of the one reallocation)",
    )
    """Optimizer steps between reallocations; for ``once``, the step (alpha) of the single reallocation.
    The default 10 reallocates often enough that, in a run of 75 steps, every module trains early,
    at a high learning rate (the paper's 50 left a third of them to the last steps)."""

    optimizer: str = _setting("local", "global or per-module (local) optimizer and LR schedule", OPTIMIZERS)
    """Optimisation (§3.4): ``global`` = one optimizer and LR schedule over every module;
    ``local`` (the default) = one per module, each advancing only on the steps its module is
    trained; how far along its schedule a rarely trained module gets is ``local_schedule``. Both
    need the optimizer from :meth:`~dynalora.DynamicAllocator.create_optimizer`."""

    local_schedule: str = _setting(
        "steps",
        "local optimizer: a module's LR schedule advances one step per step it trains (steps), or spans the "
        "steps it is expected to train and ends at the end value (run)",
        LOCAL_SCHEDULES,
    )
    """``local`` optimisation only: how each module's LR schedule advances. ``steps`` (the default):
    by one on each optimizer step the module trains, so a module that trains in part of the steps
    ends the run part-way along its schedule, at a higher rate. ``run``: by what spans the steps the
    module is expected to train (:class:`~dynalora.optim.LocalScheduler`; needs the run's length,
    which ``create_scheduler(num_training_steps=...)``, ``attach`` and ``dynalora train`` give it), so
    every module ends near the schedule's end value. ``steps`` stays the default because the quality
    suite (four tasks, three seeds, every run on the Trainer engine) does not favour ``run``: gap to
    LoRA on the validation mean -2.36 against -1.81 (test -1.79 against -1.39); docs/results.md,
    "Local schedules that anneal"."""

    state_policy: str = _setting(
        "keep",
        "optimizer state of deactivated modules: keep, reset, or offload to host memory (CUDA)",
        STATE_POLICIES,
    )
    """Optimizer state of a deactivated module: ``keep`` (the paper: moments stay and resume),
    ``reset`` (dropped; the module restarts fresh when selected again) or ``offload`` (moved to host
    memory while inactive; CUDA only). Only ``reset`` and ``offload`` give memory back."""

    inactive_dtype: str = _setting(
        "fp32",
        "storage of inactive modules: fp32, or bf16/fp16 (rounded when deactivated, trained on a float32 copy "
        "when selected; BAdam's class of dynamic full fine-tuning)",
        INACTIVE_DTYPES,
    )
    """Storage of a module's tensors while it is inactive: ``fp32`` (as trained), or ``bf16``/``fp16``
    (BAdam's class of dynamic full fine-tuning): a module is rounded to half precision when it is
    deactivated and trains on a float32 copy of that when selected again. Pair it with
    ``state_policy="reset"`` (or ``offload``) so that inactive modules hold no optimizer state
    either, and run the forward under ``torch.autocast`` at that dtype. One process only."""

    importance_ema: float | None = _setting(
        None,
        "gradient measure: score a module by a moving average of its gradient norms with this beta in (0, 1) "
        "instead of their mean (default: the mean)",
    )
    """``gradient`` measure only: ``None`` (the default) scores a module by the mean gradient norm over
    every step it trained; a number beta in (0, 1) by an exponential moving average over those steps
    (each measurement weighs beta times the next one), so that late measurements count more. Not
    adopted as the default: see docs/results.md, the quality table (variant ``importance-ema-0.8``)."""

    normalize_types: bool = _setting(
        False,
        "divide each module's importance by the mean of its type (the same layer in every block) before selection",
    )
    """Divide each module's raw importance by the mean of the modules of its type (the same layer in
    every block, e.g. every ``value`` projection) before normalising (eq. 2), so that one projection
    type does not outrank another for reasons of scale. Any measure but ``random``. Not adopted as
    the default: see docs/results.md, the quality table (variant ``normalize-types``)."""

    seed: int = _setting(0, "the allocator's seed (dynalora train: --seed)")
    """Seed of the allocator's own ``torch.Generator`` (stochastic/random choices, initial selection);
    there is no hidden global RNG. ``cutoff`` shifts its low-discrepancy sequence by
    frac(seed * (sqrt(2) - 1)) (seed 0: no shift)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                _check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        if self.optimizer != "local" and self.local_schedule != DynamicConfig.local_schedule:
            raise ValueError(
                f"local_schedule={self.local_schedule!r} is read only with optimizer='local', not "
                f"{self.optimizer!r}; allowed: optimizer='local', or leave local_schedule at its default "
                f"({DynamicConfig.local_schedule!r})"
            )
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"k={k!r} is not supported; allowed: an int >= 1 or a float in (0, 1]")
        if isinstance(k, float) and not (0.0 < k <= 1.0):
            raise ValueError(f"k={k!r} is out of range; allowed: an int >= 1 or a float in (0, 1]")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"k={k!r} is out of range; allowed: an int >= 1 or a float in (0, 1]")
        _check_share("threshold", self.threshold)  # (True is not 1.0)
        _check_share("budget", self.budget)
        if self.memory_cap is not None:
            _check_share("memory_cap", self.memory_cap, extra=" or None")
        _check_share("coverage", self.coverage, zero_ok=True)
        defaults = DynamicConfig.__dataclass_fields__
        for name, readers in READ_BY.items():
            value = getattr(self, name)
            if self.allocator not in readers and value != defaults[name].default:
                raise ValueError(
                    f"{name}={value!r} is not read by allocator={self.allocator!r}; allowed: leave {name} at its "
                    f"default, or an allocator that reads it ({', '.join(sorted(readers))})"
                )
        for name in ("budget_schedule", "coverage"):  # budget 1: every block trains at every step
            if self.budget >= 1.0 and getattr(self, name) != defaults[name].default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} has nothing to act on at budget=1 (every block trains at "
                    f"every step); allowed: a budget below 1, or leave {name} at its default"
                )
        if self.allocator == "cutoff" and self.schedule == "once":
            raise ValueError(
                "schedule='once' is not supported with allocator='cutoff' (one draw would train every module for "
                "good, whatever the budget); allowed: schedule='periodic', or another allocator"
            )
        if self.cap_mode != "exclude" and self.memory_cap is None:
            raise ValueError(f"cap_mode={self.cap_mode!r} needs a memory_cap; allowed: set memory_cap in (0, 1]")
        if self.memory_cap is not None and self.cap_mode == "exclude" and self.allocator != "cutoff":
            raise ValueError(
                f"memory_cap={self.memory_cap!r} with cap_mode='exclude' is read only by allocator='cutoff', not "
                f"{self.allocator!r}; allowed: allocator='cutoff', or cap_mode='recompute'"
            )
        if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"period={self.period!r} is out of range; allowed: an int >= 1")
        if self.importance_ema is not None:
            ema = self.importance_ema
            if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 < ema < 1.0:
                raise ValueError(f"importance_ema={ema!r} is out of range; allowed: a number in (0, 1) or None")
            if self.measure != "gradient":
                raise ValueError(
                    f"importance_ema={ema!r} is read only by measure='gradient', not {self.measure!r}; allowed: "
                    "measure='gradient', or importance_ema=None"
                )
        if not isinstance(self.normalize_types, bool):
            raise ValueError(f"normalize_types={self.normalize_types!r} is not supported; allowed: True or False")
        if self.normalize_types and self.measure == "random":
            raise ValueError(
                "normalize_types=True is not read by measure='random' (its scores are drawn, not measured); "
                "allowed: another measure, or normalize_types=False"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is not supported; allowed: an int")

    def resolve_k_unchecked(self, num_modules: int) -> int:
        """``k`` as a number of modules, without checking it against ``num_modules``."""
        if isinstance(self.k, float):
            return max(1, min(num_modules, math.floor(self.k * num_modules + 0.5)))
        return self.k

    def resolve_k(self, num_modules: int) -> int:
        """The number of active modules for a model with ``num_modules`` adapted modules.

        Raises:
            ValueError: if an int ``k`` exceeds ``num_modules``.
        """
        if isinstance(self.k, int) and self.k > num_modules:
            raise ValueError(
                f"k={self.k} is larger than the {num_modules} adapted modules; allowed: 1..{num_modules} "
                "or a fraction in (0, 1]"
            )
        return self.resolve_k_unchecked(num_modules)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DynamicConfig:
        """A preset of :data:`PRESETS` with some fields replaced, e.g. ``from_preset("paper", k=16)``."""
        _check_choice("preset", name, tuple(PRESETS))
        values = PRESETS[name] | overrides
        allocator = values.get("allocator", cls.__dataclass_fields__["allocator"].default)
        for field_name, readers in READ_BY.items():  # a preset's k does not follow it to an allocator that ignores k
            if field_name in PRESETS[name] and field_name not in overrides and allocator not in readers:
                del values[field_name]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The paper's GLUE settings (Table 1): forward importance, discounted stochastic allocation of 16
    # of 24 modules, reallocated every 50 steps, one global optimizer whose moments survive freezing.
    "paper": {
        "measure": "forward",
        "allocator": "discounted_stochastic",
        "k": 2 / 3,
        "schedule": "periodic",
        "period": 50,
        "optimizer": "global",
        "state_policy": "keep",
    },  # fmt: skip
    # The v0.2 default: two thirds of the modules anywhere in the model, one global optimizer. The
    # closest to LoRA's quality on the 2e-3 suite (-0.09 points), but a step costs 0.95-1.00 of LoRA's.
    "v0.2": {"allocator": "discounted_stochastic", "k": 2 / 3, "optimizer": "global"},
    # Dynamic full fine-tuning (``dynalora train --method full --dynamic``): the cost-aware default
    # loses 9 points to full fine-tuning on one epoch of Rotten Tomatoes (benchmarks/results/
    # backbones.md), while a third of the linear layers anywhere, with one global optimizer and
    # the moments of inactive layers dropped, loses 1.2 (seed 0).
    "full": {"allocator": "discounted_stochastic", "k": 1 / 3, "optimizer": "global", "state_policy": "reset"},
}
"""Named starting points for :class:`DynamicConfig`; ``default`` is the dataclass's own defaults."""
