"""A half-precision frozen base under float32 adapters (--base-dtype, dynalora.adapters.cast_frozen)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from dynalora import DynamicAllocator, DynamicConfig
from dynalora.adapters import cast_frozen
from tests import tiny


def _model(seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    base = BertForSequenceClassification(config)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    for name, p in model.named_parameters():  # B = 0 would hide a wrong adapter path: give it values
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_frozen_weights_half_precision_adapters_and_head_float32():
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_numel = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert cast_frozen(model, torch.bfloat16) == frozen_numel
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name in trainable else torch.bfloat16), name
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)


def test_one_step_in_bf16_base_matches_the_float32_step():
    batch = tiny.batches(1)[0]
    reference, half = _model(), _model()
    cast_frozen(half, torch.bfloat16)
    losses, grads = [], []
    for model in (reference, half):
        model.train()
        for m in model.modules():  # no dropout: the two passes must see the same function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model is half):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    for name, g in grads[0].items():
        assert grads[1][name].dtype == torch.float32  # float32 gradients for float32 optimizer state
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads[1][name].flatten(), dim=0)
        assert cos > 0.97, name


def test_the_allocator_freezes_and_trains_over_a_bf16_base():
    model = _model()
    cast_frozen(model, torch.bfloat16)
    alloc = DynamicAllocator(model, DynamicConfig())
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    before = {m.name: [p.detach().clone() for p in m.params] for m in alloc.modules}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    for batch in tiny.batches(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        alloc.step()
    for m in alloc.modules:
        changed = any(not torch.equal(a, p) for a, p in zip(before[m.name], m.params, strict=True))
        assert changed == (alloc.active_steps[m.name] > 0) and all(p.dtype == torch.float32 for p in m.params)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # the frozen base never moves


def test_merge_into_a_bf16_base_keeps_the_outputs():
    model = _model()
    cast_frozen(model, torch.bfloat16)
    model.eval()
    batch = {k: v for k, v in tiny.batches(1)[0].items() if k != "labels"}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(**batch).logits.float()
        merged = model.merge_and_unload()
        after = merged(**batch).logits.float()
    assert torch.allclose(before, after, atol=3e-2), (before - after).abs().max()


def test_cli_base_dtype_bf16_halves_the_weights(tiny_model, csv_task, tmp_path):
    from dynalora.cli import main
    from tests.test_cli import cli_args

    weights = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        assert main(cli_args(tiny_model, csv_task, out, "--base-dtype", dtype)) == 0
        memory = json.loads((out / "metrics.json").read_text())["memory"]
        weights[dtype] = memory["peak_weights"]
    assert weights["bf16"] < 0.6 * weights["fp32"]  # frozen base halved; adapters and head stay fp32


@pytest.mark.parametrize(
    "extra, words",
    [
        (("--base-dtype", "bf16", "--method", "full"), "--method full trains the base weights"),
        (("--base-dtype", "fp16"), "--base-dtype fp16 needs a CUDA device"),
        (("--base-dtype", "bf16", "--fp16"), "computes in bf16; drop --fp16"),
    ],
)
def test_cli_base_dtype_refusals(tiny_model, csv_task, tmp_path, capsys, extra, words):
    from dynalora.cli import main
    from tests.test_cli import cli_args

    assert main(cli_args(tiny_model, csv_task, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
