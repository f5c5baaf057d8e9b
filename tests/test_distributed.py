"""Under torch.distributed every rank picks the same modules, though each sees other data."""

import faulthandler
import gc
import json
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dynalora import DynamicAllocator, DynamicConfig, distributed
from tests import tiny


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(fn, *args, timeout: float = 180.0) -> None:
    """``fn(rank, *args)`` on two ranks (see :func:`_in_group`), with a deadline: a rank that dies
    must fail the test, never hang the suite."""
    ctx = mp.start_processes(_in_group, args=(2, _free_port(), fn, *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
            raise TimeoutError(f"distributed workers did not finish within {timeout:.0f} s")


def _in_group(rank: int, world: int, port: int, body, *args) -> None:
    """Run ``body(rank, *args)`` inside a gloo group of ``world`` ranks, then leave the group safely.

    One thread per rank (two ranks share 2 cores), and a stack dump and exit if the rank hangs.

    Teardown order matters. A DDP wrapper's C++ ``Reducer`` holds the process group, and pybind
    frees the Reducer with the GIL held. If it drops the last reference, ``~ProcessGroupGloo``
    joins gloo's worker threads under the GIL, while a worker that is still freeing a finished
    broadcast waits for the GIL to release the tensors' Python objects: a deadlock (stack in the
    closing note of issue 10). So the body runs in its own frame, its locals (the wrapper among
    them) are gone when it returns, and the group is destroyed last, by
    ``destroy_process_group``, whose holder releases the GIL.
    """
    faulthandler.dump_traceback_later(90, exit=True)  # a hung rank shows where it hangs, then exits
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        body(rank, *args)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the traceback would keep the body's wrapper alive
        raise
    finally:
        gc.collect()
        leaked = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        dist.destroy_process_group()
        assert not leaked, "a DistributedDataParallel wrapper outlived its worker: it can deadlock teardown"


def _worker(rank: int, out: str) -> None:
    """Both runs in one group (one spawn): synchronised, then as the authors' code did it."""
    for synced in (True, False):
        model = tiny.peft_bert()
        alloc = DynamicAllocator(model, DynamicConfig(k=2, period=2, measure="forward", allocator="topk"))
        if not synced:  # every rank decides alone
            distributed._active = lambda: False
        opt = alloc.create_optimizer(torch.optim.SGD, lr=0.0)
        tiny.train(model, alloc, opt, None, tiny.batches(6, seed=100 + rank))  # each rank its own shard
        with open(f"{out}.{synced}.{rank}", "w") as f:
            json.dump({"active": [h["active"] for h in alloc.history], "scores": alloc.history[-1]["scores"]}, f)


@pytest.fixture(scope="module")
def selections(tmp_path_factory) -> dict[bool, list[dict]]:
    out = str(tmp_path_factory.mktemp("select") / "rank")
    _spawn(_worker, out)
    return {synced: [json.load(open(f"{out}.{synced}.{r}")) for r in range(2)] for synced in (True, False)}


def test_every_rank_selects_the_same_modules(selections):
    r0, r1 = selections[True]
    assert r0["active"] == r1["active"]
    assert r0["scores"] == r1["scores"]  # averaged over ranks


def test_without_sync_ranks_would_disagree(selections):
    """Guards the test above: with these shards, unsynchronised ranks do choose differently."""
    r0, r1 = selections[False]
    assert r0["scores"] != r1["scores"]
    assert r0["active"] != r1["active"]


def _ddp_worker(rank: int, out: str, defer: bool) -> None:
    model = tiny.peft_bert()
    if not defer:  # freeze before wrapping, as an allocator built without the process group would
        real = distributed.is_distributed
        distributed.is_distributed = lambda: False
    alloc = DynamicAllocator(model, DynamicConfig(k=1, period=2, measure="forward", allocator="random", seed=3))
    if not defer:
        distributed.is_distributed = real
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    for batch in tiny.batches(8, seed=200 + rank):  # each rank its own shard
        ddp(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        alloc.step()
    torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{out}.{rank}")
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(alloc.active_steps, f)


def _ddp_run(tmp_path, defer: bool):
    out = str(tmp_path / "ddp")
    _spawn(_ddp_worker, out, defer)
    weights = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    steps = json.loads(Path(f"{out}.0.json").read_text())
    return weights, steps


def test_ddp_keeps_ranks_identical_when_frozen_modules_are_activated(tmp_path):
    (w0, w1), steps = _ddp_run(tmp_path, defer=True)
    assert sum(1 for c in steps.values() if c > 0) > 1  # modules frozen at the start did train later
    assert all(torch.equal(w0[n], w1[n]) for n in w0)


def test_ddp_diverges_if_modules_are_frozen_before_wrapping(tmp_path):
    """Guards the test above: DDP never syncs what was frozen when it wrapped the model."""
    (w0, w1), _ = _ddp_run(tmp_path, defer=False)
    assert any(not torch.equal(w0[n], w1[n]) for n in w0)


def _still_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny.peft_bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):  # two halves of a batch must see what the whole batch does
            m.p = 0.0
    return model


def _train_halves(model, rank: int, world: int, optimizer: str, ddp: bool = False) -> DynamicAllocator:
    config = DynamicConfig(k=2, period=2, measure="gradient", allocator="topk", optimizer=optimizer)
    alloc = DynamicAllocator(model, config)
    wrapped = DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    for batch in tiny.batches(6, seed=100, batch=4):
        wrapped(**{k: v.chunk(world)[rank] for k, v in batch.items()}).loss.backward()
        opt.step()
        opt.zero_grad()
        alloc.step()
    return alloc


def _scores(alloc: DynamicAllocator) -> list[dict[str, float]]:
    return [h["scores"] for h in alloc.history if h["scores"]]


def _fsdp_worker(rank: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    for optimizer in ("global", "local"):  # both in one group (one spawn)
        model = _still_bert()
        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)  # before the allocator: fully_shard replaces every parameter with a sharded one
        alloc = _train_halves(model, rank, 2, optimizer)
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}  # a collective: every rank
        if rank == 0:
            torch.save({"weights": full, "active": [h["active"] for h in alloc.history], "scores": _scores(alloc)},
                       f"{out}.{optimizer}")  # fmt: skip
    # DDP on the same halves, in the same group: gradient importance of the averaged gradient
    alloc = _train_halves(_still_bert(), rank, 2, "global", ddp=True)
    torch.save({"active": [h["active"] for h in alloc.history], "scores": _scores(alloc)}, f"{out}.ddp.{rank}")
    del alloc
    _checkpointed_ddp(rank, out)


def _checkpointed_ddp(rank: int, out: str) -> None:
    """DDP over a model with activation checkpointing: backward calls per block, below and above the cut."""
    model = tiny.peft_bert(layers=4)
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    alloc = DynamicAllocator(model, DynamicConfig(allocator="random", k=2, measure="random", period=1, seed=5))
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    calls = [0] * 4
    for i, layer in enumerate(model.get_base_model().bert.encoder.layer):
        layer.intermediate.register_full_backward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    records = []
    for batch in tiny.batches(8, seed=300 + rank):
        calls[:] = [0] * 4
        cut = alloc.cut
        ddp(**batch).loss.backward()
        records.append((cut, list(calls)))
        opt.step()
        opt.zero_grad()
        alloc.step()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    torch.save({"records": records, "weights": weights}, f"{out}.ckpt-ddp.{rank}")
    del ddp


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("fsdp") / "fsdp.pt")
    _spawn(_fsdp_worker, out)
    return out


def test_ddp_with_checkpointing_keeps_backward_out_of_blocks_below_the_cut(sharded_runs):
    runs = [torch.load(f"{sharded_runs}.ckpt-ddp.{r}", weights_only=True) for r in range(2)]
    assert runs[0]["records"] == runs[1]["records"]
    cuts = {cut for cut, _ in runs[0]["records"]}
    assert len(cuts) >= 2 and max(cuts) > 0
    for cut, calls in runs[0]["records"]:
        assert calls == [0] * cut + [1] * (4 - cut), (cut, calls)
    for name, w in runs[0]["weights"].items():
        assert torch.equal(w, runs[1]["weights"][name]), name  # DDP kept the ranks identical


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_gradient_importance_is_the_same_on_one_and_two_processes(sharded_runs, engine):
    """Scores are norms of the gradient the optimizer sees (averaged over processes; for FSDP2 the
    shards' squares summed), so two processes on halves of a batch score as one on the whole."""
    runs = [torch.load(f"{sharded_runs}.ddp.{r}", weights_only=True) for r in range(2)] if engine == "ddp" else [
        torch.load(f"{sharded_runs}.global", weights_only=True)]  # fmt: skip
    alloc = _train_halves(_still_bert(), 0, 1, "global")
    single = _scores(alloc)
    assert len(single) >= 2
    for run in runs:
        assert run["active"] == [h["active"] for h in alloc.history]
        assert len(run["scores"]) == len(single)
        for got, want in zip(run["scores"], single, strict=True):
            assert got.keys() == want.keys()
            for name in want:
                assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("optimizer", ["global", "local"])
def test_fsdp2_trains_as_one_process_across_reallocations(sharded_runs, optimizer):
    """fully_shard (FSDP2) on gloo: frozen and unfrozen modules change under sharding, and the run
    ends where one process with the whole batch ends."""
    sharded = torch.load(f"{sharded_runs}.{optimizer}", weights_only=True)
    model = _still_bert()
    alloc = _train_halves(model, 0, 1, optimizer)
    assert sharded["active"] == [h["active"] for h in alloc.history]
    assert len({tuple(a) for a in sharded["active"]}) > 1  # it did reallocate
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded["weights"][name], p.detach(), rtol=1e-4, atol=1e-5)
