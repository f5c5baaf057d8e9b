"""Hydra (Kim et al., 2024): parallel and sequential low-rank branches on one linear layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from dynalora.methods.common import Built, Method, MethodOptions, adapter_targets
from dynalora.methods.tuner import ADAPTER, OwnTunerLayer, wrap_linears


class HydraLinear(OwnTunerLayer):
    """Hydra: a parallel low-rank branch on the input and a sequential one on the base output.

    ``h = W0 x + b0 + s A_up A_down x + s B_up B_down (W0 x + b0)``, ``s = alpha / r`` as LoRA
    scales. The up-projections start at zero, so the layer starts as the base layer. Merged:
    ``W = (I + s B_up B_down) W0 + s A_up A_down`` and ``b = (I + s B_up B_down) b0``.
    """

    adapter_layer_names = ("hydra_par_down", "hydra_par_up", "hydra_seq_down", "hydra_seq_up")

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, dropout)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        kw = {"bias": False, "device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.hydra_par_down = nn.ModuleDict({ADAPTER: nn.Linear(d_in, r, **kw)})
        self.hydra_par_up = nn.ModuleDict({ADAPTER: nn.Linear(r, d_out, **kw)})
        self.hydra_seq_down = nn.ModuleDict({ADAPTER: nn.Linear(d_out, r, **kw)})
        self.hydra_seq_up = nn.ModuleDict({ADAPTER: nn.Linear(r, d_out, **kw)})
        self.scaling = alpha / r
        for down, up in ((self.hydra_par_down, self.hydra_par_up), (self.hydra_seq_down, self.hydra_seq_up)):
            nn.init.kaiming_uniform_(down[ADAPTER].weight, a=math.sqrt(5))  # as LoRA's A
            nn.init.zeros_(up[ADAPTER].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        base = self.base_layer(x)
        if self.disable_adapters:
            return base
        parallel = self.hydra_par_up[ADAPTER](self.hydra_par_down[ADAPTER](self.dropout(x)))
        sequential = self.hydra_seq_up[ADAPTER](self.hydra_seq_down[ADAPTER](self.dropout(base)))
        return base + self.scaling * (parallel + sequential)

    def merged_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        s, w0, b0 = self.scaling, self.base_layer.weight, self.base_layer.bias
        seq = s * self.hydra_seq_up[ADAPTER].weight @ self.hydra_seq_down[ADAPTER].weight  # (d_out, d_out)
        par = s * self.hydra_par_up[ADAPTER].weight @ self.hydra_par_down[ADAPTER].weight  # (d_out, d_in)
        weight = w0 + seq @ w0 + par
        return weight.detach(), None if b0 is None else (b0 + seq @ b0).detach()


def build(model: nn.Module, opts: MethodOptions) -> Built:
    """``--method hydra``: Hydra branches on the target linears (default query, value)."""
    targets = adapter_targets(model, opts.targets)
    wrap_linears(model, targets, lambda linear: HydraLinear(linear, opts.rank, opts.alpha, opts.dropout))
    return model, None  # the modules are found by structure


# benchmarks/results/methods.md, seed 0, validation: 2e-3 0.808 (5e-3 diverged: 0.580); decoders take LoRA's.
METHOD = Method("hydra", build, lr=2e-3, lr_causal=5e-4, dynamic=True)
