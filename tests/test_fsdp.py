"""`dynalora train --fsdp`: FSDP2 over 2 CPU processes (gloo) trains as 1 process does, and resumes bitwise."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynalora.cli import main
from dynalora.training import checkpoint
from tests.test_cli import read_jsonl
from tests.test_launch import BIN, _finish, _free_port, _start

# The default (DynaLoRA: LoRA's tensors, sharded and reallocated) and dynamic full fine-tuning (the
# layers' own weights). Plain LoRA (`--no-dynamic`) passed the same checks when --fsdp was written;
# it is left out here for the suite's time, as each variant is a launch of two processes.
VARIANTS = {
    "dynalora": ("--period", "2", "--adapter-dropout", "0"),
    "dynamic-full": ("--method", "full", "--dynamic", "--period", "2", "--lr", "1e-3"),
}
# 64 examples, global batch 8 split 4 + 4: both processes see the whole of every batch between them
# resumed from a checkpoint: the default (allocator, local optimizers and their schedules, each
# module's Adam state sharded)
RESUMED = ("dynalora",)
STEPS = ("--batch-size", "8", "--max-steps", "20", "--save-every", "10", "--keep-checkpoints", "2", "--eval-every",
         "10", "--lr", "1e-2", "--quiet")  # fmt: skip


def _train_args(model: str, task: dict[str, str], out: Path, *extra: str) -> list[str]:
    files = ("--train-file", task["train"], "--validation-file", task["validation"], "--test-file", task["test"])
    return ["train", "--model", model, *files, *STEPS, "--output-dir", str(out), *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    (path,) = [p for p in (run / "model").glob("*.safetensors")]
    return load_file(str(path))


def _torchrun(args: list[str]) -> list[str]:
    port = str(_free_port())
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port,
            "-m", "dynalora", *args]  # fmt: skip


@pytest.fixture(scope="module")
def runs(still_model, csv_task, tmp_path_factory) -> Path:
    """Each variant: one process; two FSDP processes; and two FSDP processes resumed from step 10 of those."""
    root = tmp_path_factory.mktemp("fsdp")
    for name, flags in VARIANTS.items():
        assert main(_train_args(still_model, csv_task, root / name / "single", *flags)) == 0
    sharded = {name: _train_args(still_model, csv_task, root / name / "fsdp", *flags, "--fsdp")
               for name, flags in VARIANTS.items()}  # fmt: skip
    for code, _, stderr in _finish([_start(_torchrun(a)) for a in sharded.values()], timeout=240):
        assert code == 0, stderr[-3000:]
    for name in RESUMED:  # a run that stopped after step 10: its config and that checkpoint
        whole, cut = root / name / "fsdp", root / name / "resumed"
        (cut / "checkpoints").mkdir(parents=True)
        config = json.loads((whole / "config.json").read_text()) | {"output_dir": str(cut)}
        (cut / "config.json").write_text(json.dumps(config))
        shutil.copytree(checkpoint.checkpoint_dir(whole, 10), checkpoint.checkpoint_dir(cut, 10))
    resumed = [_torchrun([*a[:a.index("--output-dir") + 1], str(root / n / "resumed"), *a[a.index("--output-dir") + 2:],
                          "--resume"]) for n, a in sharded.items() if n in RESUMED]  # fmt: skip
    for code, _, stderr in _finish([_start(c) for c in resumed], timeout=240):
        assert code == 0, stderr[-3000:]
    return root


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_fsdp_processes_train_as_one(runs, variant):
    single, sharded = runs / variant / "single", runs / variant / "fsdp"
    one, two = _weights(single), _weights(sharded)
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    active = [h["active"] for h in read_jsonl(single / "allocations.jsonl")]
    assert [h["active"] for h in read_jsonl(sharded / "allocations.jsonl")] == active
    assert len({tuple(a) for a in active}) > 1  # it did reallocate
    losses = [[r["loss"] for r in read_jsonl(d / "log.jsonl") if r["type"] == "train"] for d in (single, sharded)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    metrics = json.loads((sharded / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and json.loads((sharded / "config.json").read_text())["fsdp"]
    # each process holds half of the weights: the counted weights are about half of one process's
    full_weights = json.loads((single / "metrics.json").read_text())["memory"]["peak_weights"]
    assert metrics["memory"]["peak_weights"] < 0.6 * full_weights


@pytest.mark.parametrize("variant", RESUMED)
def test_an_fsdp_run_resumed_from_its_checkpoint_ends_bitwise_where_it_would_have(runs, variant):
    whole, resumed = runs / variant / "fsdp", runs / variant / "resumed"
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from_step"] == 10
    expected = _weights(whole)
    got = _weights(resumed)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert {p.name for p in checkpoint.checkpoint_dir(whole, 10).iterdir()} >= {"optimizer-0.pt", "optimizer-1.pt"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--fsdp", "hybrid_shard"), "--fsdp 'hybrid_shard': hybrid_shard is not an FSDP2 setting here; allowed: "),
        (("--fsdp", "--method", "hydra"), "--method hydra keeps state of its own"),
        (("--fsdp", "--base-dtype", "bf16"), "--fsdp gathers each block's weights in one dtype"),
        (("--fsdp",), "--fsdp shards over processes started by a launcher; allowed: torchrun"),
        (("--fsdp", "full_shard offload"), "--fsdp offload moves shards from a CUDA device"),
    ],
)
def test_fsdp_settings_it_cannot_honour_are_refused_in_one_line(still_model, csv_task, tmp_path, capsys, flags,
                                                                message, monkeypatch):  # fmt: skip
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if "offload" in flags[-1]:
        monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "run"
    assert main(_train_args(still_model, csv_task, out, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_accelerate_launch_use_fsdp_is_refused_with_the_command_that_works(still_model, csv_task, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    assert main(_train_args(still_model, csv_task, tmp_path / "run", "--period", "2")) == 2
    err = capsys.readouterr().err
    assert "allowed: accelerate launch (without --use_fsdp) or torchrun, with dynalora's --fsdp" in err
    assert err.count("\n") == 1
