"""A run's checkpoints, written from inside Trainer and read back into it, and whether ``--resume``
may continue a run. The files and their format are :mod:`dynalora.training.checkpoint`."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dynalora import distributed
from dynalora.errors import RunError, UsageError
from dynalora.training import checkpoint
from dynalora.training.args import TrainArgs
from dynalora.training.checkpoint import latest_checkpoint

if TYPE_CHECKING:
    from dynalora.training.job import Job

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


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


def _all_ok(accelerator, ok: bool) -> bool:
    if accelerator.num_processes == 1:
        return ok
    flag = accelerator.reduce(torch.tensor([0.0 if ok else 1.0], device=accelerator.device), reduction="sum")
    return float(flag[0]) == 0.0


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
        try:
            job.allocator.load_state_dict(state["allocator"])
        except ValueError as err:  # e.g. a preset that changed between versions: the flags match, the rules not
            raise UsageError(f"--resume: {err}") from None
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


def check_same_run(out: Path, args: TrainArgs) -> None:
    """Refuse ``args`` where they differ from the run in ``out`` (its ``config.json``), but for :data:`RESUME_FREE`."""
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
    check_same_run(out, args)
    if not (last / TRAINER_STATE).exists():
        raise UsageError(
            f"--resume: {last} was written by an earlier dynalora (its own loop), which Trainer cannot continue; "
            "allowed: start the run again with --overwrite"
        )
    return last
