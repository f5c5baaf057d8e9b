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
checkpointing and resume stay Trainer's. What it cannot follow is refused when it is called (see
:func:`attach`): ``model_init``, FSDP or DeepSpeed from ``TrainingArguments``/accelerate (dynalora's own
FSDP2 is ``dynalora train --fsdp``), fp16's loss scaler with ``optimizer="local"``, and DDP without
``ddp_find_unused_parameters``. One allocator serves one ``train()`` (or its resumption).

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
            ``optimizer_cls_and_kwargs``; it was built with ``model_init`` (``train()`` would replace
            the model the allocator holds); FSDP or DeepSpeed is enabled through ``TrainingArguments``
            or accelerate (they replace the parameters the allocator holds; dynalora's own FSDP2 is
            ``dynalora train --fsdp``); fp16 (a loss scaler) with ``optimizer="local"`` (accelerate
            unscales and skips steps only for a ``torch.optim.Optimizer``; allowed: bf16, or
            ``optimizer="global"``); gradient checkpointing with ``cap_mode="recompute"``, or reentrant
            with the ``forward`` or ``adapter`` measure; more than one process with ``ddp_find_unused_parameters``
            resolved to False; ``args.optim`` names an optimizer outside :data:`SUPPORTED_OPTIMIZERS`;
            or anything else that would not be read (Adam's settings with another optimizer,
            ``optim_args`` with Adam or keys its optimizer does not read, an allocator over another
            model, ``modules`` beside a built allocator, ``resume_from`` without ``save_state``).
            A second ``train()`` of the same allocator without resuming is refused when it starts
            (:class:`DynamicAllocationCallback`).
    """
    if getattr(trainer, "model_init", None) is not None:
        raise ValueError(
            "attach() trains the model the trainer holds now, and a Trainer built with model_init= replaces it "
            "in train(); allowed: Trainer(model=...) without model_init"
        )
    for flag, what in (("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")):
        if getattr(trainer, flag, False):
            raise ValueError(
                f"{what} from TrainingArguments/accelerate wraps the model after attach() and replaces the parameters "
                "the allocator holds; allowed: DDP or one process (dynalora's own FSDP2 path: dynalora train --fsdp)"
            )
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
    settings = config.config if isinstance(config, DynamicAllocator) else config or DynamicConfig()
    if settings.optimizer == "local" and _scales_loss(trainer):
        raise ValueError(
            "fp16 scales the loss, and accelerate unscales the gradients and skips overflow steps only for a "
            "torch.optim.Optimizer, which optimizer='local' does not build (its steps would take scaled gradients); "
            "allowed: bf16, or DynamicConfig(optimizer='global')"
        )
    if args.gradient_checkpointing and settings.cap_mode == "recompute":
        raise ValueError(
            "memory_cap with cap_mode='recompute' checkpoints the lowest trained blocks itself, and "
            "gradient_checkpointing=True (TRL's SFTConfig default) checkpoints every block, so the cap would do "
            "nothing; allowed: gradient_checkpointing=False with the cap, or the cap dropped"
        )
    reentrant = (args.gradient_checkpointing_kwargs or {}).get("use_reentrant", False)  # transformers 5: False
    if args.gradient_checkpointing and reentrant and settings.measure in ("forward", "adapter"):
        raise ValueError(
            f"measure={settings.measure!r} reads each module's training forward, which reentrant checkpointing runs "
            "without gradients and repeats inside backward; allowed: gradient_checkpointing_kwargs="
            "{'use_reentrant': False}, or DynamicConfig(measure='gradient')"
        )
    if args.world_size > 1 and not _finds_unused_parameters(trainer):
        raise ValueError(
            f"under DDP ({args.world_size} processes) the modules outside the selection get no gradient, and with "
            "ddp_find_unused_parameters False (given, or left unset with gradient checkpointing) DDP fails at the "
            "next step; allowed: TrainingArguments(ddp_find_unused_parameters=True)"
        )
    if isinstance(config, DynamicAllocator):
        if modules is not None:
            raise ValueError("modules= is read when attach() builds the allocator; pass it to DynamicAllocator(...)")
        allocator = config
        ours = {id(p) for p in model.parameters()}
        if any(id(p) not in ours for m in allocator.modules for p in m.params):
            raise ValueError("the allocator was built over another model than trainer.model; allowed: "
                             "DynamicAllocator(trainer.model, ...), or a DynamicConfig")  # fmt: skip
    else:
        allocator = DynamicAllocator(model, settings, modules=modules)

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


def _scales_loss(trainer: Any) -> bool:
    """Whether the trainer trains with fp16's loss scaler (accelerate builds one for fp16 on CUDA)."""
    args, accelerator = trainer.args, getattr(trainer, "accelerator", None)
    if getattr(args, "fp16", False) or getattr(args, "mixed_precision", None) == "fp16":
        return True
    return getattr(accelerator, "scaler", None) is not None


def _finds_unused_parameters(trainer: Any) -> bool:
    """``find_unused_parameters`` as the trainer's DDP gets it: Trainer resolves
    ``ddp_find_unused_parameters`` (None: False with gradient checkpointing on a ``PreTrainedModel``)
    into its accelerator's handler when it is built."""
    handler = getattr(getattr(trainer, "accelerator", None), "ddp_handler", None)
    if handler is not None:
        return bool(handler.find_unused_parameters)
    return trainer.args.ddp_find_unused_parameters is not False


OPTIM_ARGS_READ = {
    torch.optim.SGD: ("momentum", "dampening", "nesterov"),
    torch.optim.Adagrad: ("lr_decay", "eps"),
    torch.optim.RMSprop: ("momentum", "alpha", "eps", "centered"),
}
"""The ``optim_args`` keys transformers passes on to each optimizer (beside ``weight_decay``, which
is ``args.weight_decay``'s); it drops any other."""


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
    read = OPTIM_ARGS_READ.get(optimizer_cls)
    if read is not None and args.optim_args:
        keys = [item.split("=", 1)[0] for item in args.optim_args.replace(" ", "").split(",")]
        unread = [key for key in keys if key not in read and key != "weight_decay"]
        if unread:
            raise ValueError(
                f"optim_args key {unread[0]!r} is not read by optim={name!r} (transformers drops it); "
                f"allowed: {', '.join(read)}"
            )
    if "weight_decay" in kwargs:
        raise ValueError("optim_args sets weight_decay, and so does args.weight_decay; set args.weight_decay alone")


class DynamicAllocationCallback(TrainerCallback):
    """Calls :meth:`DynamicAllocator.step` once per optimizer step and saves/restores its state.

    The allocator's state goes into every checkpoint folder as ``dynalora_allocator.pt`` (and
    ``dynalora_allocator-<rank>.pt`` from every other process; read with ``weights_only=True``); on
    ``trainer.train(resume_from_checkpoint=...)`` it is read back from ``resume_from``, else
    ``<output_dir>/checkpoint-<step>``, and its saved step and number of processes must match the
    resumed run's. A ``train()`` that starts at step 0 with an allocator that has already stepped is
    refused: one allocator serves one run.

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
        if state.global_step == 0 and self.allocator.step_count > 0:
            raise ValueError(
                f"train() starts at step 0 with an allocator that has taken {self.allocator.step_count} steps "
                "(its state would be saved with the wrong step and could not resume); allowed: a fresh allocator "
                "(a new Trainer and attach()) for each train(), or train(resume_from_checkpoint=...)"
            )
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
        if not os.path.exists(path) and args.process_index > 0 and os.path.exists(os.path.join(folder, STATE_FILE)):
            raise ValueError(
                f"{path} is missing and rank 0's state is there: the run was saved with fewer processes than this "
                f"one ({args.world_size}); allowed: resume with the number of processes it was saved with"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"resuming at step {state.global_step} but {path} is missing; "
                "pass DynamicAllocationCallback(..., resume_from=<checkpoint folder>)"
            )
        saved = torch.load(path, weights_only=True)
        world = saved.pop("world_size", None)  # not the allocator's: files from before it was written have none
        if world is not None and int(world) != args.world_size:
            raise ValueError(
                f"{path} was saved by a run of {int(world)} processes and this one has {args.world_size}; allowed: "
                f"resume with {int(world)} processes (each keeps its own allocator state)"
            )
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
            saved = self.allocator.state_dict() | {"world_size": args.world_size}  # checked on resume
            torch.save(saved, os.path.join(folder, state_file(args.process_index)))


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
