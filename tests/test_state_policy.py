"""Optimizer state of deactivated modules: kept, dropped, or offloaded; and what it costs."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from dynalora import DynamicAllocator, DynamicConfig, find_linear_modules
from dynalora.metering import optimizer_state_bytes
from tests import tiny


def setup(policy, optimizer="global"):
    model = tiny.peft_bert()
    alloc = DynamicAllocator(
        model,
        DynamicConfig(k=2, period=10**6, state_policy=policy, optimizer=optimizer, allocator="discounted_stochastic"),
    )
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
        DynamicAllocator(
            tiny.peft_bert(),
            DynamicConfig(k=2, state_policy="offload", allocator="discounted_stochastic", optimizer="global"),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_moments_to_host_and_back():
    model = tiny.peft_bert().cuda()
    alloc = DynamicAllocator(
        model,
        DynamicConfig(k=2, period=10**6, state_policy="offload", allocator="discounted_stochastic", optimizer="global"),
    )
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


class FakeCuda:
    """Parameters on a CUDA device that only exists as metadata (``FakeTensorMode``).

    Lets a CPU-only machine check where ``offload`` puts optimizer state, and that the optimizer
    still steps: a fake CPU moment next to a fake CUDA parameter raises a device-mismatch error
    just as real tensors would. Values are not modelled; only shapes, dtypes and devices.
    """

    def __init__(self, monkeypatch, layers: int = 4, width: int = 8):
        # Tensor.to("cuda") asks torch.cuda to initialise first, which a CPU build refuses.
        monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
        self.mode = FakeTensorMode()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.model.head = nn.Linear(width, 2)
        for module in self.model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                with self.mode:
                    setattr(module, name, nn.Parameter(torch.empty(p.shape, device="cuda")))

    def step(self, alloc, opt):
        with self.mode:  # a backward pass, as far as the optimizer can tell
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad = torch.empty_like(p)
        opt.step()
        opt.zero_grad()
        alloc.step()


def moment_devices(opt, params):
    return {inner_state(opt, p)["exp_avg"].device.type for p in params} | {
        inner_state(opt, p)["exp_avg_sq"].device.type for p in params
    }


@pytest.mark.parametrize("optimizer", ["global", "local"])
def test_offload_moves_moments_to_host_while_inactive_on_a_fake_cuda_device(monkeypatch, optimizer):
    fake = FakeCuda(monkeypatch)
    modules = find_linear_modules(fake.model, r"layers\.\d+")
    config = DynamicConfig(
        k=2,
        period=10**6,
        measure="random",
        state_policy="offload",
        optimizer=optimizer,
        allocator="discounted_stochastic",
    )
    alloc = DynamicAllocator(fake.model, config, modules=modules)  # accepted: the parameters are on CUDA
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    first = sorted(alloc.active)
    rest = [n for n in alloc.module_names if n not in first]
    params = {name: [p for m in alloc.modules if m.name == name for p in m.params] for name in alloc.module_names}
    first_params = [p for n in first for p in params[n]]
    fake.step(alloc, opt)
    assert moment_devices(opt, first_params) == {"cuda"}
    alloc.set_active(rest)
    assert moment_devices(opt, first_params) == {"cpu"}
    steps = [float(inner_state(opt, p)["step"]) for p in first_params]
    fake.step(alloc, opt)  # inactive host moments sit beside the CUDA step untouched
    assert [float(inner_state(opt, p)["step"]) for p in first_params] == steps == [1.0] * len(first_params)
    assert moment_devices(opt, [p for n in rest for p in params[n]]) == {"cuda"}
    alloc.set_active(first)
    assert moment_devices(opt, first_params) == {"cuda"}
    assert moment_devices(opt, [p for n in rest for p in params[n]]) == {"cpu"}
    fake.step(alloc, opt)  # would raise a device mismatch had any moment stayed on the host
    assert [float(inner_state(opt, p)["step"]) for p in first_params] == [2.0] * len(first_params)


def test_offload_reapplied_after_loading_a_checkpoint_on_a_fake_cuda_device(monkeypatch):
    fake = FakeCuda(monkeypatch)
    modules = find_linear_modules(fake.model, r"layers\.\d+")
    config = DynamicConfig(
        k=2,
        period=10**6,
        measure="random",
        state_policy="offload",
        allocator="discounted_stochastic",
        optimizer="global",
    )
    alloc = DynamicAllocator(fake.model, config, modules=modules)
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    first = sorted(alloc.active)
    fake.step(alloc, opt)
    alloc.set_active([n for n in alloc.module_names if n not in first])
    fake.step(alloc, opt)
    opt.load_state_dict(opt.state_dict())  # torch casts every moment to its parameter's device
    inactive = [p for m in alloc.modules if m.name in first for p in m.params]
    assert moment_devices(opt, inactive) == {"cuda"}
    alloc.apply_state_policy()
    assert moment_devices(opt, inactive) == {"cpu"}
    assert moment_devices(opt, [p for m in alloc.modules if m.name not in first for p in m.params]) == {"cuda"}


def test_dynamic_full_finetuning_trains_selected_linears_only():
    model = tiny.bert()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    modules = find_linear_modules(model)
    for m in modules:
        for p in m.params:
            p.requires_grad_(True)
    assert len(modules) == 2 * 6
    alloc = DynamicAllocator(
        model,
        DynamicConfig(k=3, period=10**6, state_policy="reset", allocator="discounted_stochastic", optimizer="global"),
        modules=modules,
    )
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
    alloc = DynamicAllocator(
        model, DynamicConfig(k=1, measure="random", period=10**6, allocator="discounted_stochastic", optimizer="global")
    )
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
    alloc = DynamicAllocator(
        tiny.peft_bert(), DynamicConfig(k=1, allocator="discounted_stochastic", optimizer="global")
    )
    with pytest.raises(ValueError, match="unknown modules"):
        alloc.set_active(["nope"])
    with pytest.raises(ValueError, match="at least one"):
        alloc.set_active([])


def test_local_schedules_anneal_part_time_modules_to_the_end_value():
    """Every module that trained on at least a tenth of the steps ends near the global run's final
    rate (0 for linear), though most train far fewer steps than the run has."""
    model = tiny.peft_bert(layers=6)
    alloc = DynamicAllocator(model, DynamicConfig(local_schedule="run"))  # cutoff, local
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    sched = alloc.create_scheduler(opt, "linear", num_warmup_steps=0, num_training_steps=60)
    tiny.train(model, alloc, opt, sched, tiny.batches(60))
    steps = list(alloc.active_steps.values())
    assert min(steps) < 40  # part-time modules exist: the check below is not vacuous
    for trained, inner in zip(steps, opt.optimizers, strict=True):
        if trained >= 6:
            assert inner.param_groups[0]["lr"] <= 0.1 * 1e-2 + 1e-12, trained


def test_a_module_trained_at_every_step_follows_the_global_schedule():
    rates = []
    for optimizer in ("global", "local"):
        model = tiny.peft_bert()
        local = {"local_schedule": "run"} if optimizer == "local" else {}
        alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=4, optimizer=optimizer, **local))  # all 4
        opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
        sched = alloc.create_scheduler(opt, "linear", num_warmup_steps=3, num_training_steps=10)
        seen = []
        for batch in tiny.batches(7):
            model(**batch).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            alloc.step()
            seen.append(sched.get_last_lr()[-1])
        rates.append(seen)
    assert rates[0] == pytest.approx(rates[1], rel=1e-12)


@pytest.mark.parametrize(
    ("config", "refused"),
    [
        ({}, "optimizer='local'"),  # the default: one optimizer per module, which only create_optimizer builds
        ({"optimizer": "global", "state_policy": "reset"}, "state_policy='reset'"),
        ({"optimizer": "global"}, None),
    ],
)
def test_an_optimizer_of_ones_own_is_refused_where_the_config_needs_the_allocators(config, refused):
    # the allocator never saw an optimizer it did not build: local optimisation and the state policy
    # were silently not applied (a plain AdamW kept the state of deactivated modules under 'reset')
    model = tiny.peft_bert("lora")
    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=2, period=1, **config))
    opt = torch.optim.AdamW([p for m in alloc.modules for p in m.params], lr=1e-3)
    model.train()
    model(**tiny.batches(1)[0]).loss.backward()
    opt.step()
    if refused is None:
        alloc.step()
        assert alloc.step_count == 1
        return
    with pytest.raises(ValueError, match=f"{refused}.* create_optimizer"):
        alloc.step()
    resumed = DynamicAllocator(tiny.peft_bert("lora"), DynamicConfig(allocator="topk", k=2, period=1, **config))
    state = resumed.state_dict() | {"step": 5}  # a resumed run is past step 0: checked all the same
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match=f"{refused}.* create_optimizer"):
        resumed.step()
