"""``dynalora train`` on transformers' ``Trainer``: the user's engine, with dynalora plugged in by
:func:`dynalora.attach` (the same call a user's own script makes).

Trainer runs the steps: data order and sharding, gradient accumulation, DDP, mixed precision and
the loss scaler, clipping (``max_grad_norm``), the LR schedule's steps, the progress bar and
``report_to``. dynalora keeps only what Trainer cannot give, as a callback and small overrides:

- :class:`~dynalora.training.meter.Meter`, a callback: each optimizer step's loss (averaged over
  processes, with any process's stop request in the same all-reduce), time, counted bytes and log
  record; validation every ``--eval-every`` steps (:mod:`~dynalora.training.evaluation`: generation
  and exact match for causal LM); a NaN/inf loss stops before its optimizer step; SIGINT/SIGTERM
  write a checkpoint and stop;
- :class:`DynaloraTrainer`, small overrides: ``compute_loss`` counts what the forward saves for
  backward, and checkpoints are dynalora's (atomic, read back without unpickling, the allocator
  and method state inside: :mod:`~dynalora.training.resume`, :mod:`~dynalora.training.checkpoint`)
  with Trainer's ``trainer_state.json`` beside them, so that Trainer itself skips the data already
  seen when it resumes.

A run in order: :mod:`~dynalora.training.job` (folder, device, data, model, method, allocator),
:func:`training_arguments` and the trainer (here), :mod:`~dynalora.training.outputs` (what the run
leaves in its folder).
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from dynalora.data.tasks import Kind
from dynalora.errors import Interrupted, UsageError
from dynalora.integrations.trainer import MethodStepCallback, attach
from dynalora.metering import PeakMemory, SavedActivations
from dynalora.training.args import ADAM_FIELDS, TrainArgs
from dynalora.training.checkpoint import load_rng
from dynalora.training.job import (
    Job,
    check_writable,
    fsdp_group,
    load,
    prepare_output_dir,
    resolve_device,
    trainable_params,
)
from dynalora.training.meter import Meter, StopRequest
from dynalora.training.outputs import counted_memory, finish, push, start_output
from dynalora.training.resume import restore_checkpoint, resume_point, save_checkpoint

logger = logging.getLogger(__name__)


def training_arguments(args: TrainArgs, device: torch.device, num_steps: int, out: Path) -> TrainingArguments:
    """``TrainingArguments`` for ``args``: ``--batch-size`` is the global batch, split over the processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise UsageError(
            f"--batch-size {args.batch_size} is the global batch and must split evenly over {world} processes; "
            f"allowed: a multiple of {world}"
        )
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * num_steps)
    precision = _precision(args, device)
    config, extra = TrainingArguments, {}
    if args.generates:  # TRL's SFTConfig; our tokenisation (the loss on the answer only) stays
        from trl import SFTConfig

        config = SFTConfig
        extra = {"max_length": args.max_length, "packing": False, "gradient_checkpointing": False,
                 "dataset_kwargs": {"skip_prepare_dataset": True}}  # fmt: skip
    return config(
        **extra,
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=args.batch_size // world,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=num_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        optim=args.optim or "adamw_torch",
        **{name: value for name in ADAM_FIELDS if (value := getattr(args, name)) is not None},  # else transformers'
        lr_scheduler_type=args.lr_scheduler_type,
        lr_scheduler_kwargs=args.scheduler_kwargs(),
        label_smoothing_factor=args.label_smoothing_factor,
        dataloader_num_workers=args.dataloader_num_workers,
        warmup_steps=warmup,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        eval_strategy="no",  # the Meter evaluates (generation and exact match for causal LM)
        save_strategy="no",  # the Meter decides when (--save-every, signals); checkpoints are ours
        # log.jsonl has every step; Trainer's own logs go to --report-to only
        logging_strategy="no" if args.report_to == "none" else "steps",
        logging_steps=args.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss stops the run, it is not averaged away
        report_to=args.report_to if args.report_to in ("none", "all") else args.report_to.split(","),
        disable_tqdm=args.quiet,
        remove_unused_columns=False,
        dataloader_pin_memory=device.type == "cuda",
        ddp_find_unused_parameters=True,  # modules outside the selection get no gradient
    )


def _precision(args: TrainArgs, device: torch.device) -> str:
    """``bf16``/``fp16`` (autocast) or ``fp32``; a half-precision frozen base computes at its dtype."""
    if device.type != "cuda" and (args.bf16 or args.fp16):
        raise UsageError("--bf16/--fp16 need a CUDA device; allowed on CPU: full precision (drop the flag)")
    if device.type != "cuda" and args.base_dtype == "fp16":
        raise UsageError("--base-dtype fp16 needs a CUDA device; allowed on CPU: fp32, bf16")
    compute = args.base_dtype
    if args.dynamic and args.dynamic_config().inactive_dtype != "fp32":
        compute = args.dynamic_config().inactive_dtype
        if device.type != "cuda" and compute == "fp16":
            raise UsageError("--inactive-dtype fp16 needs a CUDA device; allowed on CPU: fp32, bf16")
        if args.base_dtype not in ("fp32", compute):
            raise UsageError(f"--inactive-dtype {compute} and --base-dtype {args.base_dtype} differ; choose one dtype")
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else compute
    # accelerate launch --mixed_precision fp16 reaches Trainer through the environment
    fp16 = precision == "fp16" or os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "fp16"
    if fp16 and args.dynamic and args.dynamic_config().optimizer == "local":
        raise UsageError(  # accelerate hands its loss scaler torch optimizers only
            "fp16 compute (--fp16, --base-dtype fp16, --inactive-dtype fp16 or accelerate launch --mixed_precision "
            "fp16) needs a loss scaler, which cannot step the per-module optimizers of --optimizer local; allowed: "
            "bf16, or --optimizer global"
        )
    return precision


class DynaloraMixin:
    """dynalora's overrides of ``Trainer`` (see the module doc): its checkpoints and counted saved
    activations. :class:`DynaloraTrainer` is ``Trainer`` with them; decoders train on TRL's
    ``SFTTrainer`` with them (:func:`trainer_class`)."""

    def __init__(self, *args: Any, job: Job, meter: Meter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job, self.meter = job, meter
        # Trainer then divides each micro-batch's mean loss by the accumulation steps. Left to its
        # default, it passes num_items_in_batch to models whose forward takes **kwargs and divides by
        # nothing; BERT's classification loss ignores it, so 2 micro-batches of 4 trained on twice
        # the gradient of one batch of 8 (measured: LoRA weights 4e-3 apart after 6 steps).
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with SavedActivations(exclude=self.job.weights) as saved:  # a weakref per saved tensor
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.meter.micro_batch(result[0] if return_outputs else result, saved.bytes)
        return result

    # dynalora's checkpoints: written atomically, read back with weights_only=True
    def _save_checkpoint(self, model, trial) -> None:
        self.meter.saved = save_checkpoint(self.job, self.meter.out, self.meter.progress)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        pass  # everything is restored at once, with the optimizer (L1RA resizes before its weights load)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None:
            return
        self.meter.progress = restore_checkpoint(self.job, Path(checkpoint))

    def _load_scaler(self, checkpoint) -> None:
        pass  # restored with the optimizer

    def _load_rng_state(self, checkpoint) -> None:
        if checkpoint is not None:  # at the batch after the checkpoint's step, as Trainer places it
            load_rng(Path(checkpoint), self.args.process_index)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.global_step >= self.state.max_steps:  # resumed at the last step: Trainer would take one more
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer computes the norm of every gradient each step only to log it; without clipping
        # that is a pass over all gradients (every layer under dynamic full fine-tuning) for nothing
        return grad_norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.args.report_to:  # the run's own records are log.jsonl; Trainer's go to --report-to only
            super().log(logs, start_time)


class DynaloraTrainer(DynaloraMixin, Trainer):
    """``Trainer`` with dynalora's checkpoints and counted saved activations."""


def trainer_class(kind: Kind | str) -> type[Trainer]:
    """:class:`DynaloraTrainer` for a task head; for causal LM the same overrides on TRL's ``SFTTrainer``."""
    if not Kind(kind).generates:
        return DynaloraTrainer
    from trl import SFTTrainer

    return type("DynaloraSFTTrainer", (DynaloraMixin, SFTTrainer), {})


def run(args: TrainArgs) -> dict[str, Any] | None:
    """Fine-tune with ``Trainer``, evaluate and write every output (as :func:`dynalora.training.run`).

    Returns:
        The content of ``metrics.json`` on the main process; None on the others.
    """
    resume = resume_point(args)
    prepare_output_dir(args)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UsageError("accelerate launch --use_fsdp would shard the model after dynalora built its "
                         "allocator; allowed: accelerate launch (without --use_fsdp) or torchrun, with dynalora's "
                         "--fsdp")  # fmt: skip
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UsageError("dynalora train runs under DDP or FSDP2; allowed: torchrun or accelerate launch without "
                         "--use_deepspeed (FSDP2: add --fsdp)")  # fmt: skip
    from accelerate.state import AcceleratorState, GradientState

    # one process may run several trainings (compare, benchmarks, tests): accelerate's singletons go first
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    _precision(args, device)  # refused before anything loads
    if args.fsdp is not None:
        fsdp_group(device, args.fsdp)
    job = load(args, device)  # a setting the allocator refuses is refused here, before any file is written
    out = Path(args.output_dir)
    targs = training_arguments(args, device, job.num_steps, out)
    check_writable(out, targs.process_index)
    # a plain run's optimizer is the method's (GaLore, L1RA) or --optim's; attach() builds a dynamic one
    optimizer = None
    if job.allocator is None and job.hooks.make_optimizer is not None:
        optimizer = job.hooks.make_optimizer(job.model, job.options, args.lr, args.weight_decay)
    elif job.allocator is None:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(targs, job.model)
        optimizer = optimizer_cls(trainable_params(job.model), weight_decay=args.weight_decay, **kwargs)
    with StopRequest() as stop:
        meter = Meter(job, out, stop)
        trainer = trainer_class(job.spec.kind)(
            model=job.model,
            args=targs,
            train_dataset=job.tokenized["train"],
            data_collator=job.collator,
            processing_class=job.tokenizer,
            callbacks=[meter],
            optimizers=(optimizer, None),
            job=job,
            meter=meter,
        )
        job.trainer = trainer
        if job.allocator is not None:
            attach(trainer, job.allocator, save_state=False)
        if job.hooks.on_optimizer_step is not None:  # before zero_grad: AdaLoRA reads the gradients
            trainer.add_callback(MethodStepCallback(job.hooks.on_optimizer_step))
        try:
            error = None
            if job.is_main:
                try:
                    start_output(out, args, job, resume)
                except UsageError as err:
                    error = err
            if error:
                raise error
            with PeakMemory(device) as peak:
                trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            if meter.signum:
                err = Interrupted(
                    f"stopped by {signal.Signals(meter.signum).name} after step {meter.progress.step} of "
                    f"{job.num_steps}; checkpoint in {meter.saved}; continue with the same command and --resume",
                    meter.signum,
                )
                # said while our handlers still hold: a launcher may SIGTERM this rank once another has exited
                err.report()
                raise err
            p = meter.progress
            costs = {
                "last_validation": meter.last_eval,
                "mean_active_trainable_params": float(np.mean(p.active_params)),
                "train_runtime_s": sum(p.step_ms) / 1e3,
                "median_step_ms": statistics.median(p.step_ms),
                "peak_memory_bytes": peak.peak_bytes,
                "peak_memory_kind": peak.kind,
                "peak_memory_above_start_bytes": peak.increase_bytes,
                "resumed_from_step": p.resumed_from,
                "memory": counted_memory(p.counted),
            }
            metrics = finish(job, out, p.records, costs) if job.is_main or job.sharded else None
            if metrics is not None and args.push_to_hub:
                push(out / "model", args.hub_model_id or out.resolve().name)
            job.accelerator.wait_for_everyone()
            return metrics
        finally:
            # drop every reference to the DDP wrapper while the process group is alive (gloo teardown)
            trainer.model_wrapped = trainer.model
            trainer.accelerator.free_memory()  # its gc.collect() frees the wrapper's cycles
