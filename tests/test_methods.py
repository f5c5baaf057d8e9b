"""The methods dynalora implements itself: each defining rule against its formula, computed here."""

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from dynalora import DynamicAllocator, DynamicConfig
from dynalora.adapters import find_adapter_modules
from dynalora.methods import METHODS, MethodOptions, merge
from dynalora.methods.dvora import DVoRALinear, shared_projections
from dynalora.methods.hydra import HydraLinear
from tests import tiny


def _linear(d_in=6, d_out=5, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def _randomise(layer: nn.Module, seed: int = 1) -> None:
    """Trained-looking adapter tensors (the zero initialisation would hide half of every formula)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attr in layer.adapter_layer_names:
            for p in getattr(layer, attr).parameters():
                p.copy_(torch.randn(p.shape, generator=gen))


def test_hydra_is_the_parallel_plus_sequential_formula():
    base = _linear()
    layer = HydraLinear(copy.deepcopy(base), r=3, alpha=6.0)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), base(x))  # the up-projections start at zero: the base layer
    _randomise(layer)
    s = 6.0 / 3
    a_down, a_up = layer.hydra_par_down["default"].weight, layer.hydra_par_up["default"].weight
    b_down, b_up = layer.hydra_seq_down["default"].weight, layer.hydra_seq_up["default"].weight
    w0, b0 = base.weight, base.bias
    h0 = x @ w0.T + b0  # W0 x + b0
    expected = h0 + s * (x @ a_down.T @ a_up.T) + s * (h0 @ b_down.T @ b_up.T)
    torch.testing.assert_close(layer(x), expected)


def test_hydra_merged_equals_unmerged():
    layer = HydraLinear(_linear(), r=3, alpha=6.0)
    _randomise(layer)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer.merged_linear()(x), layer(x), rtol=1e-5, atol=1e-5)


def _dvora(seed=0, d_in=6, d_out=5, r=4):
    base = _linear(d_in, d_out, seed)
    A, B = shared_projections([base], r, seed=7, device=torch.device("cpu"))
    return base, DVoRALinear(copy.deepcopy(base), A, B, d_init=0.1), A, B


def test_dvora_starts_as_vera_does_and_follows_its_formula():
    base, layer, A, B = _dvora()
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), base(x))  # VeRA at initialisation: λ_b = 0, so W0 x + b0
    _randomise(layer)
    lam_b, lam_d, m = (getattr(layer, n)["default"] for n in ("dvora_lambda_b", "dvora_lambda_d", "dvora_magnitude"))
    v = base.weight + torch.diag(lam_b) @ B @ torch.diag(lam_d) @ A  # W0 + Λ_b B Λ_d A
    w = m[:, None] * v / v.norm(dim=1, keepdim=True)  # m · V / ‖V‖, row-wise
    torch.testing.assert_close(layer(x), x @ w.T + base.bias)
    torch.testing.assert_close(layer.merged_linear()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_dvora_trains_magnitude_and_scales_not_the_shared_projections():
    _, layer, A, _ = _dvora()
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"dvora_lambda_b.default", "dvora_lambda_d.default", "dvora_magnitude.default"}
    assert "dvora_A" not in layer.state_dict()  # rebuilt from the seed, never saved
    assert layer.dvora_A.data_ptr() == A.data_ptr()  # a view of the one shared pair


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    return BertForSequenceClassification(config).eval()


@pytest.mark.parametrize(("method", "tensors"), [("hydra", 4), ("dvora", 3)])
def test_own_methods_are_found_by_structure_and_allocated(method, tensors):
    model, modules = METHODS[method](_bert(), MethodOptions(None, 4, 8.0, 0.0, True))
    found = find_adapter_modules(model)
    assert modules is None and [m.name for m in found] == [
        f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")
    ]
    assert all(len(m.params) == tensors for m in found)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.split(".")[0] == "classifier" or method in n}
    alloc = DynamicAllocator(
        model, DynamicConfig(k=2, period=1, allocator="topk", measure="gradient", optimizer="global")
    )
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    model.train()
    for batch in tiny.batches(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        alloc.step()
    assert sum(alloc.active_steps.values()) == 2 * 3


@pytest.mark.parametrize("method", ["hydra", "dvora"])
def test_merge_keeps_the_models_outputs(method):
    model, _ = METHODS[method](_bert(), MethodOptions(None, 4, 8.0, 0.0, False))
    for layer in model.modules():
        if hasattr(layer, "adapter_layer_names") and layer.adapter_layer_names[0].startswith(method):
            _randomise(layer)
    batch = tiny.batches(1)[0]
    before = model(**batch).logits
    merged = merge(model)
    assert not find_adapter_modules(merged)
    torch.testing.assert_close(merged(**batch).logits, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["hydra", "dvora", "dylora", "l1ra"])
def test_a_trained_run_loads_back_predicts_the_same_and_merges(tiny_model, csv_task, tmp_path, monkeypatch, method):
    import json

    from dynalora.cli import main
    from dynalora.data import load_task, make_collator, tokenize
    from dynalora.methods import l1ra, load_trained
    from tests.test_cli import cli_args

    monkeypatch.setattr(l1ra, "THRESHOLD", 0.995)  # L1RA: layers end at other ranks than they began
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--method", method, "--lr", "5e-2")) == 0
    model = load_trained(out / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    data = load_task("custom", train_file=csv_task["train"], validation_file=csv_task["validation"],
                     test_file=csv_task["test"])  # fmt: skip
    test = tokenize(data, tokenizer, 64)["test"]
    batch = make_collator(tokenizer)([test[i] for i in range(len(test))])
    with torch.no_grad():
        logits = model(**batch).logits
    saved = json.loads((out / "predictions.json").read_text())["test"]["predictions"]
    assert logits.argmax(-1).tolist() == saved
    with torch.no_grad():
        torch.testing.assert_close(merge(model)(**batch).logits, logits, rtol=1e-4, atol=1e-5)


def test_adalora_reallocates_once_per_optimizer_step_and_ends_at_its_budget(
    tiny_model, csv_task, tmp_path, monkeypatch
):
    """PEFT's AdaLoRA is plain LoRA unless update_and_allocate runs after every optimizer step."""
    import json

    from peft.tuners.adalora import AdaLoraModel

    from dynalora.cli import main
    from tests.test_cli import cli_args

    calls, real = [], AdaLoraModel.update_and_allocate

    def spy(self, step):
        assert all(p.grad is not None for n, p in self.named_parameters() if "lora_E" in n)  # before zero_grad
        calls.append(step)
        return real(self, step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    out = tmp_path / "run"
    accumulate = ("--batch-size", "4", "--gradient-accumulation-steps", "2")  # 2 micro-batches a step
    assert main(cli_args(tiny_model, csv_task, out, "--method", "adalora", "--rank", "4", "--max-steps", "10",
                         *accumulate)) == 0  # fmt: skip
    assert calls == list(range(10))  # optimizer steps, not micro-batches
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = metrics["ranks"]
    assert len(ranks) == 4 and set(ranks) == {
        f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")
    }
    assert sum(ranks.values()) == 4 * 4  # target_r x modules: 6 initial ranks each, pruned to the budget


def test_adalora_refuses_dynamic_allocation_in_one_line(tiny_model, csv_task, tmp_path, capsys):
    from dynalora.cli import main
    from tests.test_cli import cli_args

    assert main(cli_args(tiny_model, csv_task, tmp_path / "run", "--method", "adalora", "--dynamic")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allocates ranks itself" in err


def _dylora(r=4, frozen=False, seed=3):
    from dynalora.methods.dylora import DyLoRALinear, RankSampler

    base = _linear()
    sampler = RankSampler(r, seed)
    layer = DyLoRALinear(copy.deepcopy(base), sampler, alpha=8.0, frozen=frozen)
    _randomise(layer)
    return base, layer, sampler


def _full_factors(layer):
    a = torch.cat(list(layer.dylora_A["default"]))  # (r, d_in)
    b = torch.cat(list(layer.dylora_B["default"]), dim=1)  # (d_out, r)
    return a, b


def test_dylora_computes_the_truncated_adapter_scaled_by_alpha_over_b():
    base, layer, sampler = _dylora()
    a, b = _full_factors(layer)
    x = torch.randn(3, 6)
    for rank in (1, 2, 4):
        sampler.rank = rank
        expected = base(x) + (8.0 / rank) * x @ a[:rank].T @ b[:, :rank].T
        torch.testing.assert_close(layer.train()(x), expected)
    layer.eval()  # serving: the full rank unless set_rank says otherwise
    torch.testing.assert_close(layer(x), base(x) + (8.0 / 4) * x @ a.T @ b.T)


def test_dylora_draws_one_rank_per_optimizer_step_from_its_seed(tiny_model, csv_task, tmp_path, monkeypatch):
    from dynalora.cli import main
    from dynalora.methods import dylora
    from tests.test_cli import cli_args

    seen = []
    real = dylora.DyLoRALinear.forward

    def forward(self, x):
        if self.training:
            seen.append(self.rank)
        return real(self, x)

    monkeypatch.setattr(dylora.DyLoRALinear, "forward", forward)
    accumulate = ("--batch-size", "4", "--gradient-accumulation-steps", "2")
    assert main(cli_args(tiny_model, csv_task, tmp_path / "run", "--method", "dylora", "--no-dynamic", "--rank", "4",
                         "--seed", "5", *accumulate)) == 0  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    draws = [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(6)]
    per_forward = [b for b in draws for _ in range(2 * 4)]  # 2 micro-batches x 4 layers per step
    assert seen == per_forward and len(set(draws)) > 1


def test_dylora_frozen_updates_only_row_and_column_b():
    _, layer, sampler = _dylora(frozen=True)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    layer.train()
    for rank in (3, 2, 3):  # the second step at b=2 must not move row 3 by its momentum
        a0, b0 = (t.clone() for t in _full_factors(layer))
        sampler.rank = rank
        layer(torch.randn(5, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        a1, b1 = _full_factors(layer)
        changed_rows = [i for i in range(4) if not torch.equal(a0[i], a1[i])]
        changed_cols = [i for i in range(4) if not torch.equal(b0[:, i], b1[:, i])]
        assert changed_rows == changed_cols == [rank - 1]


def test_dylora_serves_merges_and_refuses_to_rerank_a_merged_adapter():
    from dynalora.methods.dylora import set_rank

    model, _ = METHODS["dylora"](_bert(), MethodOptions(None, 4, 8.0, 0.0, False))
    for layer in model.modules():
        if hasattr(layer, "adapter_layer_names") and layer.adapter_layer_names[0].startswith("dylora"):
            _randomise(layer)
    batch = tiny.batches(1)[0]
    outputs = {}
    for rank in (1, 4):
        set_rank(model, rank)
        outputs[rank] = model(**batch).logits
    assert not torch.allclose(outputs[1], outputs[4])
    set_rank(model, 1)
    merged = merge(model)
    torch.testing.assert_close(merged(**batch).logits, outputs[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        set_rank(merged, 2)
    with pytest.raises(ValueError, match="outside 1..4"):
        set_rank(METHODS["dylora"](_bert(), MethodOptions(None, 4, 8.0, 0.0, False))[0], 5)


def test_dylora_run_reports_validation_at_every_rank(tiny_model, csv_task, tmp_path):
    import json

    from dynalora.cli import main
    from tests.test_cli import cli_args

    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--method", "dylora", "--rank", "3", "--dylora-frozen")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_rank"]) == ["1", "2", "3"]
    assert metrics["per_rank"]["3"] == metrics["validation"]  # serving rank r is what the run reports


def _galore_weight_step(seed=0):
    """One GaLore step on a (4, 10) weight: returns the gradient, the update and the optimizer."""
    from dynalora.methods import galore

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 4))
    opts = MethodOptions(None, 2, 8.0, 0.0, False)
    opt = galore._optimizer_class()(
        [{"params": [model[0].weight], "rank": 2, "update_proj_gap": 200, "scale": 4.0, "proj_type": "std"}],
        lr=0.1, weight_decay=0.0, no_deprecation_warning=True,
    )  # fmt: skip
    w0 = model[0].weight.detach().clone()
    model(torch.randn(8, 10)).square().sum().backward()
    grad = model[0].weight.grad.clone()
    opt.step()
    return grad, model[0].weight.detach() - w0, opt, opts


def test_galore_steps_adam_in_the_gradients_top_singular_subspace():
    grad, delta, _, _ = _galore_weight_step()
    # computed here: (4, 10) has fewer rows, so P is the top-2 left singular vectors and R = P^T G
    u, _, _ = torch.linalg.svd(grad, full_matrices=False)
    p = u[:, :2]
    r = p.T @ grad
    m, v = 0.1 * r, 0.001 * r * r  # Adam's first moments after one step (betas 0.9, 0.999)
    # galore-torch's (HF's old) AdamW: eps 1e-6 on the uncorrected sqrt(v), both corrections in the step size
    n = (0.001**0.5 / 0.1) * m / (v.sqrt() + 1e-6)
    torch.testing.assert_close(delta, -0.1 * 4.0 * p @ n, rtol=1e-4, atol=1e-6)
    assert torch.linalg.matrix_rank(delta) == 2


def test_galore_state_loads_without_unpickling_and_galore_torch_alone_would_not(tmp_path):
    import pickle

    _, _, opt, _ = _galore_weight_step()
    raw = super(type(opt), opt).state_dict()  # galore-torch's own: GaLoreProjector objects inside
    torch.save(raw, tmp_path / "raw.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "raw.pt", weights_only=True)
    torch.save(opt.state_dict(), tmp_path / "ours.pt")
    _, _, fresh, _ = _galore_weight_step(seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True))
    (state,) = fresh.state.values()
    (kept,) = opt.state.values()
    assert type(state["projector"]).__name__ == "GaLoreProjector"
    torch.testing.assert_close(state["projector"].ortho_matrix, kept["projector"].ortho_matrix)
    torch.testing.assert_close(state["exp_avg"], kept["exp_avg"])
    assert "bitsandbytes" not in __import__("sys").modules  # the 8-bit optimizer was never imported


def test_galore_trains_from_the_cli_and_refuses_dynamic(tiny_model, csv_task, tmp_path, capsys):
    import json

    from dynalora.cli import main
    from tests.test_cli import cli_args

    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--method", "galore", "--lr", "1e-3", "--save-every", "3")) == 0
    assert json.loads((out / "metrics.json").read_text())["method"] == "galore"
    saved = torch.load(out / "checkpoints" / "step-000006" / "state.pt", weights_only=True)["optimizer"]
    projected = [s for s in saved["state"].values() if "projector" in s]
    assert len(projected) == 2 * 6  # the GaLore optimizer, on every block linear weight of the 2 layers
    assert all(8 in s["projector"]["ortho_matrix"].shape for s in projected)  # rank --rank (8)
    capsys.readouterr()
    assert main(cli_args(tiny_model, csv_task, tmp_path / "dyn", "--method", "galore", "--dynamic")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no modules to allocate" in err


def test_l1ra_gates_sit_between_a_and_b():
    from dynalora.methods.l1ra import L1RALinear

    base = _linear()
    layer = L1RALinear(copy.deepcopy(base), r=4, alpha=8.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    _randomise(layer)
    a, b, c = (getattr(layer, n)["default"] for n in ("l1ra_A", "l1ra_B", "l1ra_c"))
    torch.testing.assert_close(layer(x), base(x) + (8.0 / 4) * x @ a.T @ torch.diag(c) @ b.T)
    torch.testing.assert_close(layer.merged_linear()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_l1ra_plan_prunes_dead_gates_and_reassigns_them_round_robin():
    from dynalora.methods.l1ra import plan

    gates = [torch.tensor([1.0, 0.0, 0.5, 0.0]), torch.tensor([0.9, 0.8]), torch.tensor([0.3, 0.95]),
             torch.tensor([0.0, 0.0])]  # fmt: skip
    keep, grow = plan(gates, threshold=1e-6)
    assert [k.tolist() for k in keep] == [[0, 2], [0, 1], [0, 1], [0]]  # the last keeps one rank: its argmax
    # 3 ranks freed; layers 1 and 2 pruned nothing; layer 1's smallest gate (0.8) is larger: it goes first
    assert grow == [0, 2, 1, 0]
    assert sum(k.numel() for k in keep) + sum(grow) == sum(g.numel() for g in gates)  # the budget holds


def test_l1ra_resize_keeps_outputs_and_the_adam_state_of_kept_ranks():
    from dynalora.methods.l1ra import L1RA, L1RALinear

    layer = L1RALinear(_linear(), r=4, alpha=8.0)
    _randomise(layer)
    model = nn.Sequential(layer)
    groups = [{"params": [layer.l1ra_A["default"], layer.l1ra_B["default"]]},
              {"params": [layer.l1ra_c["default"]], "lr": 0.01, "l1ra_gates": True}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=0.01)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        layer.l1ra_c["default"][1] = 0.0  # a dead rank
    old_b, old_state = layer.l1ra_B["default"], dict(opt.state[layer.l1ra_B["default"]])
    x = torch.randn(5, 6)
    before = layer(x)
    keep, grow = torch.tensor([0, 2, 3]), 2
    for attr, (old, new, idx, n) in layer.resize(keep, grow, torch.Generator().manual_seed(0)).items():
        from dynalora.methods.l1ra import _move_state

        _move_state(opt, old, new, idx, n, dim=1 if attr == "l1ra_B" else 0)
    assert layer.r == 5 and layer.scaling == 8.0 / 5  # alpha / r recomputed
    torch.testing.assert_close(layer(x), before)  # B rescaled: the output does not jump
    new_b = layer.l1ra_B["default"]
    assert all(p is not old_b for g in opt.param_groups for p in g["params"]) and new_b in opt.state
    torch.testing.assert_close(opt.state[new_b]["exp_avg"][:, :3], old_state["exp_avg"][:, keep])  # kept, not reset
    assert torch.count_nonzero(opt.state[new_b]["exp_avg"][:, 3:]) == 0
    assert opt.state[new_b]["step"] == old_state["step"]
    model(x).sum().backward()
    opt.step()  # the optimizer runs on the new shapes
    with torch.no_grad():
        c_before = layer.l1ra_c["default"].clone()
    L1RA(total_steps=100, seed=0).after_step(model, step=0, optimizer=opt)  # not a resize step
    expected = (c_before - 0.01 * 1e-3).clamp(0, 1)  # the proximal L1 step at the gates' lr
    torch.testing.assert_close(layer.l1ra_c["default"].detach(), expected)
    from dynalora.errors import UsageError

    with pytest.raises(UsageError, match="needs its length"):  # it resized at every step without one
        L1RA(total_steps=None, seed=0).after_step(model, step=0, optimizer=opt)


def test_l1ra_runs_keeps_its_budget_and_draws_the_rank_map(tiny_model, csv_task, tmp_path, monkeypatch, capsys):
    import json

    from dynalora.cli import main
    from dynalora.methods import l1ra
    from tests.test_cli import cli_args

    monkeypatch.setattr(l1ra, "THRESHOLD", 0.995)  # gates that moved down at all die: resizes happen
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--method", "l1ra", "--rank", "4", "--max-steps", "20")) == 0
    ranks = json.loads((out / "metrics.json").read_text())["ranks"]
    assert sum(ranks.values()) <= 4 * 4 and len(set(ranks.values())) > 1  # moved between modules
    assert (out / "ranks.png").stat().st_size > 0
    capsys.readouterr()
    assert main(cli_args(tiny_model, csv_task, tmp_path / "dyn", "--method", "l1ra", "--dynamic")) == 2
    assert "moves ranks between modules itself" in capsys.readouterr().err


@pytest.mark.parametrize("total", [3, 10, 60, 100, 319, 800, 5000])
def test_every_methods_schedule_fits_inside_the_run(total):
    """What each method schedules by steps happens inside a run of `total` steps, several times where
    it repeats: AdaLoRA's warm-up, budget phase and final phase; L1RA's resizes. (GaLore keeps its
    projection gap of 200: see methods/galore.py.)"""
    from dynalora.methods import adalora, galore, l1ra

    s = adalora.schedule(total)
    assert 0 <= s["tinit"] < total - s["tfinal"] and s["tfinal"] < total  # a budgeting phase exists
    assert 1 <= s["deltaT"] <= max(1, total // 10)  # it reallocates about ten times or more
    assert galore.projection_gap(total) == galore.UPDATE_PROJ_GAP  # measured: a shorter gap did not help
    every = l1ra.L1RA(total, seed=0).every
    assert 1 <= every <= max(1, total // 10)


@pytest.mark.parametrize("method", ["hydra", "dvora", "dylora", "l1ra"])
def test_own_methods_refuse_gpt2_conv1d_layers_in_one_line(method):
    # GPT-2's blocks are Conv1D, not nn.Linear: these methods wrapped nothing (static runs trained only the
    # head; dvora crashed with an IndexError)
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from dynalora.errors import UsageError

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)
    )
    with pytest.raises(UsageError, match="Conv1D"):
        METHODS[method](model, MethodOptions(None, 4, 8.0, 0.0, False))
