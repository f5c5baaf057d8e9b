"""`dynalora train` under torchrun and accelerate launch: 2 CPU processes (gloo) train as 1 does.

Every launch runs in its own session with a deadline; on a timeout the whole process group is
killed and the test fails, so a stuck rank can never hang the suite.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynalora.cli import main
from dynalora.training import checkpoint
from tests.procs import kill_tree, output_of_failed
from tests.test_cli import read_jsonl

BIN = Path(sys.executable).parent
# 64 examples, global batch 8 split 4 + 4: both processes see the whole of every batch between them
RECIPE = ("--batch-size", "8", "--max-steps", "6", "--period", "2", "--adapter-dropout", "0", "--lr", "1e-2",
          "--eval-every", "3", "--quiet")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(model: str, task: dict[str, str], out: Path, *extra: str) -> list[str]:
    files = ("--train-file", task["train"], "--validation-file", task["validation"], "--test-file", task["test"])
    return ["train", "--model", model, *files, *RECIPE, "--output-dir", str(out), *extra]


def _start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(procs: list[subprocess.Popen], timeout: float = 180.0) -> list[tuple[int, str, str]]:
    """Wait for every launch; past the deadline kill them all (and their workers) and fail."""
    deadline, results = time.monotonic() + timeout, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a launch did not finish within {timeout:.0f} s")
    finally:
        for proc in procs:
            kill_tree(proc)
    return results


def _torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]


def _assert_same_training(one: Path, two: Path) -> None:
    """Weights within float tolerance; the same selections, evaluation and (averaged) losses."""
    wa = load_file(str(one / "model" / "adapter_model.safetensors"))
    wb = load_file(str(two / "model" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    assert [h["active"] for h in read_jsonl(one / "allocations.jsonl")] == [
        h["active"] for h in read_jsonl(two / "allocations.jsonl")
    ]
    la, lb = ([r["loss"] for r in read_jsonl(d / "log.jsonl") if r["type"] == "train"] for d in (one, two))
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-5)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert mb["num_processes"] == 2 and ma["num_processes"] == 1
    assert ma["validation"] == mb["validation"] and ma["test"] == mb["test"]


@pytest.fixture(scope="module")
def single(still_model, csv_task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(_train_args(still_model, csv_task, out)) == 0
    return out


def _launch_commands(model: str, task: dict[str, str], out: Path) -> dict[str, list[list[str]]]:
    train = ["-m", "dynalora", *_train_args(model, task, out)]
    port = str(_free_port())
    # two launches, one per "machine", joining one rendezvous over the loopback
    nodes = [
        [str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
         "--master-addr", "127.0.0.1", "--master-port", port, *train]
        for rank in (0, 1)
    ]  # fmt: skip
    accelerate = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, *train]  # fmt: skip
    return {
        # on CPU, `--multi_gpu` is what makes accelerate start several processes (through torchrun)
        "accelerate": [accelerate],
        "two-nodes": nodes,
    }


# torchrun on one machine is what `accelerate` starts here and what the SIGTERM test below runs;
# "two-nodes" is torchrun with a rendezvous across launches
@pytest.mark.parametrize("launcher", ["accelerate", "two-nodes"])
def test_two_processes_train_as_one(still_model, csv_task, tmp_path, single, launcher):
    out = tmp_path / "run"
    results = _finish([_start(c) for c in _launch_commands(still_model, csv_task, out)[launcher]])
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    printed = "".join(stdout for _, stdout, _ in results)
    assert printed.count("outputs in") == 1  # only the main process prints and writes
    _assert_same_training(single, out)


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_resume_matches(still_model, csv_task, tmp_path):
    """Rank 1 alone is signalled; the agreed stop makes both save the same step, then exit."""
    # a checkpoint every 10 steps shows that training is under way; the signal's own comes later
    recipe = ("--max-steps", "80", "--eval-every", "0", "--save-every", "10")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    launch = _start(
        _torchrun("--nproc-per-node", "2", "-m", "dynalora", *_train_args(still_model, csv_task, stopped, *recipe))
    )
    try:
        deadline = time.monotonic() + 120
        # any complete checkpoint (only the newest two are kept, so not a named one)
        while (seen := checkpoint.latest_checkpoint(stopped)) is None:
            assert launch.poll() is None and time.monotonic() < deadline, output_of_failed(launch)
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(launch.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        rank1 = next(
            pid for pid in workers if "LOCAL_RANK=1" in Path(f"/proc/{pid}/environ").read_text().replace("\0", " ")
        )
        os.kill(int(rank1), signal.SIGTERM)
        ((code, _, stderr),) = _finish([launch])
    finally:
        kill_tree(launch)
    assert code != 0
    saved = checkpoint.latest_checkpoint(stopped)
    per_rank = {
        f"{kind}-{rank}.{ext}" for rank in (0, 1) for kind, ext in (("rng", "safetensors"), ("allocator", "pt"))
    }
    assert saved is not None and per_rank <= {p.name for p in saved.iterdir()}
    # written when the signal stopped both, after the one seen before signalling
    assert int(seen.name.split("-")[1]) < int(saved.name.split("-")[1]) < 80
    assert stderr.count(f"after step {int(saved.name.split('-')[1])} of 80") == 2, stderr[
        -3000:
    ]  # both ranks, one step

    resumed = _start(
        _torchrun(
            "--nproc-per-node", "2", "-m", "dynalora", *_train_args(still_model, csv_task, stopped, *recipe, "--resume")
        )
    )
    plain = _start(
        _torchrun("--nproc-per-node", "2", "-m", "dynalora", *_train_args(still_model, csv_task, whole, *recipe))
    )
    for code, _, stderr in _finish([resumed, plain], timeout=300):
        assert code == 0, stderr[-3000:]
    for name, tensor in load_file(str(whole / "model" / "adapter_model.safetensors")).items():
        assert torch.equal(load_file(str(stopped / "model" / "adapter_model.safetensors"))[name], tensor), name
    assert read_jsonl(whole / "allocations.jsonl") == read_jsonl(stopped / "allocations.jsonl")
