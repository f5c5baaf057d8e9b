"""L1RA (Singh et al., 2024): LoRA with an L1-penalised gate per rank; ranks whose gate dies are
pruned and given to the modules that use all of theirs, under a fixed total rank budget.

The rule and its defaults follow the reference code (raul-singh/L1RA, ``tuner/layer.py``,
``tuner/model.py``, ``trainer/trainer.py``):

- each rank i of a layer has a gate ``c_i`` in [0, 1] (starts at 1) between A and B:
  ``h = W0 x + (alpha / r) B diag(c) A x``;
- the L1 term ``lambda * ||c||_1`` (lambda 1e-3) is applied as its proximal step after every
  optimizer step, ``c <- clip(c - lr_c * lambda, 0, 1)``, in plain torch (the reference needs a
  forked bitsandbytes optimizer for it); the gates have their own learning rate ``lr_c`` = 1e-2
  and no weight decay;
- every 10% of the optimizer steps, ranks whose gate is at most ``threshold`` (1e-6) are pruned
  (a layer keeps at least one), and the freed ranks are handed out one at a time, round-robin, to
  the layers that pruned nothing, those whose smallest gate is largest first. A new rank starts
  with gate 1, a random row of A and a zero column of B, so it changes nothing at first.

Two fixes over the reference, as the task asked: after a resize ``alpha / r`` is recomputed (and
B rescaled so that the layer's output does not jump), and the Adam state of the kept ranks is kept
(trimmed or extended with zeros) instead of restarting the whole optimizer. The gates follow the
run's LR schedule rather than a constant one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dynalora.errors import UsageError
from dynalora.methods.common import Built, Hooks, Method, MethodOptions, adapter_targets
from dynalora.methods.tuner import ADAPTER, OwnTunerLayer, wrap_linears

LAMBDA = 1e-3
GATE_LR = 1e-2
THRESHOLD = 1e-6
UPDATE_RATIO = 0.1


class L1RALinear(OwnTunerLayer):
    """``h = W0 x + b0 + (alpha / r) B diag(c) A x`` with A (r, d_in), B (d_out, r), gates c (r,)."""

    adapter_layer_names = ("l1ra_A", "l1ra_B", "l1ra_c")

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, dropout)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        dev = base_layer.weight.device
        a = torch.empty(r, d_in, device=dev)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRA's A
        self.l1ra_A = nn.ParameterDict({ADAPTER: nn.Parameter(a)})
        self.l1ra_B = nn.ParameterDict({ADAPTER: nn.Parameter(torch.zeros(d_out, r, device=dev))})
        self.l1ra_c = nn.ParameterDict({ADAPTER: nn.Parameter(torch.ones(r, device=dev))})
        self.alpha, self.init_r = alpha, r

    @property
    def r(self) -> int:
        return self.l1ra_c[ADAPTER].numel()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.disable_adapters:
            return base
        a, b, c = self.l1ra_A[ADAPTER], self.l1ra_B[ADAPTER], self.l1ra_c[ADAPTER]
        return base + self.scaling * ((self.dropout(x) @ a.T) * c) @ b.T

    def merged_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, b, c = self.l1ra_A[ADAPTER], self.l1ra_B[ADAPTER], self.l1ra_c[ADAPTER]
        weight = self.base_layer.weight + self.scaling * (b * c) @ a
        bias = self.base_layer.bias
        return weight.detach(), None if bias is None else bias.detach()

    def take_shapes(self, saved: dict[str, torch.Tensor], prefix: str) -> None:
        r = saved[f"{prefix}l1ra_c.{ADAPTER}"].numel()
        if r != self.r:
            self.resize(torch.arange(min(r, self.r)), max(0, r - self.r), torch.Generator())

    def resize(self, keep: torch.Tensor, grow: int, generator: torch.Generator) -> dict[str, tuple]:
        """Keep the ranks ``keep`` (indices) and add ``grow`` new ones; the output does not change
        for kept ranks (B is rescaled by old/new scaling), new ones contribute zero.

        Returns:
            ``{attr: (old parameter, new parameter, kept indices, new count)}`` for the optimizer.
        """
        old_scaling = self.scaling
        a, b, c = self.l1ra_A[ADAPTER], self.l1ra_B[ADAPTER], self.l1ra_c[ADAPTER]
        new_a = torch.randn(grow, a.shape[1], generator=generator).to(a) / self.init_r  # the reference's init
        r_new = keep.numel() + grow
        new = {
            "l1ra_A": torch.cat([a.detach()[keep], new_a]),
            "l1ra_B": torch.cat(
                [b.detach()[:, keep] * (old_scaling * r_new / self.alpha), b.new_zeros(b.shape[0], grow)], 1
            ),
            "l1ra_c": torch.cat([c.detach()[keep], c.new_ones(grow)]),
        }
        changes = {}
        for attr, tensor in new.items():
            container = getattr(self, attr)
            old = container[ADAPTER]
            container[ADAPTER] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            changes[attr] = (old, container[ADAPTER], keep, grow)
        return changes


def _layers(model: nn.Module) -> list[tuple[str, L1RALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, L1RALinear)]


def plan(gates: list[torch.Tensor], threshold: float) -> tuple[list[torch.Tensor], list[int]]:
    """Which ranks each layer keeps and how many new ones it gets (the reference's rule).

    Args:
        gates: each layer's gate vector.

    Returns:
        ``(keep, grow)``: kept indices and number of new ranks, per layer; the total is unchanged.
    """
    keep, pruned = [], []
    for c in gates:
        alive = (c > threshold).nonzero().flatten()
        if alive.numel() == 0:  # a layer keeps at least one rank: its strongest
            alive = c.argmax().reshape(1)
        keep.append(alive)
        pruned.append(c.numel() - alive.numel())
    freed = sum(pruned)
    grow = [0] * len(gates)
    eligible = [i for i in range(len(gates)) if pruned[i] == 0]
    eligible.sort(key=lambda i: -float(gates[i].min()))  # those using all their ranks hardest first
    for j in range(freed if eligible else 0):
        grow[eligible[j % len(eligible)]] += 1
    return keep, grow


def _move_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, keep, grow: int, dim: int):
    """Point the optimizer at ``new`` and carry the Adam state of the kept ranks over (new ranks: zeros)."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if not state:
        return
    for key, value in list(state.items()):
        if torch.is_tensor(value) and value.shape == old.shape:
            kept = value.index_select(dim, keep.to(value.device))
            shape = list(value.shape)
            shape[dim] = grow
            state[key] = torch.cat([kept, value.new_zeros(shape)], dim)
    optimizer.state[new] = state


class L1RA:
    """The per-step work of L1RA: the proximal L1 step on the gates and the periodic resize."""

    def __init__(self, total_steps: int | None, seed: int) -> None:
        # None: a model built to load a trained adapter into, which never steps
        self.every = max(1, int(UPDATE_RATIO * total_steps)) if total_steps else None
        self.generator = torch.Generator().manual_seed(seed)

    def after_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.every is None:  # it would otherwise resize at every step
            raise UsageError("--method l1ra reallocates ranks at fixed fractions of the run and needs its length "
                             "to train; allowed: MethodOptions(total_steps=N)")  # fmt: skip
        layers = _layers(model)
        gate_lr = next(g["lr"] for g in optimizer.param_groups if g.get("l1ra_gates"))
        with torch.no_grad():
            for _, layer in layers:
                c = layer.l1ra_c[ADAPTER]
                c.sub_(gate_lr * LAMBDA).clamp_(0.0, 1.0)  # prox of lambda*||c||_1 on [0, 1]
        if (step + 1) % self.every == 0:
            self.resize(model, optimizer)

    def resize(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        layers = _layers(model)
        keep, grow = plan([layer.l1ra_c[ADAPTER].detach() for _, layer in layers], THRESHOLD)
        for (_, layer), kept, new in zip(layers, keep, grow, strict=True):
            if kept.numel() == layer.r and new == 0:
                continue
            for attr, (old, param, idx, n) in layer.resize(kept, new, self.generator).items():
                _move_state(optimizer, old, param, idx, n, dim=1 if attr == "l1ra_B" else 0)


STATIC = "--method l1ra moves ranks between modules itself (its gates decide); use it with --no-dynamic"


def build(model: nn.Module, opts: MethodOptions) -> Built:
    if opts.dynamic:
        raise UsageError(STATIC)
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise UsageError(
            "--method l1ra changes parameter shapes while it trains, which DDP cannot follow; allowed: one process"
        )
    targets = adapter_targets(model, opts.targets)
    wrap_linears(model, targets, lambda linear: L1RALinear(linear, opts.rank, opts.alpha, opts.dropout))
    model.dynalora_l1ra = L1RA(opts.total_steps, opts.seed)  # the loop's hooks find it here
    return model, None


def make_optimizer(model: nn.Module, opts: MethodOptions, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    gates = [layer.l1ra_c[ADAPTER] for _, layer in _layers(model)]
    gate_ids = {id(p) for p in gates}
    rest = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in gate_ids]
    return torch.optim.AdamW(
        [{"params": rest}, {"params": gates, "lr": GATE_LR, "weight_decay": 0.0, "l1ra_gates": True}],
        lr=lr, weight_decay=weight_decay,
    )  # fmt: skip


def ranks(model: nn.Module) -> dict[str, int]:
    return {name: layer.r for name, layer in _layers(model)}


def state_dict(model: nn.Module) -> dict[str, Any]:
    return {"ranks": list(ranks(model).values()), "generator": model.dynalora_l1ra.generator.get_state()}


def load_state_dict(model: nn.Module, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Resize every layer to its saved rank (before weights and optimizer state are loaded)."""
    for (_, layer), r in zip(_layers(model), state["ranks"], strict=True):
        if layer.r != r:
            keep = torch.arange(min(r, layer.r))
            for attr, (old, param, idx, n) in layer.resize(keep, max(0, r - layer.r), torch.Generator()).items():
                _move_state(optimizer, old, param, idx, n, dim=1 if attr == "l1ra_B" else 0)
    model.dynalora_l1ra.generator.set_state(state["generator"])


HOOKS = Hooks(
    on_optimizer_step=lambda model, step, optimizer: model.dynalora_l1ra.after_step(model, step, optimizer),
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    summary=lambda model: {"ranks": ranks(model)},
    make_optimizer=make_optimizer,
)


# benchmarks/results/methods.md, seed 0, validation: 1e-3 0.804, 2e-3 0.802.
METHOD = Method("l1ra", build, lr=1e-3, static=STATIC, hooks=HOOKS)
