"""Keep every rank's selection identical under torch.distributed (DDP, accelerate, torchrun).

Each rank measures importance on its own shard of the data, so raw scores differ between ranks.
Averaging them gives every rank the same importance, and broadcasting rank 0's mask makes the
selection identical even if floating-point or RNG state ever drifted.

DDP only synchronises the gradients of parameters that required grad when the model was wrapped.
So under torch.distributed the allocator applies its first freeze at the first training forward
(after wrapping), and the wrapper needs ``find_unused_parameters=True`` (HF Trainer's default for
models without gradient checkpointing; accelerate: ``DistributedDataParallelKwargs``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return _active()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Average a CPU tensor over ranks (a no-op outside torch.distributed)."""
    if not _active():
        return scores
    buf = scores.to(_comm_device(), torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / dist.get_world_size()).cpu()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, returned on its own device and dtype (a no-op outside torch.distributed)."""
    if not _active():
        return values
    buf = values.to(_comm_device(), torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device, values.dtype)


def broadcast_mask(mask: torch.Tensor) -> torch.Tensor:
    """Rank 0's bool mask on every rank (a no-op outside torch.distributed)."""
    if not _active():
        return mask
    buf = mask.to(_comm_device(), torch.uint8)
    dist.broadcast(buf, src=0)
    return buf.cpu().bool()
