"""Discovery by structure, and freezing that is real."""

import pytest
import torch

from dynalora import DynamicAllocator, DynamicConfig, find_adapter_modules
from tests import tiny

EXPECTED_TENSORS = {
    "lora": ["lora_A.default.weight", "lora_B.default.weight"],
    "dora": ["lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight"],
    "vera": ["vera_lambda_b.default", "vera_lambda_d.default"],
}


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_one_module_per_adapted_layer_holding_its_own_tensors(method):
    model = tiny.peft_bert(method)
    modules = find_adapter_modules(model)
    names = [m.name for m in modules]
    assert names == [f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")]
    by_id = {id(p): n for n, p in model.named_parameters()}
    for module in modules:
        prefix = "base_model.model." + module.name + "."
        got = sorted(by_id[id(p)] for p in module.params)
        assert got == sorted(prefix + t for t in EXPECTED_TENSORS[method])


def test_vera_shared_projections_are_never_modules_or_trained():
    model = tiny.peft_bert("vera")
    alloc = DynamicAllocator(model, DynamicConfig(k=1, allocator="discounted_stochastic", optimizer="global"))
    owned = {id(p) for m in alloc.modules for p in m.params}
    shared = [t for n, t in model.named_buffers() if "vera_A" in n or "vera_B" in n]
    assert shared, "VeRA should hold its shared projections as buffers"
    assert not any(id(t) in owned for t in shared)
    # one module is active, its two lambda vectors require grad; nothing else of VeRA does
    vera_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "vera" in n]
    assert len(vera_trainable) == 2


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_head_is_always_trained_and_never_a_module(method):
    model = tiny.peft_bert(method)
    head = {n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n}
    assert head
    alloc = DynamicAllocator(model, DynamicConfig(k=1, allocator="discounted_stochastic", optimizer="global"))
    assert all("classifier" not in name for name in alloc.module_names)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in head)
    assert alloc.num_extra_params == sum(params[n].numel() for n in head)


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_exactly_active_modules_require_grad(method):
    model = tiny.peft_bert(method)
    alloc = DynamicAllocator(model, DynamicConfig(k=2, allocator="random", seed=3, optimizer="global"))
    for module in alloc.modules:
        on = module.name in alloc.active
        assert all(p.requires_grad == on for p in module.params), module.name
    assert alloc.num_active_params == sum(m.num_params for m in alloc.modules if m.name in alloc.active)
    assert alloc.num_params == sum(p.numel() for m in alloc.modules for p in m.params)


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adamw", "sgd-momentum"],
)
def test_inactive_modules_get_no_grad_and_stay_bitwise_unchanged(method, make_opt):
    model = tiny.peft_bert(method)
    # period longer than the run: the selection stays fixed
    alloc = DynamicAllocator(model, DynamicConfig(k=2, allocator="random", period=1000, optimizer="global"))
    opt = alloc.create_optimizer(lambda ps, **_: make_opt(ps))
    before = {m.name: [p.detach().clone() for p in m.params] for m in alloc.modules}
    for batch in tiny.batches(4):
        model(**batch).loss.backward()
        for module in alloc.modules:
            if module.name not in alloc.active:
                assert all(p.grad is None for p in module.params)
            else:
                assert all(p.grad is not None for p in module.params)
        opt.step()
        opt.zero_grad()
        alloc.step()
    for module in alloc.modules:
        same = [torch.equal(a, p) for a, p in zip(before[module.name], module.params, strict=True)]
        if module.name in alloc.active:
            assert not any(same), module.name
        else:
            assert all(same), module.name


def test_deactivation_drops_leftover_grads():
    """A module frozen after backward but before the step must not be moved by its stale grad."""
    model = tiny.peft_bert()
    alloc = DynamicAllocator(
        model, DynamicConfig(k=4, allocator="topk", measure="random", period=1, optimizer="global")
    )
    alloc.k = 1  # next reallocation keeps a single module
    model(**tiny.batches(1)[0]).loss.backward()
    alloc.step()  # reallocates before zero_grad
    frozen = [m for m in alloc.modules if m.name not in alloc.active]
    assert len(frozen) == 3
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.params)
