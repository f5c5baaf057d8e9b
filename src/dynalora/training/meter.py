"""What happens at each optimizer step besides the step itself: the loss agreed over processes, a
NaN/inf stop, time and counted bytes, the log record, validation, and the SIGINT/SIGTERM stop."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerControl, TrainerState

from dynalora.errors import RunError
from dynalora.metering import gradient_bytes, optimizer_state_bytes, weight_bytes
from dynalora.training.checkpoint import latest_checkpoint
from dynalora.training.evaluation import eval_record, evaluate
from dynalora.training.job import Job
from dynalora.training.resume import Progress

logger = logging.getLogger(__name__)


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
            p.records.append(eval_record(p.step, "validation", self.last_eval))
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

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        job = self.job
        # resumed from the last step's checkpoint (the process died before its outputs): no step ran, so the
        # final validation (its record is in the checkpoint's log) is taken again, on the same weights
        ran_no_step = not self.last_eval and self.progress.step == job.num_steps
        if ran_no_step and (job.is_main or job.sharded) and "validation" in job.eval_loaders:
            self.last_eval = evaluate(job.unwrapped(), job.eval_loaders["validation"], job.spec, job.device,
                                      job.accelerator.autocast, job.tokenizer)  # fmt: skip
