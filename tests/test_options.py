"""Every option does what it says or is refused; the cutoff allocator keeps its promises on any model."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynalora import DynamicAllocator, DynamicConfig
from dynalora.allocators import AllocationRequest, cutoff, seed_offset
from dynalora.config import ALLOCATORS, READ_BY
from dynalora.cost import CostModel
from tests.tiny import peft_bert

NON_DEFAULT = {"k": 3, "threshold": 0.5, "budget": 0.3, "budget_schedule": "linear", "coverage": 0.5}


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("field", sorted(NON_DEFAULT))
def test_a_field_the_allocator_does_not_read_is_refused_unless_at_its_default(allocator, field):
    value = NON_DEFAULT[field]
    if allocator in READ_BY[field]:
        assert getattr(DynamicConfig(allocator=allocator, **{field: value}), field) == value
    else:
        with pytest.raises(ValueError, match=f"{field}={value!r} is not read by allocator={allocator!r}"):
            DynamicConfig(allocator=allocator, **{field: value})
    DynamicConfig(allocator=allocator)  # every default is accepted by every allocator


def test_k_larger_than_the_model_is_refused_under_the_default():
    with pytest.raises(ValueError, match="k=99 is not read by allocator='cutoff'"):
        DynamicConfig(k=99)


def test_cutoff_with_schedule_once_is_refused():
    with pytest.raises(ValueError, match="schedule='once' is not supported with allocator='cutoff'"):
        DynamicConfig(schedule="once")


def test_a_preset_k_does_not_follow_it_to_an_allocator_that_ignores_k():
    config = DynamicConfig.from_preset("full", allocator="cutoff", memory_cap=0.6)
    assert config.k == DynamicConfig().k and config.memory_cap == 0.6 and config.state_policy == "reset"
    with pytest.raises(ValueError, match="memory_cap=0.6 with cap_mode='exclude' is read only by"):
        DynamicConfig.from_preset("full", memory_cap=0.6)  # discounted_stochastic cannot keep it by exclusion


# ----------------------------------------------------------------------------------- cutoff's promises
def _request(cost, importance, round_, budget, coverage=0.2, cap=None, offset=0.0):
    m = cost.blocks.numel()
    imp = torch.as_tensor(importance, dtype=torch.float64)
    imp = imp / imp.sum() if imp.sum() > 0 else torch.full((m,), 1.0 / m, dtype=torch.float64)
    return AllocationRequest(imp, 1, 0.9, torch.zeros(m, dtype=torch.int64), torch.Generator(), cost=cost,
                             budget=budget, memory_cap=cap, coverage=coverage, round=round_, offset=offset)  # fmt: skip


def _shares(layers: int) -> torch.Tensor:
    """The backward share of a cutoff at each block (what ``cutoff`` trades), from the cost model."""
    alloc = DynamicAllocator(peft_bert("lora", layers=layers), DynamicConfig(allocator="topk", k=1))
    return alloc.cost.above[torch.unique(alloc.cost.blocks)]


def test_round_0_trains_every_module_on_shallow_models():
    top = float(_shares(2)[-1])  # the least budget a 2-block model can spend: its top block, every step
    alloc = DynamicAllocator(peft_bert("lora", layers=2), DynamicConfig(budget=top))
    assert alloc.active_mask.all()
    assert alloc.history[0]["depth"] == 0


def test_a_budget_the_model_cannot_spend_is_said_and_held_to_what_it_can(caplog):
    # below the top block's share, or above what an exclusion cap leaves reachable, every step spent
    # something else than the budget, without a word
    import logging

    shares = _shares(4)
    top = float(shares[-1])
    assert 0.2 < top < 0.3  # four similar blocks
    reach = float(shares[shares <= 0.5 + 1e-9].max())  # the deepest cutoff within the cap
    with caplog.at_level(logging.WARNING, logger="dynalora.controller"):
        low = DynamicAllocator(peft_bert("lora", layers=4), DynamicConfig(budget=0.2, period=1, optimizer="global"))
        DynamicAllocator(peft_bert("lora", layers=4), DynamicConfig(budget=round(top + 0.001, 3)))
        high = DynamicConfig(budget=round(reach + 0.01, 3), memory_cap=0.5, period=1, optimizer="global")
        capped = DynamicAllocator(peft_bert("lora", layers=4), high)
        DynamicAllocator(peft_bert("lora", layers=4), DynamicConfig(budget=reach, memory_cap=0.5))
        DynamicAllocator(peft_bert("lora", layers=4), DynamicConfig(allocator="topk", k=2, memory_cap=0.5,
                                                                   cap_mode="recompute"))  # fmt: skip
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert said[0].startswith(f"budget=0.2 is below the backward share of the top block alone ({top:.3f}")
    assert said[1].startswith(f"budget={round(reach + 0.01, 3):g} is more than the backward share memory_cap=0.5")
    for alloc, spent in ((low, top), (capped, reach)):  # what the steps really spend, after round 0
        for _ in range(6):
            alloc.step()
        depths = [h["depth"] for h in alloc.history[1:]]
        assert [float(alloc.cost.above[d]) for d in depths] == pytest.approx([spent] * len(depths))


@pytest.mark.parametrize("config", [DynamicConfig(), DynamicConfig(allocator="topk", memory_cap=0.5,
                                                                  cap_mode="recompute")])  # fmt: skip
def test_budget_and_cap_are_refused_where_there_are_no_blocks_to_trade(config):
    """One block, or a model with no list of blocks: the cut could only train everything."""
    from peft import LoraConfig, get_peft_model

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    lora_mlp = get_peft_model(mlp, LoraConfig(r=2, target_modules=["0", "2"]))
    for model in (peft_bert("lora", layers=1), lora_mlp):
        with pytest.raises(ValueError, match="modules here lie in one block or none"):
            DynamicAllocator(model, config)
        DynamicAllocator(model, DynamicConfig(allocator="topk", k=1))  # an allocator that needs no blocks


def test_round_0_trains_every_module_with_layers_to_transform():
    from peft import LoraConfig, get_peft_model

    from tests.tiny import bert

    config = LoraConfig(r=4, target_modules=["query", "value"], layers_to_transform=[4, 5], task_type="SEQ_CLS")
    alloc = DynamicAllocator(get_peft_model(bert(layers=6), config), DynamicConfig(budget=0.2))
    assert alloc.active_mask.all() and len(alloc.modules) == 4


def test_the_seed_changes_the_cutoff_sequence_and_seed_0_keeps_it():
    assert seed_offset(0) == 0.0
    sequences = []
    for seed in (0, 1, 2):
        # no training: gradient importance stays zero (uniform), so only the seed's shift can differ
        alloc = DynamicAllocator(peft_bert("lora", layers=6), DynamicConfig(period=1, seed=seed, optimizer="global"))
        for _ in range(12):
            alloc.step()
        sequences.append([h["depth"] for h in alloc.history])
    assert sequences[0] != sequences[1] and sequences[1] != sequences[2]
    assert all(s[0] == 0 for s in sequences)  # round 0 trains everything whatever the seed


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    blocks=st.integers(1, 8),
    per_block=st.integers(1, 3),
    budget=st.floats(0.05, 1.0),
    coverage=st.floats(0.0, 1.0),
    seed=st.integers(0, 50),
    importance=st.lists(st.sampled_from([0.0, 0.0, 1.0, 1.0, 2.0, 5.0]), min_size=24, max_size=24),
    capped=st.booleans(),
)
def test_cutoff_properties(blocks, per_block, budget, coverage, seed, importance, capped):
    """Non-empty selections, no NaN, every module in round 0 (within the cap), the budget kept on average."""
    share = [1.0 / blocks] * blocks
    cost = CostModel([b for b in range(blocks) for _ in range(per_block)], share, [1] * (blocks * per_block))
    imp = importance[: blocks * per_block]
    cap = 0.5 if capped and blocks > 1 else None
    offset = seed_offset(seed)
    masks = [cutoff(_request(cost, imp, t, budget, coverage, cap, offset)) for t in range(200)]
    assert all(bool(m.any()) for m in masks)
    lowest = 0 if cap is None else min(b for b in range(blocks) if float(cost.above[b]) <= cap + 1e-9)
    assert torch.equal(masks[0], cost.blocks >= lowest)
    shares = [cost.backward_share(m) for m in masks[1:]]
    assert all(math.isfinite(s) for s in shares)
    top, ceiling = 1.0 / blocks, float(cost.above[lowest])
    # the budget is kept within 0.05 where it is reachable, between the top block alone and the cap
    reachable = min(max(budget, top), ceiling)
    assert sum(shares) / len(shares) == pytest.approx(reachable, abs=0.05)


def test_local_schedule_is_refused_under_the_global_optimizer_unless_at_its_default():
    with pytest.raises(ValueError, match="local_schedule='run' is read only with optimizer='local'"):
        DynamicConfig(optimizer="global", local_schedule="run")
    assert DynamicConfig(optimizer="global").local_schedule == "steps"  # the default: accepted, not read
    assert DynamicConfig(local_schedule="run").local_schedule == "run"


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"importance_ema": 0.8, "measure": "forward"}, "read only by measure='gradient'"),
        ({"importance_ema": 1.0}, "allowed: a number in (0, 1) or None"),
        ({"importance_ema": 0.0}, "allowed: a number in (0, 1) or None"),
        ({"normalize_types": True, "measure": "random"}, "not read by measure='random'"),
        ({"normalize_types": 1}, "allowed: True or False"),
    ],
)
def test_importance_options_refused_where_not_read(fields, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        DynamicConfig(**fields)
