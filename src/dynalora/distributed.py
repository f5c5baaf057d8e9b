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

from collections.abc import Iterable, Iterator
from typing import Any

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


# ------------------------------------------------------------------------------------------ FSDP2
# ``fully_shard`` turns every parameter into a DTensor holding this rank's shard. What reads or
# writes whole tensors (checkpoints, the saved model) goes through the helpers below.
def shard(model: torch.nn.Module, blocks: Iterable[torch.nn.Module], *, reshard_after_forward: bool = True,
          offload: bool = False) -> None:  # fmt: skip
    """FSDP2: shard each of ``blocks`` (the transformer blocks), then ``model`` (what is left: embeddings,
    head, adapters outside the blocks). Call it before building the allocator, which must see the
    sharded parameters. ``offload`` keeps the shards and their optimizer state on the CPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2's ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it, in the same order);
    any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def load_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into ``param``, or into this rank's shard of it (every rank holds ``value``;
    nothing is sent)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None)  # fmt: skip
        param.copy_(value)


def local_shards(state: Any) -> Any:
    """``state`` (an optimizer's ``state_dict``) with every DTensor replaced by this rank's shard, so
    that ``torch.load(weights_only=True)`` reads it back; :func:`reshard_optimizer` undoes it."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.to_local()
    if isinstance(state, dict):
        return {k: local_shards(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(local_shards(v) for v in state)
    return state


def _torch_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
    if inner is not None and inner is not optimizer:
        yield from _torch_optimizers(inner)
    elif isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
    else:  # dynalora.optim.LocalOptimizer: one per module, and one for the always-trained tensors
        for opt in [*getattr(optimizer, "optimizers", []), getattr(optimizer, "extra", None)]:
            if opt is not None:
                yield from _torch_optimizers(opt)


def reshard_optimizer(optimizer: Any) -> None:
    """After ``load_state_dict`` of a state written by :func:`local_shards`: the state of each sharded
    parameter becomes a DTensor again, laid out as its parameter."""
    from torch.distributed.tensor import DTensor

    for opt in _torch_optimizers(optimizer):
        for param, state in opt.state.items():
            if not isinstance(param, DTensor):
                continue
            local = param.to_local()
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == local.shape:
                    state[key] = DTensor.from_local(
                        value.to(local.device), param.device_mesh, param.placements, run_check=False,
                        shape=param.shape, stride=param.stride(),
                    )  # fmt: skip
