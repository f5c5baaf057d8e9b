"""Fine-tuning methods the CLI offers: PEFT adapters and the full / BitFit baselines.

Each builder takes a loaded ``AutoModelForSequenceClassification`` and returns the model to train
plus, for dynamic allocation, the units of allocation (``None``: the model's PEFT tuner layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peft import LoraConfig, VeraConfig, get_peft_model
from torch import nn

from dynalora.adapters import AdapterModule, find_linear_modules
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


Built = tuple[nn.Module, list[AdapterModule] | None]


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (what ``--targets`` matches)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    available = linear_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise UsageError(
            f"--targets {','.join(missing)} matched no linear layer of the model; available: {', '.join(available)}"
        )


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


ALL_LINEAR = "all-linear"
"""``--targets all-linear``: every linear layer inside the transformer blocks (found by structure)."""


def _adapter_targets(model: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    if targets == (ALL_LINEAR,):
        return [m.name for m in find_linear_modules(model)]  # full names: PEFT matches them exactly
    targets = targets or ("query", "value")
    _check_targets(model, targets)
    return list(targets)


def _lora(model: nn.Module, opts: MethodOptions, *, dora: bool = False) -> Built:
    targets = _adapter_targets(model, opts.targets)
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=list(targets),
        use_dora=dora,
        task_type="SEQ_CLS",
    )
    return get_peft_model(model, config), None


def _vera(model: nn.Module, opts: MethodOptions) -> Built:
    targets = _adapter_targets(model, opts.targets)
    config = VeraConfig(r=opts.rank, vera_dropout=opts.dropout, target_modules=list(targets), task_type="SEQ_CLS")
    return get_peft_model(model, config), None


def _full(model: nn.Module, opts: MethodOptions) -> Built:
    """Full fine-tuning; with ``dynamic``, each target linear layer is a module trained only while
    selected, everything else but the head stays frozen (as LISA/BAdam do by layers)."""
    if not opts.dynamic:
        model.requires_grad_(True)
        return model, None
    # default and all-linear: every linear layer of the transformer blocks (find_linear_modules' own default)
    custom = opts.targets not in (None, (ALL_LINEAR,))
    if custom:
        _check_targets(model, opts.targets)
    modules = find_linear_modules(model, opts.targets if custom else None)
    modules = [m for m in modules if not _is_head(m.name)]
    for name, param in model.named_parameters():
        param.requires_grad_(_is_head(name))
    for module in modules:
        for param in module.params:
            param.requires_grad_(True)
    return model, modules


def _bitfit(model: nn.Module, opts: MethodOptions) -> Built:
    """Biases and the task head only (Zaken et al., 2021)."""
    if opts.dynamic:
        raise UsageError("--method bitfit has no modules to allocate; use it with --no-dynamic")
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".bias") or _is_head(name))
    return model, None


METHODS: dict[str, Callable[[nn.Module, MethodOptions], Built]] = {
    "lora": _lora,
    "dora": lambda model, opts: _lora(model, opts, dora=True),
    "vera": _vera,
    "full": _full,
    "bitfit": _bitfit,
}
ADAPTER_METHODS = ("lora", "dora", "vera")
