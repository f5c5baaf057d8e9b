"""Checkpoints, exact resume and failure safety of `dynalora train` (tiny model, tiny CSV, CPU)."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynalora.cli import main
from dynalora.training import checkpoint, job, meter
from tests.procs import kill_tree
from tests.test_cli import cli_args, read_jsonl

# 64 examples in batches of 8 and 2 micro-batches a step: 4 optimizer steps an epoch, so 14 steps
# cross three epoch boundaries; period 4 reallocates at steps 4, 8 and 12.
RECIPE = ("--max-steps", "14", "--period", "4", "--eval-every", "5", "--gradient-accumulation-steps", "2")


class Crash(Exception):
    pass


def _crashed_run(monkeypatch, argv: list[str], steps: int) -> None:
    """Run ``argv`` until it dies after optimizer step ``steps``."""
    with monkeypatch.context() as m:
        _crash_after(m, steps)
        with pytest.raises(Crash):
            main(argv)


def _crash_after(monkeypatch, steps: int) -> None:
    """The process dies (an exception nobody catches) right after optimizer step ``steps``."""
    real_end, count = meter.Meter.on_step_end, {"n": 0}

    def step_end(self, args, state, control, **kwargs):
        count["n"] += 1
        if count["n"] == steps:
            raise Crash
        return real_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(meter.Meter, "on_step_end", step_end)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    peft, own = out / "model" / "adapter_model.safetensors", out / "model" / "dynalora_adapter.safetensors"
    return load_file(str(peft if peft.exists() else own))


def _same_run(a: Path, b: Path) -> None:
    """Bitwise the same final weights, selections and training log."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert read_jsonl(a / "allocations.jsonl") == read_jsonl(b / "allocations.jsonl")
    train = [
        [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(d / "log.jsonl") if r["type"] == "train"] for d in (a, b)
    ]
    assert train[0] == train[1]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["validation"] == mb["validation"] and ma["module_active_steps"] == mb["module_active_steps"]


@pytest.mark.parametrize(
    ("optimizer", "save_every", "crash_at"),
    [("local", 5, 7), ("global", 4, 9)],  # a checkpoint mid-epoch / on a reallocation; crash after a reallocation
)
def test_resume_after_a_crash_is_bitwise_the_uninterrupted_run(
    tiny_model, csv_task, tmp_path, monkeypatch, optimizer, save_every, crash_at
):
    recipe = (*RECIPE, "--optimizer", optimizer, "--adapter-dropout", "0.1")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(cli_args(tiny_model, csv_task, whole, *recipe)) == 0

    _crashed_run(
        monkeypatch, cli_args(tiny_model, csv_task, broken, *recipe, "--save-every", str(save_every)), crash_at
    )
    last = crash_at // save_every * save_every
    saved = checkpoint.latest_checkpoint(broken)
    assert saved.name == f"step-{last:06d}" and not (broken / "metrics.json").exists()
    # nothing in a checkpoint needs unpickling
    assert set(torch.load(saved / "state.pt", weights_only=True)) == {"optimizer", "scheduler", "scaler", "method"}
    assert torch.load(saved / "allocator-0.pt", weights_only=True)["step"] == last

    assert main(cli_args(tiny_model, csv_task, broken, *recipe, "--save-every", str(save_every), "--resume")) == 0
    _same_run(whole, broken)
    metrics = json.loads((broken / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == last
    # pruned to the newest two (--keep-checkpoints' default)
    steps = [int(p.name.split("-")[1]) for p in checkpoint.list_checkpoints(broken)]
    assert steps == [s for s in range(save_every, 15, save_every)][-2:]


def test_a_crash_after_the_last_checkpoint_resumes_without_an_extra_step(tiny_model, csv_task, tmp_path, monkeypatch):
    """The process dies after the final step's checkpoint, before its outputs: Trainer, resumed at
    max_steps, would take one step more (at a constant rate it changes the weights)."""
    from dynalora.training import engine

    recipe = (*RECIPE, "--lr-scheduler-type", "constant", "--save-every", "7")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(cli_args(tiny_model, csv_task, whole, *recipe)) == 0
    with monkeypatch.context() as m:
        m.setattr(engine, "finish", lambda *a, **k: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            main(cli_args(tiny_model, csv_task, broken, *recipe))
    assert checkpoint.latest_checkpoint(broken).name == "step-000014" and not (broken / "metrics.json").exists()
    assert main(cli_args(tiny_model, csv_task, broken, *recipe, "--resume")) == 0
    _same_run(whole, broken)
    assert json.loads((broken / "metrics.json").read_text())["resumed_from_step"] == 14


def _signal_during_step(monkeypatch, step: int) -> None:
    """SIGTERM to this process while optimizer step ``step`` runs (after its start, before its optimizer
    step), as a launcher's or a scheduler's signal would come: caught by the run's own handler."""
    real = meter.Meter.on_step_begin

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, args, state, control, **kwargs)

    monkeypatch.setattr(meter.Meter, "on_step_begin", on_step_begin)


def test_a_stop_request_during_the_last_step_finishes_the_run(tiny_model, csv_task, tmp_path, monkeypatch, capsys):
    """Nothing is left to resume: the run writes its outputs and exits 0, with no extra step."""
    _signal_during_step(monkeypatch, 6)
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--eval-every", "0")) == 0  # 6 steps
    assert [r["step"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (out / "metrics.json").exists() and checkpoint.latest_checkpoint(out) is None
    assert "--resume" not in capsys.readouterr().err


def test_a_stop_request_mid_step_checkpoints_that_step_and_resume_is_bitwise(
    tiny_model, csv_task, tmp_path, monkeypatch, capsys
):
    recipe = ("--max-steps", "8", "--period", "3", "--eval-every", "0")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(cli_args(tiny_model, csv_task, whole, *recipe)) == 0
    with monkeypatch.context() as patch:
        _signal_during_step(patch, 5)
        assert main(cli_args(tiny_model, csv_task, stopped, *recipe)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.count("stopped by SIGTERM after step 5 of 8") == 1 and "--resume" in err  # said once
    assert checkpoint.latest_checkpoint(stopped).name == "step-000005"
    assert main(cli_args(tiny_model, csv_task, stopped, *recipe, "--resume")) == 0
    _same_run(whole, stopped)


def test_gradient_accumulation_counts_optimizer_steps(still_model, csv_task, tmp_path):
    """2 micro-batches of 4 are one step of 8: same weights (no dropout), same reallocation steps."""
    common = ("--max-steps", "6", "--period", "2", "--adapter-dropout", "0", "--eval-every", "0")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(cli_args(still_model, csv_task, one, *common)) == 0
    accumulate = ("--batch-size", "4", "--gradient-accumulation-steps", "2")
    assert main(cli_args(still_model, csv_task, two, *common, *accumulate)) == 0
    wa, wb = _weights(one), _weights(two)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    steps = [[h["step"] for h in read_jsonl(d / "allocations.jsonl")] for d in (one, two)]
    assert steps[0] == steps[1] == [0, 2, 4, 6]
    assert [r["step"] for r in read_jsonl(two / "log.jsonl") if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tiny_model, csv_task, tmp_path, monkeypatch, capsys
):
    real_load, calls = job.load_model, {"n": 0}

    def poisoned(*args, **kwargs):
        tokenizer, model = real_load(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == 5:  # the 5th training forward: step 5 (no accumulation)
                    return output * float("nan")
            return output

        model.classifier.register_forward_hook(hook)
        return tokenizer, model

    monkeypatch.setattr(job, "load_model", poisoned)
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--max-steps", "8", "--save-every", "2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training loss is nan at step 5" in err and "step-000004" in err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000002", "step-000004"]
    assert not (out / "metrics.json").exists()


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_model, csv_task, tmp_path, monkeypatch, capsys):
    real, calls = checkpoint.save_file, {"n": 0}

    def save_file(tensors, filename):
        calls["n"] += 1
        if "step-000004" in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--max-steps", "8", "--save-every", "2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "step-000002 is intact" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # no half-written folder
    weights, state, rng, progress = checkpoint.load(out / "checkpoints" / "step-000002", rank=0, world_size=1)
    assert progress["step"] == 2 and weights and state["allocator"]["step"] == 2


def test_any_failure_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous(
    tiny_model, csv_task, tmp_path, monkeypatch, capsys
):
    # not only OSError: every process agrees on any failure before it raises, so under several
    # processes none is left waiting in a collective for the one that failed
    from transformers.trainer_callback import TrainerState

    real = TrainerState.save_to_json

    def save_to_json(self, path):
        if "step-000004" in path:
            raise TypeError("Object of type Tensor is not JSON serializable")
        real(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--max-steps", "8", "--save-every", "2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not JSON serializable" in err and "step-000002 is intact" in err, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_resume_refusals_are_one_line(tiny_model, csv_task, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _crashed_run(monkeypatch, cli_args(tiny_model, csv_task, out, "--save-every", "2"), 3)
    capsys.readouterr()
    cases = [
        ((), "--resume to continue it"),  # the folder holds a stopped run: say how to continue
        (("--resume", "--lr", "0.5"), "--resume: --lr is 0.5 here but 0.01"),
    ]
    for extra, expected in cases:
        assert main(cli_args(tiny_model, csv_task, out, "--save-every", "2", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert main(cli_args(tiny_model, csv_task, out, "--save-every", "2", "--resume")) == 0
    capsys.readouterr()
    assert main(cli_args(tiny_model, csv_task, out, "--save-every", "2", "--resume")) == 2
    assert "already finished" in capsys.readouterr().err


def test_resume_without_a_checkpoint_starts_from_step_zero(tiny_model, csv_task, tmp_path):
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--resume")) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] is None


def test_an_unwritable_output_folder_is_one_line(tiny_model, csv_task, capsys):
    assert main(cli_args(tiny_model, csv_task, "/proc/dynalora-cannot-write-here")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not writable" in err


def _launch(command: list[str], timeout: float = 120.0, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )


def _kill(proc: subprocess.Popen) -> None:
    kill_tree(proc)


@pytest.fixture
def one_thread():
    """This process on one torch thread, as the launched ones (OMP_NUM_THREADS=1): on some CPUs the
    kernels split float sums by thread count, and a bitwise comparison across processes needs them equal."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sigterm_checkpoints_and_resume_finishes_the_same_run(tiny_model, csv_task, tmp_path, one_thread):
    recipe = ("--max-steps", "150", "--eval-every", "0", "--period", "4")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    args = [a for a in cli_args(tiny_model, csv_task, stopped, *recipe) if a != "--quiet"]  # the bar tells the step
    proc = _launch([sys.executable, "-m", "dynalora", *args])
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(int(n) >= 3 for n in re.findall(r"(\d+)/150", "".join(seen))):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        _kill(proc)
    reader.join(timeout=10)
    last = "".join(seen).strip().splitlines()[-1]  # the message comes after the progress bar
    saved = checkpoint.latest_checkpoint(stopped)
    assert f"stopped by SIGTERM after step {int(saved.name.split('-')[1])} of 150" in last and "--resume" in last
    assert not (stopped / "metrics.json").exists()

    assert main(cli_args(tiny_model, csv_task, stopped, *recipe, "--resume")) == 0
    assert main(cli_args(tiny_model, csv_task, whole, *recipe)) == 0
    _same_run(whole, stopped)


def test_a_checkpoint_missing_its_rng_state_is_refused(tiny_model, csv_task, tmp_path, monkeypatch, capsys):
    """accelerate only logs an RNG state it cannot restore; a bitwise resume must not go on without it."""
    out = tmp_path / "run"
    _crashed_run(monkeypatch, cli_args(tiny_model, csv_task, out, "--save-every", "2"), 3)
    (out / "checkpoints" / "step-000002" / "rng-0.safetensors").unlink()
    capsys.readouterr()
    assert main(cli_args(tiny_model, csv_task, out, "--save-every", "2", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rng-0.safetensors is missing" in err


def test_a_resume_on_another_thread_count_says_it_may_not_be_bitwise(
    tiny_model, csv_task, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "run"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _crashed_run(monkeypatch, cli_args(tiny_model, csv_task, out, "--save-every", "2"), 3)
        torch.set_num_threads(2)
        with caplog.at_level("WARNING", logger="dynalora.training.resume"):
            assert main(cli_args(tiny_model, csv_task, out, "--save-every", "2", "--resume")) == 0
    finally:
        torch.set_num_threads(before)
    warned = [r.getMessage() for r in caplog.records if "torch threads" in r.getMessage()]
    assert len(warned) == 1 and "resuming with 2 torch threads" in warned[0] and "written with 1" in warned[0]


@pytest.mark.parametrize(("method", "state"), [("adalora", "ranks"), ("dylora", "per_rank"), ("l1ra", "ranks")])
def test_methods_with_their_own_state_resume_exactly(tiny_model, csv_task, tmp_path, monkeypatch, method, state):
    """PEFT never saves AdaLoRA's importance averages, DyLoRA's rank draws come from a generator, and
    L1RA's layers change shape: a checkpoint must hold all of it, or the resumed run trains differently."""
    from dynalora.methods import l1ra

    monkeypatch.setattr(l1ra, "THRESHOLD", 0.995)  # L1RA: resizes happen in 20 steps (one before the crash)
    recipe = ("--method", method, "--no-dynamic", "--rank", "4", "--max-steps", "20", "--eval-every", "0")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(cli_args(tiny_model, csv_task, whole, *recipe)) == 0
    _crashed_run(monkeypatch, cli_args(tiny_model, csv_task, broken, *recipe, "--save-every", "8"), 9)
    assert main(cli_args(tiny_model, csv_task, broken, *recipe, "--save-every", "8", "--resume")) == 0
    wa, wb = _weights(whole), _weights(broken)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    results = [json.loads((d / "metrics.json").read_text())[state] for d in (whole, broken)]
    assert results[0] == results[1]


def test_a_run_begun_before_a_flag_existed_resumes_with_that_flags_default(tmp_path):
    """config.json of an older version lacks newer flags: the run began with their defaults."""
    import json

    from dynalora.errors import UsageError
    from dynalora.training import TrainArgs
    from dynalora.training.resume import resume_point

    out = tmp_path / "run"
    args = TrainArgs(output_dir=str(out), resume=True)
    began = {k: v for k, v in args.to_dict().items() if k not in ("lr_scheduler_type", "max_grad_norm")}
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    (out / "checkpoints" / "step-000004" / "progress.json").write_text("{}")
    (out / "checkpoints" / "step-000004" / "trainer_state.json").write_text("{}")
    (out / "config.json").write_text(json.dumps(began))
    assert resume_point(args) == out / "checkpoints" / "step-000004"
    with pytest.raises(UsageError, match="--lr-scheduler-type is 'cosine' here but 'linear'"):
        resume_point(TrainArgs(output_dir=str(out), resume=True, lr_scheduler_type="cosine"))
