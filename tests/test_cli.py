"""`dynalora train/compare/report` end to end on a tiny model and a tiny CSV; bad input exits 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from dynalora.cli import main
from dynalora.errors import UsageError
from dynalora.methods import ADAPTER_METHODS
from tests.tiny import write_csv


def cli_args(tiny_model, csv_task, out, *extra):
    """A short run on the tiny model; dynamic runs reallocate every 2 steps (a static run refuses --period)."""
    method = extra[extra.index("--method") + 1] if "--method" in extra else "lora"
    static = "--no-dynamic" in extra or ("--dynamic" not in extra and method not in ADAPTER_METHODS)
    return [
        "train", "--model", tiny_model, "--task", "custom", "--train-file", csv_task["train"],
        "--validation-file", csv_task["validation"], "--test-file", csv_task["test"], "--batch-size", "8",
        "--max-steps", "6", "--eval-every", "3", *([] if static else ["--period", "2"]), "--lr", "1e-2",
        "--output-dir", str(out), "--quiet", *extra,
    ]  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_dynamic_lora_run_writes_every_output(tiny_model, csv_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--allocator", "topk", "--k", "2")) == 0
    printed = capsys.readouterr().out
    assert "DynaLoRA" in printed and "MiB at the peak step, of which weights" in printed
    for name in ("config.json", "metrics.json", "log.jsonl", "allocations.jsonl", "loss.png", "module_activity.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "model" / "adapter_model.safetensors").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "lora" and m["dynamic"]["k_modules"] == 2 and m["num_modules"] == 4
    assert set(m["validation"]) == {"accuracy", "f1_macro"} and set(m["test"]) == {"accuracy", "f1_macro"}
    assert sum(m["module_active_steps"].values()) == 2 * 6
    head = 32 * 2 + 2
    lora = 4 * 2 * (32 * 8)  # 4 modules x (A: 8x32, B: 32x8)
    assert m["trainable_params"] == lora + head
    assert m["mean_active_trainable_params"] == lora // 2 + head
    assert m["peak_memory_kind"] == "cpu_peak_rss" and m["peak_memory_bytes"] > 0
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    base_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    weights = base_bytes + 4 * (lora + head)  # + the adapters and PEFT's trained copy of the head, fp32
    assert m["memory"]["peak_weights"] == weights
    assert m["memory"]["peak_total_with_weights"] == weights + m["memory"]["peak_total"]
    assert m["median_step_ms"] > 0 and m["train_runtime_s"] > 0
    log = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["split"]) for r in log if r["type"] == "eval"] == [
        (3, "validation"),
        (6, "validation"),
        (6, "test"),
    ]
    allocations = read_jsonl(out / "allocations.jsonl")
    assert [a["step"] for a in allocations] == [0, 2, 4, 6]
    assert all(len(a["active"]) == 2 for a in allocations)
    config = json.loads((out / "config.json").read_text())
    assert config["k"] == "2" and config["num_steps"] == 6
    predictions = json.loads((out / "predictions.json").read_text())
    gold = [0 if line.endswith(",neg") else 1 for line in Path(csv_task["test"]).read_text().splitlines()[1:]]
    assert predictions["test"]["labels"] == gold  # "neg" < "pos": ids in sorted order
    for split in ("validation", "test"):
        p = predictions[split]
        hits = sum(a == b for a, b in zip(p["predictions"], p["labels"], strict=True))
        assert hits / len(p["labels"]) == pytest.approx(m[split]["accuracy"])


def test_files_alone_make_a_custom_task(tiny_model, csv_task, tmp_path, capsys):
    args = cli_args(tiny_model, csv_task, tmp_path / "run", "--no-dynamic")
    del args[args.index("--task") : args.index("--task") + 2]
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"] == "custom"
    args = cli_args(tiny_model, csv_task, tmp_path / "other", "--no-dynamic")
    args[args.index("--task") + 1] = "political"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "drop --task political or pass --task custom" in err
    assert not (tmp_path / "other").exists()


def test_plain_lora_trains_everything_every_step(tiny_model, csv_task, tmp_path):
    out = tmp_path / "plain"
    assert main(cli_args(tiny_model, csv_task, out, "--no-dynamic")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dynamic"] is None and m["module_active_steps"] == {}
    assert m["mean_active_trainable_params"] == m["trainable_params"] == 4 * 2 * 32 * 8 + 66
    assert not (out / "allocations.jsonl").exists()
    # each split's class balance, beside which an accuracy reads for what it is (counted from the files here)
    import csv
    from collections import Counter

    for split in ("validation", "test"):
        with open(csv_task[split]) as f:
            labels = Counter(row["label"] for row in csv.DictReader(f))
        assert sorted(m["label_counts"][split].values()) == sorted(labels.values())
        assert m["majority_baseline"][split] == pytest.approx(max(labels.values()) / sum(labels.values()))
    assert f"(n={sum(labels.values())})" in (out / "model" / "README.md").read_text()


def _count(model_dir, keep):
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return sum(p.numel() for n, p in model.named_parameters() if keep(n))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--method", "bitfit"], lambda n: n.endswith(".bias") or n.startswith("classifier")),
        (["--method", "full"], lambda n: True),
    ],
)
def test_baselines_train_what_they_should(tiny_model, csv_task, tmp_path, flags, expected):
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, *flags)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dynamic"] is None
    assert m["trainable_params"] == _count(tiny_model, expected)


@pytest.mark.parametrize("method", ["vera", "dora"])
def test_other_adapters_run_dynamic(tiny_model, csv_task, tmp_path, method):
    out = tmp_path / method
    assert main(cli_args(tiny_model, csv_task, out, "--method", method, "--allocator", "topk", "--k", "0.5")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and m["dynamic"]["k_modules"] == 2
    assert sum(m["module_active_steps"].values()) == 12


def test_dynamic_full_finetuning_allocates_block_linears(tiny_model, csv_task, tmp_path):
    out = tmp_path / "dynfull"
    flags = ("--method", "full", "--dynamic", "--allocator", "topk", "--k", "4", "--state-policy", "reset")
    assert main(cli_args(tiny_model, csv_task, out, *flags)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dynamic"]["state_policy"] == "reset"
    assert (
        m["num_modules"] == 2 * 6
    )  # per block: query key value attention.output.dense intermediate.dense output.dense
    assert sum(m["module_active_steps"].values()) == 4 * 6
    assert m["mean_active_trainable_params"] < m["trainable_params"]


def test_cutoff_allocation_over_all_linear_layers(tiny_model, csv_task, tmp_path):
    out = tmp_path / "cutoff"
    flags = ("--targets", "all-linear", "--allocator", "cutoff", "--budget", "0.75", "--period", "2")
    assert main(cli_args(tiny_model, csv_task, out, *flags)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_modules"] == 2 * 6  # every linear layer of the 2 blocks; not the pooler, not the head
    history = [json.loads(line) for line in (out / "allocations.jsonl").read_text().splitlines()]
    # two blocks of equal size: budget 0.75 = the top block (0.5) + block 0 half the time.
    # Rounds 0, 1, 2, ...: u = 0, 0.618, 0.236, 0.854, 0.472, 0.090: depth 0 exactly when u < 0.5
    golden = (5**0.5 - 1) / 2
    assert [h["depth"] for h in history] == [0 if (t * golden) % 1 < 0.5 else 1 for t in range(len(history))]
    for h in history:
        assert len(h["active"]) == (12 if h["depth"] == 0 else 6)
        assert h["backward_share"] == (1.0 if h["depth"] == 0 else 0.5)


def test_regression_on_custom_floats(tiny_model, tmp_path):
    files = {s: write_csv(tmp_path / f"{s}.csv", 32, i, regression=True) for i, s in enumerate(["train", "validation"])}
    out = tmp_path / "reg"
    argv = [
        "train", "--model", tiny_model, "--task", "custom", "--train-file", files["train"],
        "--validation-file", files["validation"], "--regression", "--max-steps", "3",
        "--output-dir", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["validation"]) == {"pearson", "spearman"} and m["test"] == {}


def test_compare_prints_both_runs(tiny_model, csv_task, tmp_path, capsys):
    argv = cli_args(tiny_model, csv_task, tmp_path / "cmp")
    argv[0] = "compare"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "DynaLoRA" in printed and "\nLoRA " in printed
    assert (tmp_path / "cmp" / "compare.md").exists()


def test_report_reads_runs(tiny_model, csv_task, tmp_path, capsys):
    assert main(cli_args(tiny_model, csv_task, tmp_path / "r")) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "r"), "--format", "markdown"]) == 0
    assert "| DynaLoRA" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- bad input
BAD = {
    "unknown task": (["--task", "imdb"], "invalid choice"),
    "unknown method": (["--method", "lokr"], "invalid choice"),
    "missing model": (["--model", "/nonexistent/model"], "no such directory"),
    "missing column": (["--text-column", "review"], "review"),
    "k above modules": (["--allocator", "topk", "--k", "9"], "k=9 is larger than the 4 adapted modules"),
    "k not a number": (["--k", "lots"], "--k 'lots' is not a number"),
    "bad threshold": (["--allocator", "threshold", "--threshold", "1.5"], "--threshold=1.5 is out of range"),
    "targets match nothing": (["--targets", "q_proj"], "--targets q_proj matched no linear layer"),
    "bf16 on cpu": (["--bf16", "--device", "cpu"], "need a CUDA device"),
    "bad batch size": (["--batch-size", "0"], "--batch-size must be >= 1"),
    "no test examples": (["--max-test-samples", "0"], "--max-test-samples must be >= 1, got 0"),
    "negative save interval": (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
    "bad cap mode": (["--cap-mode", "sometimes"], "argument --cap-mode: invalid choice: 'sometimes'"),
    "bad device": (["--device", "gpu"], "--device 'gpu' is not a device"),
    "lr not finite": (["--lr", "nan"], "--lr must be a finite number"),
    "epochs not finite": (["--epochs", "inf"], "--epochs must be a finite number"),
    "offload on cpu": (["--state-policy", "offload"], "--state-policy='offload' needs CUDA"),
    "budget out of range": (["--allocator", "cutoff", "--budget", "0"], "--budget=0.0 is out of range"),
    "warm-up of a constant rate": (
        ["--lr-scheduler-type", "constant", "--warmup-steps", "5"],
        "--warmup-steps is not read by --lr-scheduler-type constant",
    ),
    "warm-up ratio of a constant rate": (
        ["--lr-scheduler-type", "constant", "--warmup-ratio", "0.1"],
        "--warmup-ratio is not read by --lr-scheduler-type constant",
    ),
    "resume and overwrite": (["--resume", "--overwrite"], "--overwrite starts it over; choose one"),
    "preset of a static run": (["--no-dynamic", "--preset", "default"], "--preset is a dynamic setting"),
    "dynamic flag of a static method": (
        ["--method", "bitfit", "--k", "3"],
        "--k is a dynamic setting, and --method bitfit trains statically; drop it",
    ),
    "pacing a full budget": (
        ["--budget", "1", "--budget-schedule", "linear"],
        "--budget-schedule='linear' has nothing to act on at budget=1",
    ),
    "memory cap below the top block": (
        ["--allocator", "cutoff", "--memory-cap", "0.2"],
        "--memory-cap=0.2 is below the share of the top block alone (0.500)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_overwritten(tiny_model, csv_task, tmp_path, capsys, case):
    flags, expected = BAD[case]
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = None
    try:
        code = main(cli_args(tiny_model, csv_task, out, *flags))
    except SystemExit as exc:  # argparse choices
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_warm_up_ratio_is_refused_only_when_given_to_a_constant_rate():
    from dynalora.training import TrainArgs

    assert TrainArgs().warmup_ratio == 0.06  # transformers' constant rate ignores warm-up: the default passes
    assert TrainArgs(lr_scheduler_type="constant").warmup_ratio == 0.06
    assert TrainArgs(lr_scheduler_type="constant", warmup_ratio=0.0, warmup_steps=0).warmup_ratio == 0.0
    assert TrainArgs(lr_scheduler_type="cosine", warmup_ratio=0.2).warmup_ratio == 0.2
    with pytest.raises(UsageError, match="--warmup-ratio is not read by --lr-scheduler-type constant"):
        TrainArgs(lr_scheduler_type="constant", warmup_ratio=0.06)  # the default's value, given


def test_bad_labels_and_empty_split(tiny_model, csv_task, tmp_path, capsys):
    floats = tmp_path / "floats.csv"
    floats.write_text("text,label\ngood movie,0.5\nbad movie,1.5\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    for bad, expected in ((str(floats), "--regression"), (str(empty), "empty")):
        argv = cli_args(tiny_model, csv_task, tmp_path / "x")
        argv[argv.index("--train-file") + 1] = bad
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err
        assert not (tmp_path / "x").exists()


def test_existing_run_is_not_overwritten_without_flag(tiny_model, csv_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(cli_args(tiny_model, csv_task, out, "--seed", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(cli_args(tiny_model, csv_task, out, "--seed", "1", "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_console_entry_point_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dynalora", "train", "--task", "nope"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--task" in proc.stderr


@pytest.mark.slow
def test_real_embedded_default_runs_a_few_steps(tmp_path):
    """The real MiniLM-L6 on the embedded Rotten Tomatoes data, all defaults but the size of the run."""
    out = tmp_path / "default"
    argv = [
        "train",
        "--max-steps",
        "3",
        "--max-train-samples",
        "96",
        "--max-eval-samples",
        "64",
        "--max-test-samples",  # a sample of the 1,276 test reviews: the whole split is most of this test's time
        "64",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "rotten_tomatoes" and m["method"] == "lora"
    from dynalora import DynamicConfig

    assert m["dynamic"] == DynamicConfig().to_dict() | {"k_modules": 8}  # the defaults live in DynamicConfig
    assert m["num_modules"] == 12  # 6 layers x (query, value); k = 2/3 of them
    assert 0.0 <= m["test"]["accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("method", "dynamic", "lr"),
    [("lora", None, 2e-3), ("vera", None, 3e-2), ("full", None, 5e-5), ("full", True, 3e-4), ("bitfit", None, 1e-3)],
)
def test_learning_rate_defaults_by_method(method, dynamic, lr):
    from dynalora.training import TrainArgs

    args = TrainArgs(method=method, dynamic=dynamic)
    assert args.lr == lr
    assert args.dynamic == (method in ("lora", "dora", "vera") if dynamic is None else dynamic)
    assert TrainArgs(method=method, dynamic=dynamic, lr=3e-4).lr == 3e-4


# What each method reads of the options that not every method reads, written out here by hand from
# the builders (VeRA and DVoRA scale by trained vectors, not alpha; GaLore projects every linear
# weight at --rank; plain full fine-tuning and BitFit have no adapter).
ADAPTER = {"targets", "rank", "alpha", "adapter_dropout"}
READS = {"lora": ADAPTER, "dora": ADAPTER, "hydra": ADAPTER, "adalora": ADAPTER, "l1ra": ADAPTER,
         "dylora": ADAPTER | {"dylora_frozen"}, "vera": ADAPTER - {"alpha"}, "dvora": ADAPTER - {"alpha"},
         "full": {"targets"}, "bitfit": set(), "galore": {"rank"}}  # fmt: skip
GIVEN = {"targets": "query", "rank": 4, "alpha": 4.0, "adapter_dropout": 0.2, "dylora_frozen": True}


@pytest.mark.parametrize("method", sorted(READS))
@pytest.mark.parametrize("option", sorted(GIVEN))
def test_an_option_the_method_does_not_read_is_refused(method, option):
    from dynalora.errors import UsageError
    from dynalora.training import TrainArgs

    dynamic = True if method == "full" else None  # full reads --targets when dynamic (plain: see below)
    if option in READS[method]:
        assert getattr(TrainArgs(method=method, dynamic=dynamic, **{option: GIVEN[option]}), option) == GIVEN[option]
    else:
        flag = "--" + option.replace("_", "-")
        with pytest.raises(UsageError, match=f"{flag} applies to --method .* only, not {method}; drop it"):
            TrainArgs(method=method, dynamic=dynamic, **{option: GIVEN[option]})
    TrainArgs(method=method, dynamic=dynamic)  # the defaults are accepted by every method


@pytest.mark.parametrize("targets", ["query", "all-linear"])  # all-linear was accepted, and ignored
def test_plain_full_fine_tuning_refuses_targets(tiny_model, csv_task, tmp_path, capsys, targets):
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--method", "full", "--targets", targets)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--targets is read by dynamic --method full only" in err
    assert not (out / "config.json").exists()


def test_max_test_samples_without_a_test_split_is_refused(tiny_model, csv_task, tmp_path, capsys):
    out = tmp_path / "run"
    argv = cli_args(tiny_model, csv_task, out, "--max-test-samples", "2")
    del argv[argv.index("--test-file") : argv.index("--test-file") + 2]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-test-samples: --task custom has no labelled test split" in err
    assert not (out / "config.json").exists()


def test_output_dir_under_a_file_is_refused(tiny_model, csv_task, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert main(cli_args(tiny_model, csv_task, blocker / "run")) == 2
    assert "is a file" in capsys.readouterr().err
    assert blocker.read_text() == "mine"


def test_a_users_model_folder_is_not_deleted(tiny_model, csv_task, tmp_path, capsys):
    out = tmp_path / "work"
    (out / "model").mkdir(parents=True)
    (out / "model" / "my_checkpoint.bin").write_text("precious")
    assert main(cli_args(tiny_model, csv_task, out)) == 2
    assert "already holds a run (model)" in capsys.readouterr().err
    assert (out / "model" / "my_checkpoint.bin").read_text() == "precious"


def test_compare_refuses_an_existing_comparison_and_resolves_lr_per_variant(tiny_model, csv_task, tmp_path, capsys):
    root = tmp_path / "cmp"
    root.mkdir()
    (root / "compare.md").write_text("old table")
    argv = cli_args(tiny_model, csv_task, root, "--method", "full")
    argv[0] = "compare"
    argv.remove("--lr")
    argv.remove("1e-2")
    assert main(argv) == 2
    assert "already holds a comparison" in capsys.readouterr().err
    assert (root / "compare.md").read_text() == "old table"
    assert main([*argv, "--overwrite"]) == 0
    lrs = {v: json.loads((root / v / "config.json").read_text())["lr"] for v in ("dynamic", "plain")}
    assert lrs == {"dynamic": 3e-4, "plain": 5e-5}

    # --resume keeps a finished variant and trains what is missing (it was refused as "already holds")
    import shutil

    shutil.rmtree(root / "plain")
    stamp = (root / "dynamic" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert (root / "dynamic" / "metrics.json").stat().st_mtime_ns == stamp
    assert (root / "plain" / "metrics.json").is_file() and "Full FT" in (root / "compare.md").read_text()
    capsys.readouterr()
    assert main([*argv, "--resume", "--lr", "1e-3"]) == 2  # a finished variant with other flags: refused
    assert "--lr is 0.001 here but 0.0003" in capsys.readouterr().err


def test_evaluating_more_often_does_not_change_training(tiny_model, csv_task, tmp_path):
    """Dropout is on in the tiny model: an evaluation that touched the global RNG would change the run."""
    from safetensors.torch import load_file

    weights = []
    for every in ("1", "0"):
        out = tmp_path / f"eval{every}"
        argv = cli_args(tiny_model, csv_task, out)
        argv[argv.index("--eval-every") + 1] = every
        assert main(argv) == 0
        weights.append(load_file(out / "model" / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_compare_methods_runs_each_plain_and_dynamic_where_it_has_one(tiny_model, csv_task, tmp_path, capsys):
    root = tmp_path / "cmp"
    argv = cli_args(tiny_model, csv_task, root, "--max-steps", "4", "--rank", "4", "--alpha", "4",
                    "--methods", "lora,adalora,bitfit,hydra,dvora")  # fmt: skip
    argv[0] = "compare"
    assert main(argv) == 0
    expected = ["lora-dynamic", "lora", "adalora", "bitfit", "hydra-dynamic", "hydra", "dvora-dynamic", "dvora"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(expected)
    # each method got the options it reads; the others stay at their defaults (8, 16.0) where it would refuse them
    config = {name: json.loads((root / name / "config.json").read_text()) for name in expected}
    assert {name: (c["rank"], c["alpha"]) for name, c in config.items()} == {
        "lora-dynamic": (4, 4.0), "lora": (4, 4.0), "adalora": (4, 4.0), "bitfit": (8, 16.0),
        "hydra-dynamic": (4, 4.0), "hydra": (4, 4.0), "dvora-dynamic": (4, 16.0), "dvora": (4, 16.0),
    }  # fmt: skip
    table = (root / "compare.md").read_text()
    labels = ["DynaLoRA", "| LoRA", "AdaLoRA", "BitFit", "DynaHydra", "| Hydra", "DynaDVoRA", "| DVoRA"]
    assert all(label in table for label in labels), table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(expected)
    capsys.readouterr()
    assert main([*argv, "--method", "vera", "--overwrite"]) == 2  # two names for what runs: refused
    assert "--method vera and --methods both name what compare runs" in capsys.readouterr().err
    argv[-1] = "lora,l2ra"
    argv += ["--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown l2ra" in err


def test_transformers_flag_names_mean_the_same_as_ours(tiny_model, csv_task, tmp_path):
    from dynalora.cli import build_parser

    ours = [
        "train",
        "--model",
        "m",
        "--lr",
        "0.01",
        "--epochs",
        "2",
        "--save-every",
        "3",
        "--rank",
        "4",
        "--eval-every",
        "5",
        "--keep-checkpoints",
        "1",
        "--alpha",
        "8",
        "--adapter-dropout",
        "0.2",
    ]
    theirs = ["train", "--model_name_or_path", "m", "--learning_rate", "0.01", "--num_train_epochs", "2",
              "--save_steps", "3", "--lora_r", "4", "--eval-steps", "5", "--save_total_limit", "1",
              "--lora-alpha", "8", "--lora_dropout", "0.2"]  # fmt: skip
    parser = build_parser()
    assert vars(parser.parse_args(ours)) == vars(parser.parse_args(theirs))
    assert vars(parser.parse_args(["train", "--max_steps", "7"]))["max_steps"] == 7  # underscores everywhere


def test_max_grad_norm_clips_every_step(tiny_model, csv_task, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = torch.nn.utils.clip_grad_norm_
    seen = []

    def spy(params, max_norm, *args, **kwargs):
        params = [p for p in params if p.grad is not None]
        before = real(params, float("inf"))  # the norm, unchanged
        real(params, max_norm)
        if max_norm != float("inf"):  # Trainer also reads the norm without clipping
            after = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
            seen.append((float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    monkeypatch.setattr(
        Accelerator, "clip_grad_norm_", lambda self, params, max_norm, norm_type=2: spy(params, max_norm)
    )
    assert main(cli_args(tiny_model, csv_task, tmp_path / "run", "--max-grad-norm", "0.05")) == 0
    assert len(seen) == 6  # once per optimizer step
    assert all(after <= 0.05 * (1 + 1e-4) for _, after in seen)
    assert any(before > 0.05 for before, _ in seen)  # it had something to clip


def test_lr_scheduler_type_and_warmup_steps(tiny_model, csv_task, tmp_path):
    import math

    out = tmp_path / "run"
    extra = ("--no-dynamic", "--lr-scheduler-type", "cosine", "--warmup-steps", "2")
    assert main(cli_args(tiny_model, csv_task, out, *extra)) == 0
    rates = [r["lr"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]
    # the rate after step t (t = 1..6) is the schedule's rate of step t: warm-up 2, cosine to 0 at 6
    expected = [1e-2 * (t / 2 if t < 2 else 0.5 * (1 + math.cos(math.pi * (t - 2) / 4))) for t in range(1, 7)]
    assert rates == pytest.approx(expected, abs=1e-12)


def test_saved_adapter_names_a_loadable_base_and_carries_a_model_card(tiny_model, csv_task, tmp_path):
    from dynalora.models import portable_model_id

    assert portable_model_id("embedded:minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_model_id("embedded:smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out)) == 0
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model  # as the user named it
    card = (out / "model" / "README.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert card.startswith("---\nbase_model: " + tiny_model + "\nlibrary_name: peft\n")
    assert f"test accuracy {metrics['test']['accuracy']:.4f}" in card and "cutoff allocator" in card


def test_config_file_gives_flags_and_the_command_line_overrides_it(tiny_model, csv_task, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.05\nallocator: topk\nk: 2\nmax-steps: 4\nlearning_rate_is_not_a_flag: 1\n")
    out = tmp_path / "run"
    assert main([*cli_args(tiny_model, csv_task, out), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "learning_rate_is_not_a_flag is not a `dynalora train` flag" in err and "\n" not in err
    config.write_text("per_device_train_batch_size: 4\n")  # a transformers setting dynalora sets itself
    assert main([*cli_args(tiny_model, csv_task, out), "--config", str(config)]) == 2
    assert "per_device_train_batch_size (transformers' TrainingArguments) is set by dynalora" in capsys.readouterr().err
    # transformers' names work in the file as on the command line: learning_rate for lr
    config.write_text("learning_rate: 0.05\nallocator: topk\nk: 2\nmax-steps: 4\nlr_scheduler_kwargs: {power: 2.0}\n"
                      "lr_scheduler_type: polynomial\n")  # fmt: skip
    argv = cli_args(tiny_model, csv_task, out)  # it sets --max-steps 6 and --lr 1e-2 itself
    argv.remove("--lr"), argv.remove("1e-2")
    assert main(["train", "--config", str(config), *argv[1:]]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 0.05 and saved["allocator"] == "topk" and saved["k"] == "2"  # from the file
    assert json.loads(saved["lr_scheduler_kwargs"]) == {"power": 2.0}  # a mapping in YAML
    assert saved["num_steps"] == 6  # the command line's --max-steps 6 over the file's 4
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "full", "--rank", "16"], "--rank is read by none of the runs this comparison makes"),
        (["--methods", "full,bitfit", "--rank", "16"], "--rank is read by none of the runs"),
        (["--methods", "bitfit", "--k", "3"], "--k is read by none of the runs"),
        (["--methods", "lora", "--no-dynamic", "--k", "3"], "--k is read by none of the runs"),
        (["--methods", "bitfit", "--dynamic"], "--dynamic: none of --methods bitfit has a dynamic variant"),
        (["--method", "bitfit"], "--method bitfit has no dynamic variant to compare with; allowed: --methods"),
    ],
)
def test_compare_refuses_what_none_of_its_runs_reads(argv, expected, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--output-dir", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_config_file_refuses_two_spellings_of_one_flag_and_a_second_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.001\nlearning_rate: 0.002\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learning_rate and another key both set lr; keep one" in err, err
    config.write_text("lr: 0.001\n")
    assert main(["train", "--config", str(config), "--config", str(config), "--output-dir", str(out)]) == 2
    assert "--config is given twice" in capsys.readouterr().err
    assert not out.exists()


def _optimizer_seen(monkeypatch) -> list:
    """The optimizer Trainer steps, as the Meter sees it at each step's end (accelerate's wrapper taken off)."""
    from dynalora.training.meter import Meter

    seen, real = [], Meter.on_step_end

    def spy(self, args, state, control, model=None, optimizer=None, **kwargs):
        seen.append(getattr(optimizer, "optimizer", optimizer))
        return real(self, args, state, control, model=model, optimizer=optimizer, **kwargs)

    monkeypatch.setattr(Meter, "on_step_end", spy)
    return seen


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("--no-dynamic", "--optim", "sgd"), (torch.optim.SGD, None)),
        (("--no-dynamic", "--adam-beta2", "0.95", "--adam-epsilon", "1e-6"), (torch.optim.AdamW, ((0.9, 0.95), 1e-6))),
        (("--optimizer", "global", "--adam-beta1", "0.8"), (torch.optim.AdamW, ((0.8, 0.999), 1e-8))),
        (("--optimizer", "local", "--optim", "rmsprop"), (torch.optim.RMSprop, None)),
    ],
)
def test_optim_and_adam_settings_build_the_optimizer(tiny_model, csv_task, tmp_path, monkeypatch, extra, expected):
    seen = _optimizer_seen(monkeypatch)
    assert main(cli_args(tiny_model, csv_task, tmp_path / "run", *extra)) == 0
    optimizer = seen[-1]
    # local optimisation: one optimizer per module, each of the class asked for
    inner = getattr(optimizer, "optimizers", [optimizer])
    cls, adam = expected
    assert len(inner) >= 1 and all(type(o) is cls for o in inner)
    for o in inner:
        group = o.param_groups[0]
        assert group["weight_decay"] == 0.01
        if adam is not None:
            assert (group["betas"], group["eps"]) == adam
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["optim"] == (extra[extra.index("--optim") + 1] if "--optim" in extra else None)  # None: adamw_torch


def test_lr_scheduler_kwargs_shape_the_schedule(tiny_model, csv_task, tmp_path):
    import math

    out = tmp_path / "run"
    extra = ("--no-dynamic", "--lr-scheduler-type", "cosine_with_restarts", "--lr-scheduler-kwargs",
             '{"num_cycles": 2}', "--warmup-steps", "0")  # fmt: skip
    assert main(cli_args(tiny_model, csv_task, out, *extra)) == 0
    rates = [r["lr"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]
    # two cosines over 6 steps: each 3 steps long, back at the peak after the first
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * ((2 * t / 6) % 1.0))) for t in range(1, 7)]
    expected[-1] = 0.0  # the schedule ends at 0
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[2] == pytest.approx(1e-2)  # the restart: only num_cycles=2 gives it


def test_label_smoothing_mixes_the_loss_linearly(tiny_model, csv_task, tmp_path):
    # Smoothing by e trains on (1 - e) * NLL + e * (the loss against uniform targets): the first
    # step's loss (same weights, same batch) is linear in e, which no other change of the loss is.
    first = []
    for e in ("0", "0.2", "0.4"):
        out = tmp_path / f"run-{e}"
        assert main(cli_args(tiny_model, csv_task, out, "--no-dynamic", "--label-smoothing-factor", e)) == 0
        first.append(next(r["loss"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"))
    assert abs(first[1] - first[0]) > 1e-4
    assert first[2] - first[1] == pytest.approx(first[1] - first[0], abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--optim", "sgd", "--adam-beta2", "0.9"), "--adam-beta2 is read by --optim adamw_torch and adamw_torch_f"),
        (("--optim", "adafactor"), "argument --optim: invalid choice"),
        (("--method", "galore", "--optim", "sgd"), "--optim: --method galore builds its own optimizer"),
        (("--lr-scheduler-kwargs", '{"num_cycles": 2}'), "linear takes no 'num_cycles'; allowed: nothing"),
        (("--lr-scheduler-type", "cosine", "--lr-scheduler-kwargs", "{num_cycles: 2}"), "is not a JSON object"),
        (("--lr-scheduler-type", "warmup_stable_decay"), "num_decay_steps"),
        (("--label-smoothing-factor", "0.1", "--regression"), "--label-smoothing-factor smooths class targets"),
        (
            ("--per_device_train_batch_size", "8"),
            "--per_device_train_batch_size (transformers' TrainingArguments) "
            "is set by dynalora train itself; use --batch-size",
        ),
        (("--eval-strategy=steps",), "use --eval-every N"),
        (
            ("--optim_args", "x=1"),
            "--optim_args is a setting of transformers' TrainingArguments that dynalora train does not apply",
        ),
        (("--packing",), "--packing is a setting of TRL's SFTConfig"),
        (("--not_a_flag_anywhere", "1"), "unrecognized arguments: --not_a_flag_anywhere 1"),
        (("--optim", "sgd", "--adam-beta1", "0.9"), "--adam-beta1 is read by"),  # given, even at its default
        (("--no-fsdp",), "--fsdp takes a value and has no --no- form; omit it"),
        (("--optim", "local"), "the dynamic setting of global or local optimisation is --optimizer"),
        (
            ("--lr", "5e-4", "--lr-scheduler-type", "polynomial", "--lr-scheduler-kwargs", '{"lr_end": 0.001}'),
            "lr_end (0.001) must be smaller than initial lr (0.0005)",
        ),
        (("--lr-scheduler-type", "inverse_sqrt", "--lr-scheduler-kwargs", '{"timescale": 0}'), "division by zero"),
        (("--label-smoothing-factor", "0.1", "--task", "stsb"), "--task stsb has none"),
    ],
)
def test_training_arguments_flags_are_applied_or_refused_in_one_line(tiny_model, csv_task, tmp_path, capsys, extra,
                                                                     message):  # fmt: skip
    out = tmp_path / "run"
    try:
        code = main(cli_args(tiny_model, csv_task, out, *extra))
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()


def test_every_training_arguments_field_is_taken_or_refused_in_one_line(capsys):
    # each field of TrainingArguments and SFTConfig: a dynalora train flag of that name (or an alias), or
    # refused naming it; none slips in as an abbreviation of one of ours
    import dataclasses

    from transformers import TrainingArguments
    from trl import SFTConfig

    from dynalora.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    ours = {flag for action in train._actions for flag in action.option_strings}
    for name in ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "adam_beta2",
                 "weight_decay", "max_grad_norm", "gradient_accumulation_steps", "gradient_checkpointing", "bf16",
                 "report_to", "logging_steps", "save_steps", "save_total_limit", "num_train_epochs", "output_dir",
                 "push_to_hub", "fsdp", "label_smoothing_factor", "dataloader_num_workers", "max_length"):  # fmt: skip
        assert "--" + name in ours, name
    refused = 0
    for name in sorted({f.name for f in (*dataclasses.fields(TrainingArguments), *dataclasses.fields(SFTConfig))}):
        if "--" + name in ours:
            continue
        with pytest.raises(SystemExit) as exit:
            parser.parse_args(["train", f"--{name}=1"])
        err = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and f"--{name} " in err and "\n" not in err and "unrecognized" not in err, err
        refused += 1
    assert refused > 80


def test_scheduler_kwargs_are_kept_in_one_spelling_and_causal_lm_refuses_label_smoothing():
    from dynalora.errors import UsageError
    from dynalora.training import TrainArgs

    spaced = TrainArgs(lr_scheduler_type="cosine", lr_scheduler_kwargs='{ "num_cycles" : 2 }')
    assert (
        spaced.lr_scheduler_kwargs
        == TrainArgs(lr_scheduler_type="cosine", lr_scheduler_kwargs='{"num_cycles":2}').lr_scheduler_kwargs
    )
    assert TrainArgs(lr_scheduler_kwargs="{}").lr_scheduler_kwargs is None  # the same run as no flag: --resume agrees
    with pytest.raises(UsageError, match="TRL's SFTTrainer deprecates it"):
        TrainArgs(model="embedded:smollm2-135m", label_smoothing_factor=0.1)


def test_dynamic_flags_are_dynamic_config_fields(capsys):
    # one place defines a dynamic setting: each DynamicConfig field but the seed (--seed is the run's) is a
    # train flag of its name with the field's choices, unset unless given; given, it reaches the config
    import dataclasses

    from dynalora import DynamicConfig
    from dynalora.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions if a.help != "==SUPPRESS=="}  # not the hidden --no-X forms
    settings = [f for f in dataclasses.fields(DynamicConfig) if f.name != "seed"]
    assert len(settings) == 17 and "seed" in actions and "--seed" in actions["seed"].option_strings
    group = next(g for g in train._action_groups if g.title.startswith("dynamic allocation"))
    shown = [a.dest for a in group._group_actions if a.help != "==SUPPRESS=="]
    assert shown == ["dynamic", "preset", *(f.name for f in settings)]
    for setting in settings:
        assert actions[setting.name].default is None, setting.name
        assert tuple(actions[setting.name].choices or ()) == setting.metadata.get("choices", ()), setting.name
    chosen = {name: tuple(actions[name].choices) for name in actions if actions[name].choices}
    assert {n: c for n, c in chosen.items() if n in {f.name for f in settings}} == {  # written out by hand
        "measure": ("forward", "adapter", "gradient", "random"),
        "allocator": ("topk", "threshold", "stochastic", "discounted_stochastic", "random", "cutoff"),
        "budget_schedule": ("constant", "linear"), "cap_mode": ("exclude", "recompute"),
        "schedule": ("periodic", "once"), "optimizer": ("global", "local"), "local_schedule": ("steps", "run"),
        "state_policy": ("keep", "reset", "offload"), "inactive_dtype": ("fp32", "bf16", "fp16"),
    }  # fmt: skip
    assert "(default: gradient)" in actions["measure"].help and "(default: 2/3)" in actions["k"].help
    given = ["--allocator", "topk", "--k", "3/4", "--memory-cap", "0.5", "--cap-mode", "recompute",
             "--normalize-types", "--optimizer", "global", "--state-policy", "reset", "--period", "7"]  # fmt: skip
    args = parser.parse_args(["train", *given])
    config = DynamicConfig(allocator="topk", k=0.75, memory_cap=0.5, cap_mode="recompute", normalize_types=True,
                           optimizer="global", state_policy="reset", period=7)  # fmt: skip
    from dynalora.cli import _train_args

    assert _train_args(args).dynamic_config() == config
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["train", "--cap-mode", "sometimes"])
    assert exit.value.code == 2 and "--cap-mode" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cap_mode='sometimes' is not supported; allowed: exclude, recompute"):
        DynamicConfig(cap_mode="sometimes", memory_cap=0.5)

    from dynalora.training.args import _dynamic_flag

    @dataclasses.dataclass
    class Bare:
        x: int = 3

    with pytest.raises(TypeError, match="DynamicConfig.x has no flag help; declare it with _setting"):
        _dynamic_flag(dataclasses.fields(Bare)[0])


def test_a_run_that_ends_before_its_first_reallocation_says_so(tiny_model, csv_task, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="dynalora.controller"):
        assert main(cli_args(tiny_model, csv_task, tmp_path / "long")) == 0  # 6 steps, --period 2
        assert not [r for r in caplog.records if "first reallocation" in r.getMessage()]
        assert main(cli_args(tiny_model, csv_task, tmp_path / "short", "--max-steps", "2")) == 0
    said = [r.getMessage() for r in caplog.records if "first reallocation" in r.getMessage()]
    assert said == ["the run's 2 optimizer steps end before its first reallocation (period 2): no module is "
                    "chosen by importance in it"]  # fmt: skip


def test_metrics_json_writes_no_bare_nan():
    # a constant regression prediction has no correlation: NaN, which json.dumps wrote as a bare NaN
    from dynalora.training.outputs import _finite

    metrics = {"test": {"pearson": float("nan"), "mse": 0.5}, "steps": [1.0, float("inf")], "n": 3}
    assert json.loads(json.dumps(_finite(metrics), allow_nan=False)) == {
        "test": {"pearson": None, "mse": 0.5}, "steps": [1.0, None], "n": 3
    }  # fmt: skip
