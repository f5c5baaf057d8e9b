import pytest

from dynalora import DynamicAllocator, DynamicConfig
from tests import tiny


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("measure", "activation", "forward, adapter, gradient, random"),
        ("allocator", "greedy", "topk, threshold"),
        ("schedule", "cosine", "periodic, once"),
        ("optimizer", "sgd", "global, local"),
        ("budget_schedule", "cosine", "constant, linear"),
        ("cap_mode", "sometimes", "exclude, recompute"),
        ("local_schedule", "epochs", "steps, run"),
        ("state_policy", "drop", "keep, reset, offload"),
        ("inactive_dtype", "int8", "fp32, bf16, fp16"),
        ("k", 0, "int >= 1"),
        ("k", -3, "int >= 1"),
        ("k", 0.0, "(0, 1]"),
        ("k", 1.5, "(0, 1]"),
        ("k", "all", "int >= 1"),
        ("threshold", 0.0, "(0, 1]"),
        ("threshold", 1.2, "(0, 1]"),
        ("threshold", True, "(0, 1]"),  # was taken as 1.0
        ("period", 0, "int >= 1"),
        ("period", 2.5, "int >= 1"),
    ],
)
def test_bad_field_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as err:
        DynamicConfig(**{field: value})
    message = str(err.value)
    assert message.startswith(f"{field}={value!r}")
    assert allowed in message


@pytest.mark.parametrize(
    ("k", "modules", "expected"), [(0.5, 24, 12), (2 / 3, 24, 16), (0.01, 24, 1), (1.0, 7, 7), (5, 8, 5)]
)
def test_resolve_k(k, modules, expected):
    assert DynamicConfig(k=k, allocator="discounted_stochastic", optimizer="global").resolve_k(modules) == expected


def test_k_larger_than_modules_is_rejected_by_allocator():
    model = tiny.peft_bert()  # 2 layers x (query, value) = 4 modules
    with pytest.raises(ValueError, match=r"k=5 is larger than the 4 adapted modules; allowed: 1..4"):
        DynamicAllocator(model, DynamicConfig(k=5, allocator="discounted_stochastic", optimizer="global"))


def test_model_without_adapters_is_rejected():
    with pytest.raises(ValueError, match="no trainable adapter modules"):
        DynamicAllocator(tiny.bert(), DynamicConfig(k=1, allocator="discounted_stochastic", optimizer="global"))


def test_config_round_trips_through_dict():
    cfg = DynamicConfig(measure="gradient", allocator="topk", k=3, period=7, seed=4, optimizer="global")
    assert DynamicConfig(**cfg.to_dict()) == cfg


def test_threshold_refuses_k_and_starts_from_its_own_count():
    with pytest.raises(ValueError, match="k=20 is not read by allocator='threshold'"):
        DynamicConfig(allocator="threshold", k=20, threshold=0.5)
    alloc = DynamicAllocator(tiny.peft_bert(), DynamicConfig(allocator="threshold", threshold=0.5, optimizer="global"))
    assert len(alloc.active) == 2  # ceil(0.5 * 4) at the start


def test_offload_on_cpu_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match=r"state_policy='offload' needs CUDA"):
        DynamicAllocator(
            tiny.peft_bert(),
            DynamicConfig(k=1, state_policy="offload", allocator="discounted_stochastic", optimizer="global"),
        )


def test_paper_preset_is_the_papers_table_1_setting():
    paper = DynamicConfig.from_preset("paper")
    assert (paper.measure, paper.allocator, paper.period, paper.optimizer) == (
        "forward",
        "discounted_stochastic",
        50,
        "global",
    )
    assert paper.resolve_k(24) == 16  # 16 of RoBERTa-base's 24 query/value modules
    assert DynamicConfig.from_preset("paper", period=7).period == 7
    assert DynamicConfig.from_preset("default") == DynamicConfig()
    with pytest.raises(ValueError, match="preset='nope' is not supported; allowed: default, paper, v0.2, full"):
        DynamicConfig.from_preset("nope")


def test_cli_flags_override_the_preset_and_defaults_live_in_dynamic_config():
    from dynalora.training import TrainArgs

    assert TrainArgs().dynamic_config() == DynamicConfig()
    args = TrainArgs(preset="paper", period=10, k="1/2", seed=3)
    assert args.dynamic_config() == DynamicConfig.from_preset("paper", period=10, k=0.5, seed=3)


def test_dynamic_full_fine_tuning_starts_from_its_own_preset():
    from dynalora.training import TrainArgs

    full = TrainArgs(method="full", dynamic=True)
    assert full.preset == "full" and full.dynamic_config() == DynamicConfig.from_preset("full")
    assert full.dynamic_config().allocator == "discounted_stochastic" and full.dynamic_config().state_policy == "reset"
    assert TrainArgs(method="lora").dynamic_config() == DynamicConfig()
    assert TrainArgs(method="full", dynamic=True, preset="default").dynamic_config() == DynamicConfig()


@pytest.mark.parametrize(("field", "value"), [("budget_schedule", "linear"), ("coverage", 0.7)])
def test_what_a_full_budget_leaves_unread_is_refused(field, value):
    with pytest.raises(ValueError) as err:
        DynamicConfig(budget=1.0, **{field: value})
    assert str(err.value).startswith(f"{field}={value!r} has nothing to act on at budget=1")
    assert "allowed: a budget below 1" in str(err.value)
    assert getattr(DynamicConfig(budget=0.99, **{field: value}), field) == value  # below 1 it is read
