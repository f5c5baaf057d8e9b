"""Property-based: any DynamicConfig value and any `dynalora train` flag combination either works or
is refused with one line (ValueError for the library, exit code 2 for the CLI), never a traceback.

Examples are drawn with a fixed seed (``derandomize``), so CI sees the same cases every time.
"""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynalora.training
from dynalora import DynamicConfig
from dynalora.cli import main
from dynalora.config import ALLOCATORS, BUDGET_SCHEDULES, MEASURES, OPTIMIZERS, PRESETS, SCHEDULES, STATE_POLICIES
from tests.test_cli import cli_args

NUMBERS = st.one_of(
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 2 / 3, 1e-9, 1.0000001]),
)
CONFIG_FIELDS = {
    "measure": st.sampled_from([*MEASURES, "bogus"]),
    "allocator": st.sampled_from([*ALLOCATORS, ""]),
    "k": NUMBERS,
    "threshold": NUMBERS,
    "budget": NUMBERS,
    "memory_cap": st.one_of(st.none(), NUMBERS),
    "coverage": NUMBERS,
    "budget_schedule": st.sampled_from([*BUDGET_SCHEDULES, "cosine"]),
    "schedule": st.sampled_from([*SCHEDULES, "never"]),
    "period": st.one_of(st.integers(-2, 100), st.floats(allow_nan=True)),
    "optimizer": st.sampled_from([*OPTIMIZERS, "adam"]),
    "state_policy": st.sampled_from([*STATE_POLICIES, "drop"]),
    "seed": st.integers(-5, 2**31),
}


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.fixed_dictionaries({}, optional=CONFIG_FIELDS))
def test_dynamic_config_is_valid_or_names_what_is_wrong(fields):
    try:
        config = DynamicConfig(**fields)
    except ValueError as err:
        message = str(err)
        assert "\n" not in message and "allowed" in message, message
        assert any(name in message for name in CONFIG_FIELDS), message
        return
    assert config.to_dict() == DynamicConfig(**config.to_dict()).to_dict()  # a valid config round-trips
    assert 0 < config.budget <= 1 and 0 <= config.coverage <= 1 and config.period >= 1
    assert not isinstance(config.k, float) or (math.isfinite(config.k) and 0 < config.k <= 1)


# flag -> values, good and bad
FLAG_VALUES = {
    "--method": ["lora", "dora", "vera", "full", "bitfit", "adapter"],
    "--preset": [*PRESETS, "fast"],
    "--measure": [*MEASURES, "weight"],
    "--allocator": [*ALLOCATORS, "greedy"],
    "--optimizer": [*OPTIMIZERS, "sgd"],
    "--state-policy": [*STATE_POLICIES, "drop"],
    "--budget-schedule": [*BUDGET_SCHEDULES, "cosine"],
    "--k": ["2", "0.5", "2/3", "1/0", "0", "-1", "1.5", "abc", "nan", "100"],
    "--period": ["1", "2", "0", "-3", "x"],
    "--threshold": ["0.9", "0", "1", "1.5", "nan"],
    "--budget": ["0.5", "1", "0", "1.5", "nan", "-0.1"],
    "--memory-cap": ["0.5", "1", "0", "2", "nan"],
    "--coverage": ["0.2", "1", "-1", "2"],
    "--lr": ["1e-3", "0", "-1", "nan", "inf", "lots"],
    "--batch-size": ["1", "8", "0", "-2"],
    "--gradient-accumulation-steps": ["1", "2", "0"],
    "--rank": ["1", "4", "0"],
    "--epochs": ["1", "0", "-1", "nan"],
    "--warmup-ratio": ["0", "0.1", "1", "-0.1"],
    "--adapter-dropout": ["0", "0.1", "1", "-0.1"],
    "--save-every": ["0", "2", "-1"],
    "--keep-checkpoints": ["1", "2", "0"],
    "--eval-every": ["0", "2", "-1"],
    "--max-length": ["8", "0"],
    "--targets": ["query,value", "all-linear", "query", "nonexistent"],
}
SWITCHES = ["--dynamic", "--no-dynamic", "--bf16", "--fp16", "--overwrite", "--resume"]
# values that can work (each may still be refused in combination: offload on CPU, a cap too small)
GOOD = {
    "--method": ["lora", "dora", "vera", "full", "bitfit"],
    "--allocator": list(ALLOCATORS),
    "--measure": list(MEASURES),
    "--optimizer": list(OPTIMIZERS),
    "--state-policy": list(STATE_POLICIES),
    "--k": ["1", "0.5", "2/3"],
    "--period": ["1", "2"],
    "--budget": ["0.3", "1"],
    "--memory-cap": ["0.5", "1"],
    "--gradient-accumulation-steps": ["1", "2"],
    "--save-every": ["0", "1", "2"],
    "--targets": ["query,value", "all-linear"],
}


def _flags(max_flags: int, values: dict[str, list[str]] = FLAG_VALUES, switches: list[str] = SWITCHES):
    pairs = st.lists(st.sampled_from(sorted(values)), max_size=max_flags, unique=True).flatmap(
        lambda names: st.tuples(*[st.tuples(st.just(n), st.sampled_from(values[n])) for n in names])
    )
    return st.tuples(pairs, st.lists(st.sampled_from(switches), max_size=2, unique=True))


def _outcome(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: a value outside a flag's choices or type
        code = exit_.code
    return code, capsys.readouterr().err.strip()


# fixed examples, no deadline; the fixtures (a model folder, the CSVs) are read-only, so sharing is safe
SHARED = settings(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(SHARED, max_examples=300)
@given(_flags(max_flags=5))
def test_any_flag_combination_is_accepted_or_refused_in_one_line(
    tiny_model, csv_task, tmp_path, monkeypatch, capsys, flags
):
    """Validation only: `run` is replaced, so hundreds of combinations take seconds."""
    monkeypatch.setattr(dynalora.training, "run", lambda args: None)
    pairs, switches = flags
    argv = cli_args(tiny_model, csv_task, tmp_path / "run", *[x for pair in pairs for x in pair], *switches)
    code, err = _outcome(argv, capsys)
    assert code in (0, 2), (argv, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("dynalora"), err


@settings(SHARED, max_examples=8)
@given(_flags(max_flags=4, values=GOOD, switches=["--dynamic", "--no-dynamic", "--resume"]))
def test_real_tiny_runs_finish_or_refuse_in_one_line(tiny_model, csv_task, tmp_path_factory, capsys, flags):
    pairs, switches = flags
    out = tmp_path_factory.mktemp("prop") / "run"
    argv = cli_args(tiny_model, csv_task, out, *[x for pair in pairs for x in pair], *switches, "--max-steps", "3")
    code, err = _outcome(argv, capsys)
    assert code in (0, 2), (argv, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("dynalora"), err
    else:
        assert (out / "metrics.json").exists()
