"""Cost model of a selection and the cost-aware ``cutoff`` allocator, on tiny models."""

import math
import statistics

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from dynalora import DynamicAllocator, DynamicConfig, find_adapter_modules, find_linear_modules
from dynalora.allocators import AllocationRequest, cutoff, lowest_allowed, training_profile
from dynalora.cost import CostModel, module_blocks
from dynalora.metering import SavedActivations
from tests.tiny import VOCAB, batches, bert, peft_bert

SIXTH = [1 / 6] * 6


def _llama(layers=3):
    torch.manual_seed(0)
    return LlamaForSequenceClassification(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, num_labels=2)
    )  # fmt: skip


def _gpt2(layers=3):
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=64, pad_token_id=0,
                   bos_token_id=0, eos_token_id=0, num_labels=2)
    )  # fmt: skip


def _roberta(layers=3):
    torch.manual_seed(0)
    return RobertaForSequenceClassification(
        RobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, max_position_embeddings=70, num_labels=2)
    )  # fmt: skip


# ----------------------------------------------------------------------------- blocks from the module tree
@pytest.mark.parametrize(
    ("build", "targets"),
    [
        (lambda: bert(layers=3), ["query", "value"]),
        (_roberta, ["query", "value"]),
        (_llama, ["q_proj", "v_proj", "down_proj"]),
        (_gpt2, ["c_attn", "c_fc"]),  # GPT-2's block layers are Conv1D, and its blocks are transformer.h
    ],
)
def test_block_of_each_module_comes_from_the_module_tree(build, targets):
    model = get_peft_model(build(), LoraConfig(r=2, target_modules=targets, task_type="SEQ_CLS"))
    modules = find_adapter_modules(model)
    blocks, share = module_blocks(model, modules)
    # expected independently: the first integer in the dotted name is the block index in every family
    expected = [int(next(part for part in m.name.split(".") if part.isdigit())) for m in modules]
    assert blocks == expected and sorted(set(blocks)) == [0, 1, 2]
    assert share == pytest.approx([1 / 3] * 3)  # identical blocks


def test_gpt2_conv1d_layers_are_found_for_dynamic_full_fine_tuning():
    model = _gpt2(layers=2)
    names = [m.name for m in find_linear_modules(model)]
    assert names == [f"transformer.h.{b}.{n}" for b in range(2) for n in ("attn.c_attn", "attn.c_proj",
                                                                           "mlp.c_fc", "mlp.c_proj")]  # fmt: skip
    blocks, _ = module_blocks(model, find_linear_modules(model))
    assert blocks == [0] * 4 + [1] * 4


def test_a_module_after_the_blocks_counts_as_the_top_block():
    model = bert(layers=2)
    modules = find_linear_modules(model, ["query", "pooler.dense"])
    blocks, _ = module_blocks(model, modules)
    assert [m.name for m in modules][-1] == "bert.pooler.dense" and blocks == [0, 1, 1]


# ----------------------------------------------------------------------------- the cost model
def test_cost_model_predictions_match_the_formula():
    cost = CostModel(blocks=[0, 0, 1, 2, 3], block_share=[0.1, 0.2, 0.3, 0.4], module_bytes=[8, 8, 4, 4, 2],
                     fixed_share=0.5)  # fmt: skip
    mask = torch.tensor([False, False, True, False, True])
    got = cost.estimate(mask)
    assert got.depth == 1
    assert got.backward_share == pytest.approx(0.9)  # blocks 1..3
    assert got.step_ratio == pytest.approx(0.5 + 0.5 * 0.9)
    assert got.gradient_bytes == 6 and got.optimizer_bytes == 12
    assert cost.estimate(torch.zeros(5, dtype=torch.bool)).backward_share == 0.0
    assert cost.estimate(torch.tensor([True, False, False, False, False])).step_ratio == pytest.approx(1.0)


def _hooked_blocks(model):
    """Forward hooks that record, per block, whether its output is part of the autograd graph."""
    graph = {}
    blocks = model.base_model.model.bert.encoder.layer
    handles = [
        block.register_forward_hook(lambda mod, args, out, i=i: graph.__setitem__(i, out[0].grad_fn is not None))
        for i, block in enumerate(blocks)
    ]
    return graph, handles


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_backward_stops_at_the_cutoff(depth):
    model = peft_bert("lora", layers=3)
    modules = find_adapter_modules(model)
    blocks, _ = module_blocks(model, modules)
    allocator = DynamicAllocator(model, DynamicConfig(allocator="cutoff"))
    allocator.set_active([m.name for m, b in zip(modules, blocks, strict=True) if b >= depth])
    graph, handles = _hooked_blocks(model)
    loss = model(**batches(1)[0]).loss
    loss.backward()
    for h in handles:
        h.remove()
    assert graph == {b: b >= depth for b in range(3)}  # no autograd node below the cutoff
    for module, block in zip(modules, blocks, strict=True):
        assert all((p.grad is not None) == (block >= depth) for p in module.params)
    base = dict(model.named_parameters())
    assert all(p.grad is None for n, p in base.items() if "lora_" not in n and "classifier" not in n)


def _counted_bytes(model, mask, modules):
    for module, on in zip(modules, mask.tolist(), strict=True):
        for p in module.params:
            p.requires_grad_(on)
            p.grad = None
    with SavedActivations(exclude=list(model.parameters()) + list(model.buffers())) as saved:
        loss = model(**batches(1, batch=8, length=16)[0]).loss
    loss.backward()
    return saved.bytes + sum(p.grad.numel() * p.grad.element_size() for m in modules for p in m.params
                             if p.grad is not None)  # fmt: skip


def test_cost_model_ranks_selections_as_counted_bytes_do():
    model = peft_bert("lora", layers=4)
    modules = find_adapter_modules(model)
    cost = CostModel.from_model(model, modules)
    blocks = cost.blocks
    selections = {  # one per depth, with few or many modules above it
        "all": blocks >= 0,
        "query of block 0 only": torch.tensor([True] + [False] * (len(modules) - 1)),
        "blocks 1-3": blocks >= 1,
        "value of block 2 only": (blocks == 2) & torch.tensor(["value" in m.name for m in modules]),
        "block 3": blocks >= 3,
    }
    predicted = {name: cost.backward_share(mask) for name, mask in selections.items()}
    counted = {name: _counted_bytes(model, mask, modules) for name, mask in selections.items()}
    by_depth = sorted(selections, key=lambda n: cost.depth(selections[n]))
    # deeper cutoff: strictly fewer counted bytes, and a strictly smaller predicted share
    for a, b in zip(by_depth, by_depth[1:], strict=False):
        if cost.depth(selections[a]) < cost.depth(selections[b]):
            assert counted[a] > counted[b] and predicted[a] > predicted[b], (a, b, counted)
    assert predicted["all"] == pytest.approx(1.0) and predicted["block 3"] == pytest.approx(0.25)


# ----------------------------------------------------------------------------- the training profile
def test_profile_with_uniform_importance_splits_the_budget_evenly_below_the_top():
    p = training_profile(torch.ones(6), torch.tensor(SIXTH), budget=0.6, coverage=0.2)
    # top block always; the other five share 0.6 - 1/6 of backward share, 1/6 each: (0.6 - 1/6) * 6 / 5
    assert p.tolist() == pytest.approx([0.52] * 5 + [1.0])


def test_profile_follows_importance_with_a_coverage_floor():
    p = training_profile(torch.tensor([1.0, 2, 3, 4, 5, 6]), torch.tensor(SIXTH), budget=0.6, coverage=0.2)
    # p = clamp(a * [1..5], 0.2, 1): block 0 at the floor, 0.2 + 14a = 5 * 0.52 = 2.6  =>  a = 2.4 / 14
    a = 2.4 / 14
    assert p.tolist() == pytest.approx([0.2, 2 * a, 3 * a, 4 * a, 5 * a, 1.0])


def test_blocks_above_an_important_block_train_at_least_as_often():
    p = training_profile(torch.tensor([6.0, 1, 1, 1, 1, 1]), torch.tensor(SIXTH), budget=0.6, coverage=0.2)
    assert p.tolist() == pytest.approx([0.52] * 5 + [1.0])  # running maximum: 6 everywhere


def test_profile_when_the_budget_cannot_pay_the_floor_or_pays_everything():
    low = training_profile(torch.tensor([1.0, 9, 1, 1, 1, 1]), torch.tensor(SIXTH), budget=0.3, coverage=0.2)
    assert low.tolist() == pytest.approx([0.16] * 5 + [1.0])  # (0.3 - 1/6) * 6 / 5
    assert training_profile(torch.ones(6), torch.tensor(SIXTH), budget=1.0, coverage=0.2).tolist() == [1.0] * 6
    top = training_profile(torch.ones(6), torch.tensor(SIXTH), budget=1 / 6, coverage=0.2)
    assert top.tolist() == [0.0] * 5 + [1.0]


def test_memory_cap_keeps_blocks_below_it_out():
    share = torch.tensor(SIXTH, dtype=torch.float64)
    depth_share = torch.tensor([1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6], dtype=torch.float64)
    assert lowest_allowed(depth_share, 0.5) == 3 and lowest_allowed(depth_share, None) == 0
    with pytest.raises(ValueError, match="memory_cap=0.1 is below"):
        lowest_allowed(depth_share, 0.1)
    p = training_profile(torch.ones(6), share, budget=0.45, coverage=0.2, lowest=3)
    assert p[:3].tolist() == [0.0] * 3 and p[5] == 1.0
    assert float((share * p).sum()) == pytest.approx(0.45)


@pytest.mark.parametrize("seed", range(5))
def test_profile_never_decreases_upwards_and_spends_the_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    share = torch.rand(8, generator=gen, dtype=torch.float64) + 0.1
    share /= share.sum()
    importance = torch.rand(8, generator=gen, dtype=torch.float64)
    budget = float(share[-1]) + 0.5 * float(1 - share[-1])
    p = training_profile(importance, share, budget, coverage=0.1)
    assert torch.all(p[1:] >= p[:-1]) and p[-1] == 1.0 and torch.all(p[:-1] >= 0.1 - 1e-12)
    assert float((share * p).sum()) == pytest.approx(budget)


# ----------------------------------------------------------------------------- the cutoff allocator
def _request(cost, importance, round_, budget=0.6, cap=None, coverage=0.2):
    m = cost.blocks.numel()
    imp = torch.as_tensor(importance, dtype=torch.float64)
    return AllocationRequest(imp / imp.sum(), 1, 0.9, torch.zeros(m, dtype=torch.int64), torch.Generator(),
                             cost=cost, budget=budget, memory_cap=cap, coverage=coverage, round=round_)  # fmt: skip


def test_cutoff_draws_depths_from_the_golden_ratio_sequence():
    cost = CostModel([b for b in range(6) for _ in range(2)], SIXTH, [1] * 12)
    depths = [cost.depth(cutoff(_request(cost, [1.0] * 12, t))) for t in range(8)]
    # profile [0.52] * 5 + [1]: depth 0 when u_t = frac(t * 0.618...) < 0.52, else 5
    golden = (math.sqrt(5) - 1) / 2
    assert depths == [0 if (t * golden) % 1 < 0.52 else 5 for t in range(8)]
    assert depths[0] == 0  # the first selection trains everything


def test_cutoff_frequencies_and_spend_follow_the_profile_over_a_run():
    cost = CostModel([b for b in range(6) for _ in range(2)], SIXTH, [1] * 12)
    importance = [1.0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    masks = [cutoff(_request(cost, importance, t)) for t in range(200)]
    trained = torch.stack([torch.stack([m[2 * b] for b in range(6)]) for m in masks]).double().mean(0)
    expected = training_profile(torch.tensor([1.0, 2, 3, 4, 5, 6]), torch.tensor(SIXTH), 0.6, 0.2)
    assert trained.tolist() == pytest.approx(expected.tolist(), abs=0.02)  # low discrepancy: close in 200 rounds
    assert sum(cost.backward_share(m) for m in masks) / 200 == pytest.approx(0.6, abs=0.01)
    for m in masks:  # everything at or above the cutoff, nothing below
        depth = cost.depth(m)
        assert torch.equal(m, cost.blocks >= depth)


def test_cutoff_with_modules_in_some_blocks_only_never_selects_nothing():
    cost = CostModel([0, 0, 2, 2], [0.25] * 4, [1] * 4)  # blocks 1 and 3 hold no module
    for t in range(20):
        mask = cutoff(_request(cost, [1.0] * 4, t, budget=0.6))
        assert mask[2] and mask[3]  # the highest block with modules always trains
    # a cutoff at block 2 costs blocks 2-3 (0.5), at block 0 everything: P(depth 0) = (0.6 - 0.5) / 0.5
    depths = [cost.depth(cutoff(_request(cost, [1.0] * 4, t, budget=0.6))) for t in range(500)]
    assert depths.count(0) / 500 == pytest.approx(0.2, abs=0.01)


def test_cutoff_under_a_memory_cap_never_goes_below_it():
    cost = CostModel([b for b in range(6) for _ in range(2)], SIXTH, [1] * 12)
    depths = {cost.depth(cutoff(_request(cost, [1.0] * 12, t, budget=0.4, cap=0.5))) for t in range(50)}
    assert min(depths) == 3 and 5 in depths


# ----------------------------------------------------------------------------- through DynamicAllocator
def test_allocator_with_cutoff_starts_with_everything_and_records_the_cost():
    model = peft_bert("lora", layers=3)
    allocator = DynamicAllocator(model, DynamicConfig(allocator="cutoff", budget=0.5, period=1, optimizer="global"))
    assert allocator.active_mask.all()
    first = allocator.history[0]
    assert first["depth"] == 0 and first["backward_share"] == pytest.approx(1.0)
    allocator.step()  # round 1: u = 0.618; uniform scores: profile [0.25, 0.25, 1] -> depth 2
    assert allocator.history[-1]["depth"] == 2
    assert allocator.active == {m for m in allocator.module_names if ".2." in m}


def test_memory_cap_below_the_top_block_is_refused_at_construction():
    with pytest.raises(ValueError, match="memory_cap=0.2 is below the share of the top block"):
        DynamicAllocator(peft_bert("lora", layers=3), DynamicConfig(allocator="cutoff", memory_cap=0.2))


@pytest.mark.parametrize(("field", "value"), [("budget", 0.0), ("budget", 1.5), ("memory_cap", 0.0),
                                              ("coverage", -0.1), ("coverage", 1.2)])  # fmt: skip
def test_bad_cost_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r} is out of range"):
        DynamicConfig(**{field: value})


def test_cutoff_sequence_continues_exactly_after_load_state_dict():
    config = DynamicConfig(allocator="cutoff", budget=0.5, period=1, measure="random", optimizer="global")
    a = DynamicAllocator(peft_bert("lora", layers=3), config)
    for _ in range(3):
        a.step()
    b = DynamicAllocator(peft_bert("lora", layers=3), config)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        a.step()
        b.step()
        assert a.active == b.active and a.history[-1]["depth"] == b.history[-1]["depth"]
    assert len({h["depth"] for h in a.history}) > 1  # the sequence moved: the check was not vacuous


def test_paced_budget_decays_with_the_run_and_keeps_its_mean():
    from dynalora.allocators import paced_budget

    values = [paced_budget(0.5, 1 / 6, (i + 0.5) / 1000) for i in range(1000)]
    assert statistics.mean(values) == pytest.approx(0.5, abs=1e-3)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False)) and values[-1] == pytest.approx(1 / 6)
    # unclamped at the top (c < 1), the mean of max(c (1 - t), f) is c/2 + f^2/(2c) = 1/2: c^2 - c + f^2 = 0
    f = 1 / 6
    c = (1 + math.sqrt(1 - 4 * f * f)) / 2
    assert paced_budget(0.5, f, 0.0) == pytest.approx(c, abs=1e-3)
    assert paced_budget(0.5, f, 0.5) == pytest.approx(c / 2, abs=1e-3)
    assert paced_budget(1.0, 1 / 6, 0.7) == 1.0  # everything, every step: nothing to pace


def test_linear_budget_schedule_trains_deep_early_and_shallow_late():
    config = DynamicConfig(
        allocator="cutoff", budget=0.5, period=1, measure="random", budget_schedule="linear", optimizer="global"
    )
    model = peft_bert("lora", layers=3)
    allocator = DynamicAllocator(model, config)
    allocator.set_total_steps(200)
    for _ in range(199):
        allocator.step()
    depths = [h["depth"] for h in allocator.history]
    early, late = depths[1:60], depths[140:]
    assert statistics.mean(early) < statistics.mean(late)
    assert late.count(2) / len(late) > 0.9  # little budget is left: mostly the top block only
    shares = [h["backward_share"] for h in allocator.history[1:]]
    assert statistics.mean(shares) == pytest.approx(0.5, abs=0.05)


def test_linear_budget_schedule_without_the_runs_length_is_refused():
    config = DynamicConfig(
        allocator="cutoff", budget=0.5, period=1, measure="random", budget_schedule="linear", optimizer="global"
    )
    allocator = DynamicAllocator(peft_bert("lora", layers=3), config)
    with pytest.raises(ValueError, match="budget_schedule='linear' paces the budget over the run"):
        allocator.step()  # the first reallocation needs the length (it used to warn and spend evenly)
