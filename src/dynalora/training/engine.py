"""``dynalora train`` on transformers' ``Trainer``: the user's engine, with dynalora plugged in by
:func:`dynalora.attach` (the same call a user's own script makes).

Trainer runs the steps: data order and sharding, gradient accumulation, DDP, mixed precision and
the loss scaler, clipping (``max_grad_norm``), the LR schedule's steps, the progress bar and
``report_to``. dynalora keeps only what Trainer cannot give, as a callback and small overrides:

- :class:`Meter`, a callback: each optimizer step's loss (averaged over processes, with any
  process's stop request in the same all-reduce), time, counted bytes and log record; validation
  every ``--eval-every`` steps (our evaluation: generation and exact match for causal LM); a
  NaN/inf loss stops before its optimizer step; SIGINT/SIGTERM write a checkpoint and stop;
- :class:`DynaloraTrainer`, small overrides: ``compute_loss`` counts what the forward saves for
  backward, and checkpoints are dynalora's (atomic, read back without unpickling, the allocator
  and method state inside, see :mod:`dynalora.training.checkpoint`) with Trainer's
  ``trainer_state.json`` beside them, so that Trainer itself skips the data already seen when it
  resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from dynalora import distributed
from dynalora.adapters import DTYPES, cast_frozen, find_block_list
from dynalora.checkpointing import enable_checkpointing
from dynalora.controller import DynamicAllocator
from dynalora.data import TaskData, load_task, make_collator, tokenize
from dynalora.data.tasks import Kind, TaskSpec, compute_metrics
from dynalora.errors import Interrupted, RunError, UsageError
from dynalora.integrations.trainer import MethodStepCallback, attach
from dynalora.metering import (
    PeakMemory,
    SavedActivations,
    gradient_bytes,
    optimizer_state_bytes,
    weight_bytes,
)
from dynalora.methods import REGISTRY, Hooks, MethodOptions, is_own, save_adapter
from dynalora.models import load_model, portable_model_id, resolve_model_path
from dynalora.training import checkpoint
from dynalora.training.args import ADAM_FIELDS, RUN_FILES, TrainArgs, as_flag_message
from dynalora.training.causal import evaluate_causal
from dynalora.training.checkpoint import latest_checkpoint, load_rng

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ set-up
def prepare_output_dir(args: TrainArgs) -> Path:
    """Refuse a folder that holds a run (unless --overwrite) or that cannot be a folder; writes nothing."""
    out = Path(args.output_dir)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not (args.overwrite or args.resume):
        hint = "--resume to continue it, " if "checkpoints" in existing and "metrics.json" not in existing else ""
        raise UsageError(
            f"--output-dir {out} already holds a run ({existing[0]}); choose another folder, or pass {hint}--overwrite"
        )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output-dir {out}: {parent} is a file; allowed: a folder")
    return out


def clear_run(out: Path) -> None:
    """Remove a previous run's files (only those dynalora writes) before a new run writes any."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; allowed: cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: unsupported; allowed: cpu, cuda, cuda:N")
    return device


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def method_options(args: TrainArgs, num_steps: int, kind: Kind = Kind.CLASSIFICATION) -> MethodOptions:
    """What ``args`` asks of the method's builder, for a run of ``num_steps`` optimizer steps on a task of ``kind``."""
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    return MethodOptions(
        targets,
        args.rank,
        args.alpha,
        args.adapter_dropout,
        bool(args.dynamic),
        num_steps,
        args.seed,
        args.dylora_frozen,
        Kind(kind).peft_task_type,
    )


def adamw(model: torch.nn.Module, options: MethodOptions, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(trainable_params(model), lr=lr, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(
    model, loader: DataLoader, spec: TaskSpec, device: torch.device, autocast, tokenizer=None
) -> dict[str, Any]:
    """Mean loss, the task's metrics and the predictions over a split (eval mode, no grad: no importance).

    Returns:
        ``{"loss": float, "metrics": {name: float}, "predictions": (N,) array, "labels": (N,) array}``;
        predictions are class ids, floats for regression, or generated text for causal LM
        (:func:`dynalora.training.causal.evaluate_causal`).
    """
    if spec.kind.generates:
        return evaluate_causal(model, loader, spec, device, autocast, tokenizer)
    was_training = model.training
    model.eval()
    losses, weights, preds, labels = [], [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = model(**batch)
        losses.append(float(out.loss))
        weights.append(len(batch["labels"]))
        logits = out.logits.float()
        preds.append((logits.squeeze(-1) if spec.is_regression else logits.argmax(-1)).cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    model.train(was_training)
    predictions, gold = np.concatenate(preds), np.concatenate(labels)
    metrics = compute_metrics(spec, predictions, gold)
    return {"loss": float(np.average(losses, weights=weights)), "metrics": metrics, "predictions": predictions,
            "labels": gold}  # fmt: skip


def _eval_record(step: int, split: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"type": "eval", "step": step, "split": split, "loss": result["loss"], "metrics": result["metrics"]}


@dataclass
class Job:
    """One run: its arguments, what :func:`load` built (data, the model with its method, the
    allocator, evaluation loaders), and the ``Trainer`` that trains it (set by :func:`run`)."""

    args: TrainArgs
    spec: TaskSpec
    model_path: str
    tokenizer: Any
    model: torch.nn.Module
    options: MethodOptions
    allocator: DynamicAllocator | None
    hooks: Hooks
    tokenized: Any
    collator: Any
    eval_loaders: dict[str, DataLoader]
    num_steps: int
    saved_names: frozenset[str]
    num_trainable: int
    trainer: Any = None

    @property
    def accelerator(self) -> Any:
        return self.trainer.accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrapped(self) -> torch.nn.Module:
        return self.trainer.model  # Trainer's model is never the DDP wrapper

    @property
    def sharded(self) -> bool:
        return self.args.fsdp is not None

    @property
    def weights(self) -> list[torch.Tensor]:
        """Parameters and buffers, looked up now: what autograd saves of these is not an activation."""
        model = self.unwrapped()
        return [*model.parameters(), *model.buffers()]

    def saved(self) -> dict[str, torch.nn.Parameter]:
        """The checkpoint's tensors, looked up now: L1RA replaces its parameters when it resizes."""
        return {n: p for n, p in self.unwrapped().named_parameters() if n in self.saved_names}


def load(args: TrainArgs, device: torch.device) -> Job:
    """Load data and model and set up the method on ``device``, and the allocator when the run is
    dynamic. Raises UsageError on bad input."""
    model_path = resolve_model_path(args.model)

    from transformers import set_seed

    set_seed(args.seed)
    data: TaskData = load_task(
        args.task,
        glue_dir=args.glue_dir,
        train_file=args.train_file,
        validation_file=args.validation_file,
        test_file=args.test_file,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        regression=args.regression,
        max_train_samples=args.max_train_samples,
        seed=args.seed,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        causal=args.generates,
    )
    if args.max_test_samples is not None and not ("test" in data.splits and data.has_test_labels):
        raise UsageError(f"--max-test-samples: --task {args.task} has no labelled test split to sample (custom "
                         "tasks: --test-file); drop it")  # fmt: skip
    # optimizer steps; the last, shorter accumulation of an epoch is a step too
    batches_per_epoch = math.ceil(len(data.splits["train"]) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    num_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    tokenizer, model = load_model(model_path, data.spec, device)
    options = method_options(args, num_steps, data.spec.kind)
    model, modules = REGISTRY[args.method].build(model, options)
    if args.base_dtype != "fp32":  # before the allocator freezes anything: every adapter stays float32
        cast_frozen(model, DTYPES[args.base_dtype])
    hooks = REGISTRY[args.method].hooks
    model.to(device)
    if args.gradient_checkpointing:
        try:
            enable_checkpointing(model)
        except ValueError as err:
            raise UsageError(f"--gradient-checkpointing: {err}") from None
    if args.fsdp is not None:  # before the allocator, which must see the sharded parameters
        modules = _shard(model, args.fsdp, modules)
    saved = frozenset(n for n, p in model.named_parameters() if p.requires_grad)  # before any module is frozen
    allocator = None
    if args.dynamic:
        try:
            allocator = DynamicAllocator(model, args.dynamic_config(), modules=modules)
        except ValueError as err:
            raise UsageError(as_flag_message(err)) from None

    tokenized = tokenize(data, tokenizer, args.max_length)
    collator = make_collator(tokenizer, kind=data.spec.kind)
    eval_loaders = {  # only the main process evaluates, on the whole split
        split: DataLoader(
            # each split has its own cap: --max-eval-samples never shrinks the test split
            _sample(tokenized[split], args.max_eval_samples if split == "validation" else args.max_test_samples),
            batch_size=2 * args.batch_size,
            collate_fn=collator,
            # without its own generator, every pass over the loader draws from the global RNG, and
            # the dropout masks of training would then depend on how often it evaluates
            generator=torch.Generator().manual_seed(0),
        )
        for split in ("validation", "test")
        if split in tokenized and (split != "test" or data.has_test_labels)
    }
    if allocator is not None:
        trained = allocator.num_params + allocator.num_extra_params
    else:
        trained = sum(p.numel() for p in trainable_params(model))
    return Job(args, data.spec, model_path, tokenizer, model, options, allocator, hooks, tokenized, collator,
               eval_loaders, num_steps, saved, trained)  # fmt: skip


def _shard(model: torch.nn.Module, fsdp: str, modules: list | None) -> list | None:
    """--fsdp: FSDP2 over the transformer blocks, then the rest. Trainer is told that the model is
    sharded already, so it neither wraps it in DDP nor shards it again, and it defers the
    reduce-scatter to the last micro-batch of each accumulation. Returns ``modules`` (a method's
    units of allocation) holding the sharded parameters that replaced theirs."""
    found = find_block_list(model)
    if found is None:
        raise UsageError("--fsdp shards each transformer block, and this model has no list of blocks; "
                         "allowed: transformers models (drop --fsdp)")  # fmt: skip
    words = fsdp.replace(",", " ").split()
    names = {id(p): name for name, p in model.named_parameters()}
    distributed.shard(model, found[1], reshard_after_forward="shard_grad_op" not in words, offload="offload" in words)
    if isinstance(getattr(type(model), "is_distributed_loading_by_transformers", None), property):
        model._is_distributed_loading_by_transformers = True  # a transformers model: its flag behind the property
    else:  # a PeftModel or an own wrapper: Trainer reads the attribute
        model.is_distributed_loading_by_transformers = True
    if modules is None:
        return None
    now = dict(model.named_parameters())
    return [dataclasses.replace(m, params=tuple(now[names[id(p)]] for p in m.params)) for m in modules]


def _fsdp_group(device: torch.device, fsdp: str) -> None:
    """The process group FSDP2 shards over, before the model loads (under torchrun, one process too)."""
    if "WORLD_SIZE" not in os.environ:
        raise UsageError("--fsdp shards over processes started by a launcher; allowed: torchrun --nproc_per_node "
                         "N -m dynalora train --fsdp ... (N may be 1), or accelerate launch -m dynalora train "
                         "--fsdp")  # fmt: skip
    if "offload" in fsdp.split() and device.type != "cuda":
        raise UsageError("--fsdp offload moves shards from a CUDA device to the CPU; allowed on CPU: --fsdp "
                         "without offload")  # fmt: skip
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState(cpu=device.type == "cpu")  # what TrainingArguments will find: its process group
    if not dist.is_initialized():  # one process: accelerate starts no group, FSDP2 needs one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


# ------------------------------------------------------------------------------------------ progress
@dataclass
class Progress:
    """Where a run stands and what it logged; a checkpoint's ``progress.json`` restores it (the data
    position is Trainer's, in ``trainer_state.json``)."""

    step: int = 0  # optimizer steps done
    records: list[dict[str, Any]] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    active_params: list[int] = field(default_factory=list)
    # counted bytes of each step (saved activations, gradients, optimizer state), for metrics.json
    counted: list[dict[str, int]] = field(default_factory=list)
    resumed_from: int | None = None

    SAVED = ("step", "records", "step_ms", "active_params", "counted")  # in progress.json

    def to_json(self, world_size: int) -> dict[str, Any]:
        # the thread count changes how CPU kernels split their sums: a resume on another count is not bitwise
        return {name: getattr(self, name) for name in self.SAVED} | {
            "world_size": world_size,
            "torch_threads": torch.get_num_threads(),
        }


class StopRequest:
    """SIGINT and SIGTERM ask the loop to checkpoint and stop at the next step boundary.

    A second Ctrl-C stops at once (KeyboardInterrupt). Handlers are installed only in the main
    thread (Python allows no other) and restored on exit.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _agree(accelerator, loss: torch.Tensor, signum: int) -> tuple[float, int]:
    """The step's loss averaged over processes and any process's stop request: one collective per step.

    Every process then takes the same decisions (stop, save, diverged) at the same step, so none
    waits forever in a collective that the others left.
    """
    if accelerator.num_processes == 1:
        return float(loss), signum  # a sync point: the step's time is real work, not queued kernels
    both = torch.stack([loss.detach().double(), torch.tensor(float(signum), device=loss.device)])
    both = accelerator.reduce(both.to(accelerator.device), reduction="sum")
    loss_value, any_signal = float(both[0]) / accelerator.num_processes, float(both[1])
    return loss_value, signum or (signal.SIGTERM if any_signal else 0)


def _all_ok(accelerator, ok: bool) -> bool:
    if accelerator.num_processes == 1:
        return ok
    flag = accelerator.reduce(torch.tensor([0.0 if ok else 1.0], device=accelerator.device), reduction="sum")
    return float(flag[0]) == 0.0


def counted_memory(steps: list[dict[str, int]]) -> dict[str, float]:
    """What ``metrics.json`` reports of the counted training bytes of each step.

    Peak RSS cannot tell apart selections a few percent apart (glibc keeps freed blocks); these
    are the bytes of live tensors: saved activations (the largest micro-batch), gradients after
    backward and optimizer state after the step, on this process.

    Returns:
        ``peak_<kind>`` and ``mean_<kind>`` of each kind, ``peak_total``/``mean_total`` of their
        sum per step (the peak of the sum, not the sum of the peaks), and, beside them, the model's
        own ``weights`` (every parameter and buffer at its storage dtype) and
        ``peak_total_with_weights``: what the run needs on its device, all of it.
    """
    kinds = ("saved_activations", "gradients", "optimizer_state")
    if not steps:
        return {}
    columns = {kind: [s[kind] for s in steps] for kind in kinds}
    columns["total"] = [sum(s[kind] for kind in kinds) for s in steps]
    if all("weights" in s for s in steps):  # progress saved by an older version lacks them
        columns["weights"] = [s["weights"] for s in steps]
        columns["total_with_weights"] = [t + w for t, w in zip(columns["total"], columns["weights"], strict=True)]
    out: dict[str, float] = {}
    for kind, values in columns.items():
        out[f"peak_{kind}"] = int(max(values))
        out[f"mean_{kind}"] = float(np.mean(values))
    return out


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(job: Job, out: Path, p: Progress) -> Path:
    """Write the checkpoint of step ``p.step`` on every process, with Trainer's state; returns its folder.

    Every process reaches the same agreements (:func:`_all_ok`), whether or not its own writes
    failed, so a full disk on one of them stops all with one message and none hangs.
    """
    acc, final = job.accelerator, checkpoint.checkpoint_dir(out, p.step)
    tmp, error = final.with_name(final.name + ".tmp"), None
    # collectives first, on every rank: whole weights; under FSDP each rank keeps its optimizer shard
    sharded = distributed.is_sharded(job.unwrapped())
    weights = {name: distributed.full_tensor(p.detach()) for name, p in job.saved().items()}
    optimizer = job.trainer.optimizer.state_dict()
    try:
        if job.is_main:
            checkpoint.begin(tmp)
    except OSError as err:
        error = err
    if _all_ok(acc, error is None):
        try:
            allocator = job.allocator.state_dict() if job.allocator else None
            checkpoint.write_rank(tmp, acc.process_index, allocator)
            if sharded:
                torch.save(distributed.local_shards(optimizer), tmp / f"optimizer-{acc.process_index}.pt")
            if job.is_main:
                state = {
                    "optimizer": None if sharded else optimizer,  # None: one file per rank
                    "scheduler": job.trainer.lr_scheduler.state_dict(),
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "method": job.hooks.state_dict(job.unwrapped()) if job.hooks.state_dict else None,
                }
                checkpoint.write_shared(tmp, weights, state, p.to_json(acc.num_processes))
                job.trainer.state.save_to_json(str(tmp / TRAINER_STATE))
        except Exception as err:  # any failure, on any process, is agreed on below: none waits alone
            error = err
    if _all_ok(acc, error is None) and job.is_main:
        try:
            checkpoint.commit(tmp, job.args.keep_checkpoints)
        except OSError as err:
            error = err
    if not _all_ok(acc, error is None):
        if job.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        reason = getattr(error, "strerror", None) or error or "another process could not write its part"
        raise RunError(
            f"cannot write checkpoint {final} ({reason}); "
            + (f"{previous} is intact" if previous else "no earlier checkpoint")
        )
    return final


def restore_checkpoint(job: Job, folder: Path) -> Progress:
    """Put weights, optimizer, scheduler, allocator and RNG back as they were after the checkpoint's step."""
    acc = job.accelerator
    try:
        weights, state, rng, saved = checkpoint.load(folder, acc.process_index, acc.num_processes)
    except ValueError as err:
        raise UsageError(f"--resume: {err}") from None
    if set(weights) != job.saved_names:
        missing = sorted(job.saved_names ^ set(weights))[0]
        raise UsageError(f"--resume: {folder} holds other weights than this run ({missing}); allowed: the same model")
    if job.hooks.load_state_dict is not None:  # first: L1RA resizes its layers to the saved ranks
        job.hooks.load_state_dict(job.unwrapped(), state["method"], job.trainer.optimizer)
    params = job.saved()
    for name, tensor in weights.items():
        distributed.load_full(params[name], tensor)  # under FSDP, this rank's shard of it
    if state["optimizer"] is None:  # FSDP: this rank's shard of the optimizer state
        shard = folder / f"optimizer-{acc.process_index}.pt"
        if not shard.exists():
            raise UsageError(f"--resume: {folder} is incomplete ({shard.name} is missing); allowed: a checkpoint "
                             "dynalora wrote")  # fmt: skip
        job.trainer.optimizer.load_state_dict(torch.load(shard, weights_only=True))
        distributed.reshard_optimizer(job.trainer.optimizer)
    else:
        job.trainer.optimizer.load_state_dict(state["optimizer"])
    job.trainer.lr_scheduler.load_state_dict(state["scheduler"])
    if job.allocator is not None:
        job.allocator.load_state_dict(state["allocator"])
    if acc.scaler is not None and state["scaler"] is not None:
        acc.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(rng)  # last: nothing above may draw from it
    threads = saved.get("torch_threads")
    if threads is not None and threads != torch.get_num_threads():
        logger.warning(
            "resuming with %d torch threads; %s was written with %d: training goes on, but float sums may "
            "split differently, so the result can differ from an uninterrupted run in the last bits",
            torch.get_num_threads(), folder, threads,
        )  # fmt: skip
    return Progress(
        **{k: saved[k] for k in Progress.SAVED if k in saved},  # "counted" came later: older ones lack it
        resumed_from=saved["step"],
    )


# ------------------------------------------------------------------------------------------ run
# Flags that may change between a run and its --resume; every other one must be what the run began with.
RESUME_FREE = (
    "resume",
    "overwrite",
    "quiet",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "logging_steps",
    "push_to_hub",
    "hub_model_id",
    "dataloader_num_workers",  # batches are drawn in the main process: workers only collate them
)


def resume_point(args: TrainArgs) -> Path | None:
    """The checkpoint ``--resume`` continues from; None when there is none yet (the run starts at step 0)."""
    if not args.resume:
        return None
    out = Path(args.output_dir)
    if (out / "metrics.json").exists():
        raise UsageError(
            f"--resume: the run in {out} already finished (metrics.json); allowed: a run that stopped early"
        )
    last = latest_checkpoint(out)
    if last is None:
        return None
    began = json.loads((out / "config.json").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
    for name, value in args.to_dict().items():
        # a flag newer than the run: the run began with what it does by default
        before = began.get(name, defaults[name])
        if name not in RESUME_FREE and before != value:
            raise UsageError(
                f"--resume: --{name.replace('_', '-')} is {value!r} here but {before!r} in {out}/config.json; "
                "allowed: the flags the run began with"
            )
    if not (last / TRAINER_STATE).exists():
        raise UsageError(
            f"--resume: {last} was written by an earlier dynalora (its own loop), which Trainer cannot continue; "
            "allowed: start the run again with --overwrite"
        )
    return last


def check_writable(out: Path, rank: int = 0) -> None:
    """Create ``out`` and write a probe file in it, or raise UsageError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dynalora-write-test-{rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        message = f"--output-dir {out} is not writable ({err.strerror}); allowed: a folder you can write to"
        raise UsageError(message) from None


def _start_output(out: Path, args: TrainArgs, job: Job, resume: Path | None) -> None:
    check_writable(out)
    if resume is not None:
        logger.info("resuming %s from %s", out, resume)
        return
    clear_run(out)  # --overwrite (or a --resume with nothing saved yet): the old files go first
    resolved = {"model_path": job.model_path, "num_steps": job.num_steps, "resolved_device": str(job.device),
                "num_processes": job.accelerator.num_processes,
                # what ran, after the preset and every flag: the allocator's own config
                "resolved_dynamic": job.allocator.config.to_dict() if job.allocator else None}  # fmt: skip
    config = {**args.to_dict(), **resolved}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info(
        "training %s on %s for %d steps (%d trainable parameters)",
        args.method, args.task, job.num_steps, job.num_trainable,
    )  # fmt: skip


def _finish(job: Job, out: Path, records: list[dict[str, Any]], costs: dict[str, Any]) -> dict[str, Any] | None:
    args, model = job.args, job.unwrapped()  # under FSDP every rank comes here: forwards and gathers are collectives
    final = {"validation": costs.pop("last_validation")}
    test = {}
    if "test" in job.eval_loaders:
        final["test"] = evaluate(
            model, job.eval_loaders["test"], job.spec, job.device, job.accelerator.autocast, job.tokenizer
        )
        records.append(_eval_record(job.num_steps, "test", final["test"]))
        test = final["test"]["metrics"]
    predictions = {
        split: {"predictions": r["predictions"].tolist(), "labels": r["labels"].tolist()}
        for split, r in final.items()
        if r
    }
    alloc = job.allocator
    metrics = {
        "task": args.task,
        "model": args.model,
        "method": args.method,
        "dynamic": alloc.config.to_dict() | {"k_modules": alloc.k} if alloc else None,
        "validation": final["validation"].get("metrics", {}),
        "test": test,
        # how many examples each figure comes from, so that a sampled split cannot pass for a whole one
        "examples": {split: len(loader.dataset) for split, loader in job.eval_loaders.items()},
        "main_metric": job.spec.main_metric,
        "trainable_params": job.num_trainable,
        **costs,
        "module_active_steps": alloc.active_steps if alloc else {},
        "num_modules": len(alloc.modules) if alloc else None,
        "num_steps": job.num_steps,
        "seed": args.seed,
        "device": str(job.device),
        "num_processes": job.accelerator.num_processes,
        **(job.hooks.summary(model) if job.hooks.summary else {}),
    }
    if job.hooks.evaluate_each and "validation" in job.eval_loaders:  # DyLoRA: every rank 1..r
        name, settings = job.hooks.evaluate_each
        loader = job.eval_loaders["validation"]
        metrics[name] = {
            str(key): evaluate(model, loader, job.spec, job.device, job.accelerator.autocast, job.tokenizer)["metrics"]
            for key in settings(model)
        }
    state_dict = None
    if job.sharded:  # PEFT and transformers save whole tensors: gathered on every rank, written by the main one
        state_dict = {name: distributed.full_tensor(t).cpu() for name, t in model.state_dict().items()}
        if not job.is_main:
            return None
    (out / "predictions.json").write_text(json.dumps(predictions) + "\n")
    info = {"method": args.method, "base_model": job.model_path, "targets": args.targets and args.targets.split(","),
            "rank": args.rank, "alpha": args.alpha, "num_labels": job.spec.num_labels,
            "problem_type": job.spec.kind.problem_type}  # fmt: skip
    card = model_card(args, metrics, alloc)
    _write_outputs(out, model, job.tokenizer, alloc, records, metrics, info, (card, portable_model_id(args.model)),
                   state_dict)  # fmt: skip
    # (metrics.json is written last: the run is done)
    return metrics


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _sample(dataset, n: int | None):
    """``n`` examples drawn at random (seed 0, the same every run), or the whole split. Not the first
    ``n``: a split stored by class would give one class (the political speeches' test split did)."""
    if n is None or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    return dataset.select(sorted(order.tolist()))


def model_card(args: TrainArgs, metrics: dict[str, Any], allocator: DynamicAllocator | None) -> str:
    """``model/README.md``: what was trained, from what, how, and what it scored."""
    base = portable_model_id(args.model)
    library = "peft" if args.method not in ("full", "bitfit", "galore") else "transformers"
    scores = ", ".join(
        f"{split} {name} {value:.4f}"
        for split in ("validation", "test")
        for name, value in metrics.get(split, {}).items()
        if isinstance(value, (int, float))
    )
    how = "plain (every trainable tensor, every step)"
    if allocator is not None:
        c = allocator.config
        how = (f"dynamic allocation: {c.measure} importance, {c.allocator} allocator, {c.optimizer} optimisation, "
               f"reallocated every {c.period} steps; {metrics['mean_active_trainable_params']:,.0f} of "
               f"{metrics['trainable_params']:,} trainable parameters active on average")  # fmt: skip
    return "\n".join([
        "---",
        f"base_model: {base}",
        f"library_name: {library}",
        f"tags: [dynalora, {args.method}]",
        "---",
        "",
        f"# {args.method} on {metrics['task']}, trained with dynalora",
        "",
        f"- base model: `{base}`",
        f"- method: `{args.method}`, {how}",
        f"- {metrics['num_steps']} optimizer steps, learning rate {args.lr:g} ({args.lr_scheduler_type}), "
        f"seed {args.seed}",
        f"- scores: {scores or 'none'}",
        "",
        "Every setting of the run is in `../config.json`, every step in `../log.jsonl`; `dynalora train` with",
        "the same flags trains it again.",
        "",
    ])  # fmt: skip


def _portable_adapter_config(folder: Path, base: str) -> None:
    """PEFT writes the base model's path as loaded; write the id others can load instead."""
    path = folder / "adapter_config.json"
    if path.exists():
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = base
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_outputs(out: Path, model, tokenizer, allocator, records, metrics, info, card: tuple[str, str] | None = None,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """``card``: the model card and the base model's portable id; ``state_dict``: the whole tensors of a
    sharded model."""
    from dynalora.analysis.plots import plot_loss, plot_module_activity

    _write_jsonl(out / "log.jsonl", records)
    if allocator is not None:
        _write_jsonl(out / "allocations.jsonl", allocator.history)
        plot_module_activity(
            allocator.active_steps,
            out / "module_activity.png",
            total_steps=metrics["num_steps"],
            title=f"{metrics['method']} on {metrics['task']}: fraction of steps each module trained",
        )
    plot_loss(records, out / "loss.png", metric=metrics["main_metric"])
    if metrics.get("ranks"):  # AdaLoRA, L1RA: where the rank budget went
        plot_module_activity(metrics["ranks"], out / "ranks.png", label="rank",
                             title=f"{metrics['method']} on {metrics['task']}: final rank of each module")  # fmt: skip
    weights = out / "model"
    if is_own(model):  # hydra, dvora: their tensors and how to rebuild the rest (methods.load_trained)
        save_adapter(model, weights, info)
    else:  # PEFT: the adapter (and head) only; full/bitfit: the whole model
        model.save_pretrained(weights, **({"state_dict": state_dict} if state_dict is not None else {}))
        if card is not None:
            _portable_adapter_config(weights, card[1])
    tokenizer.save_pretrained(weights)
    if card is not None:
        (weights / "README.md").write_text(card[0])  # in place of PEFT's empty template
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ Trainer
TRAINER_STATE = "trainer_state.json"


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
    return "bf16" if args.bf16 else "fp16" if args.fp16 else compute


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


class Meter(TrainerCallback):
    """Per optimizer step: loss, time, counted bytes, the log record, validation, NaN and signal stops."""

    def __init__(self, job: Job, out: Path, stop: StopRequest) -> None:
        self.job, self.out, self.stop = job, out, stop
        self.progress = Progress()
        self.last_eval: dict[str, Any] = {}
        self.saved: Path | None = None
        self.signum = 0
        self._losses: list[torch.Tensor] = []
        self._saved_bytes = 0
        self._t0 = 0.0
        self._active = 0
        self._grad_bytes = 0
        self._loss = 0.0

    def micro_batch(self, loss: torch.Tensor, saved_bytes: int) -> None:
        self._losses.append(loss.detach())
        self._saved_bytes = max(self._saved_bytes, saved_bytes)  # micro-batches free theirs in backward

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        job = self.job
        loss, self.signum = _agree(job.accelerator, torch.stack(self._losses).mean(), self.stop.signum)
        if not math.isfinite(loss):
            last = latest_checkpoint(self.out)
            raise RunError(
                f"training loss is {loss} at step {state.global_step + 1}; stopped before its optimizer step; "
                + (f"last good checkpoint: {last}" if last else "no checkpoint (--save-every N writes them)")
            )
        alloc = job.allocator
        self._loss = loss
        self._active = alloc.num_active_params + alloc.num_extra_params if alloc else job.num_trainable
        self._grad_bytes = gradient_bytes(model)

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, model=None, optimizer=None, **kwargs):
        job, p = self.job, self.progress
        step_ms = (time.perf_counter() - self._t0) * 1e3
        p.step = state.global_step
        p.step_ms.append(step_ms)
        p.active_params.append(self._active)
        p.counted.append({"saved_activations": self._saved_bytes, "gradients": self._grad_bytes,
                          "optimizer_state": optimizer_state_bytes(optimizer),
                          "weights": weight_bytes(model)})  # fmt: skip
        alloc = job.allocator
        p.records.append(
            {"type": "train", "step": p.step, "loss": self._loss, "lr": job.trainer.lr_scheduler.get_last_lr()[0],
             "num_active": len(alloc.active) if alloc else None, "step_ms": step_ms}
        )  # fmt: skip
        self._losses, self._saved_bytes = [], 0
        every = job.args.eval_every
        due = p.step == job.num_steps or (every and p.step % every == 0)
        # under FSDP every rank takes part in each forward, so every rank evaluates
        if due and (job.is_main or job.sharded) and "validation" in job.eval_loaders:
            self.last_eval = evaluate(job.unwrapped(), job.eval_loaders["validation"], job.spec, job.device,
                                      job.accelerator.autocast, job.tokenizer)  # fmt: skip
            p.records.append(_eval_record(p.step, "validation", self.last_eval))
        if self.signum and p.step >= job.num_steps:
            # training is over: finish the run (its outputs) rather than leave a checkpoint with nothing
            # left to resume (Trainer, resumed at its last step, would train one step more)
            logger.warning("%s came with the last step: finishing the run", signal.Signals(self.signum).name)
            self.signum = 0
        save_every = job.args.save_every
        control.should_save = bool(self.signum or (save_every and p.step % save_every == 0))
        if self.signum:
            control.should_training_stop = True
        return control


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
        _fsdp_group(device, args.fsdp)
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
                    _start_output(out, args, job, resume)
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
            metrics = _finish(job, out, p.records, costs) if job.is_main or job.sharded else None
            if metrics is not None and args.push_to_hub:
                push(out / "model", args.hub_model_id or out.resolve().name)
            job.accelerator.wait_for_everyone()
            return metrics
        finally:
            # drop every reference to the DDP wrapper while the process group is alive (gloo teardown)
            trainer.model_wrapped = trainer.model
            trainer.accelerator.free_memory()  # its gc.collect() frees the wrapper's cycles


def push(folder: Path, repo_id: str) -> None:
    """Upload the trained ``model/`` folder to the Hub repository ``repo_id`` (created if need be)."""
    from huggingface_hub import create_repo, upload_folder

    try:
        url = create_repo(repo_id, exist_ok=True).repo_id
        upload_folder(repo_id=url, folder_path=str(folder), commit_message="dynalora train")
    except Exception as err:  # network, auth, permissions: the run itself is complete
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = f"--push-to-hub {repo_id}: the upload failed ({first}); the run is complete in {folder}"
        raise RunError(message) from None
    logger.info("uploaded %s to https://huggingface.co/%s", folder, url)
