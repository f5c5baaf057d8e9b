"""GaLore (Zhao et al., 2024) through ``galore-torch`` 1.0: full fine-tuning whose optimizer keeps its
state in a low-rank projection of each block weight's gradient.

Every block linear weight (found by structure, as for dynamic full fine-tuning) is a GaLore
parameter: its gradient G is projected onto the top-``rank`` singular vectors of G (renewed every
``update_proj_gap`` steps), Adam runs on the projection, and the update is projected back and
multiplied by ``scale``. Everything else trains with plain AdamW. Defaults follow the paper's GLUE
fine-tuning: rank = ``--rank``, scale 4, and galore-torch's projection gap of 200 steps (a quarter
of a 100-step run measured no better: benchmarks/results/short_runs.md).

Two defects of galore-torch 1.0, worked around here rather than copying the package:

- its ``__init__`` imports its 8-bit AdamW and with it bitsandbytes, which a CPU-only machine
  lacks: :func:`_galore_adamw` loads only ``galore_torch/adamw.py`` and ``galore_projector.py``,
  which need neither (so galore-torch installs with ``--no-deps``);
- its optimizer state holds ``GaLoreProjector`` objects, which ``torch.load(weights_only=True)``
  refuses: :class:`GaLoreAdamW`'s ``state_dict`` stores their tensors and numbers instead.

This is the standard (not the layer-wise) GaLore optimizer, so it runs under DDP and with gradient
accumulation, both of which the layer-wise mode refuses (GaLore #55).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

from torch import nn
from torch.optim import Optimizer

from dynalora.adapters import find_linear_modules
from dynalora.errors import UsageError
from dynalora.methods.common import Built, Hooks, Method, MethodOptions, is_head

SCALE = 4.0
UPDATE_PROJ_GAP = 200
FIXED_GAP: int | None = None
"""When set, the projection gap of every run (benchmarks/short_runs.py compares it with the default)."""


def projection_gap(total_steps: int | None) -> int:
    """galore-torch's 200, whatever the run's length. A run shorter than that keeps the first
    step's subspace; renewing it every quarter of a 100-step run did not help (seed 0, Rotten
    Tomatoes: test 0.650 at 25 against 0.657 at 200, benchmarks/short_runs.py)."""
    return FIXED_GAP if FIXED_GAP is not None else UPDATE_PROJ_GAP


_PROJECTOR_FIELDS = ("rank", "update_proj_gap", "scale", "proj_type")


def _galore_adamw() -> types.ModuleType:
    """``galore_torch.adamw``, without running ``galore_torch/__init__.py`` (it imports bitsandbytes)."""
    if "galore_torch.adamw" in sys.modules:
        return sys.modules["galore_torch.adamw"]
    spec = importlib.util.find_spec("galore_torch")  # finds the package without importing it
    if spec is None or spec.submodule_search_locations is None:
        raise UsageError("--method galore needs `pip install --no-deps galore-torch==1.0` (the Makefile installs it)")
    if "galore_torch" not in sys.modules:  # a bare package: its submodules import, its __init__ does not run
        package = types.ModuleType("galore_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = package
    return importlib.import_module("galore_torch.adamw")


def _optimizer_class() -> type[Optimizer]:
    adamw = _galore_adamw()
    projector_cls = sys.modules["galore_torch.galore_projector"].GaLoreProjector

    class GaLoreAdamW(adamw.AdamW):
        """galore-torch's AdamW whose state dict holds only tensors, numbers and strings."""

        def state_dict(self) -> dict[str, Any]:
            saved = super().state_dict()
            saved["state"] = {
                key: {name: _projector_to_dict(v) if name == "projector" else v for name, v in state.items()}
                for key, state in saved["state"].items()
            }  # new dicts: the ones super() returns are the live state
            return saved

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            for state in self.state.values():
                if isinstance(state.get("projector"), dict):
                    state["projector"] = _projector_from_dict(projector_cls, state["projector"])

    return GaLoreAdamW


def _projector_to_dict(projector: Any) -> dict[str, Any]:
    return {name: getattr(projector, name) for name in _PROJECTOR_FIELDS} | {"ortho_matrix": projector.ortho_matrix}


def _projector_from_dict(projector_cls: type, saved: dict[str, Any]) -> Any:
    projector = projector_cls(**{name: saved[name] for name in _PROJECTOR_FIELDS})
    projector.ortho_matrix = saved["ortho_matrix"]
    return projector


STATIC = (
    "--method galore projects every weight's gradient at every step; there are no modules to allocate, "
    "use it with --no-dynamic"
)


def build(model: nn.Module, opts: MethodOptions) -> Built:
    if opts.dynamic:
        raise UsageError(STATIC)
    _galore_adamw()  # installed? (before anything is trained)
    model.requires_grad_(True)
    return model, None


def make_optimizer(model: nn.Module, opts: MethodOptions, lr: float, weight_decay: float) -> Optimizer:
    """GaLore for the block linear weights, plain AdamW (in the same optimizer) for the rest."""
    projected = {id(m.params[0]) for m in find_linear_modules(model) if not is_head(m.name)}
    galore = [p for p in model.parameters() if id(p) in projected]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in projected]
    groups = [
        {"params": rest},
        {
            "params": galore,
            "rank": opts.rank,
            "update_proj_gap": projection_gap(opts.total_steps),
            "scale": SCALE,
            "proj_type": "std",
        },  # fmt: skip
    ]
    return _optimizer_class()(groups, lr=lr, weight_decay=weight_decay, no_deprecation_warning=True)


HOOKS = Hooks(make_optimizer=make_optimizer)


# Validation (benchmarks/results/methods.md, seed 0): 5e-5 0.798, 2e-5 0.770, 1e-4 0.818; at 100
# steps 5e-5 0.663, 1e-4 0.776 (benchmarks/results/short_runs.md; the 1e-4 runs on the Trainer engine):
# 1e-4 holds at both.
METHOD = Method("galore", build, lr=1e-4, static=STATIC, hooks=HOOKS, trains_base=True, options=("rank",))
