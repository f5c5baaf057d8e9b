"""Importance measures against hand-computed norms; evaluation passes never count."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dynalora import DynamicAllocator, DynamicConfig
from tests import tiny


def _capture_inputs(alloc):
    """Record every input of every adapted layer (independently of dynalora's hooks)."""
    seen = {m.name: [] for m in alloc.modules}
    handles = [
        m.layer.register_forward_pre_hook(lambda mod, args, name=m.name: seen[name].append(args[0].detach().clone()))
        for m in alloc.modules
    ]
    return seen, handles


def _lora_parts(layer):
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]
    return base, a, b, scale


@pytest.mark.parametrize("measure", ["forward", "adapter"])
def test_forward_and_adapter_norms_match_hand_computation(measure):
    model = tiny.peft_bert("lora")
    alloc = DynamicAllocator(
        model, DynamicConfig(measure=measure, k=2, period=1000, allocator="discounted_stochastic", optimizer="global")
    )
    seen, handles = _capture_inputs(alloc)
    model.train()
    for batch in tiny.batches(2):
        model(**batch)
    for h in handles:
        h.remove()
    scores = alloc.scores()
    for module in alloc.modules:
        base, a, b, scale = _lora_parts(module.layer)
        expected = 0.0
        with torch.no_grad():
            for x in seen[module.name]:  # (B, T, d_in)
                delta = (x @ a.T @ b.T) * scale  # ΔW x, ΔW = B A · scaling
                h = x @ base.weight.T + base.bias + delta if measure == "forward" else delta
                expected += sum(float(v.norm()) for v in h.reshape(-1, h.shape[-1]))  # Σ_x ||h||_2
        assert scores[module.name] == pytest.approx(expected, rel=1e-5)
        assert expected > 0


def _dvora_bert():
    from dynalora.methods import METHODS, MethodOptions

    model, _ = METHODS["dvora"](tiny.bert(), MethodOptions(None, 4, 8.0, 0.0, False))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dvora_lambda_b" in name:  # zero at init: the adapter would add nothing
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


# dvora: it rescales W x + ΔW x, and read its base layer's weight without calling the layer, so the
# measure's base-output hook never fired and every score stayed 0
@pytest.mark.parametrize("method", ["dora", "vera", "dvora"])
def test_adapter_norm_is_tuner_output_minus_base_output(method):
    model = _dvora_bert() if method == "dvora" else tiny.peft_bert(method)
    alloc = DynamicAllocator(
        model, DynamicConfig(measure="adapter", k=1, period=1000, allocator="discounted_stochastic", optimizer="global")
    )
    seen, handles = _capture_inputs(alloc)
    model.train()
    model(**tiny.batches(1)[0])
    for h in handles:
        h.remove()
    for module in alloc.modules:
        x = seen[module.name][0]
        with torch.no_grad():
            delta = module.layer(x) - module.layer.base_layer(x)
        expected = float(delta.norm(dim=-1).sum())
        assert alloc.scores()[module.name] == pytest.approx(expected, rel=1e-4)
        assert expected > 0


def test_adapter_norm_refuses_a_layer_that_never_calls_its_base_layer(monkeypatch):
    import torch.nn.functional as F

    from dynalora.methods.dvora import DVoRALinear

    def reads_the_weight(self, x):  # what DVoRA did before
        return F.linear(x, self.base_layer.weight + self.delta(), self.base_layer.bias)

    monkeypatch.setattr(DVoRALinear, "forward", reads_the_weight)
    model = _dvora_bert()
    config = DynamicConfig(measure="adapter", k=1, period=1000, allocator="discounted_stochastic", optimizer="global")
    DynamicAllocator(model, config)
    model.train()
    with pytest.raises(RuntimeError, match="without calling its base layer"):
        model(**tiny.batches(1)[0])


def test_gradient_norm_matches_grad_and_is_read_whether_zero_grad_comes_first():
    model = tiny.peft_bert("lora")
    alloc = DynamicAllocator(
        model, DynamicConfig(measure="gradient", k=2, allocator="random", period=1000, optimizer="global")
    )
    opt = alloc.create_optimizer(torch.optim.SGD, lr=0.0)
    expected = {name: [] for name in alloc.module_names}
    for i, batch in enumerate(tiny.batches(3)):
        model(**batch).loss.backward()
        for m in alloc.modules:
            if m.name in alloc.active:
                expected[m.name].append(float(torch.sqrt(sum(p.grad.pow(2).sum() for p in m.params))))
        if i % 2 == 0:
            opt.zero_grad()
            alloc.step()
        else:
            alloc.step()
            opt.zero_grad()
    scores = alloc.scores()
    trained = [n for n in alloc.module_names if expected[n]]
    assert sorted(trained) == sorted(alloc.active)
    for name in trained:  # mean norm over the steps it trained
        assert scores[name] == pytest.approx(sum(expected[name]) / len(expected[name]), rel=1e-5)
    mean_trained = sum(scores[n] for n in trained) / len(trained)
    for name in set(alloc.module_names) - set(trained):  # never trained: the mean of the trained ones
        assert scores[name] == pytest.approx(mean_trained)


@pytest.mark.parametrize("measure", ["forward", "adapter", "gradient"])
def test_evaluation_passes_do_not_count(measure):
    model = tiny.peft_bert("lora")
    alloc = DynamicAllocator(
        model, DynamicConfig(measure=measure, k=4, period=1000, allocator="discounted_stochastic", optimizer="global")
    )
    batch = tiny.batches(1)[0]
    model.train()
    model(**batch).loss.backward()
    alloc.step()
    before = alloc.scores()
    assert any(v > 0 for v in before.values())
    model.eval()
    model(**batch).loss.backward()  # eval-mode pass, even with a backward
    with torch.no_grad():
        model.train()
        model(**batch)  # training mode but no autograd: an evaluation pass too
    alloc.step()
    assert alloc.scores() == before


def test_random_measure_installs_no_hooks_and_is_seeded():
    model = tiny.peft_bert("lora")
    a = DynamicAllocator(
        model, DynamicConfig(measure="random", k=1, seed=5, allocator="discounted_stochastic", optimizer="global")
    )
    assert all(not m.layer._forward_hooks for m in a.modules)
    first = a.scores()
    model(**tiny.batches(1)[0])
    assert a.scores() == first
    a.close()
    b = DynamicAllocator(
        tiny.peft_bert("lora"),
        DynamicConfig(measure="random", k=1, seed=5, allocator="discounted_stochastic", optimizer="global"),
    )
    assert b.scores() == first


@pytest.mark.parametrize("measure", ["forward", "adapter", "gradient"])
def test_close_removes_every_hook(measure):
    model = tiny.peft_bert("lora")
    alloc = DynamicAllocator(
        model, DynamicConfig(measure=measure, k=4, allocator="discounted_stochastic", optimizer="global")
    )
    alloc.close()
    for module in alloc.modules:
        assert not module.layer._forward_hooks
        assert not module.layer.base_layer._forward_hooks
        assert all(not p._post_accumulate_grad_hooks for p in module.params)
    model(**tiny.batches(1)[0]).loss.backward()
    alloc.step()
    assert all(v == 0 for v in alloc.scores().values())


def test_overflowed_measurements_are_dropped_not_summed():
    """An inf (fp16 overflow) would otherwise poison the running sum and make every selection uniform."""
    model = tiny.peft_bert("lora")
    fwd = DynamicAllocator(
        model, DynamicConfig(measure="forward", k=4, period=1000, allocator="discounted_stochastic", optimizer="global")
    )
    layer = fwd.modules[0].layer
    layer.train()
    hook = next(iter(layer._forward_hooks.values()))
    hook(layer, (None,), torch.tensor([[1.0, float("inf")], [3.0, 4.0]]))
    assert fwd.scores()[fwd.modules[0].name] == 0.0
    hook(layer, (None,), torch.tensor([[3.0, 4.0]]))
    assert fwd.scores()[fwd.modules[0].name] == 5.0
    fwd.close()

    grad = DynamicAllocator(
        model,
        DynamicConfig(measure="gradient", k=4, period=1000, allocator="discounted_stochastic", optimizer="global"),
    )
    batch = tiny.batches(1)[0]
    (model(**batch).loss * float("inf")).backward()
    grad.step()
    model.zero_grad()
    assert all(v == 0.0 for v in grad.scores().values())  # nothing measured yet
    model(**batch).loss.backward()
    grad.step()
    assert all(v > 0 and v != float("inf") for v in grad.scores().values())


def test_once_schedule_stops_measuring_after_its_reallocation():
    model = tiny.peft_bert("lora")
    alloc = DynamicAllocator(
        model,
        DynamicConfig(
            measure="forward", k=2, schedule="once", period=2, allocator="discounted_stochastic", optimizer="global"
        ),
    )
    opt = alloc.create_optimizer(torch.optim.SGD, lr=0.0)
    tiny.train(model, alloc, opt, None, tiny.batches(2))
    assert [h["step"] for h in alloc.history] == [0, 2]
    assert all(not m.layer._forward_hooks for m in alloc.modules)
    frozen = alloc.scores()
    tiny.train(model, alloc, opt, None, tiny.batches(2))
    assert alloc.scores() == frozen


@pytest.mark.parametrize("measure", ["forward", "adapter"])
def test_activation_checkpointing_recomputation_does_not_count_twice(measure):
    scores = []
    for checkpointing in (False, True):
        model = tiny.peft_bert("lora")
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        alloc = DynamicAllocator(
            model,
            DynamicConfig(measure=measure, k=4, period=1000, allocator="discounted_stochastic", optimizer="global"),
        )
        model.train()
        model(**tiny.batches(1)[0]).loss.backward()
        scores.append(alloc.scores())
    plain, checkpointed = scores
    assert checkpointed == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("measure", ["forward", "adapter"])
def test_reentrant_checkpointing_is_refused_by_forward_measures_it_would_blind(measure):
    # reentrant checkpointing runs the first forward without gradients and repeats it inside backward: a
    # forward measure saw neither, so every checkpointed block scored 0 (the frozen blocks below the cut
    # still scored, and the next reallocation preferred them)
    model = tiny.peft_bert("lora")
    alloc = DynamicAllocator(
        model, DynamicConfig(measure=measure, allocator="topk", k=4, period=1000, optimizer="global")
    )
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(RuntimeError, match=rf"measure='{measure}' .* \(use_reentrant=True\)"):
        model(**tiny.batches(1)[0])
    alloc.close()
    gradient = tiny.peft_bert("lora")  # the gradient measure reads .grad, which reentrant checkpointing gives
    alloc = DynamicAllocator(
        gradient, DynamicConfig(measure="gradient", allocator="topk", k=4, period=1000, optimizer="global")
    )
    gradient.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    gradient.train()
    gradient(**tiny.batches(1)[0]).loss.backward()
    alloc.step()
    assert all(score > 0 for score in alloc.scores().values())


class _HostReads(TorchDispatchMode):
    """Counts the ops that make a CUDA stream wait for the host: reading a value (``.item()``,
    ``bool(tensor)``), or producing a data-dependent shape (``nonzero``, ``masked_select``)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in self.SYNCING:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _host_reads_of_a_step(model, optimizer, allocator, batch):
    with _HostReads() as reads:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if allocator is not None:
            allocator.step()
    return sorted(reads.ops)


@pytest.mark.parametrize("measure", ["forward", "adapter", "gradient", "random"])
def test_measuring_adds_no_host_reads_to_a_training_step(measure):
    """The hot path stays on the device: a measured step reads from the device exactly as often as
    a plain PEFT step (AdamW's own step counters are read on both)."""
    batch = tiny.batches(1)[0]
    plain = tiny.peft_bert()
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
    expected = _host_reads_of_a_step(plain, plain_opt, None, batch)
    model = tiny.peft_bert()
    alloc = DynamicAllocator(
        model,
        DynamicConfig(measure=measure, k=1.0, period=10**6, allocator="discounted_stochastic", optimizer="global"),
    )
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-3)
    assert _host_reads_of_a_step(model, opt, alloc, batch) == expected


def test_gradient_ema_weighs_late_measurements_more():
    model = tiny.peft_bert("lora")
    beta = 0.5
    alloc = DynamicAllocator(
        model, DynamicConfig(k=4, allocator="random", period=1000, optimizer="global", importance_ema=beta)
    )
    opt = alloc.create_optimizer(torch.optim.SGD, lr=0.1)  # weights move, so the norms differ by step
    norms = {name: [] for name in alloc.module_names}
    for batch in tiny.batches(4):
        model(**batch).loss.backward()
        for m in alloc.modules:
            if m.name in alloc.active:
                norms[m.name].append(float(torch.sqrt(sum(p.grad.pow(2).sum() for p in m.params))))
        opt.step()
        opt.zero_grad()
        alloc.step()
    scores = alloc.scores()
    for name in alloc.active:
        g = norms[name]
        weights = [beta ** (len(g) - 1 - i) for i in range(len(g))]  # the newest weighs 1
        expected = sum(w * v for w, v in zip(weights, g, strict=True)) / sum(weights)
        assert scores[name] == pytest.approx(expected, rel=1e-5)
        assert scores[name] != pytest.approx(sum(g) / len(g), rel=1e-4)  # not the plain mean


def test_type_groups_and_normalisation_within_types():
    from dynalora.importance import normalize_within, type_groups

    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
             "bert.encoder.layer.11.attention.self.query", "bert.encoder.layer.11.attention.self.value",
             "model.layers.3.mlp.down_proj"]  # fmt: skip
    groups = type_groups(names)
    assert groups.tolist() == [0, 1, 0, 1, 2]
    scores = torch.tensor([1.0, 10.0, 3.0, 30.0, 0.0])
    # query mean 2, value mean 20: both types become 0.5 and 1.5; a type measured at 0 stays 0
    assert normalize_within(scores, groups).tolist() == [0.5, 0.5, 1.5, 1.5, 0.0]


def test_normalize_types_hands_the_allocator_type_normalised_scores(monkeypatch):
    from dynalora import allocators, controller

    model = tiny.peft_bert("lora")
    alloc = DynamicAllocator(model, DynamicConfig(k=2, allocator="topk", period=1, optimizer="global",
                                                  normalize_types=True))  # fmt: skip
    seen = []
    real = allocators.topk
    monkeypatch.setattr(alloc, "_allocate", lambda req: seen.append(req.importance) or real(req))
    raw = torch.tensor([float(i + 1) * (10 if "value" in n else 1) for i, n in enumerate(alloc.module_names)])
    monkeypatch.setattr(alloc._measure, "scores", lambda: raw.clone())
    alloc.reallocate()
    groups = controller.type_groups(alloc.module_names)
    expected = allocators.normalize(controller.normalize_within(raw, groups))
    assert torch.allclose(seen[-1], expected)
    assert not torch.allclose(seen[-1], allocators.normalize(raw))
