"""The saving of a partial selection survives activation checkpointing; the recompute memory cap.

Savings are verified by counting backward and forward calls per block (trap 7: ``requires_grad``
alone says nothing once ``enable_input_require_grads`` has made the embedding output require grad).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from dynalora import DynamicAllocator, DynamicConfig
from dynalora.metering import SavedActivations
from tests.tiny import VOCAB, bert, train

LAYERS = 6
MODES = ["plain", "input-grads", "reentrant", "non-reentrant"]


def _llama(layers: int = LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    )  # fmt: skip


def _bert():
    return bert(layers=LAYERS)


BUILD = {
    "llama": (_llama, ["q_proj", "v_proj"], "CAUSAL_LM"),
    "bert": (_bert, ["query", "value"], "SEQ_CLS"),
}


def _enable(base, mode: str) -> None:
    if mode == "input-grads":
        base.enable_input_require_grads()
    elif mode in ("reentrant", "non-reentrant"):
        base.activation_checkpointing_enable({"use_reentrant": mode == "reentrant"})


def _peft(kind: str, seed_b: bool = True):
    make, targets, task = BUILD[kind]
    model = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task))
    if seed_b:  # B starts at zero; without it no gradient reaches A and the comparison is weak
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _blocks(model):
    base = model.get_base_model()
    return base.model.layers if hasattr(base, "model") else base.bert.encoder.layer


def _batch(kind: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 8), generator=gen)
    labels = ids if kind == "llama" else torch.randint(0, 2, (2,), generator=gen)
    return {"input_ids": ids, "labels": labels}


class Calls:
    """Forward and full-backward calls on each block's feed-forward part (MLP / BertOutput's dense)."""

    def __init__(self, blocks) -> None:
        self.forward = [0] * len(blocks)
        self.backward = [0] * len(blocks)
        for i, block in enumerate(blocks):
            inner = block.mlp if hasattr(block, "mlp") else block.intermediate
            # torch's non-reentrant recomputation skips module hooks: count calls of forward itself
            inner.forward = self._counted(inner.forward, i)
            inner.register_full_backward_hook(lambda *a, i=i: self.backward.__setitem__(i, self.backward[i] + 1))

    def _counted(self, forward, i):
        def counted(*args, **kwargs):
            self.forward[i] += 1
            return forward(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.forward[:] = [0] * len(self.forward)
        self.backward[:] = [0] * len(self.backward)


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("when", ["before", "after"])
def test_no_backward_or_recompute_below_the_lowest_trained_block(kind, mode, when):
    model = _peft(kind)
    if when == "before":
        _enable(model.get_base_model(), mode)
    alloc = DynamicAllocator(model, DynamicConfig(allocator="random", k=2, measure="random", period=1, seed=3))
    if when == "after":  # as Trainer does: checkpointing is switched on when training starts
        _enable(model.get_base_model(), mode)
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    calls = Calls(_blocks(model))
    model.train()
    depths, trained = set(), set()
    for step in range(12):
        depth = alloc.cost.depth(alloc.active_mask)
        assert alloc.cut == depth
        calls.reset()
        model(**_batch(kind, step)).loss.backward()
        assert calls.backward[:depth] == [0] * depth, (step, calls.backward)
        assert calls.forward[:depth] == [1] * depth, (step, calls.forward)  # forward once: no recomputation
        above = [1] * (LAYERS - depth)
        assert calls.backward[depth:] == above, (step, calls.backward)  # every block above runs backward once
        recomputed = mode in ("reentrant", "non-reentrant")
        assert calls.forward[depth:] == [2 if recomputed else 1] * (LAYERS - depth), (step, calls.forward)
        for m, on in zip(alloc.modules, alloc.active_mask.tolist(), strict=True):
            assert all((p.grad is not None) == on for p in m.params), (step, m.name)
        trained |= {m.name for m, on in zip(alloc.modules, alloc.active_mask.tolist(), strict=True) if on}
        depths.add(depth)
        opt.step()
        opt.zero_grad()
        alloc.step()
    assert len(depths) >= 3  # the boundary moved with the selection


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant", "input-grads"])
def test_active_gradients_match_the_step_without_checkpointing(kind, mode):
    plain = _peft(kind)
    checked = copy.deepcopy(plain)
    _enable(checked.get_base_model(), mode)
    plain.train()
    checked.train()
    grads = []
    for model in (plain, checked):
        alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=1))
        # two modules in block 3 and one in block 5: the cut is block 3
        names = [m.name for m in alloc.modules]
        alloc.set_active([names[6], names[7], names[10]])
        assert alloc.cut == 3
        model(**_batch(kind)).loss.backward()
        grads.append({m.name: [p.grad for p in m.params] for m in alloc.modules})
    for name, expected in grads[0].items():
        for want, got in zip(expected, grads[1][name], strict=True):
            if want is None:
                assert got is None, name
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert sum(g is not None for gs in grads[1].values() for g in gs) == 6  # A and B of three modules


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_bf16_autocast_keeps_the_saving(mode):
    model = _peft("llama")
    _enable(model.get_base_model(), mode)
    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=1))
    alloc.set_active(alloc.module_names[6:8])  # block 3
    calls = Calls(_blocks(model))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**_batch("llama")).loss
    loss.backward()
    assert calls.backward == [0, 0, 0, 1, 1, 1]
    assert calls.forward == [1, 1, 1, 2, 2, 2]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in alloc.modules[6:8] for p in m.params)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_inactive_modules_stay_bitwise_unchanged_under_checkpointing(mode):
    model = _peft("llama")
    _enable(model.get_base_model(), mode)
    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=1, measure="random", period=100))
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    names = [m.name for m in alloc.modules]
    alloc.set_active(names[4:6])  # block 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, alloc, opt, None, [_batch("llama", step) for step in range(3)])
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == ("lora_" in n and ".layers.2." in n), n


def test_a_trainable_tensor_below_the_blocks_keeps_backward_everywhere():
    """An always-trained embedding needs backward through every block: no cut."""
    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": True})
    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=1))
    alloc.set_active([alloc.modules[-1].name])
    assert alloc.cut is None
    model.train()
    model(**_batch("llama")).loss.backward()
    embedding = model.get_base_model().model.embed_tokens.modules_to_save["default"].weight
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def test_close_removes_the_guard():
    model = _peft("llama")
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=1))
    alloc.set_active([alloc.modules[-1].name])
    alloc.close()
    calls = Calls(_blocks(model))
    model.train()
    model(**_batch("llama")).loss.backward()
    assert calls.backward == [1] * LAYERS  # transformers' own behaviour again


# ----------------------------------------------------------------------------------- recompute cap
def _block_saved_bytes(model, blocks, batch) -> tuple[list[int], torch.Tensor]:
    """Bytes autograd saves while each block runs its forward (outside any checkpoint)."""
    per_block = [0] * len(blocks)
    current: list[int] = []
    counters: list[SavedActivations] = []
    weights = list(model.parameters()) + list(model.buffers())

    def enter(i):
        def hook(*_):
            current.append(i)
            counter = SavedActivations(exclude=weights)
            counter.__enter__()
            counters.append(counter)

        return hook

    def leave(i):
        def hook(*_):
            counter = counters.pop()
            counter.__exit__(None, None, None)
            current.pop()
            per_block[i] += counter.bytes

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(leave(i)))
    loss = model(**batch).loss
    for h in handles:
        h.remove()
    return per_block, loss


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_recompute_cap_keeps_saved_activations_under_the_cap_and_trains_block_0(kind):
    cap = 0.5
    reference = _peft(kind)
    capped = copy.deepcopy(reference)
    every = DynamicAllocator(reference, DynamicConfig(allocator="topk", k=1))
    alloc = DynamicAllocator(capped, DynamicConfig(allocator="topk", k=1, memory_cap=cap, cap_mode="recompute"))
    for a in (every, alloc):
        a.set_active(a.module_names)  # every module, block 0 included: depth 0
    # 3 blocks plainly + 3 checkpointed would keep 0.5 + 0.05 (their inputs): a fourth is checkpointed
    assert alloc.history[-1]["recompute"] == [0, 1, 2, 3]
    assert alloc.history[-1]["activation_share"] == pytest.approx(2 / 6 + 0.1 * 4 / 6)
    reference.train()
    capped.train()
    batch = _batch(kind)
    full, loss_full = _block_saved_bytes(reference, _blocks(reference), batch)
    kept, loss_capped = _block_saved_bytes(capped, _blocks(capped), batch)
    assert all(b > 0 for b in full)
    assert sum(kept) <= cap * sum(full) + 1e-9, (kept, full)
    hidden = batch["input_ids"].numel() * 32 * 4  # a checkpointed block keeps its input hidden state
    assert kept[:4] == [hidden] * 4 and kept[4:] == full[4:]
    calls = Calls(_blocks(capped))
    loss_full.backward()
    loss_capped.backward()
    assert calls.forward == [1, 1, 1, 1, 0, 0]  # blocks 0-3 recomputed in backward
    for m_ref, m_cap in zip(every.modules, alloc.modules, strict=True):
        for want, got in zip(m_ref.params, m_cap.params, strict=True):
            assert got.grad is not None  # block 0 trains
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)


def test_recompute_cap_checkpoints_nothing_when_the_selection_fits():
    model = _peft("llama")
    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=1, memory_cap=0.5, cap_mode="recompute"))
    names = alloc.module_names
    alloc.set_active(names[6:])  # blocks 3-5: half of the activations
    assert alloc.history[-1]["recompute"] == []
    alloc.set_active(names[4:])  # blocks 2-5: 2/3, so 2 and 3 are recomputed (1/3 + 0.1 * 2/6 kept)
    assert alloc.history[-1]["recompute"] == [2, 3]
    calls = Calls(_blocks(model))
    model.train()
    model(**_batch("llama")).loss.backward()
    assert calls.forward == [1, 1, 2, 2, 1, 1]
    assert calls.backward == [0, 0, 1, 1, 1, 1]
    alloc.close()
    assert "forward" not in _blocks(model)[2].__dict__


def test_the_recompute_cap_refuses_blocks_already_checkpointed():
    # the wrapper stood aside for a checkpointed block: no cap, while the history recorded recomputation
    model = _peft("llama")
    alloc = DynamicAllocator(model, DynamicConfig(allocator="topk", k=1, memory_cap=0.5, cap_mode="recompute"))
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing already checkpoints every block"):
        model(**_batch("llama"))
    with torch.no_grad():  # evaluation passes are not training: nothing to refuse
        model.eval()
        model(**_batch("llama"))
    alloc.close()


def test_recompute_cap_under_the_default_allocator_trains_every_block():
    """The exclusion cap keeps blocks 0-2 out of training for good; the recompute cap does not."""
    model = _peft("llama")
    alloc = DynamicAllocator(model, DynamicConfig(memory_cap=0.5, cap_mode="recompute", period=1))
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    train(model, alloc, opt, None, [_batch("llama", step) for step in range(12)])
    assert all(h["activation_share"] <= 0.5 + 1e-9 for h in alloc.history)
    assert min(h["depth"] for h in alloc.history) == 0
    assert all(n > 0 for n in alloc.active_steps.values())


def test_the_recompute_cap_trains_exactly_as_the_uncapped_run():
    """Recomputation changes memory, not the run: same selections, same weights (so the same quality)."""
    runs = []
    for config in (DynamicConfig(period=2), DynamicConfig(period=2, memory_cap=0.5, cap_mode="recompute")):
        model = _peft("llama")
        alloc = DynamicAllocator(model, config)
        opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
        train(model, alloc, opt, None, [_batch("llama", step) for step in range(10)])
        runs.append((model, alloc))
    (plain, a), (capped, b) = runs
    assert [h["active"] for h in a.history] == [h["active"] for h in b.history]
    assert any(h["recompute"] for h in b.history)
    for (name, p), q in zip(plain.named_parameters(), capped.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"cap_mode": "recompute"}, "needs a memory_cap"),
        ({"memory_cap": 0.5, "allocator": "topk"}, "read only by allocator='cutoff'"),
        ({"cap_mode": "sometimes", "memory_cap": 0.5}, "cap_mode='sometimes' is not supported"),
    ],
)
def test_cap_options_that_would_be_ignored_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        DynamicConfig(**overrides)


def test_a_recompute_cap_below_what_checkpointed_blocks_keep_is_refused():
    with pytest.raises(ValueError, match="below what checkpointed blocks keep"):
        DynamicAllocator(_peft("llama"), DynamicConfig(memory_cap=0.05, cap_mode="recompute"))


# ----------------------------------------------------------------------------------- Trainer and TRL
class BelowTheCut:
    """A TrainerCallback that records, for every optimizer step, the cut and the backward calls below it."""

    def __init__(self, alloc, calls) -> None:
        from transformers import TrainerCallback

        outer = self
        self.records: list[tuple[int, list[int], list[int]]] = []

        class _Callback(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                outer.cut = alloc.cut
                calls.reset()

            def on_pre_optimizer_step(self, *args, **kwargs):
                outer.records.append((outer.cut, list(calls.backward), list(calls.forward)))

        self.callback = _Callback()


def _check_steps(records, recomputed: bool) -> None:
    assert len({cut for cut, _, _ in records}) >= 2  # the cut moved at a reallocation
    assert any(cut > 0 for cut, _, _ in records)
    for cut, backward, forward in records:
        assert backward[:cut] == [0] * cut, (cut, backward)
        assert forward[:cut] == [1] * cut, (cut, forward)
        assert backward[cut:] == [1] * (LAYERS - cut), (cut, backward)
        assert forward[cut:] == [2 if recomputed else 1] * (LAYERS - cut), (cut, forward)


def test_the_default_config_keeps_its_saving_under_trainer_with_checkpointing(tmp_path):
    from transformers import Trainer

    from dynalora.integrations import DynamicAllocationCallback
    from tests.test_trainer import args, dataset

    model = _peft("bert")
    alloc = DynamicAllocator(model, DynamicConfig())  # untouched: cutoff, gradient importance, local
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    sched = alloc.create_scheduler(opt, "linear", num_warmup_steps=0, num_training_steps=30)
    calls = Calls(_blocks(model))
    probe = BelowTheCut(alloc, calls)
    trainer = Trainer(model=model, args=args(tmp_path, 30, activation_checkpointing=True),
                      train_dataset=dataset(120), optimizers=(opt, sched),
                      callbacks=[DynamicAllocationCallback(alloc), probe.callback])  # fmt: skip
    trainer.train()
    assert _blocks(model)[0].gradient_checkpointing  # Trainer switched it on after the allocator was built
    assert len(probe.records) == 30
    _check_steps(probe.records, recomputed=True)


def _sft_setup(tmp_path, **config):
    """A tiny llama, a prompt/completion set, and TRL's SFTConfig at its defaults for 30 steps."""
    import datasets
    from trl import SFTConfig

    from tests.test_causal import WORDS

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    )  # fmt: skip
    data = datasets.Dataset.from_dict({"prompt": ["review the movie was good", "review it was dull"] * 30,
                                       "completion": ["positive", "negative"] * 30})  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=2, report_to=[],
                     save_strategy="no", use_cpu=True, max_length=32, dataloader_num_workers=0,
                     disable_tqdm=True, **config)  # fmt: skip
    return base, data, args


def test_the_default_config_keeps_its_saving_under_sft_trainer_with_its_default_config(tmp_path):
    pytest.importorskip("trl")
    from peft import LoraConfig
    from trl import SFTTrainer

    from dynalora.integrations import DynamicAllocationCallback
    from tests.test_causal import _tokenizer

    base, data, config = _sft_setup(tmp_path)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    alloc = DynamicAllocator(model, DynamicConfig())
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    assert config.gradient_checkpointing  # TRL's default
    calls = Calls(_blocks(model))
    probe = BelowTheCut(alloc, calls)
    sched = alloc.create_scheduler(opt, "linear", num_warmup_steps=0, num_training_steps=30)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=_tokenizer(),
                         optimizers=(opt, sched),
                         callbacks=[DynamicAllocationCallback(alloc), probe.callback])  # fmt: skip
    trainer.train()
    assert _blocks(model)[0].gradient_checkpointing
    assert len(probe.records) == 30
    _check_steps(probe.records, recomputed=True)


def test_attach_on_sft_trainer_with_peft_config_keeps_the_saving(tmp_path):
    """TRL's own route: SFTTrainer builds the PeftModel from peft_config=, dynalora.attach() after it,
    the optimizer and schedule come from SFTConfig, checkpointing is TRL's default."""
    pytest.importorskip("trl")
    from peft import LoraConfig
    from trl import SFTTrainer

    import dynalora
    from tests.test_causal import _tokenizer

    base, data, config = _sft_setup(tmp_path, learning_rate=1e-2)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=base, args=config, train_dataset=data, processing_class=_tokenizer(), peft_config=lora)
    alloc = dynalora.attach(trainer)
    probe = BelowTheCut(alloc, Calls(_blocks(trainer.model)))
    trainer.add_callback(probe.callback)
    trainer.train()
    assert _blocks(trainer.model)[0].gradient_checkpointing
    assert len(probe.records) == 30
    _check_steps(probe.records, recomputed=True)
    assert len(alloc.modules) == 2 * LAYERS and alloc.step_count == 30


# ----------------------------------------------------------------------------------- dynalora train
def test_dynalora_train_gradient_checkpointing_saves_activations_and_the_run_folder_says_what_ran(
    tiny_model, csv_task, tmp_path
):
    import json

    from dynalora.cli import main
    from tests.test_cli import cli_args

    saved = {}
    for flag, cap in (("--gradient-checkpointing", ()), ("--no-gradient-checkpointing", ("--memory-cap", "0.5"))):
        out = tmp_path / flag
        extra = (*cap, "--cap-mode", "recompute", flag) if cap else (flag,)
        assert main(cli_args(tiny_model, csv_task, out, *extra)) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["gradient_checkpointing"] == (flag == "--gradient-checkpointing")
        assert config["resolved_dynamic"]["cap_mode"] == ("recompute" if cap else "exclude")
        assert config["resolved_dynamic"]["allocator"] == "cutoff"
        saved[flag] = json.loads((out / "metrics.json").read_text())["memory"]["peak_saved_activations"]
    assert saved["--gradient-checkpointing"] < saved["--no-gradient-checkpointing"]


def test_a_recompute_cap_under_full_checkpointing_is_refused(tiny_model, csv_task, tmp_path, capsys):
    """Every block checkpointed leaves the cap nothing to checkpoint: refused, not run as if capped."""
    from dynalora.cli import main
    from tests.test_causal import _llama
    from tests.test_cli import cli_args

    tiny_llama = tmp_path / "llama"  # a decoder: checkpointed by default
    _llama().save_pretrained(tiny_llama)

    cap = ("--memory-cap", "0.5", "--cap-mode", "recompute")
    for model, extra in ((tiny_model, ("--gradient-checkpointing",)), (str(tiny_llama), ("--objective", "causal-lm"))):
        out = tmp_path / "run"
        assert main(cli_args(model, csv_task, out, *cap, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "already checkpoints every block" in err, err
        assert "--no-gradient-checkpointing" in err and not out.exists()


def test_dynalora_train_refuses_k_under_the_default_allocator_in_one_line(tiny_model, csv_task, tmp_path, capsys):
    from dynalora.cli import main
    from tests.test_cli import cli_args

    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--k", "500")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--k=500 is not read by allocator='cutoff'" in err
    assert not out.exists()
