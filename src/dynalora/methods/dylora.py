"""DyLoRA (Valipour et al., 2023): LoRA trained at a random rank each step, servable at any rank.

Each optimizer step draws one rank ``b ~ U{1..r}`` for every layer (the reference code,
huawei-noah/Efficient-NLP ``DyLoRA/``, does the same), from a seeded generator that is saved in
checkpoints and draws the same sequence on every process. The layer then computes
``W0 x + (alpha / b) B[:, :b] A[:b] x``. With ``frozen`` (``--dylora-frozen``) only row ``b`` of A
and column ``b`` of B are updated; the rows below ``b`` are used but stay as they are.

A and B are kept as one parameter per row (column), so a row that does not train has no gradient
at all: AdamW then neither decays it nor moves it by momentum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dynalora.methods.common import ADAPTER_OPTIONS, Built, Hooks, Method, MethodOptions, adapter_targets
from dynalora.methods.tuner import ADAPTER, OwnTunerLayer, wrap_linears


class RankSampler:
    """The rank every DyLoRA layer trains at in the current optimizer step."""

    def __init__(self, r: int, seed: int) -> None:
        self.r = r
        self.generator = torch.Generator().manual_seed(seed)
        self.rank = self._draw()
        self.serve_rank = r  # the rank in evaluation and prediction

    def _draw(self) -> int:
        return int(torch.randint(1, self.r + 1, (1,), generator=self.generator))

    def next_step(self) -> None:
        self.rank = self._draw()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "rank": self.rank, "serve_rank": self.serve_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.rank, self.serve_rank = int(state["rank"]), int(state["serve_rank"])


class DyLoRALinear(OwnTunerLayer):
    """A LoRA layer whose rank is the sampler's: ``b`` in training, ``serve_rank`` in eval mode."""

    adapter_layer_names = ("dylora_A", "dylora_B")

    def __init__(
        self, base_layer: nn.Linear, sampler: RankSampler, alpha: float, dropout: float = 0.0, frozen: bool = False
    ) -> None:
        super().__init__(base_layer, dropout)
        d_in, d_out, r = base_layer.in_features, base_layer.out_features, sampler.r
        weight = base_layer.weight
        a = torch.empty(r, d_in, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRA's A; B starts at zero
        rows = nn.ParameterList([nn.Parameter(a[i : i + 1].clone()) for i in range(r)])  # each (1, d_in)
        cols = nn.ParameterList([nn.Parameter(torch.zeros(d_out, 1, device=weight.device)) for _ in range(r)])
        self.dylora_A = nn.ModuleDict({ADAPTER: rows})
        self.dylora_B = nn.ModuleDict({ADAPTER: cols})
        self.sampler, self.alpha, self.frozen = sampler, alpha, frozen

    @property
    def rank(self) -> int:
        return self.sampler.rank if self.training else self.sampler.serve_rank

    def factors(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:b]`` (b, d_in) and ``B[:, :b]`` (d_out, b); frozen: rows/columns below b carry no gradient."""
        rows, cols = list(self.dylora_A[ADAPTER]), list(self.dylora_B[ADAPTER])
        if self.frozen and self.training:
            rows = [p.detach() for p in rows[: b - 1]] + [rows[b - 1]]
            cols = [p.detach() for p in cols[: b - 1]] + [cols[b - 1]]
        return torch.cat(rows[:b]), torch.cat(cols[:b], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.disable_adapters:
            return base
        b = self.rank
        a, bb = self.factors(b)
        return base + (self.alpha / b) * (self.dropout(x) @ a.T @ bb.T)

    def merged_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.sampler.serve_rank
        a, bb = self.factors(b)
        weight = self.base_layer.weight + (self.alpha / b) * bb @ a
        bias = self.base_layer.bias
        return weight.detach(), None if bias is None else bias.detach()


def _sampler(model: nn.Module) -> RankSampler:
    return next(m.sampler for m in model.modules() if isinstance(m, DyLoRALinear))


def set_rank(model: nn.Module, rank: int) -> None:
    """Serve (evaluate, predict, merge) the DyLoRA adapters of ``model`` at ``rank`` (1..r).

    Raises:
        ValueError: a rank outside 1..r, or a model whose adapters were merged (a merged adapter
            has the rank it was merged at).
    """
    layers = [m for m in model.modules() if isinstance(m, DyLoRALinear)]
    if not layers:
        raise ValueError("the model has no DyLoRA layers: merged adapters keep the rank they were merged at")
    r = layers[0].sampler.r
    if not 1 <= rank <= r:
        raise ValueError(f"rank {rank} is outside 1..{r}; allowed: a rank the adapter was trained for")
    layers[0].sampler.serve_rank = rank


def build(model: nn.Module, opts: MethodOptions) -> Built:
    """``--method dylora``: DyLoRA on the target linears (default query, value), one sampler for all."""
    sampler = RankSampler(opts.rank, opts.seed)
    targets = adapter_targets(model, opts.targets)
    wrap_linears(
        model, targets, lambda linear: DyLoRALinear(linear, sampler, opts.alpha, opts.dropout, opts.dylora_frozen)
    )
    return model, None


def _each_rank(model: nn.Module) -> Iterator[int]:
    sampler = _sampler(model)
    kept = sampler.serve_rank
    try:
        for b in range(1, sampler.r + 1):
            sampler.serve_rank = b
            yield b
    finally:
        sampler.serve_rank = kept


HOOKS = Hooks(
    on_optimizer_step=lambda model, step, optimizer: _sampler(model).next_step(),
    state_dict=lambda model: _sampler(model).state_dict(),
    load_state_dict=lambda model, state, optimizer: _sampler(model).load_state_dict(state),
    evaluate_each=("per_rank", _each_rank),
)


METHOD = Method(
    "dylora", build, lr=2e-3, lr_causal=5e-4, dynamic=True, hooks=HOOKS, options=(*ADAPTER_OPTIONS, "dylora_frozen")
)
