"""dynalora.attach refuses what would silently train wrong or not at all inside a Trainer."""

import types

import pytest
import torch
from transformers import Trainer, TrainingArguments

import dynalora
from dynalora import DynamicAllocator, DynamicConfig
from dynalora.integrations import DynamicAllocationCallback
from dynalora.integrations.trainer import STATE_FILE, state_file
from tests import tiny
from tests.test_trainer import args, dataset


def built(tmp_path, max_steps=2, **kw):
    return Trainer(model=tiny.peft_bert(), args=args(tmp_path, max_steps, **kw), train_dataset=dataset())


def refused(trainer, config=None):
    with pytest.raises(ValueError) as info:
        dynalora.attach(trainer, config)
    return str(info.value)


# ------------------------------------------------------------------------------ 1. fp16 with local
def test_fp16_is_refused_with_the_local_optimizer_and_allowed_with_global(tmp_path):
    t = built(tmp_path)
    t.args.fp16 = True  # set after construction: the accelerator (CPU) is built without a scaler
    says = refused(t)
    assert "fp16 scales the loss" in says and "optimizer='local' does not build" in says
    assert "allowed: bf16, or DynamicConfig(optimizer='global')" in says
    assert not any(isinstance(c, DynamicAllocationCallback) for c in t.callback_handler.callbacks)

    alloc = dynalora.attach(t, DynamicConfig(optimizer="global"))  # accelerate wraps a torch optimizer
    assert isinstance(t.create_optimizer(), torch.optim.Optimizer) and t.optimizer is alloc._optimizer

    t = built(tmp_path)
    t.args.bf16 = True  # no loss scaler: local stays allowed
    alloc = dynalora.attach(t)
    assert alloc.config.optimizer == "local" and type(t.create_optimizer()).__name__ == "LocalOptimizer"


def test_a_grad_scaler_is_refused_with_the_local_optimizer_whatever_the_flags_say(tmp_path):
    t = built(tmp_path)
    assert not t.args.fp16 and t.args.mixed_precision == "no" and t.accelerator.scaler is None
    t.accelerator.scaler = torch.amp.GradScaler("cpu")  # as accelerate builds for fp16 on CUDA
    assert "fp16 scales the loss" in refused(t)
    assert dynalora.attach(t, DynamicConfig(optimizer="global")).config.optimizer == "global"


# ------------------------------------------------------------------------------ 2. model_init
def test_model_init_is_refused(tmp_path):
    t = Trainer(model_init=lambda: tiny.peft_bert(), args=args(tmp_path, 2), train_dataset=dataset())
    says = refused(t)
    assert "a Trainer built with model_init= replaces it in train()" in says
    assert "allowed: Trainer(model=...) without model_init" in says


# ------------------------------------------------------------------------------ 3. FSDP / DeepSpeed
@pytest.mark.parametrize(("flag", "what"), [("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")])
def test_fsdp_and_deepspeed_from_training_arguments_are_refused(tmp_path, flag, what):
    t = built(tmp_path)
    assert getattr(t, flag) is False
    setattr(t, flag, True)  # as Trainer sets it from accelerate's plugin
    says = refused(t)
    assert says.startswith(f"{what} from TrainingArguments/accelerate wraps the model after attach()")
    assert "dynalora's own FSDP2 path: dynalora train --fsdp" in says


# ------------------------------------------------------------------------------ 4. a second train()
def test_a_second_train_without_resume_is_refused(tmp_path):
    t = built(tmp_path, 4, save_strategy="steps", save_steps=2)
    alloc = dynalora.attach(t, DynamicConfig(period=1))
    t.train()
    assert alloc.step_count == 4
    history = [dict(h) for h in alloc.history]
    before = tiny.weights(t.model)
    with pytest.raises(ValueError) as info:
        t.train()
    says = str(info.value)
    assert "train() starts at step 0 with an allocator that has taken 4 steps" in says
    assert "a new Trainer and attach()) for each train(), or train(resume_from_checkpoint=...)" in says
    assert alloc.step_count == 4  # refused before any step
    after = tiny.weights(t.model)
    assert all(torch.equal(tensor, after[name]) for name, tensor in before.items())

    # resuming (global_step > 0) is still allowed: the allocator goes back to step 2 and trains to 4 again
    t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert alloc.step_count == 4 and t.state.global_step == 4
    assert alloc.history == history


# ------------------------------------------------------------------------------ 5. greedy with local
def test_greedy_schedule_is_refused_with_the_local_optimizer(tmp_path):
    model = tiny.peft_bert()
    local = DynamicAllocator(model, DynamicConfig())
    opt = local.create_optimizer(torch.optim.AdamW, lr=1e-2)
    with pytest.raises(
        ValueError, match="greedy is not supported with optimizer='local' .*allowed: optimizer='global'"
    ):
        local.create_scheduler(opt, "greedy")
    local.close()

    glob = DynamicAllocator(tiny.peft_bert(), DynamicConfig(optimizer="global"))
    opt = glob.create_optimizer(torch.optim.AdamW, lr=1e-2)
    assert type(glob.create_scheduler(opt, "greedy")).__name__ == "GreedyLR"  # Trainer steps it on metrics

    # through attach: refused when Trainer builds the schedule (greedy needs an evaluation to step on)
    targs = args(tmp_path, 2, lr_scheduler_type="greedy", eval_strategy="steps")
    t = Trainer(model=tiny.peft_bert(), args=targs, train_dataset=dataset(), eval_dataset=dataset(8))
    dynalora.attach(t)
    t.create_optimizer()
    with pytest.raises(ValueError, match="greedy is not supported with optimizer='local'"):
        t.create_scheduler(num_training_steps=2)


# ------------------------------------------------------------------------------ 6. optim_args
UNREAD = [
    ("sgd", "momentum=0.9,eps=1e-6", "'eps' is not read by optim='sgd'", "momentum, dampening, nesterov"),
    ("adagrad", "momentum=0.9", "'momentum' is not read by optim='adagrad'", "lr_decay, eps"),
    (
        "rmsprop",
        "alpha=0.9, lr_decay=0.1",
        "'lr_decay' is not read by optim='rmsprop'",
        "momentum, alpha, eps, centered",
    ),
]


@pytest.mark.parametrize(("optim", "optim_args", "unread", "allowed"), UNREAD)
def test_optim_args_the_optimizer_does_not_read_are_refused(tmp_path, optim, optim_args, unread, allowed):
    says = refused(built(tmp_path, optim=optim, optim_args=optim_args))
    assert says == f"optim_args key {unread} (transformers drops it); allowed: {allowed}"


def test_optim_args_the_optimizer_reads_reach_it(tmp_path):
    t = built(tmp_path, optim="sgd", optim_args="momentum=0.9,dampening=0.1,nesterov=False")
    alloc = dynalora.attach(t, DynamicConfig(optimizer="global"))
    t.create_optimizer()
    defaults = alloc._optimizer.defaults
    assert (defaults["momentum"], defaults["dampening"], defaults["nesterov"]) == (0.9, 0.1, False)
    t = built(tmp_path, optim="rmsprop", optim_args="alpha=0.9,eps=1e-6,centered=True")
    alloc = dynalora.attach(t)
    t.create_optimizer()
    inner = alloc._optimizer.optimizers[0].defaults
    assert (inner["alpha"], inner["eps"], inner["centered"]) == (0.9, 1e-6, True)
    # weight_decay is read, and still refused beside args.weight_decay (its own message)
    assert "optim_args sets weight_decay" in refused(built(tmp_path, optim="adagrad", optim_args="weight_decay=0.1"))


# ------------------------------------------------------------------------------ 7. the number of processes
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-step attached run with its checkpoint at step 2: (checkpoint folder, its allocator's history)."""
    out = tmp_path_factory.mktemp("saved")
    t = built(out, save_strategy="steps", save_steps=2)
    alloc = dynalora.attach(t, DynamicConfig(period=1))
    t.train()
    return out / "checkpoint-2", alloc.history


def _restore(folder, process_index=0, world_size=1):
    """A fresh allocator's callback restoring from ``folder`` at step 2 as process ``process_index``."""
    alloc = DynamicAllocator(tiny.peft_bert(), DynamicConfig(period=1))
    callback = DynamicAllocationCallback(alloc, resume_from=str(folder))
    run = types.SimpleNamespace(process_index=process_index, world_size=world_size, resume_from_checkpoint=None,
                                output_dir=str(folder.parent))  # fmt: skip
    callback._restore(run, types.SimpleNamespace(global_step=2))
    return alloc


def test_the_state_file_records_the_number_of_processes_and_a_mismatch_is_refused(saved, tmp_path):
    folder, history = saved
    state = torch.load(folder / STATE_FILE, weights_only=True)
    assert state["world_size"] == 1 and state["step"] == 2

    seen = []
    real = DynamicAllocator.load_state_dict

    def spy(self, s):
        seen.append(set(s))
        return real(self, s)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DynamicAllocator, "load_state_dict", spy)
        alloc = _restore(folder)
    assert alloc.step_count == 2 and alloc.history == history
    assert seen and "world_size" not in seen[0]  # the allocator gets its own keys only

    with pytest.raises(ValueError) as info:
        _restore(folder, world_size=2)
    assert str(info.value) == (f"{folder / STATE_FILE} was saved by a run of 1 processes and this one has 2; "
                               "allowed: resume with 1 processes (each keeps its own allocator state)")  # fmt: skip


def test_a_rank_whose_file_is_missing_is_told_the_run_had_fewer_processes(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(ValueError) as info:
        _restore(folder, process_index=1, world_size=2)
    says = str(info.value)
    assert f"{folder / state_file(1)} is missing and rank 0's state is there" in says
    assert "the run was saved with fewer processes than this one (2); allowed: resume with the number" in says
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="is missing; pass DynamicAllocationCallback"):
        _restore(empty, process_index=1, world_size=2)  # nothing saved at all: the old message


def test_a_state_file_from_before_world_size_was_written_still_loads(saved, tmp_path):
    folder, history = saved
    old = tmp_path / "checkpoint-2"
    old.mkdir()
    state = torch.load(folder / STATE_FILE, weights_only=True)
    del state["world_size"]
    torch.save(state, old / STATE_FILE)
    alloc = _restore(old, world_size=4)  # nothing to compare with: loads
    assert alloc.step_count == 2 and alloc.history == history


# ------------------------------------------------------------------------------ 8. DDP without find_unused
def test_ddp_without_find_unused_parameters_is_refused(tmp_path, monkeypatch):
    off = built(tmp_path, ddp_find_unused_parameters=False)
    on = built(tmp_path)
    assert on.accelerator.ddp_handler.find_unused_parameters is True  # Trainer's own resolution (PeftModel)
    dynalora.attach(built(tmp_path, ddp_find_unused_parameters=False))  # one process: no reducer, allowed
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    says = refused(off)
    assert says.startswith("under DDP (2 processes) the modules outside the selection get no gradient")
    assert says.endswith("allowed: TrainingArguments(ddp_find_unused_parameters=True)")
    assert dynalora.attach(on) is not None


# ------------------------------------------------------------------------------ checkpointing
def test_checkpointing_that_would_blind_a_setting_is_refused_before_training(tmp_path):
    t = built(tmp_path, gradient_checkpointing=True)  # as TRL's SFTConfig by default
    cap = DynamicConfig(allocator="topk", k=2, memory_cap=0.5, cap_mode="recompute")
    assert "gradient_checkpointing=True (TRL's SFTConfig default) checkpoints every block" in refused(t, cap)
    t = built(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    forward = DynamicConfig(allocator="topk", k=2, measure="forward")
    assert "reentrant checkpointing runs without gradients" in refused(t, forward)
    dynalora.attach(built(tmp_path, gradient_checkpointing=True), forward)  # non-reentrant: allowed
    dynalora.attach(t, DynamicConfig())  # the default measure (gradient) reads .grad: allowed
