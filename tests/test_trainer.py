"""DynamicAllocationCallback drives the allocator inside a Hugging Face Trainer."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from dynalora import DynamicAllocator, DynamicConfig
from dynalora.integrations import DynamicAllocationCallback
from dynalora.integrations.trainer import STATE_FILE
from tests import tiny


def dataset(n=48):
    gen = torch.Generator().manual_seed(0)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(0, tiny.VOCAB, (n, 8), generator=gen).tolist(),
            "labels": torch.randint(0, 2, (n,), generator=gen).tolist(),
        }
    )


def args(tmp_path, max_steps, **kw):
    defaults = {
        "per_device_train_batch_size": 4,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    return TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, **(defaults | kw))


def trainer(tmp_path, max_steps, optimizer="global", **kw):
    model = tiny.peft_bert()
    alloc = DynamicAllocator(model, DynamicConfig(k=2, period=3, allocator="random", optimizer=optimizer))
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    sched = alloc.create_scheduler(opt, "linear", num_warmup_steps=0, num_training_steps=max_steps)
    t = Trainer(
        model=model,
        args=args(tmp_path, max_steps, **kw),
        train_dataset=dataset(),
        optimizers=(opt, sched),
        callbacks=[DynamicAllocationCallback(alloc)],
    )
    return t, alloc


@pytest.mark.parametrize("optimizer", ["global", "local"])
def test_trainer_reallocates_on_schedule(tmp_path, optimizer):
    t, alloc = trainer(tmp_path, 7, optimizer)
    before = {m.name: [p.detach().clone() for p in m.params] for m in alloc.modules}
    t.train()
    assert alloc.step_count == 7
    assert [h["step"] for h in alloc.history] == [0, 3, 6]
    assert len({tuple(h["active"]) for h in alloc.history}) > 1
    assert sum(alloc.active_steps.values()) == 2 * 7
    for m in alloc.modules:  # trained exactly the modules that were ever active
        changed = any(not torch.equal(a, p) for a, p in zip(before[m.name], m.params, strict=True))
        assert changed == (alloc.active_steps[m.name] > 0)


def test_trainer_built_optimizer_that_misses_frozen_modules_is_refused(tmp_path):
    model = tiny.peft_bert()
    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=1))
    t = Trainer(
        model=model,
        args=args(tmp_path, 2),
        train_dataset=dataset(),
        callbacks=[DynamicAllocationCallback(alloc)],
    )
    with pytest.raises(ValueError, match="create_optimizer"):
        t.train()


@pytest.mark.parametrize("optimizer", ["global", "local"])
def test_trainer_resume_restores_allocator_state(tmp_path, optimizer):
    """Resumed at step 4, across the reallocation at step 6: the same selections and final weights."""
    full, alloc_full = trainer(tmp_path / "full", 8, optimizer)
    full.train()

    first, _ = trainer(tmp_path / "part", 8, optimizer, save_strategy="steps", save_steps=4)
    first.train()
    saved = torch.load(tmp_path / "part" / "checkpoint-4" / STATE_FILE, weights_only=True)  # nothing unpickled
    assert saved["step"] == 4

    resumed, alloc = trainer(tmp_path / "part", 8, optimizer, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    assert alloc.step_count == 8
    assert [h["active"] for h in alloc.history] == [h["active"] for h in alloc_full.history]
    assert alloc.active_steps == alloc_full.active_steps
    ours, theirs = tiny.weights(resumed.model), tiny.weights(full.model)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_adalora_callback_reallocates_once_per_optimizer_step(tmp_path, monkeypatch):
    from peft import AdaLoraConfig, get_peft_model
    from peft.tuners.adalora import AdaLoraModel

    from dynalora.integrations import AdaLoraCallback

    calls, real = [], AdaLoraModel.update_and_allocate

    def spy(self, step):
        assert any(p.grad is not None for n, p in self.named_parameters() if "lora_E" in n)  # before zero_grad
        calls.append(step)
        return real(self, step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    config = AdaLoraConfig(init_r=6, target_r=4, total_step=6, tinit=1, tfinal=2, deltaT=1,
                           target_modules=["query", "value"], task_type="SEQ_CLS")  # fmt: skip
    model = get_peft_model(tiny.bert(), config)
    t = Trainer(model=model, args=args(tmp_path, 6, gradient_accumulation_steps=2, learning_rate=1e-2),
                train_dataset=dataset(), callbacks=[AdaLoraCallback()])  # fmt: skip
    t.train()
    assert calls == list(range(6))  # optimizer steps, not the 12 micro-batches
    kept = sum(int((p != 0).sum()) for n, p in model.named_parameters() if n.endswith("lora_E.default"))
    assert kept == 4 * 4  # pruned from 6 to the budget: target_r x modules


def test_method_step_callback_runs_a_hook_once_per_optimizer_step_before_zero_grad(tmp_path):
    from dynalora.integrations import MethodStepCallback

    seen = []

    def hook(model, step, optimizer):
        grads = any(p.grad is not None for p in model.parameters() if p.requires_grad)
        seen.append((step, model is t.model, optimizer is not None, grads))

    t = Trainer(model=tiny.peft_bert(), args=args(tmp_path, 3, gradient_accumulation_steps=2),
                train_dataset=dataset(), callbacks=[MethodStepCallback(hook)])  # fmt: skip
    t.train()
    assert seen == [(step, True, True, True) for step in range(3)]


# ------------------------------------------------------------------------------ dynalora.attach
def _attached(tmp_path, max_steps, config=None, **kw):
    import dynalora

    model = tiny.peft_bert()
    t = Trainer(model=model, args=args(tmp_path, max_steps, **kw), train_dataset=dataset())
    return t, dynalora.attach(t, config)


def test_attach_trains_the_default_config_with_the_trainers_own_rate_and_schedule(tmp_path):
    """The untouched DynamicConfig() (cutoff, local) under Trainer: every module in the optimizer,
    each module's rate follows TrainingArguments (cosine, 2 warm-up steps, lr 3e-3) on its own steps."""
    t, alloc = _attached(tmp_path, 12, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2,
                         weight_decay=0.05, adam_beta2=0.99)  # fmt: skip
    before = {m.name: [p.detach().clone() for p in m.params] for m in alloc.modules}
    t.train()
    assert alloc.step_count == 12 and alloc.config == DynamicConfig()
    assert getattr(t.optimizer, "optimizer", t.optimizer) is alloc._optimizer  # accelerate may wrap it
    inner = alloc._optimizer.optimizers[0]
    assert inner.defaults["weight_decay"] == 0.05 and inner.defaults["betas"] == (0.9, 0.99)
    for i, m in enumerate(alloc.modules):
        trained = alloc.active_steps[m.name]
        changed = any(not torch.equal(a, p) for a, p in zip(before[m.name], m.params, strict=True))
        assert changed == (trained > 0)
        # cosine with 2 warm-up steps over 12, evaluated after the module's own `trained` steps
        import math

        expected = 3e-3 * (trained / 2 if trained < 2 else 0.5 * (1 + math.cos(math.pi * (trained - 2) / 10)))
        assert alloc._optimizer.optimizers[i].param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
    assert any(alloc.active_steps[n] < 12 for n in alloc.module_names)  # something was left out: a saving


def test_attach_refuses_what_it_cannot_build(tmp_path):
    import dynalora

    model = tiny.peft_bert()
    t = Trainer(model=model, args=args(tmp_path, 2, optim="adafactor"), train_dataset=dataset())
    with pytest.raises(ValueError, match="optim='adafactor' is not supported by dynalora.attach; allowed: adamw_torch"):
        dynalora.attach(t)
    opt = torch.optim.AdamW(model.parameters())
    t = Trainer(model=model, args=args(tmp_path, 2), train_dataset=dataset(), optimizers=(opt, None))
    with pytest.raises(ValueError, match="builds the optimizer and its LR schedule itself"):
        dynalora.attach(t)


def _refusal(tmp_path, trainer_kw=None, attach_kw=None, **targs):
    import dynalora

    model = tiny.peft_bert()
    t = Trainer(model=model, args=args(tmp_path, 2, **targs), train_dataset=dataset(), **(trainer_kw or {}))
    with pytest.raises(ValueError) as info:
        dynalora.attach(t, **(attach_kw or {}))
    return str(info.value)


def test_attach_refuses_what_it_would_not_read(tmp_path):
    """Each of these was accepted and had no effect on the weights before (checked by hand)."""
    other = tiny.peft_bert()
    lam = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)]), lambda step: 0.0)
    cases = [
        ({"trainer_kw": {"optimizers": (None, lam)}}, "builds the optimizer and its LR schedule itself"),
        ({"trainer_kw": {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 10.0})}},
         "would not read optimizer_cls_and_kwargs"),
        ({"attach_kw": {"resume_from": str(tmp_path), "save_state": False}}, "resume_from is read only with"),
        ({"attach_kw": {"config": DynamicAllocator(other, DynamicConfig())}}, "built over another model"),
        ({"optim": "adamw_torch", "optim_args": "amsgrad=True"}, "optim_args='amsgrad=True' is not read by"),
        ({"optim": "sgd", "adam_beta1": 0.5}, "adam_beta1=0.5 is read by Adam only, not optim='sgd'"),
        ({"optim": "sgd", "optim_args": "weight_decay=0.1"}, "optim_args sets weight_decay, and so does"),
    ]  # fmt: skip
    for kw, says in cases:
        assert says in _refusal(tmp_path, **kw)


def test_attach_refuses_modules_beside_a_built_allocator(tmp_path):
    import dynalora

    model = tiny.peft_bert()
    alloc = DynamicAllocator(model, DynamicConfig())
    t = Trainer(model=model, args=args(tmp_path, 2), train_dataset=dataset())
    with pytest.raises(ValueError, match="modules= is read when attach"):
        dynalora.attach(t, alloc, modules=alloc.modules[:1])


def test_hand_built_optimizer_is_refused_where_the_config_needs_the_allocators(tmp_path):
    """optimizer='local' and a state policy act through create_optimizer's optimizer: with any other
    they would silently not apply."""
    for config in (DynamicConfig(), DynamicConfig(optimizer="global", state_policy="reset")):
        model = tiny.peft_bert()
        alloc = DynamicAllocator(model, config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # every parameter: nothing is left out
        t = Trainer(model=model, args=args(tmp_path, 2), train_dataset=dataset(), optimizers=(opt, None),
                    callbacks=[DynamicAllocationCallback(alloc)])  # fmt: skip
        with pytest.raises(ValueError, match="works through the optimizer that allocator.create_optimizer"):
            t.train()


def test_local_schedules_refuse_what_they_cannot_follow():
    model = tiny.peft_bert()
    alloc = DynamicAllocator(model, DynamicConfig(local_schedule="run"))
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    with pytest.raises(ValueError, match="local_schedule='run' spans each module's schedule over the run"):
        alloc.create_scheduler(opt, "constant")
    assert alloc.create_scheduler(opt, "constant", num_training_steps=4) is not None
    with pytest.raises(ValueError, match="reduce_lr_on_plateau is not supported with optimizer='local'"):
        alloc.create_scheduler(opt, "reduce_lr_on_plateau")


def test_attach_resumes_bitwise(tmp_path):
    config = DynamicConfig(period=3)
    full, alloc_full = _attached(tmp_path / "full", 8, config)
    full.train()
    first, _ = _attached(tmp_path / "part", 8, config, save_strategy="steps", save_steps=4)
    first.train()
    resumed, alloc = _attached(tmp_path / "part", 8, config, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    assert [h["active"] for h in alloc.history] == [h["active"] for h in alloc_full.history]
    ours, theirs = tiny.weights(resumed.model), tiny.weights(full.model)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
