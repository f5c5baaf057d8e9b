"""Full fine-tuning (plain, or dynamic over the block linears) and BitFit."""

from __future__ import annotations

from torch import nn

from dynalora.adapters import find_linear_modules
from dynalora.errors import UsageError
from dynalora.methods.common import ALL_LINEAR, Built, Method, MethodOptions, check_targets, is_head

PLAIN_TARGETS = (
    "--targets {} chooses the layers that dynamic full fine-tuning allocates; plain --method full "
    "trains every weight; add --dynamic, or drop --targets"
)


def full(model: nn.Module, opts: MethodOptions) -> Built:
    """Full fine-tuning; with ``dynamic``, each target linear layer is a module trained only while
    selected, everything else but the head stays frozen (as LISA/BAdam do by layers)."""
    # default and all-linear: every linear layer of the transformer blocks (find_linear_modules' own default)
    custom = opts.targets not in (None, (ALL_LINEAR,))
    if not opts.dynamic:
        if custom:  # all-linear is what plain full fine-tuning trains anyway (the CLI's default on decoders)
            raise UsageError(PLAIN_TARGETS.format(",".join(opts.targets)))
        model.requires_grad_(True)
        return model, None
    if custom:
        check_targets(model, opts.targets)
    modules = find_linear_modules(model, opts.targets if custom else None)
    modules = [m for m in modules if not is_head(m.name)]
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(name))
    for module in modules:
        for param in module.params:
            param.requires_grad_(True)
    return model, modules


BITFIT_STATIC = "--method bitfit has no modules to allocate; use it with --no-dynamic"


def bitfit(model: nn.Module, opts: MethodOptions) -> Built:
    """Biases and the task head only (Zaken et al., 2021)."""
    if opts.dynamic:
        raise UsageError(BITFIT_STATIC)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".bias") or is_head(name))
    return model, None


# Full fine-tuning needs far smaller steps than adapters; dynamic full fine-tuning trains each layer
# only part of the time and takes a larger one. Its rate was chosen on mean validation accuracy
# (benchmarks/quality.py, seeds 0-2): 0.8118 at 2e-4, 0.8133 at 3e-4, 0.8091 at 5e-4 (1e-4 scored
# 0.8127 on test, against 0.8184 for 2e-4).
FULL = Method(
    "full",
    full,
    lr=5e-5,
    lr_dynamic=3e-4,
    trains_base=True,
    shardable=True,
    options=("targets",),
    dynamic_options=("targets",),
)
BITFIT = Method("bitfit", bitfit, lr=1e-3, static=BITFIT_STATIC, shardable=True, options=())  # the paper's rate
