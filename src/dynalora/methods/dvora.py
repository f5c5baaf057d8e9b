"""DVoRA: DoRA's magnitude/direction decomposition over VeRA's scaled random projections."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynalora.methods.common import Built, Method, MethodOptions, adapter_targets
from dynalora.methods.tuner import ADAPTER, OwnTunerLayer, target_linears, wrap_linears


class DVoRALinear(OwnTunerLayer):
    """DVoRA: DoRA's weight decomposition over VeRA's update.

    ``W = m ⊙ V / ‖V‖``, ``V = W0 + Λ_b B Λ_d A`` with ``‖·‖`` the norm of each output row (PEFT's
    DoRA convention for ``nn.Linear``). Trained: the magnitude ``m`` (starts at ``‖W0‖``) and VeRA's
    scaling vectors ``λ_b`` (starts at 0) and ``λ_d`` (starts at ``d_init``). Frozen: the random
    projections ``A`` (r, d_in) and ``B`` (d_out, r), shared by every layer (slices of one pair). At
    initialisation the layer is the base layer, as VeRA's is.

    As DoRA recommends (and PEFT does), ``‖V‖`` is treated as a constant in the backward pass: the
    forward value is the formula's, and training is cheaper. With dropout, the dropped input feeds
    the update only: ``y = (m / ‖V‖) ⊙ (W0 x + ΔW dropout(x)) + b``.
    """

    adapter_layer_names = ("dvora_lambda_b", "dvora_lambda_d", "dvora_magnitude")
    other_param_names = ("dvora_A", "dvora_B")

    def __init__(
        self, base_layer: nn.Linear, A: torch.Tensor, B: torch.Tensor, d_init: float = 0.1, dropout: float = 0.0
    ) -> None:
        super().__init__(base_layer, dropout)
        d_in, d_out, r = base_layer.in_features, base_layer.out_features, A.shape[0]
        weight = base_layer.weight
        # slices of the shared projections: views, so every layer uses the one pair in memory
        self.register_buffer("dvora_A", A[:, :d_in], persistent=False)  # rebuilt from the seed on load
        self.register_buffer("dvora_B", B[:d_out, :], persistent=False)
        self.dvora_lambda_b = nn.ParameterDict({ADAPTER: nn.Parameter(torch.zeros(d_out, device=weight.device))})
        self.dvora_lambda_d = nn.ParameterDict({ADAPTER: nn.Parameter(torch.full((r,), d_init, device=weight.device))})
        magnitude = torch.linalg.vector_norm(weight.detach(), dim=1)
        self.dvora_magnitude = nn.ParameterDict({ADAPTER: nn.Parameter(magnitude)})

    def delta(self) -> torch.Tensor:
        """``Λ_b B Λ_d A``: (d_out, d_in)."""
        lambda_b, lambda_d = self.dvora_lambda_b[ADAPTER], self.dvora_lambda_d[ADAPTER]
        return (lambda_b[:, None] * self.dvora_B) @ (lambda_d[:, None] * self.dvora_A)

    def _scale(self, delta: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(self.base_layer.weight + delta, dim=1).detach()  # (d_out,)
        return self.dvora_magnitude[ADAPTER] / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x)
        delta = self.delta()
        scale = self._scale(delta)
        bias = self.base_layer.bias
        base = self.base_layer(x)  # called, not its weight read: measure="adapter" hooks the base layer
        out = (base if bias is None else base - bias) + F.linear(self.dropout(x), delta)
        out = out * scale
        return out if bias is None else out + bias

    def merged_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta = self.delta()
        weight = self._scale(delta)[:, None] * (self.base_layer.weight + delta)
        bias = self.base_layer.bias
        return weight.detach(), None if bias is None else bias.detach()


def shared_projections(
    layers: list[nn.Linear], r: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's frozen random pair, sized for the largest layer: A (r, max d_in), B (max d_out, r).

    Kaiming-uniform from a seeded generator (VeRA's ``projection_prng_key``), so a saved adapter
    needs only the seed to rebuild them.
    """
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = max(m.in_features for m in layers), max(m.out_features for m in layers)

    def kaiming(rows: int, cols: int) -> torch.Tensor:
        bound = math.sqrt(6 / cols)  # kaiming_uniform_ with a=0 on a (rows, cols) weight: fan_in = cols
        return (torch.rand(rows, cols, generator=gen) * 2 - 1) * bound

    return kaiming(r, d_in).to(device), kaiming(d_out, r).to(device)


PROJECTION_SEED = 0  # VeRA's projection_prng_key default


def build(model: nn.Module, opts: MethodOptions) -> Built:
    """``--method dvora``: DVoRA on the target linears (default query, value), projections shared."""
    targets = adapter_targets(model, opts.targets)
    chosen = [linear for _, linear in target_linears(model, targets)]
    A, B = shared_projections(chosen, opts.rank, PROJECTION_SEED, chosen[0].weight.device)
    wrap_linears(model, targets, lambda linear: DVoRALinear(linear, A, B, dropout=opts.dropout))
    return model, None


# benchmarks/results/methods.md, seed 0, validation: 3e-2 0.795, 1e-2 0.793.
# As VeRA's, its trained scaling vectors take the place of alpha.
METHOD = Method("dvora", build, lr=3e-2, dynamic=True, options=("targets", "rank", "adapter_dropout"))
