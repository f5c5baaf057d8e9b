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


# ------------------------------------------------------------------ half-precision inactive modules (BAdam's class)
def _dynamic_full(inactive_dtype: str, seed: int = 0):
    from dynalora import find_linear_modules

    model = tiny.bert(seed=seed, layers=4)
    model.requires_grad_(False)
    modules = find_linear_modules(model)
    for m in modules:
        m.layer.requires_grad_(True)
    model.classifier.requires_grad_(True)
    config = DynamicConfig(allocator="random", k=3, period=2, optimizer="global", state_policy="reset",
                           inactive_dtype=inactive_dtype)  # fmt: skip
    return model, DynamicAllocator(model, config, modules=modules)


def test_a_module_rounds_on_deactivation_and_returns_as_float32_of_that_rounding():
    torch.manual_seed(0)
    model, alloc = _dynamic_full("bf16")
    masters = {m.name: [p.detach().clone() for p in m.params] for m in _dynamic_full("fp32")[1].modules}
    for m in alloc.modules:  # the same initial selection: the random draw does not depend on dtypes
        on = m.name in alloc.active
        for p, master in zip(m.params, masters[m.name], strict=True):
            assert p.dtype == (torch.float32 if on else torch.bfloat16) and p.requires_grad == on
            assert torch.equal(p, master if on else master.to(torch.bfloat16))
    inactive = [m.name for m in alloc.modules if m.name not in alloc.active]
    alloc.set_active(inactive[:3])  # reactivated with no update in between
    for m in alloc.modules:
        for p, master in zip(m.params, masters[m.name], strict=True):
            if m.name in inactive[:3]:
                assert p.dtype == torch.float32 and torch.equal(p, master.to(torch.bfloat16).float())


def test_half_precision_storage_trains_like_float32_storage_and_holds_less():
    from dynalora.metering import weight_bytes

    runs = {}
    for dtype in ("fp32", "bf16"):
        model, alloc = _dynamic_full(dtype)
        opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
        bytes_held = weight_bytes(model)
        for batch in tiny.batches(8):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            alloc.step()
        runs[dtype] = (alloc, bytes_held, {n: p.detach().float() for n, p in model.named_parameters()})
    (a32, b32, w32), (a16, b16, w16) = runs["fp32"], runs["bf16"]
    assert [h["active"] for h in a16.history] == [h["active"] for h in a32.history]
    linear = sum(m.num_params for m in a32.modules)
    inactive = sum(m.num_params for m in a32.modules if m.name not in a32.history[0]["active"])
    assert b32 - b16 == 2 * inactive and linear > inactive > 0  # inactive modules at 2 bytes, not 4
    for name, w in w32.items():  # rounding at each deactivation only: the runs stay together
        assert torch.allclose(w16[name], w, atol=2e-2, rtol=2e-2), name
    assert any(not torch.equal(w16[n], w32[n]) for n in w32)  # ... and the rounding did happen


def test_inactive_dtype_refuses_half_precision_modules():
    model, _ = _dynamic_full("fp32")
    model.half()
    from dynalora import find_linear_modules

    with pytest.raises(ValueError, match="needs float32 modules"):
        DynamicAllocator(model, DynamicConfig(inactive_dtype="bf16"), modules=find_linear_modules(model))


def test_cli_dynamic_full_in_bf16_storage(tiny_model, csv_task, tmp_path):
    from dynalora.cli import main
    from tests.test_cli import cli_args

    weights = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        extra = ("--method", "full", "--dynamic", "--inactive-dtype", dtype, "--state-policy", "reset")
        assert main(cli_args(tiny_model, csv_task, out, *extra)) == 0
        weights[dtype] = json.loads((out / "metrics.json").read_text())["memory"]["peak_weights"]
        assert json.loads((out / "config.json").read_text())["resolved_dynamic"]["inactive_dtype"] == dtype
    assert weights["bf16"] < 0.9 * weights["fp32"]


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (["--fp16"], True),
        (["--base-dtype", "fp16"], True),
        (["--inactive-dtype", "fp16"], True),
        (["--fp16", "--optimizer", "global"], False),
        (["--bf16"], False),
        (["--fp16", "--no-dynamic"], False),
    ],
)
def test_fp16_on_cuda_is_refused_with_local_optimizers(flags, refused, monkeypatch):
    """fp16's loss scaler steps torch optimizers only (accelerate wraps nothing else): with --optimizer
    local the gradients would stay scaled and overflow steps would not be skipped."""
    from dynalora.cli import build_parser
    from dynalora.errors import UsageError
    from dynalora.training.args import TrainArgs
    from dynalora.training.engine import _precision

    ns = build_parser().parse_args(["train", *flags])
    args = TrainArgs(**{k: v for k, v in vars(ns).items() if k not in ("command", "config")})
    if refused:
        with pytest.raises(UsageError, match="cannot step the per-module optimizers of --optimizer local"):
            _precision(args, torch.device("cuda"))
    else:
        assert _precision(args, torch.device("cuda")) in ("fp16", "bf16")
    if "--fp16" not in flags:  # accelerate launch --mixed_precision fp16, through the environment
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        local = args.dynamic and args.dynamic_config().optimizer == "local"
        if local:
            with pytest.raises(UsageError, match="accelerate launch --mixed_precision fp16"):
                _precision(args, torch.device("cuda"))
        else:
            _precision(args, torch.device("cuda"))
