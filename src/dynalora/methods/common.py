"""What every method's builder shares: its options, the head's names, and --targets resolution."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from dynalora.adapters import _LINEAR, AdapterModule, find_linear_modules
from dynalora.errors import UsageError

# Parameters of the task head, trained by every method (they are new, randomly initialised).
HEAD_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class MethodOptions:
    targets: tuple[str, ...] | None  # None: the method's default
    rank: int
    alpha: float
    dropout: float
    dynamic: bool
    total_steps: int | None = None  # optimizer steps of the run, for methods that schedule by them (AdaLoRA)
    seed: int = 0  # for methods with their own randomness (DyLoRA's rank draws)
    dylora_frozen: bool = False  # DyLoRA: update only row/column b of the drawn rank b
    task_type: str = "SEQ_CLS"  # PEFT's task type: SEQ_CLS (a task head) or CAUSAL_LM


Built = tuple[nn.Module, list[AdapterModule] | None]


@dataclass(frozen=True)
class Hooks:
    """What a method needs from the training loop beyond forward/backward (all optional).

    Attributes:
        on_optimizer_step: ``f(model, step, optimizer)`` after ``optimizer.step()`` and before
            ``zero_grad``, once per optimizer step; ``step`` counts the optimizer steps before this
            one (0-based).
        state_dict / load_state_dict: the method's own training state, saved in checkpoints
            (tensors, numbers, strings: loaded with ``weights_only=True``); ``load_state_dict(model,
            state, optimizer)`` runs before the weights and the optimizer state are loaded (L1RA
            resizes its layers there).
        summary: extra entries for ``metrics.json`` at the end (AdaLoRA: ``ranks``).
        make_optimizer: ``f(model, options, lr, weight_decay)``, the optimizer of a plain (not
            dynamic) run, where a method brings its own (GaLore); default AdamW.
        evaluate_each: ``(name, settings)``: after training, validation is measured once per item
            ``settings(model)`` yields (it sets the model up for that item), and written to
            ``metrics.json`` under ``name`` (DyLoRA: ``per_rank``, every rank 1..r).
    """

    on_optimizer_step: Callable[[nn.Module, int, Any], None] | None = None
    state_dict: Callable[[nn.Module], dict[str, Any]] | None = None
    load_state_dict: Callable[[nn.Module, dict[str, Any], Any], None] | None = None
    summary: Callable[[nn.Module], dict[str, Any]] | None = None
    evaluate_each: tuple[str, Callable[[nn.Module], Iterator[Any]]] | None = None
    make_optimizer: Callable[[nn.Module, MethodOptions, float, float], Any] | None = None


ADAPTER_OPTIONS = ("targets", "rank", "alpha", "adapter_dropout")
"""What an adapter method reads of ``dynalora train``'s flags; a method record names those it reads."""


@dataclass(frozen=True)
class Method:
    """Everything the package knows about one ``--method``, in the method's own file; the registry,
    the CLI's choices and defaults, and the sweep's keys are read from these records.

    Attributes:
        name: the ``--method`` value.
        build: ``f(model, options) -> (model, modules)``; ``modules`` None: found by structure.
        lr: default peak learning rate on a task head (measured where the file says so).
        lr_causal: default on a decoder (causal LM), where it differs from ``lr``.
        lr_dynamic: default with dynamic allocation, where it differs (each module trains part of the time).
        dynamic: dynamic allocation unless ``--no-dynamic``.
        static: why ``--dynamic`` is refused (the method allocates by its own rule, or has nothing to
            allocate); None: it can be dynamic.
        hooks: what it needs from the training loop beyond forward and backward.
        trains_base: its trained tensors are the model's own weights (``--base-dtype`` does not apply).
        shardable: ``--fsdp`` can shard it (its trained tensors are plain parameters, saved by PEFT or
            transformers).
        options: the ``TrainArgs`` fields, among those that not every method reads, that this one
            reads (:data:`ADAPTER_OPTIONS` by default); ``dynalora train`` refuses any other of
            them at a value other than its default.
        dynamic_options: those of ``options`` that only its dynamic variant reads (plain full
            fine-tuning trains every weight: ``targets`` chooses dynamic full fine-tuning's modules).
    """

    name: str
    build: Callable[[nn.Module, MethodOptions], Built]
    lr: float
    lr_causal: float | None = None
    lr_dynamic: float | None = None
    dynamic: bool = False
    static: str | None = None
    hooks: Hooks = Hooks()
    trains_base: bool = False
    shardable: bool = False
    options: tuple[str, ...] = ADAPTER_OPTIONS
    dynamic_options: tuple[str, ...] = ()

    def default_lr(self, causal: bool, dynamic: bool) -> float:
        if dynamic and self.lr_dynamic is not None:
            return self.lr_dynamic
        return self.lr_causal if causal and self.lr_causal is not None else self.lr


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (what ``--targets`` matches)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, _LINEAR)}
    return sorted(names)


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    available = linear_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise UsageError(
            f"--targets {','.join(missing)} matched no linear layer of the model; available: {', '.join(available)}"
        )


def is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


ALL_LINEAR = "all-linear"
"""``--targets all-linear``: every linear layer inside the transformer blocks (found by structure)."""


DEFAULT_TARGETS = ("query", "value")
"""LoRA's choice for BERT-style encoders; a model without both (a decoder) gets every block linear."""


def adapter_targets(model: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    if targets is None:
        targets = DEFAULT_TARGETS if set(DEFAULT_TARGETS) <= set(linear_names(model)) else (ALL_LINEAR,)
    if targets == (ALL_LINEAR,):
        return [m.name for m in find_linear_modules(model)]  # full names: PEFT matches them exactly
    check_targets(model, targets)
    return list(targets)
