"""Dynamic allocation inside a Hugging Face ``Trainer`` or TRL ``SFTTrainer``.

One call, after the trainer is built (so TRL's ``peft_config=`` route works: the trainer wraps the
model first)::

    trainer = SFTTrainer(model=model_id, args=SFTConfig(...), train_dataset=data, peft_config=LoraConfig(...))
    alloc = dynalora.attach(trainer)  # DynamicConfig() unless given
    trainer.train()

:func:`attach` builds the allocator's optimizer and LR schedule from the trainer's own
``TrainingArguments`` (learning rate, ``optim``, Adam betas and epsilon, weight decay, scheduler
type and its kwargs, warm-up) when training starts, and drives the allocator with
:class:`DynamicAllocationCallback`; ``max_grad_norm``, gradient accumulation, mixed precision,
checkpointing and resume stay Trainer's.

By hand, build the optimizer with the allocator (``Trainer`` would build one from whatever has
``requires_grad`` when training starts and leave every frozen module out for good)::

    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=16))
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=2e-3)
    sched = alloc.create_scheduler(opt, "linear", num_warmup_steps=60, num_training_steps=1000)
    trainer = Trainer(model, args, ..., optimizers=(opt, sched),
                      callbacks=[DynamicAllocationCallback(alloc)])
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dynalora.config import DynamicConfig
from dynalora.controller import DynamicAllocator

logger = logging.getLogger(__name__)

STATE_FILE = "dynalora_allocator.pt"


def state_file(rank: int) -> str:
    """Each process keeps its own file: importance is measured on its part of the batch."""
    return STATE_FILE if rank == 0 else f"dynalora_allocator-{rank}.pt"


SUPPORTED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop)
"""The optimizer classes :func:`attach` can build (one per module under ``local``): torch's own,
whose state is per parameter."""
SUPPORTED_OPTIM = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")
"""Their ``TrainingArguments.optim`` names (``dynalora train --optim``)."""


def attach(
    trainer: Any,
    config: DynamicConfig | DynamicAllocator | None = None,
    *,
    modules: Any = None,
    resume_from: str | None = None,
    save_state: bool = True,
) -> DynamicAllocator:
    """Train only the most important adapter modules inside ``trainer`` (a ``Trainer`` or a subclass).

    Builds a :class:`DynamicAllocator` over ``trainer.model`` (which must hold the adapters: a
    ``PeftModel``, or the model TRL built from ``peft_config=``), makes the trainer build its
    optimizer with :meth:`DynamicAllocator.create_optimizer` and its schedule with
    :meth:`DynamicAllocator.create_scheduler` from ``trainer.args``, and adds the callback that
    steps the allocator and saves its state in every checkpoint.

    Weight decay applies to every trained tensor (Trainer exempts biases and norms; adapters have
    neither). ``modules``: the allocation units, where the method defines its own (see
    :class:`DynamicAllocator`); ``resume_from``: see :class:`DynamicAllocationCallback`;
    ``save_state=False``: the caller saves and restores the allocator's state itself (``dynalora
    train`` does, in its own checkpoints). ``config`` may be an allocator already built over
    ``trainer.model`` (so that a bad setting is refused before the trainer exists).

    Raises:
        ValueError: the trainer already has an optimizer or a schedule (``optimizers=`` was given) or
            ``optimizer_cls_and_kwargs``; ``args.optim`` names an optimizer outside
            :data:`SUPPORTED_OPTIMIZERS`; or anything else that would not be read (Adam's settings
            with another optimizer, ``optim_args`` with Adam, an allocator over another model,
            ``modules`` beside a built allocator, ``resume_from`` without ``save_state``).
    """
    if any(getattr(trainer, name, None) is not None for name in ("optimizer", "lr_scheduler")):
        raise ValueError(
            "attach() builds the optimizer and its LR schedule itself; allowed: a Trainer built without "
            "optimizers=(...), or DynamicAllocationCallback with allocator.create_optimizer(...) by hand"
        )
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise ValueError(
            "attach() builds the optimizer from args.optim, and would not read optimizer_cls_and_kwargs; "
            f"allowed: a Trainer without it, and args.optim one of {', '.join(SUPPORTED_OPTIM)}"
        )
    if resume_from is not None and not save_state:
        raise ValueError("resume_from is read only with save_state=True (the caller restores the state otherwise)")
    args = trainer.args
    model = trainer.model
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
    name = getattr(args.optim, "value", args.optim)
    if optimizer_cls not in SUPPORTED_OPTIMIZERS:
        raise ValueError(f"optim={name!r} is not supported by dynalora.attach; allowed: {', '.join(SUPPORTED_OPTIM)}")
    _check_optimizer_args(args, name, optimizer_cls, kwargs)
    if isinstance(config, DynamicAllocator):
        if modules is not None:
            raise ValueError("modules= is read when attach() builds the allocator; pass it to DynamicAllocator(...)")
        allocator = config
        ours = {id(p) for p in model.parameters()}
        if any(id(p) not in ours for m in allocator.modules for p in m.params):
            raise ValueError("the allocator was built over another model than trainer.model; allowed: "
                             "DynamicAllocator(trainer.model, ...), or a DynamicConfig")  # fmt: skip
    else:
        allocator = DynamicAllocator(model, config or DynamicConfig(), modules=modules)

    def create_optimizer(self: Any, model: Any = None) -> Any:
        if self.optimizer is None:
            self.optimizer = allocator.create_optimizer(optimizer_cls, weight_decay=args.weight_decay, **kwargs)
        return self.optimizer

    def create_scheduler(self: Any, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = allocator.create_scheduler(
                optimizer if optimizer is not None else self.optimizer,
                args.lr_scheduler_type,
                num_warmup_steps=args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    trainer.create_optimizer = types.MethodType(create_optimizer, trainer)
    trainer.create_scheduler = types.MethodType(create_scheduler, trainer)
    trainer.add_callback(DynamicAllocationCallback(allocator, resume_from=resume_from, save_state=save_state))
    return allocator


def _check_optimizer_args(args: TrainingArguments, name: str, optimizer_cls: type, kwargs: dict[str, Any]) -> None:
    """What transformers would ignore for this optimizer is refused: Adam's settings elsewhere, and
    ``optim_args`` where the optimizer reads none; weight decay is ``args.weight_decay`` alone."""
    adam = optimizer_cls in (torch.optim.AdamW, torch.optim.Adam)
    if adam and args.optim_args:
        raise ValueError(f"optim_args={args.optim_args!r} is not read by optim={name!r}; drop it")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    for field in ("adam_beta1", "adam_beta2", "adam_epsilon"):
        if not adam and getattr(args, field) != defaults[field]:
            raise ValueError(f"{field}={getattr(args, field)!r} is read by Adam only, not optim={name!r}; drop it")
    if "weight_decay" in kwargs:
        raise ValueError("optim_args sets weight_decay, and so does args.weight_decay; set args.weight_decay alone")


class DynamicAllocationCallback(TrainerCallback):
    """Calls :meth:`DynamicAllocator.step` once per optimizer step and saves/restores its state.

    The allocator's state goes into every checkpoint folder as ``dynalora_allocator.pt`` (and
    ``dynalora_allocator-<rank>.pt`` from every other process; read with ``weights_only=True``); on
    ``trainer.train(resume_from_checkpoint=...)`` it is read back from ``resume_from``, else
    ``<output_dir>/checkpoint-<step>``, and its saved step must match the step Trainer resumes at.

    Under DDP, build the allocator after the process group is initialised and keep
    ``ddp_find_unused_parameters`` True (the default without gradient checkpointing): inactive
    modules produce no gradients.
    """

    def __init__(self, allocator: DynamicAllocator, resume_from: str | None = None, save_state: bool = True) -> None:
        """Args:
        allocator: the allocator to drive.
        resume_from: the checkpoint folder ``trainer.train(resume_from_checkpoint=...)`` resumes
            from, when it is not ``<output_dir>/checkpoint-<step>`` (Trainer does not tell callbacks).
        save_state: write and read the allocator's state in Trainer's checkpoints (False: the
            caller does).
        """
        self.allocator = allocator
        self.resume_from = resume_from
        self.save_state = save_state

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer=None, **kwargs
    ):
        config = self.allocator.config
        if optimizer is not None and self.allocator._optimizer is None:  # built by hand, not create_optimizer
            if config.optimizer == "local" or config.state_policy != "keep":
                what = "optimizer='local'" if config.optimizer == "local" else f"state_policy={config.state_policy!r}"
                raise ValueError(
                    f"{what} works through the optimizer that allocator.create_optimizer(...) builds, and this one "
                    "was built otherwise; build it so, or set optimizer='global' and state_policy='keep'"
                )
            covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [m.name for m in self.allocator.modules if any(id(p) not in covered for p in m.params)]
            if missing:
                raise ValueError(
                    f"the optimizer leaves out {len(missing)} adapter modules (e.g. {missing[0]}); build it with "
                    "allocator.create_optimizer(...) and pass Trainer(optimizers=(optimizer, scheduler))"
                )
        if state.max_steps:
            self.allocator.set_total_steps(state.max_steps)
        if self.save_state and state.global_step > 0 and self.allocator.step_count != state.global_step:
            self._restore(args, state)
        # Trainer has loaded the optimizer by now, which puts every state tensor back on its
        # parameter's device; re-apply the policy (offload) to the inactive modules.
        self.allocator.apply_state_policy()

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        folder = self.resume_from or args.resume_from_checkpoint
        if not folder or not os.path.isdir(folder):
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, state_file(args.process_index))
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"resuming at step {state.global_step} but {path} is missing; "
                "pass DynamicAllocationCallback(..., resume_from=<checkpoint folder>)"
            )
        saved = torch.load(path, weights_only=True)
        if int(saved["step"]) != state.global_step:
            raise ValueError(f"{path} was saved at step {saved['step']}, the run resumes at {state.global_step}")
        self.allocator.load_state_dict(saved)
        logger.info("restored dynamic allocation state from %s", path)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Runs after optimizer.step() and before the LR scheduler and zero_grad; LocalScheduler
        # reads which modules that step trained, so a reallocation here is safe.
        self.allocator.step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.save_state and (args.should_save or args.world_size > 1):  # every process saves its own state
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.allocator.state_dict(), os.path.join(folder, state_file(args.process_index)))


class MethodStepCallback(TrainerCallback):
    """Runs a method's per-step hook, ``hook(model, step, optimizer)``, once per optimizer step.

    ``on_optimizer_step`` comes after ``optimizer.step()`` and before ``zero_grad`` (AdaLoRA reads
    the gradients), once per optimizer step whatever ``gradient_accumulation_steps`` is;
    ``state.global_step`` then counts the steps before this one. Each method's hook is its
    record's ``hooks.on_optimizer_step`` (:data:`dynalora.methods.REGISTRY`): AdaLoRA's rank
    allocation, DyLoRA's rank draw, L1RA's pruning.
    """

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def on_optimizer_step(self, args, state: TrainerState, control: TrainerControl, model=None, optimizer=None,
                          **kwargs):  # fmt: skip
        self.hook(getattr(model, "module", model), state.global_step, optimizer)  # DDP: the model inside


class AdaLoraCallback(MethodStepCallback):
    """PEFT AdaLoRA's ``update_and_allocate`` once per optimizer step inside a ``Trainer``: without it
    AdaLoRA trains as plain LoRA (peft #1327). Set the config's ``total_step`` to the run's optimizer steps."""

    def __init__(self) -> None:
        from dynalora.methods.adalora import on_optimizer_step

        super().__init__(on_optimizer_step)
