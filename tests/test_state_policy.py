"""Optimizer state of deactivated modules: kept, dropped, or offloaded; and what it costs."""

import pytest
import torch

from dynalora import DynamicAllocator, DynamicConfig, find_linear_modules
from dynalora.memory import optimizer_state_bytes
from tests import tiny


def setup(policy, optimizer="global"):
    model = tiny.peft_bert()
    alloc = DynamicAllocator(model, DynamicConfig(k=2, period=10**6, state_policy=policy, optimizer=optimizer))
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    return model, alloc, opt


def step(model, alloc, opt, batch):
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    alloc.step()


def inner_state(opt, p):
    states = [o.state for o in getattr(opt, "optimizers", [opt]) if p in o.state]
    return states[0][p] if states else None


@pytest.mark.parametrize("optimizer", ["global", "local"])
def test_keep_moments_stay_and_resume(optimizer):
    model, alloc, opt = setup("keep", optimizer)
    data = tiny.batches(3)
    first = sorted(alloc.active)
    step(model, alloc, opt, data[0])
    p = next(m for m in alloc.modules if m.name == first[0]).params[0]
    saved = {k: v.clone() for k, v in inner_state(opt, p).items()}
    others = [n for n in alloc.module_names if n not in first]
    alloc.set_active(others)
    assert all(torch.equal(inner_state(opt, p)[k], v) for k, v in saved.items())  # untouched while inactive
    step(model, alloc, opt, data[1])
    assert all(torch.equal(inner_state(opt, p)[k], v) for k, v in saved.items())
    alloc.set_active(first)
    step(model, alloc, opt, data[2])
    assert float(inner_state(opt, p)["step"]) == 2.0  # resumed: bias correction continues from step 1


@pytest.mark.parametrize("optimizer", ["global", "local"])
def test_reset_drops_moments_and_restarts_fresh(optimizer):
    model, alloc, opt = setup("reset", optimizer)
    data = tiny.batches(3)
    first = sorted(alloc.active)
    step(model, alloc, opt, data[0])
    params = [p for m in alloc.modules if m.name in first for p in m.params]
    assert all(inner_state(opt, p) is not None for p in params)
    alloc.set_active([n for n in alloc.module_names if n not in first])
    assert all(inner_state(opt, p) is None for p in params)
    step(model, alloc, opt, data[1])
    alloc.set_active(first)
    step(model, alloc, opt, data[2])
    assert all(float(inner_state(opt, p)["step"]) == 1.0 for p in params)  # a fresh start


def test_reset_gives_memory_back_by_the_hand_computed_amount():
    results = {}
    for policy in ("keep", "reset"):
        model, alloc, opt = setup(policy)
        data = tiny.batches(2)
        first = sorted(alloc.active)
        step(model, alloc, opt, data[0])
        alloc.set_active([n for n in alloc.module_names if n not in first])
        step(model, alloc, opt, data[1])
        results[policy] = optimizer_state_bytes(opt)
    # AdamW keeps exp_avg and exp_avg_sq (fp32, like the tensor) and a 4-byte step per tensor.
    per_module = 2 * 4 * (4 * 32 + 32 * 4) + 2 * 4  # two tensors (A 4x32, B 32x4)
    head = 2 * 4 * (32 * 2 + 2) + 2 * 4  # classifier weight and bias, trained every step
    assert results["keep"] == 4 * per_module + head  # everything ever trained
    assert results["reset"] == 2 * per_module + head  # only the active two


def test_offload_needs_cuda_parameters():
    with pytest.raises(ValueError, match="state_policy='offload' needs CUDA"):
        DynamicAllocator(tiny.peft_bert(), DynamicConfig(k=2, state_policy="offload"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_moments_to_host_and_back():
    model = tiny.peft_bert().cuda()
    alloc = DynamicAllocator(model, DynamicConfig(k=2, period=10**6, state_policy="offload"))
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    batch = {k: v.cuda() for k, v in tiny.batches(1)[0].items()}
    first = sorted(alloc.active)
    step(model, alloc, opt, batch)
    p = next(m for m in alloc.modules if m.name == first[0]).params[0]
    before = inner_state(opt, p)["exp_avg"].clone()
    alloc.set_active([n for n in alloc.module_names if n not in first])
    assert inner_state(opt, p)["exp_avg"].device.type == "cpu"
    alloc.set_active(first)
    assert inner_state(opt, p)["exp_avg"].device.type == "cuda"
    assert torch.equal(inner_state(opt, p)["exp_avg"], before)


def test_dynamic_full_finetuning_trains_selected_linears_only():
    model = tiny.bert()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    modules = find_linear_modules(model)
    for m in modules:
        for p in m.params:
            p.requires_grad_(True)
    assert len(modules) == 2 * 6
    alloc = DynamicAllocator(model, DynamicConfig(k=3, period=10**6, state_policy="reset"), modules=modules)
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    before = tiny.weights(model)
    for batch in tiny.batches(3):
        step(model, alloc, opt, batch)
    after = tiny.weights(model)
    active_params = {
        n
        for n, p in model.named_parameters()
        for m in alloc.modules
        if m.name in alloc.active
        for q in m.params
        if q is p
    }
    for n in before:
        changed = not torch.equal(before[n], after[n])
        assert changed == (n in active_params or n.startswith("classifier")), n


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backward_stops_below_the_lowest_trainable_module():
    model = tiny.peft_bert(layers=3)
    alloc = DynamicAllocator(model, DynamicConfig(k=1, measure="random", period=10**6))
    alloc.set_active([n for n in alloc.module_names if ".layer.2." in n])
    reached = []
    layer0 = model.base_model.model.bert.encoder.layer[0]
    layer0.register_full_backward_hook(lambda m, gi, go: reached.append(0))
    emb_out = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: emb_out.append(out.requires_grad))
    model(**tiny.batches(1)[0]).loss.backward()
    assert emb_out == [False]  # nothing forces gradients down to the embeddings
    assert reached == []  # autograd never ran backward through layer 0
    alloc.set_active([n for n in alloc.module_names if ".layer.0." in n])
    model(**tiny.batches(1)[0]).loss.backward()
    assert reached == [0]


def test_set_active_rejects_unknown_or_empty():
    alloc = DynamicAllocator(tiny.peft_bert(), DynamicConfig(k=1))
    with pytest.raises(ValueError, match="unknown modules"):
        alloc.set_active(["nope"])
    with pytest.raises(ValueError, match="at least one"):
        alloc.set_active([])
