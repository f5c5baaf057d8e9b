"""Schedules, global/local optimisation, determinism, parity with plain PEFT, exact resume."""

import pytest
import torch

from dynalora import DynamicAllocator, DynamicConfig
from dynalora.optim import LocalOptimizer, LocalScheduler
from tests import tiny


def make(config, method="lora", seed=0):
    model = tiny.peft_bert(method, seed=seed)
    alloc = DynamicAllocator(model, config)
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
    sched = alloc.create_scheduler(opt, "linear", num_warmup_steps=2, num_training_steps=20)
    return model, alloc, opt, sched


def test_periodic_reallocates_every_period_steps():
    model, alloc, opt, sched = make(DynamicConfig(k=2, period=3, allocator="random", optimizer="global"))
    tiny.train(model, alloc, opt, sched, tiny.batches(10))
    assert [h["step"] for h in alloc.history] == [0, 3, 6, 9]
    assert alloc.history[0]["scores"] == {}
    assert set(alloc.history[1]["scores"]) == set(alloc.module_names)
    assert all(len(h["active"]) == 2 for h in alloc.history)
    assert len({tuple(h["active"]) for h in alloc.history}) > 1  # the selection did change
    assert sum(alloc.active_steps.values()) == 2 * 10


def test_once_makes_initial_selection_and_one_reallocation_at_alpha():
    model, alloc, opt, sched = make(
        DynamicConfig(k=2, period=4, schedule="once", allocator="random", optimizer="global")
    )
    tiny.train(model, alloc, opt, sched, tiny.batches(12))
    assert [h["step"] for h in alloc.history] == [0, 4]


def test_initial_selection_is_seeded_random_and_respects_budget():
    firsts = set()
    for seed in range(8):
        alloc = DynamicAllocator(tiny.peft_bert(), DynamicConfig(k=2, allocator="topk", seed=seed, optimizer="global"))
        assert len(alloc.active) == 2
        firsts.add(alloc.active)
        again = DynamicAllocator(tiny.peft_bert(), DynamicConfig(k=2, allocator="topk", seed=seed, optimizer="global"))
        assert again.active == alloc.active
    assert len(firsts) > 1
    thr = DynamicAllocator(tiny.peft_bert(), DynamicConfig(allocator="threshold", threshold=0.6))
    assert len(thr.active) == 3  # ceil(0.6 * 4)


def test_topk_on_forward_scores_selects_the_largest():
    model, alloc, opt, sched = make(
        DynamicConfig(k=2, period=2, allocator="topk", measure="forward", optimizer="global")
    )
    tiny.train(model, alloc, opt, sched, tiny.batches(2))
    scores = alloc.history[-1]["scores"]
    assert set(alloc.history[-1]["active"]) == set(sorted(scores, key=scores.get)[-2:])


def test_global_optimizer_trains_modules_frozen_when_it_was_built():
    model, alloc, opt, sched = make(DynamicConfig(k=1, period=2, allocator="random", seed=1, optimizer="global"))
    initially_frozen = {m.name for m in alloc.modules} - alloc.active
    before = {m.name: [p.detach().clone() for p in m.params] for m in alloc.modules}
    tiny.train(model, alloc, opt, sched, tiny.batches(16))
    trained = {n for n, c in alloc.active_steps.items() if c > 0}
    assert trained & initially_frozen
    for m in alloc.modules:
        changed = any(not torch.equal(a, p) for a, p in zip(before[m.name], m.params, strict=True))
        assert changed == (m.name in trained), m.name


@pytest.mark.parametrize("order", ["after_zero_grad", "before_zero_grad"])
def test_local_schedules_advance_only_when_their_module_trains(order):
    config = DynamicConfig(k=2, period=3, optimizer="local", allocator="random", local_schedule="steps")
    model, alloc, opt, sched = make(config)
    assert isinstance(opt, LocalOptimizer) and isinstance(sched, LocalScheduler)
    tiny.train(model, alloc, opt, sched, tiny.batches(9), step_before_zero_grad=order == "before_zero_grad")
    for i, (name, module_sched, module_opt) in enumerate(
        zip(alloc.module_names, sched.schedulers, opt.optimizers, strict=True)
    ):
        trained = alloc.active_steps[name]
        assert int(sched.trained[i]) == trained
        assert module_sched.last_epoch == trained  # local_schedule="steps": one per trained step
        assert float(sched.position[i]) == trained
        state_steps = [s["step"] for s in module_opt.state.values()]
        assert all(float(s) == trained for s in state_steps) if trained else not state_steps
    assert sched.extra.last_epoch == 9  # the classifier head trains every step
    assert len(sched.get_last_lr()) == len(alloc.modules) + 1
    assert len(opt.param_groups) == len(alloc.modules) + 1


def test_local_optimizer_state_dict_round_trip():
    model, alloc, opt, sched = make(DynamicConfig(k=2, period=2, optimizer="local", allocator="random"))
    tiny.train(model, alloc, opt, sched, tiny.batches(4))
    sd = opt.state_dict()
    model2, alloc2, opt2, sched2 = make(DynamicConfig(k=2, period=2, optimizer="local", allocator="random"))
    opt2.load_state_dict(sd)
    sched2.load_state_dict(sched.state_dict())
    assert torch.equal(opt2.last_stepped, opt.last_stepped)
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("optimizer", ["global", "local"])
@pytest.mark.parametrize("measure", ["forward", "gradient", "random"])
def test_same_seed_gives_same_selections_and_bitwise_weights(optimizer, measure):
    runs = []
    for _ in range(2):
        cfg = DynamicConfig(
            k=2, period=2, measure=measure, optimizer=optimizer, seed=11, allocator="discounted_stochastic"
        )
        model, alloc, opt, sched = make(cfg)
        tiny.train(model, alloc, opt, sched, tiny.batches(8))
        runs.append((alloc.history, tiny.weights(model)))
    (h1, w1), (h2, w2) = runs
    assert [h["active"] for h in h1] == [h["active"] for h in h2]
    assert all(torch.equal(w1[n], w2[n]) for n in w1)


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_all_modules_global_is_bitwise_plain_peft(method):
    data = tiny.batches(6)
    plain = tiny.peft_bert(method)
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    for batch in data:
        plain(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

    dyn = tiny.peft_bert(method)
    alloc = DynamicAllocator(
        dyn, DynamicConfig(k=1.0, period=2, measure="forward", allocator="discounted_stochastic", optimizer="global")
    )
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
    tiny.train(dyn, alloc, opt, None, data)

    a, b = tiny.weights(plain), tiny.weights(dyn)
    assert all(torch.equal(a[n], b[n]) for n in a)
    start = tiny.weights(tiny.peft_bert(method))
    assert any(not torch.equal(a[n], start[n]) for n in a if "lora_B" in n or "vera_lambda" in n)


@pytest.mark.parametrize("optimizer", ["global", "local"])
@pytest.mark.parametrize("measure", ["forward", "gradient", "random"])
@pytest.mark.parametrize("allocator", ["discounted_stochastic", "topk"])
def test_resume_from_state_dicts_continues_exactly(optimizer, measure, allocator, tmp_path):
    cfg = DynamicConfig(k=2, period=3, measure=measure, optimizer=optimizer, allocator=allocator, seed=2)
    data = tiny.batches(12)

    model, alloc, opt, sched = make(cfg)
    tiny.train(model, alloc, opt, sched, data)
    expected_history, expected_weights = alloc.history, tiny.weights(model)

    model, alloc, opt, sched = make(cfg)
    tiny.train(model, alloc, opt, sched, data[:7])  # stop mid-period
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "alloc": alloc.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
        },
        path,
    )
    del model, alloc, opt, sched

    ckpt = torch.load(path, weights_only=True)
    model, alloc, opt, sched = make(cfg, seed=99)  # different init: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    alloc.load_state_dict(ckpt["alloc"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    tiny.train(model, alloc, opt, sched, data[7:])

    assert alloc.step_count == 12
    assert [h["active"] for h in alloc.history] == [h["active"] for h in expected_history]
    for got_h, want_h in zip(alloc.history, expected_history, strict=True):
        assert got_h["scores"] == pytest.approx(want_h["scores"])
    got = tiny.weights(model)
    assert all(torch.equal(got[n], expected_weights[n]) for n in got)


def test_load_state_dict_rejects_other_modules():
    alloc = DynamicAllocator(
        tiny.peft_bert(), DynamicConfig(k=1, allocator="discounted_stochastic", optimizer="global")
    )
    other = DynamicAllocator(
        tiny.peft_bert(layers=3), DynamicConfig(k=1, allocator="discounted_stochastic", optimizer="global")
    )
    with pytest.raises(ValueError, match="saved for other modules"):
        alloc.load_state_dict(other.state_dict())


def test_state_saved_under_another_config_is_refused_and_a_new_length_kept():
    # a mismatch only logged a warning, and the run continued its selections under other rules
    # (or failed on the saved measure's keys)
    config = DynamicConfig(allocator="topk", k=2, period=1, optimizer="global", measure="forward")
    saved = DynamicAllocator(tiny.peft_bert("lora"), config)
    saved.set_total_steps(10)
    state = saved.state_dict()
    other = DynamicAllocator(tiny.peft_bert("lora"), DynamicConfig(allocator="topk", k=3, period=1, optimizer="global"))
    with pytest.raises(ValueError, match="saved with measure=.forward., and this allocator has measure=.gradient."):
        other.load_state_dict(state)
    older = {**state, "config": {k: v for k, v in state["config"].items() if k != "coverage"}}  # a field added later
    longer = DynamicAllocator(tiny.peft_bert("lora"), config)
    longer.set_total_steps(20)  # the resumed run is longer: its own length, not the saved one, paces it
    longer.load_state_dict(older)
    assert longer.state_dict()["total_steps"] == 20
    fresh = DynamicAllocator(tiny.peft_bert("lora"), config)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["total_steps"] == 10


def test_a_run_no_longer_than_the_period_is_said_once(caplog):
    import logging

    alloc = DynamicAllocator(
        tiny.peft_bert("lora"), DynamicConfig(allocator="topk", k=2, period=10, optimizer="global")
    )
    with caplog.at_level(logging.WARNING, logger="dynalora.controller"):
        alloc.set_total_steps(11)
        alloc.set_total_steps(10)
        alloc.set_total_steps(10)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["the run's 10 optimizer steps end before its first reallocation (period 10): no module is chosen "
                    "by importance in it"]  # fmt: skip
