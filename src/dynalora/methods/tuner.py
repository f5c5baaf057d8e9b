"""Adapter forms PEFT does not have (hydra.py, dvora.py): tuner layers dynalora finds like PEFT's own.

Each layer wraps a frozen ``nn.Linear`` and subclasses PEFT's ``BaseTunerLayer``; its trainable
tensors sit in the containers named by ``adapter_layer_names`` (one entry, ``"default"``), so
:func:`dynalora.adapters.find_adapter_modules` picks them up by structure and dynamic allocation
works over them unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from dynalora.errors import UsageError

ADAPTER = "default"


class OwnTunerLayer(nn.Module, BaseTunerLayer):
    """What the layers below share: the frozen base layer, PEFT's adapter bookkeeping, merging."""

    adapter_layer_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Linear, dropout: float) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._active_adapter = ADAPTER
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` that computes what this layer computes (dropout off)."""
        weight, bias = self.merged_weight_and_bias()
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=weight.device)
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None:
                out.bias.copy_(bias)
        return out.to(base.weight.dtype)

    def merged_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def take_shapes(self, saved: dict[str, torch.Tensor], prefix: str) -> None:
        """Before saved tensors are copied in: take their shapes where they may differ (L1RA's ranks)."""


def target_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` outside the task head whose name is in ``targets`` or ends with ``.target``."""
    from dynalora.methods.common import is_head

    chosen = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not is_head(name) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not chosen:  # GPT-2's blocks are transformers' Conv1D, which dynalora's own tuner layers do not wrap
        conv = any(type(m).__name__ == "Conv1D" for m in model.modules())
        why = "; this model's layers are Conv1D (GPT-2 style), which it does not wrap" if conv else ""
        raise UsageError(f"--targets matched no nn.Linear for this method{why}; allowed: a model with nn.Linear "
                         "layers, or a PEFT method (lora, dora, vera)")  # fmt: skip
    return chosen


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def wrap_linears(model: nn.Module, targets: list[str], make) -> list[nn.Linear]:
    """Replace every target linear (:func:`target_linears`) by ``make(linear)``; then only adapters
    and head train.

    Returns:
        The wrapped base layers, in model order.
    """
    from dynalora.methods.common import is_head

    chosen = target_linears(model, targets)
    for name, linear in chosen:
        _replace(model, name, make(linear).train(linear.training))  # in the mode the model is in
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(name))
    for layer in model.modules():
        if isinstance(layer, OwnTunerLayer):
            for attr in layer.adapter_layer_names:
                getattr(layer, attr).requires_grad_(True)
    return [linear for _, linear in chosen]


def merge(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by the plain ``nn.Linear`` it computes (in place; returns the model)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, OwnTunerLayer):
            _replace(model, name, layer.merged_linear())
    return model


ADAPTER_FILE = "dynalora_adapter.safetensors"
INFO_FILE = "dynalora_adapter.json"


def is_own(model: nn.Module) -> bool:
    return any(isinstance(m, OwnTunerLayer) for m in model.modules())


def trained_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter tensor (active or frozen by the allocator right now) and the task head's."""
    from dynalora.methods.common import is_head

    adapter = {
        id(p)
        for layer in model.modules()
        if isinstance(layer, OwnTunerLayer)
        for attr in layer.adapter_layer_names
        for p in getattr(layer, attr).parameters()
    }
    return {name: p for name, p in model.named_parameters() if id(p) in adapter or is_head(name)}


def save_adapter(model: nn.Module, folder: Path, info: dict) -> None:
    """The trained tensors (adapters and head) and what rebuilds the rest (``info``: method,
    base model, targets, rank, alpha, labels); :func:`load_trained` reads them back."""
    folder.mkdir(parents=True, exist_ok=True)
    trained = {name: p.detach().contiguous().cpu() for name, p in trained_params(model).items()}
    save_file(trained, str(folder / ADAPTER_FILE))
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_trained(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A model trained with ``--method hydra`` or ``dvora``, ready for prediction (eval mode).

    Args:
        folder: the run's ``model/`` folder.

    ``merge(load_trained(folder))`` gives the same model as plain ``nn.Linear`` layers.
    """
    from transformers import AutoModelForSequenceClassification

    from dynalora.data.tasks import Kind
    from dynalora.methods import METHODS
    from dynalora.methods.common import MethodOptions

    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    kind = Kind.of_problem_type(info["problem_type"])
    if kind.generates:
        from dynalora.models import load_causal_model

        _, model = load_causal_model(info["base_model"], torch.device("cpu"))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            info["base_model"], num_labels=info["num_labels"], problem_type=info["problem_type"],
            ignore_mismatched_sizes=True,
        )  # fmt: skip
    options = MethodOptions(
        tuple(info["targets"]) if info["targets"] else None, info["rank"], info["alpha"], 0.0, False,
        task_type=kind.peft_task_type,
    )  # fmt: skip
    model, _ = METHODS[info["method"]](model, options)
    saved = load_file(str(folder / ADAPTER_FILE))
    for name, layer in model.named_modules():
        if isinstance(layer, OwnTunerLayer):
            layer.take_shapes(saved, f"{name}.")
    params = trained_params(model)
    if set(saved) != set(params):
        raise ValueError(f"{folder / ADAPTER_FILE} does not match --method {info['method']} on {info['base_model']}")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return model.to(device).eval()
