"""What every method's builder shares: its options, the head's names, and --targets resolution."""

from __future__ import annotations

from dataclasses import dataclass

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


def adapter_targets(model: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    if targets == (ALL_LINEAR,):
        return [m.name for m in find_linear_modules(model)]  # full names: PEFT matches them exactly
    targets = targets or ("query", "value")
    check_targets(model, targets)
    return list(targets)
