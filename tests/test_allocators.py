"""Allocators as seeded functions of the scores (paper §3.2)."""

import pytest
import torch

from dynalora.allocators import ALLOCATORS, AllocationRequest, normalize, threshold_count
from dynalora.cost import CostModel


def request(importance, k=1, p=0.9, steps=None, seed=0):
    imp = normalize(torch.tensor(importance, dtype=torch.float64))
    steps = torch.zeros(len(importance), dtype=torch.int64) if steps is None else torch.tensor(steps)
    n = len(importance)
    cost = CostModel(range(n), [1 / n] * n, [1] * n)  # one module per block, for the cost-aware allocator
    return AllocationRequest(imp, k, p, steps, torch.Generator().manual_seed(seed), cost=cost, round=3)


def chosen(mask):
    return mask.nonzero().flatten().tolist()


def test_normalize_is_eq2_and_uniform_when_nothing_measured():
    assert normalize(torch.tensor([1.0, 3.0])).tolist() == [0.25, 0.75]
    assert normalize(torch.zeros(4)).tolist() == [0.25] * 4


def test_topk_picks_largest_and_breaks_ties_by_module_order():
    assert chosen(ALLOCATORS["topk"](request([1, 5, 3, 5, 2], k=2))) == [1, 3]
    assert chosen(ALLOCATORS["topk"](request([2, 2, 2, 2], k=3))) == [0, 1, 2]


@pytest.mark.parametrize(
    ("scores", "p", "expected"),
    [
        ([5, 3, 2], 0.5, 1),  # 0.5 reached exactly by the first module
        ([5, 3, 2], 0.51, 2),  # crosses p at the second: it is included
        ([5, 3, 2], 0.8, 2),
        ([5, 3, 2], 0.81, 3),
        ([5, 3, 2], 1.0, 3),
        ([1, 1, 1], 1.0, 3),  # 1/3 * 3 may round below 1.0; still everything, never more
        ([100, 1e-9, 1e-9], 1e-6, 1),  # never empty
    ],
)
def test_threshold_includes_the_crossing_module(scores, p, expected):
    mask = ALLOCATORS["threshold"](request(scores, p=p))
    assert int(mask.sum()) == expected
    assert threshold_count(normalize(torch.tensor(scores, dtype=torch.float64)), p) == expected
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    assert chosen(mask) == sorted(order[:expected])


def test_stochastic_frequencies_follow_importance():
    imp = [1.0, 2.0, 7.0]
    counts = torch.zeros(3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4000):
        req = AllocationRequest(
            normalize(torch.tensor(imp, dtype=torch.float64)), 1, 0.9, torch.zeros(3, dtype=torch.int64), gen
        )
        counts += ALLOCATORS["stochastic"](req).float()
    freq = counts / counts.sum()
    assert freq.tolist() == pytest.approx([0.1, 0.2, 0.7], abs=0.025)


def test_discounted_stochastic_divides_by_steps_plus_one():
    # equal importance, C = (0, 3): weights 1 : 1/4 -> probabilities 0.8 : 0.2
    counts = torch.zeros(2)
    gen = torch.Generator().manual_seed(1)
    steps = torch.tensor([0, 3])
    for _ in range(4000):
        req = AllocationRequest(torch.tensor([0.5, 0.5], dtype=torch.float64), 1, 0.9, steps, gen)
        counts += ALLOCATORS["discounted_stochastic"](req).float()
    assert (counts / counts.sum()).tolist() == pytest.approx([0.8, 0.2], abs=0.025)


@pytest.mark.parametrize("name", ["stochastic", "discounted_stochastic", "random"])
def test_sampling_allocators_return_k_distinct_modules(name):
    for seed in range(20):
        mask = ALLOCATORS[name](request([3, 1, 4, 1, 5, 9, 2, 6], k=5, seed=seed))
        assert mask.dtype == torch.bool and int(mask.sum()) == 5


def test_zero_importance_modules_fill_only_when_too_few_are_positive():
    for seed in range(20):
        mask = ALLOCATORS["stochastic"](request([0, 4, 0, 0, 1], k=3, seed=seed))
        assert mask[1] and mask[4] and int(mask.sum()) == 3


def test_random_is_uniform():
    counts = torch.zeros(4)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4000):
        req = AllocationRequest(
            torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64),
            1,
            0.9,
            torch.zeros(4, dtype=torch.int64),
            gen,
        )
        counts += ALLOCATORS["random"](req).float()
    assert (counts / counts.sum()).tolist() == pytest.approx([0.25] * 4, abs=0.03)


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_same_seed_same_choice(name):
    a = ALLOCATORS[name](request([3, 1, 4, 1, 5, 9, 2, 6], k=3, steps=[1, 2, 3, 4, 5, 6, 7, 8], seed=7))
    b = ALLOCATORS[name](request([3, 1, 4, 1, 5, 9, 2, 6], k=3, steps=[1, 2, 3, 4, 5, 6, 7, 8], seed=7))
    assert torch.equal(a, b)
