"""Under torch.distributed every rank picks the same modules, though each sees other data."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynalora import DynamicAllocator, DynamicConfig
from tests import tiny


def _worker(rank: int, world: int, port: int, out: str, synced: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny.peft_bert()
        alloc = DynamicAllocator(model, DynamicConfig(k=2, period=2, measure="forward", allocator="topk"))
        if not synced:  # what the authors' code did: every rank decides alone
            from dynalora import distributed

            distributed._active = lambda: False
        opt = alloc.create_optimizer(torch.optim.SGD, lr=0.0)
        tiny.train(model, alloc, opt, None, tiny.batches(6, seed=100 + rank))  # each rank its own shard
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"active": [h["active"] for h in alloc.history], "scores": alloc.history[-1]["scores"]}, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, synced: bool, port: int):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, port, out, synced), nprocs=2, join=True)
    return [json.load(open(f"{out}.{r}")) for r in range(2)]


def test_every_rank_selects_the_same_modules(tmp_path):
    r0, r1 = _run(tmp_path, synced=True, port=29517)
    assert r0["active"] == r1["active"]
    assert r0["scores"] == r1["scores"]  # averaged over ranks


def test_without_sync_ranks_would_disagree(tmp_path):
    """Guards the test above: with these shards, unsynchronised ranks do choose differently."""
    r0, r1 = _run(tmp_path, synced=False, port=29518)
    assert r0["scores"] != r1["scores"]
    assert r0["active"] != r1["active"]
