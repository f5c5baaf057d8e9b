"""Find the trainable modules of a model by structure, and set which of them train."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# PeftModel wraps the user's model twice; the names users know start after this prefix.
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterModule:
    """One unit of allocation: a layer and the trainable tensors that belong to it.

    Attributes:
        name: the layer's dotted name in the user's model (PEFT's ``base_model.model.`` prefix dropped).
        layer: the module whose forward output is measured (a PEFT tuner layer, or a plain ``nn.Linear``
            for dynamic full fine-tuning).
        params: the tensors trained while the module is active (LoRA: A, B; DoRA: A, B, magnitude;
            VeRA: ``vera_lambda_b``, ``vera_lambda_d``; full fine-tuning: weight and bias).
    """

    name: str
    layer: nn.Module
    params: tuple[nn.Parameter, ...]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


def _short_name(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def _tuner_params(layer: BaseTunerLayer) -> list[nn.Parameter]:
    """The trainable tensors of a tuner layer's active adapters, in ``adapter_layer_names`` order.

    ``adapter_layer_names`` lists, per tuner type, the attributes that hold trainable adapter
    weights (LoRA: ``lora_A``, ``lora_B``, ``lora_magnitude_vector``; VeRA: ``vera_lambda_b``,
    ``vera_lambda_d``). VeRA's shared random projections live in ``other_param_names`` as frozen
    buffers, so they are never picked up. Matching names like ``"lora_" in name`` would miss VeRA.
    """
    params: dict[int, nn.Parameter] = {}  # by id: DoRA lists its magnitude in adapter_layer_names twice
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None:
            continue
        for adapter in layer.active_adapters:
            if adapter not in container:
                continue
            item = container[adapter]
            tensors = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            params.update((id(p), p) for p in tensors if p.requires_grad)
    return list(params.values())


def find_adapter_modules(model: nn.Module) -> list[AdapterModule]:
    """Every PEFT tuner layer with trainable adapter weights, in model order.

    Works for any PEFT method built on ``BaseTunerLayer`` (LoRA, DoRA, VeRA, LoHa, IA3, ...).
    """
    modules = []
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer):
            params = _tuner_params(layer)
            if params:
                modules.append(AdapterModule(_short_name(name), layer, tuple(params)))
    return modules


def find_block_list(model: nn.Module, within: Iterable[nn.Module] | None = None) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of transformer blocks, found by structure: the ``nn.ModuleList`` holding most
    of ``within`` (default: most linear layers). BERT: ``encoder.layer``; llama: ``model.layers``;
    GPT-2: ``transformer.h``. Ties go to the outermost list. ``None`` if no list holds any.

    Returns:
        ``(dotted name, list)``, with PEFT's ``base_model.model.`` prefix kept (a name in ``model``).
    """
    wanted = {id(m) for m in within} if within is not None else None
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, ml in model.named_modules():
        if not isinstance(ml, nn.ModuleList):
            continue
        inside = [m for m in ml.modules() if (id(m) in wanted if wanted is not None else isinstance(m, _LINEAR))]
        if inside and (best is None or len(inside) > best[0]):
            best = (len(inside), name, ml)
    return None if best is None else (best[1], best[2])


def _linear_types() -> tuple[type[nn.Module], ...]:
    try:  # GPT-2's block layers are transformers' Conv1D (a transposed linear), not nn.Linear
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


_LINEAR = _linear_types()


def find_linear_modules(model: nn.Module, targets: Sequence[str] | str | None = None) -> list[AdapterModule]:
    """Plain linear layers (``nn.Linear``, GPT-2's ``Conv1D``) as units of allocation, for dynamic
    full fine-tuning.

    Args:
        model: the model whose linear layers are to be trained.
        targets: ``None`` (default) for every linear layer inside the transformer blocks
            (:func:`find_block_list`); a regular expression that the full module name must match;
            or a list of name suffixes (``["query", "value"]``) as PEFT's ``target_modules`` takes them.
    """
    if targets is None:
        found = find_block_list(model)
        prefix = None if found is None else found[0] + "."

        def matches(name: str) -> bool:
            return prefix is not None and name.startswith(prefix)
    elif isinstance(targets, str):
        pattern = re.compile(targets)

        def matches(name: str) -> bool:
            return pattern.fullmatch(name) is not None
    else:
        suffixes = tuple(targets)

        def matches(name: str) -> bool:
            return any(name == s or name.endswith("." + s) for s in suffixes)

    return [
        AdapterModule(name, layer, tuple(p for p in layer.parameters(recurse=False)))
        for name, layer in model.named_modules()
        if isinstance(layer, _LINEAR) and matches(name)
    ]


def other_trainable_params(model: nn.Module, modules: Iterable[AdapterModule]) -> list[nn.Parameter]:
    """Trainable parameters outside every module (classifier head, ``modules_to_save``): always trained."""
    owned = {id(p) for m in modules for p in m.params}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in owned]


def set_trainable(modules: Sequence[AdapterModule], active: torch.Tensor) -> None:
    """Make exactly the active modules' tensors trainable.

    A deactivated tensor also loses its gradient: a stale gradient (or a zeroed one, after
    ``zero_grad(set_to_none=False)``) would still move it through momentum and weight decay.

    Args:
        modules: all modules, in order.
        active: bool mask, shape ``(len(modules),)``.
    """
    for module, on in zip(modules, active.tolist(), strict=True):
        for p in module.params:
            p.requires_grad_(on)
            if not on:
                p.grad = None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--base-dtype`` names."""


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen floating-point parameter of ``model`` at ``dtype``; trainable ones stay
    (or become) float32, as PEFT's ``autocast_adapter_dtype`` keeps adapters: a half-precision
    frozen base under float32 adapters, gradients and optimizer state.

    Call it after the adapters exist and before :class:`~dynalora.DynamicAllocator` freezes any of
    them (inactive adapters are trainable tensors too), and run the forward under
    ``torch.autocast`` at ``dtype`` so that mixed inputs meet in one precision.

    Returns:
        The number of parameters cast.
    """
    if not dtype.is_floating_point:
        allowed = ", ".join(map(str, DTYPES.values()))
        raise ValueError(f"dtype={dtype} is not a floating-point dtype; allowed: {allowed}")
    cast = 0
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        target = torch.float32 if param.requires_grad else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
            cast += param.numel() if target == dtype else 0
    return cast
