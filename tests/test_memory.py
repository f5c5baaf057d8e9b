"""Exact tests for dynalora.metering: every expected number is worked out by hand below."""

from __future__ import annotations

import gc
import logging
import mmap
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from dynalora import metering as memory
from dynalora.metering import (
    PeakMemory,
    SavedActivations,
    gradient_bytes,
    optimizer_state_bytes,
    parameter_bytes,
    step_memory_breakdown,
    tensor_bytes,
    weight_bytes,
)

F32 = 4  # bytes per float32 element
# Linear(8, 16) + Linear(16, 4), float32: weights 8*16 and 16*4, biases 16 and 4.
MLP_PARAM_BYTES = F32 * (8 * 16 + 16 + 16 * 4 + 4)  # 848
FIRST_LINEAR_BYTES = F32 * (8 * 16 + 16)  # 576
SECOND_LINEAR_BYTES = F32 * (16 * 4 + 4)  # 272
BATCH = 5
X_BYTES = F32 * BATCH * 8  # 160: the input, (5, 8)
HIDDEN_BYTES = F32 * BATCH * 16  # 320: the ReLU output, (5, 16)
STEP_BYTES = 4  # torch.optim.Adam/AdamW keep `step` as a 0-dim float32 tensor per parameter


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _x() -> torch.Tensor:
    return torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(1))


def test_tensor_bytes_counts_elements_not_storage() -> None:
    t = torch.zeros(3, 5, dtype=torch.float16)
    assert tensor_bytes(t) == 3 * 5 * 2
    assert tensor_bytes(t[:1]) == 5 * 2


def test_parameter_bytes_hand_computed() -> None:
    assert parameter_bytes(_mlp()) == MLP_PARAM_BYTES == 848


def test_parameter_bytes_counts_tied_weights_once() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    assert parameter_bytes(model) == 2 * F32 * 16
    model[1].weight = model[0].weight
    assert parameter_bytes(model) == F32 * 16


def test_gradient_bytes_after_backward_equals_parameter_bytes() -> None:
    model = _mlp()
    assert gradient_bytes(model) == 0  # no backward yet: every grad is None
    model(_x()).sum().backward()
    assert gradient_bytes(model) == MLP_PARAM_BYTES
    assert gradient_bytes(list(model.parameters())) == MLP_PARAM_BYTES


def test_gradient_bytes_skips_frozen_parameters() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    model(_x()).sum().backward()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert gradient_bytes(model) == SECOND_LINEAR_BYTES == 272


def test_adamw_state_is_two_moments_plus_step_tensors() -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    assert optimizer_state_bytes(opt) == 0  # state is created lazily by the first step
    model(_x()).sum().backward()
    opt.step()
    steps = [state["step"] for state in opt.state.values()]
    # Verified for torch 2.13: one 0-dim float32 `step` tensor per parameter.
    assert all(s.dtype == torch.float32 and s.dim() == 0 for s in steps)
    # exp_avg + exp_avg_sq (one param-sized tensor each) + 4 step tensors of 4 bytes.
    assert optimizer_state_bytes(opt) == 2 * MLP_PARAM_BYTES + 4 * STEP_BYTES == 1712


def test_sgd_momentum_state() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(_x()).sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == MLP_PARAM_BYTES  # one momentum_buffer per parameter


def test_optimizer_container_sums_its_optimizers() -> None:
    class LocalOptimizer:
        def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
            self.optimizers = optimizers

    model = _mlp()
    opt1 = torch.optim.AdamW(model[0].parameters())
    opt2 = torch.optim.AdamW(model[2].parameters())
    model(_x()).sum().backward()
    opt1.step()
    opt2.step()
    assert optimizer_state_bytes(opt1) == 2 * FIRST_LINEAR_BYTES + 2 * STEP_BYTES  # 1160
    assert optimizer_state_bytes(opt2) == 2 * SECOND_LINEAR_BYTES + 2 * STEP_BYTES  # 552
    assert optimizer_state_bytes(LocalOptimizer([opt1, opt2])) == 1160 + 552


def test_the_local_optimizers_own_tensors_outside_the_modules_are_counted() -> None:
    # LocalOptimizer keeps the always-trained tensors (a classifier head) in an optimizer of their own,
    # `extra`, which the count left out
    from dynalora.optim import LocalOptimizer

    model = _mlp()
    local = LocalOptimizer([list(model[0].parameters())], list(model[2].parameters()), lambda: torch.tensor([True]),
                           torch.optim.AdamW)  # fmt: skip
    model(_x()).sum().backward()
    local.step()
    assert (
        optimizer_state_bytes(local)
        == 2 * FIRST_LINEAR_BYTES + 2 * STEP_BYTES + 2 * SECOND_LINEAR_BYTES + 2 * STEP_BYTES
    )


def test_optimizer_state_bytes_by_device() -> None:
    """State moved off the model's device (``offload``) is counted apart; meta stands in for the other device."""
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    model(_x()).sum().backward()
    opt.step()
    first_weight = model[0].weight
    opt.state[first_weight] = {
        k: v.to("meta") if v.dim() > 0 else v for k, v in opt.state[first_weight].items()
    }  # its two moments, 2 x 4 x 16 x 8 bytes
    moved = 2 * first_weight.numel() * F32
    assert optimizer_state_bytes(opt, "cpu") == 1712 - moved
    assert optimizer_state_bytes(opt, torch.device("meta")) > 0  # (meta storages all share address 0)
    assert optimizer_state_bytes(opt, "cuda") == optimizer_state_bytes(opt, "cuda:1") == 0


def test_optimizer_state_bytes_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="optimizer"):
        optimizer_state_bytes(object())


def test_saved_activations_mlp_hand_computed() -> None:
    # What autograd saves (verified with a printing pack hook, torch 2.13):
    #   Linear1 = addmm(b1, x, W1.t()): saves x for dW1; W1.t() is saved only when x requires
    #       grad, which it does not -> x only (160 bytes).
    #   ReLU saves its *output* h (320 bytes).
    #   Linear2 = addmm(b2, h, W2.t()): saves h again (same storage: counted once) and W2.t(),
    #       a view of the parameter W2 -> excluded.
    #   sum() saves no tensor. The pre-ReLU output of Linear1 is not saved at all.
    model = _mlp()
    with SavedActivations(exclude=model.parameters()) as saved:
        loss = model(_x()).sum()
    assert saved.count == 2
    assert saved.bytes == X_BYTES + HIDDEN_BYTES == 480
    loss.backward()  # the graph is intact: the hooks returned the tensors unchanged


def test_saved_activations_without_exclude_counts_the_weight() -> None:
    # Same forward; now W2's storage (16*4 float32 = 256 bytes) counts as well.
    model = _mlp()
    with SavedActivations() as saved:
        model(_x()).sum()
    assert saved.count == 3
    assert saved.bytes == X_BYTES + HIDDEN_BYTES + F32 * 16 * 4 == 736


def test_saved_activations_counts_a_storage_once() -> None:
    x = torch.randn(3, requires_grad=True)
    with SavedActivations() as saved:
        (x * x).sum()  # mul saves x twice (once per operand)
    assert (saved.count, saved.bytes) == (1, F32 * 3)

    y = torch.randn(4, requires_grad=True)
    with SavedActivations() as saved:
        (y[:2] * y[2:]).sum()  # two 8-byte views of one 16-byte storage
    assert (saved.count, saved.bytes) == (1, F32 * 4)


def test_saved_activations_frozen_first_layer() -> None:
    # Linear1 frozen and x without grad: nothing upstream of ReLU is in the graph, so Linear1 and
    # ReLU save nothing; Linear2 saves h (320) for dW2 and not W2.t() (h needs no grad).
    model = _mlp()
    model[0].requires_grad_(False)
    with SavedActivations(exclude=model.parameters()) as saved:
        model(_x()).sum()
    assert (saved.count, saved.bytes) == (1, HIDDEN_BYTES)


def test_saved_activations_keeps_nothing_alive() -> None:
    x = torch.randn(1000, requires_grad=True)
    with SavedActivations() as saved:
        y = x.exp()  # exp saves its output
        loss = y.sum()
    ref = weakref.ref(y)
    del y
    assert ref() is not None  # autograd still holds it for backward
    loss.backward()
    del loss
    assert ref() is None
    assert saved.bytes == F32 * 1000


def test_peak_memory_cpu_sees_a_freed_allocation() -> None:
    size = 200 * 10**6
    gc.collect()  # garbage of earlier tests, freed inside the region, would lower the RSS under the baseline
    with PeakMemory("cpu") as peak:
        # Fresh pages from the kernel, touched so that they count in RSS. Not a tensor: malloc may
        # serve one from blocks that earlier tests freed and glibc kept resident, and then the RSS
        # does not move at all (seen once in ten suite runs).
        big = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            big[offset] = 1
        big.close()
    assert peak.kind == "cpu_peak_rss"
    assert peak.reset
    # Freed before the region ends, so only the high-water mark still shows it. The margin covers
    # other memory that the process returns meanwhile (seen once under load: below 0.95 of the size).
    assert peak.peak_bytes - peak.baseline_bytes >= 0.5 * size


def test_peak_memory_falls_back_when_the_peak_cannot_be_reset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    with caplog.at_level(logging.WARNING, logger="dynalora.metering"), PeakMemory() as peak:
        pass
    assert not peak.reset
    assert "cannot reset the peak RSS" in caplog.text
    assert peak.peak_bytes >= peak.baseline_bytes > 0


def test_peak_memory_rejects_other_devices() -> None:
    with pytest.raises(ValueError, match="device"):
        PeakMemory("meta")


def test_peak_memory_cuda_reads_the_allocator_in_order(monkeypatch) -> None:
    """The CUDA path without a GPU: the allocator's counters are stood in for, and every call is logged."""
    calls = []
    counters = {"allocated": 300, "peak": 900}

    def log(name, result=None):
        def call(device=None):
            calls.append((name, torch.device(device)))
            if name == "reset_peak_memory_stats":
                counters["peak"] = counters["allocated"]
            return counters.get(result)

        return call

    monkeypatch.setattr(torch.cuda, "synchronize", log("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", log("reset_peak_memory_stats"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", log("memory_allocated", "allocated"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", log("max_memory_allocated", "peak"))
    with PeakMemory("cuda:1") as peak:
        counters.update(allocated=500, peak=1_700)  # the region allocates, peaks, frees part
    dev = torch.device("cuda:1")
    assert calls == [
        ("synchronize", dev),  # queued kernels finish before the reset...
        ("reset_peak_memory_stats", dev),  # ...so an earlier peak cannot leak in
        ("memory_allocated", dev),
        ("synchronize", dev),
        ("max_memory_allocated", dev),
    ]
    assert (peak.kind, peak.reset) == ("cuda_max_allocated", True)
    assert (peak.baseline_bytes, peak.peak_bytes, peak.increase_bytes) == (300, 1_700, 1_400)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda() -> None:
    size = 200 * 10**6
    with PeakMemory("cuda") as peak:
        big = torch.ones(size // F32, device="cuda")
        del big
    assert peak.kind == "cuda_max_allocated"
    assert peak.peak_bytes - peak.baseline_bytes >= size


def test_step_memory_breakdown_mlp_with_loss_fn() -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    result = step_memory_breakdown(model, opt, {"input": _x()}, loss_fn=lambda out, batch: out.sum())
    assert result["parameters"] == MLP_PARAM_BYTES
    assert result["gradients"] == MLP_PARAM_BYTES  # measured before zero_grad
    assert result["optimizer_state"] == 2 * MLP_PARAM_BYTES + 4 * STEP_BYTES
    assert result["optimizer_state_host"] == 0  # the model is on the host already
    assert result["saved_activations"] == X_BYTES + HIDDEN_BYTES
    assert result["peak_kind"] == "cpu_peak_rss"
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True) ran


def test_step_memory_breakdown_peft_lora_bert() -> None:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = get_peft_model(
        BertForSequenceClassification(config), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8)
    )
    # Trainable by hand: LoRA on query and value (PEFT's BERT default) in 2 layers, each
    # A (4x32) + B (32x4); plus the classifier copy PEFT trains for SEQ_CLS, 32x2 + 2.
    n_trainable_tensors = 2 * 2 * 2 + 2
    trainable_bytes = F32 * (2 * 2 * (4 * 32 + 32 * 4) + 32 * 2 + 2)  # 4360
    assert trainable_bytes == F32 * sum(p.numel() for p in model.parameters() if p.requires_grad)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 100, (4, 12), generator=g),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    result = step_memory_breakdown(model, opt, batch)

    assert result["gradients"] == trainable_bytes
    assert result["optimizer_state"] == 2 * trainable_bytes + n_trainable_tensors * STEP_BYTES
    assert result["parameters"] == F32 * sum(p.numel() for p in model.parameters())
    assert result["saved_activations"] > 0
    assert result["peak"] >= result["peak_baseline"] > 0


def test_weight_bytes_counts_frozen_weights_buffers_and_dtypes() -> None:
    model = _mlp()
    model.register_buffer("table", torch.zeros(10, dtype=torch.int64))
    model.requires_grad_(False)  # frozen weights count all the same
    assert weight_bytes(model) == MLP_PARAM_BYTES + 8 * 10
    model.to(torch.bfloat16)  # floating parameters at their storage dtype; the int64 buffer stays
    assert weight_bytes(model) == MLP_PARAM_BYTES // 2 + 8 * 10
    fresh = _mlp()
    result = step_memory_breakdown(fresh, torch.optim.SGD(fresh.parameters()), {"input": _x()},
                                   loss_fn=lambda out, batch: out.sum())  # fmt: skip
    assert result["weights"] == MLP_PARAM_BYTES


def test_run_summary_gives_total_peak_with_the_weights() -> None:
    from dynalora.training.outputs import counted_memory

    steps = [{"saved_activations": 10, "gradients": 5, "optimizer_state": 0, "weights": 100},
             {"saved_activations": 4, "gradients": 5, "optimizer_state": 10, "weights": 100}]  # fmt: skip
    out = counted_memory(steps)
    assert out["peak_total"] == 19 and out["peak_weights"] == 100 and out["peak_total_with_weights"] == 119
    assert "peak_weights" not in counted_memory([{k: v for k, v in s.items() if k != "weights"} for s in steps])
