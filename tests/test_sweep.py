"""``dynalora sweep``: grid expansion, bad configs, dry run, skip, resume and failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynalora.cli import main
from dynalora.errors import UsageError
from dynalora.training.sweep import expand, load_config, run_name, to_argv
from tests.procs import kill_tree, output_of_failed

ISSUE_EXAMPLE = {
    "name": "embedded",
    "base": {"task": "rotten_tomatoes", "epochs": 1},
    "grid": {
        "method": ["lora", "vera"],
        "dynamic": [True, False],
        "allocator": ["topk"],
        "k": ["1/3", "2/3"],
        "seed": [0, 1, 2],
    },
}


def _write(tmp_path: Path, config: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_the_issue_example_expands_without_duplicating_plain_runs(tmp_path):
    runs = expand(load_config(_write(tmp_path, ISSUE_EXAMPLE)), tmp_path / "out")
    dynamic = [r for r in runs if r.args.dynamic]
    plain = [r for r in runs if not r.args.dynamic]
    assert len(dynamic) == 2 * 2 * 3  # method x k x seed
    assert len(plain) == 2 * 3  # k does not apply: one run per method and seed, not two
    assert all("k" not in r.flags for r in plain)
    assert {r.name for r in plain} == {f"method={m},dynamic=false,seed={s}" for m in ("lora", "vera") for s in range(3)}
    first = runs[0]
    assert first.name == "method=lora,dynamic=true,k=1_3,seed=0"
    assert first.args.output_dir == str(tmp_path / "out" / first.name)
    assert first.args.dynamic_config().k == pytest.approx(1 / 3)
    assert first.args.epochs == 1.0 and first.args.task == "rotten_tomatoes"
    assert len({r.name for r in runs}) == len(runs)


def test_dashes_and_a_list_of_grids(tmp_path):
    config = {
        "name": "two",
        # transformers' names work too; the schedule's kwargs may be a mapping
        "base": {
            "max-steps": 3,
            "allocator": "topk",
            "learning_rate": 0.01,
            "lr_scheduler_type": "cosine",
            "lr_scheduler_kwargs": {"num_cycles": 0.25},
        },  # fmt: skip
        "grid": [
            {"method": ["lora"], "k": ["1/3", "2/3"]},
            {"method": ["lora", "vera"], "dynamic": [False]},
            {"method": ["lora"], "k": ["0.3333333333333333"]},  # the same run as k=1/3: dropped
        ],
    }
    runs = expand(load_config(_write(tmp_path, config)), tmp_path / "out")
    assert [r.name for r in runs] == ["method=lora,k=1_3", "method=lora,k=2_3", "method=lora,dynamic=false",
                                      "method=vera,dynamic=false"]  # fmt: skip
    assert all(r.args.max_steps == 3 and r.args.lr == 0.01 for r in runs)
    assert all(r.args.scheduler_kwargs() == {"num_cycles": 0.25} for r in runs)


def test_method_only_flags_leave_other_methods():
    assert to_argv({"dylora_frozen": True, "dynamic": False, "k": "1/3", "lr": 0.001}) == [
        "--dylora-frozen", "--no-dynamic", "--k", "1/3", "--lr", "0.001"
    ]  # fmt: skip
    assert run_name({"k": "1/3", "seed": 2}, ["k", "seed", "method"]) == "k=1_3,seed=2"


def test_dylora_frozen_applies_to_dylora_only(tmp_path):
    config = {"grid": {"method": ["lora", "dylora"], "dylora_frozen": [True, False]}}
    runs = expand(load_config(_write(tmp_path, config)), tmp_path / "out")
    assert sorted(r.name for r in runs) == sorted([
        "method=lora", "method=dylora,dylora_frozen=true", "method=dylora,dylora_frozen=false"
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("config", "says"),
    [({"base": {"dynamic": False, "k": "4"}, "grid": {"seed": [0, 1]}}, "base.k is read by none of the sweep's runs"),
     ({"base": {"method": "bitfit", "rank": 64}, "grid": {"seed": [0]}}, "base.rank is read by none"),
     ({"grid": {"method": ["lora"], "dylora_frozen": [True]}}, "grid.dylora_frozen is read by none")],
)  # fmt: skip
def test_a_key_no_run_reads_is_refused(tmp_path, config, says):
    with pytest.raises(UsageError, match=says):
        expand(load_config(_write(tmp_path, config)), tmp_path / "out")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"grid": {"rnak": [4]}}, "grid.rnak: not a `dynalora train` flag"),
        (
            {"grid": {"eval_strategy": ["steps"]}},
            "grid.eval_strategy: --eval_strategy (transformers' TrainingArguments) is set by dynalora train itself",
        ),
        ({"grid": {"rank": 4}}, "grid.rank = 4; allowed: a non-empty list of values"),
        ({"grid": {"rank": []}}, "grid.rank = []; allowed: a non-empty list"),
        ({"grid": {"method": ["lora", "nope"]}}, "run method=nope: argument --method: invalid choice: 'nope'"),
        ({"grid": {"rank": ["eight"]}}, "argument --rank: invalid int value: 'eight'"),
        ({"grid": {"k": ["2/0"]}}, "--k '2/0' is not a number"),
        ({"base": {"output_dir": "x"}, "grid": {"seed": [0]}}, "base.output_dir: the sweep sets it"),
        ({"base": {"seed": 1}, "grid": {"seed": [0]}}, "'seed' is in both base and grid"),
        ({"grid": {"seed": [0]}, "grdi": {}}, "unknown key 'grdi'; allowed: name, description, base, grid"),
        ({"base": {"seed": 0}}, "no 'grid'"),
        ({"base": {"targets": ["query", "value"]}, "grid": {"seed": [0]}}, "base.targets = ['query', 'value']: base"),
        ({"grid": {"seed": [{"a": 1}]}}, "allowed: a string, number or boolean"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys, config, expected):
    path = _write(tmp_path, config)
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_not_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed\n")
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "none.yaml"), "--dry-run"]) == 2
    assert "sweep config not found" in capsys.readouterr().err


def test_dry_run_lists_and_trains_nothing(tmp_path, capsys):
    path = _write(tmp_path, ISSUE_EXAMPLE)
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 18 + 1
    assert lines[0].split() == ["new", "method=lora,dynamic=true,k=1_3,seed=0", "--task", "rotten_tomatoes", "--epochs",
                                "1", "--method", "lora", "--dynamic", "--allocator", "topk", "--k", "1/3",
                                "--seed", "0"]  # fmt: skip
    assert lines[-1] == "18 runs: 0 done, 0 to resume, 18 new"
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "out"), "--dry-run", "--jobs", "2"]) == 2
    assert "--jobs is for training, and --dry-run trains nothing" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["paper.yaml", "embedded.yaml", "methods.yaml", "llm.yaml"])
def test_the_committed_experiments_expand(name, capsys):
    path = Path(__file__).parents[1] / "experiments" / name
    assert main(["sweep", str(path), "--output-dir", "/nonexistent/dir", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith("new")
    if name == "paper.yaml":
        runs = expand(load_config(path), "/nonexistent")
        assert {r.args.task for r in runs} == {"sst2", "mrpc", "cola", "qnli", "rte", "stsb"}
        assert {r.args.model for r in runs} == {"FacebookAI/roberta-base"}


# ------------------------------------------------------------------------------------------ real runs
def _tiny_grid(tmp_path: Path, tiny_model: str, csv_task: dict[str, str], grid: dict) -> Path:
    config = {
        "name": "tiny",
        "base": {
            "model": tiny_model,
            "train_file": csv_task["train"],
            "validation_file": csv_task["validation"],
            "test_file": csv_task["test"],
            "max_steps": 4,
            "batch_size": 8,
            "max_length": 16,
            "eval_every": 2,
        },  # fmt: skip
        "grid": grid,
    }
    return _write(tmp_path, config)


def _sweep_here(capsys, *argv: str) -> tuple[int, str, str]:
    """``dynalora sweep`` in this process (its runs are still processes of their own)."""
    capsys.readouterr()
    code = main(["sweep", *argv, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_grid_runs_skips_what_finished_and_resumes_what_did_not(tmp_path, tiny_model, csv_task, capsys):
    path = _tiny_grid(tmp_path, tiny_model, csv_task, {"dynamic": [True, False]})
    out = tmp_path / "out"
    code, _, err = _sweep_here(capsys, str(path), "--output-dir", str(out))
    assert code == 0, err
    names = ["dynamic=true", "dynamic=false"]
    for name in names:
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["num_steps"] == 4
        assert (metrics["dynamic"] is not None) == (name == "dynamic=true")
        assert metrics["memory"]["peak_total"] > 0
    index = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["done"] * 2
    assert all(r["seconds"] > 0 for r in index["runs"])
    stamp = (out / names[1] / "metrics.json").stat().st_mtime_ns

    # a crashed run: its metrics.json never came; the sweep starts it again with --resume
    (out / names[0] / "metrics.json").unlink()
    code, dry, _ = _sweep_here(capsys, str(path), "--output-dir", str(out), "--dry-run")
    assert code == 0 and dry.strip().splitlines()[-1] == "2 runs: 1 done, 1 to resume, 0 new"
    code, _, err = _sweep_here(capsys, str(path), "--output-dir", str(out))
    assert code == 0, err
    assert (out / names[0] / "metrics.json").is_file()
    assert (out / names[1] / "metrics.json").stat().st_mtime_ns == stamp  # not trained again
    commands = [line for line in (out / names[0] / "sweep.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[1].endswith("--resume")

    # a third call trains nothing
    assert _sweep_here(capsys, str(path), "--output-dir", str(out))[0] == 0
    assert [(out / n / "sweep.log").read_text().count("$ ") for n in names] == [2, 1]

    # the grid changed under a finished run: refused before anything trains
    changed = yaml.safe_load(path.read_text())
    changed["base"]["rank"] = 4
    path.write_text(yaml.safe_dump(changed))
    code, _, err = _sweep_here(capsys, str(path), "--output-dir", str(out))
    assert code == 2
    assert "holds a finished run with --rank 8, the grid says 4" in err
    assert err.count("\n") == 1


def test_a_failing_run_does_not_stop_the_grid(tmp_path, tiny_model, csv_task, capsys):
    path = _tiny_grid(tmp_path, tiny_model, csv_task, {"targets": ["no_such_layer", "query,value"]})
    out = tmp_path / "out"
    code, _, err = _sweep_here(capsys, str(path), "--output-dir", str(out))
    assert code == 1
    assert "1 of 2 runs failed: targets=no_such_layer" in err
    assert (out / "targets=query,value" / "metrics.json").is_file()
    assert not (out / "targets=no_such_layer" / "metrics.json").exists()
    assert "no_such_layer" in (out / "targets=no_such_layer" / "sweep.log").read_text()
    status = {r["name"]: r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert status == {"targets=no_such_layer": "failed (exit 2)", "targets=query,value": "done"}


def test_ctrl_c_stops_at_a_checkpoint_and_the_same_command_continues(tmp_path, tiny_model, csv_task):
    import signal
    import time

    from dynalora.training import checkpoint

    # the first run is long enough to be inside training when the signal comes (a checkpoint every 10
    # steps shows it began); the second, which must not start before the signal, is short
    path = _tiny_grid(tmp_path, tiny_model, csv_task, {"max_steps": [100, 2]})
    config = yaml.safe_load(path.read_text())
    del config["base"]["max_steps"]
    config["base"] |= {"eval_every": 0, "save_every": 10}
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dynalora", "sweep", str(path), "--output-dir", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # any complete checkpoint (only the newest two are kept, so not a named one)
        while (seen := checkpoint.latest_checkpoint(out / "max_steps=100")) is None:
            assert proc.poll() is None and time.monotonic() < deadline, output_of_failed(proc)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "sweep stopped; run the same command again to continue" in err
    stopped_at = int(checkpoint.latest_checkpoint(out / "max_steps=100").name.split("-")[1])
    seen_at = int(seen.name.split("-")[1])
    assert seen_at < stopped_at < 100, "the running training checkpointed where the signal stopped it"
    assert not (out / "max_steps=2").exists()  # never started
    assert not (out / "max_steps=100" / "metrics.json").exists()

    assert main(cmd[3:]) == 0  # the same command (here in this process) continues
    metrics = json.loads((out / "max_steps=100" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == stopped_at  # continued from its checkpoint, not from step 0
    assert (out / "max_steps=2" / "metrics.json").is_file()


def test_an_overwrite_stopped_part_way_continues_without_old_results(tmp_path, tiny_model, csv_task, monkeypatch):
    # an interrupted `sweep --overwrite` left the old metrics.json of the runs it had not reached: the
    # same command without --overwrite counted them as done, results from before the overwrite
    from dynalora.training.sweep import Sweep, status

    config = load_config(_tiny_grid(tmp_path, tiny_model, csv_task, {"seed": [0, 1]}))
    out = tmp_path / "out"
    runs = expand(config, out)
    for run in runs:  # an earlier sweep's finished runs, and a file of the user's beside them
        (out / run.name).mkdir(parents=True)
        (out / run.name / "config.json").write_text(json.dumps(run.args.to_dict()))
        (out / run.name / "metrics.json").write_text("{}")
        (out / run.name / "notes.txt").write_text("mine")
    assert [status(r, out) for r in runs] == ["done", "done"]
    started = []

    def stopped_before_training(self, run, state):  # as if Ctrl-C came before any run finished
        started.append((run.name, state))
        return None

    monkeypatch.setattr(Sweep, "_train", stopped_before_training)
    Sweep(config, out, runs, overwrite=True, progress=False).run()
    assert started == [(r.name, "resume") for r in runs]  # each folder still holds the sweep's files
    assert [status(r, out) for r in runs] == ["resume", "resume"]  # nothing counts as done any more
    assert all(not (out / r.name / "metrics.json").exists() for r in runs)
    assert all((out / r.name / "notes.txt").read_text() == "mine" for r in runs)


def test_plain_full_fine_tuning_drops_the_targets_of_its_dynamic_variant(tmp_path, capsys):
    # plain full fine-tuning trains every weight: a grid's targets were kept for it (all-linear: ignored;
    # a layer name: refused only once the run had loaded)
    config = {"name": "full", "base": {"method": "full", "targets": "query,value"}, "grid": {"dynamic": [True, False]}}
    runs = {r.args.dynamic: r for r in expand(load_config(_write(tmp_path, config)), tmp_path / "out")}
    assert runs[True].args.targets == "query,value" and "targets" in runs[True].flags
    assert runs[False].args.targets is None and "targets" not in runs[False].flags
    argv = ["compare", "--methods", "full", "--no-dynamic", "--targets", "query", "--output-dir", str(tmp_path / "c")]
    assert main(argv) == 2  # no run of this comparison reads it
    assert "--targets is read by none of the runs" in capsys.readouterr().err
