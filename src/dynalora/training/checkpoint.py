"""Checkpoints of a ``dynalora train`` run: atomic folders that resume bitwise.

``<output-dir>/checkpoints/step-000040/`` holds:

- ``weights.safetensors``: every tensor the run trains at some point (adapters, head; the block
  linears of full fine-tuning), whether it is active now or not;
- ``state.pt``: optimizer(s), LR scheduler(s) and the fp16 loss scaler, written with ``torch.save``
  and read back with ``torch.load(weights_only=True)`` (tensors, numbers, strings);
- ``allocator-<rank>.pt``: each process's allocator, the same way (importance is measured on each
  process's part of the batch before it is averaged, so the accumulators differ between processes);
- ``rng-<rank>.safetensors``: each process's torch, CUDA, numpy and Python RNG states;
- ``progress.json``: the step and the log records so far;
- ``trainer_state.json``: Trainer's state (its step, epoch and data position), so that Trainer
  skips the batches already trained on when it resumes.

Nothing is unpickled. accelerate's ``save_state`` does not fit here: it loads objects registered
for checkpointing with ``weights_only=False``, does not know :class:`~dynalora.optim.LocalOptimizer`,
and only logs a failed RNG restore, which for a bitwise resume is an error.

A checkpoint is written under ``step-N.tmp`` and renamed when every file is on disk, so a crash or a
full disk never leaves a half-written folder where a good one was.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under ``out``, oldest first (``.tmp`` folders are half-written: ignored)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / "progress.json").exists()]


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (safetensors holds nothing else)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss_next is None else gauss_next], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    version, *internal = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((version, tuple(internal), None if gauss != gauss else gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def load_rng(folder: Path, rank: int) -> None:
    """Set this process's RNG states to those saved in the checkpoint ``folder``."""
    set_rng_state(load_file(str(folder / f"rng-{rank}.safetensors")))


# ------------------------------------------------------------------------------------------ save / load
def write_shared(folder: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], progress: dict) -> None:
    """The files every rank holds the same copy of (written by rank 0)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(folder / "weights.safetensors"))
    torch.save(state, folder / "state.pt")
    (folder / "progress.json").write_text(json.dumps(progress) + "\n")


def write_rank(folder: Path, rank: int, allocator: dict[str, Any] | None) -> None:
    """The files of one process: its RNG states and its allocator's state."""
    save_file(rng_state(), str(folder / f"rng-{rank}.safetensors"))
    torch.save(allocator, folder / f"allocator-{rank}.pt")


def begin(tmp: Path) -> None:
    """A fresh temporary folder ``step-N.tmp`` for a checkpoint (rank 0 calls this)."""
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash
    tmp.mkdir(parents=True)


def commit(tmp: Path, keep: int) -> None:
    """Flush and rename ``step-N.tmp`` to ``step-N``; then keep only the last ``keep`` checkpoints."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    old = final.with_name(final.name + ".old")
    if final.exists():  # the same step saved again (a resumed run that is interrupted at once):
        os.replace(final, old)  # moved aside, not deleted, until the new one is in place
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(folder: Path, rank: int, world_size: int) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """``(weights, state, rng, progress)`` of a checkpoint, for this rank; ``state["allocator"]`` is this rank's.

    Raises:
        ValueError: a file is missing, or it was written by another number of processes (the RNG
            states would not match).
    """
    needed = ["progress.json", "weights.safetensors", "state.pt", f"allocator-{rank}.pt", f"rng-{rank}.safetensors"]
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:  # for a bitwise resume, RNG states that cannot be restored are an error
        raise ValueError(f"{folder} is incomplete ({missing[0]} is missing); allowed: a checkpoint dynalora wrote")
    progress = json.loads((folder / "progress.json").read_text())
    if progress["world_size"] != world_size:
        raise ValueError(
            f"{folder} was written by {progress['world_size']} process(es), this run has {world_size}; "
            "allowed: resume with the same number of processes"
        )
    weights = load_file(str(folder / "weights.safetensors"))
    state = torch.load(folder / "state.pt", weights_only=True)
    state["allocator"] = torch.load(folder / f"allocator-{rank}.pt", weights_only=True)
    rng = load_file(str(folder / f"rng-{rank}.safetensors"))
    return weights, state, rng, progress
