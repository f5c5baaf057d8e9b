"""`dynalora train` on transformers' Trainer: the flags users know, --help, reporting and the Hub."""

import json

import pytest

from dynalora.cli import build_parser, main
from dynalora.training.args import ARG_GROUPS, TrainArgs
from tests.test_cli import cli_args


def test_version(capsys):
    from dynalora import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"dynalora {__version__}"


def test_help_groups_every_flag_and_lists_choices():
    import dataclasses

    from transformers import HfArgumentParser

    grouped = [f.name for group in ARG_GROUPS for f in dataclasses.fields(group)]
    fields = [f.name for f in dataclasses.fields(TrainArgs)]
    assert sorted(grouped) == sorted(fields) and len(set(grouped)) == len(grouped)  # each flag in one group
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert isinstance(train, HfArgumentParser)  # transformers' parser, over dynalora's dataclasses
    text = train.format_help()
    for group in ARG_GROUPS:
        assert f"\n{group._argument_group_name}:\n" in text
    method = next(a for a in train._actions if "--method" in a.option_strings)
    assert "(choices: lora, dora, vera" in method.help
    # one spelling per flag in the help; the underscore one parses too
    assert "  --max-grad-norm MAX_GRAD_NORM\n" in text and "--max_grad_norm" not in text.split("\n\n", 1)[1]
    assert "  --dynamic, --no-dynamic\n" in text


@pytest.mark.parametrize(
    ("argv", "dynamic", "checkpointing", "fsdp"),
    [
        ([], None, None, None),
        (["--dynamic"], True, None, None),
        (["--no-dynamic"], False, None, None),
        (["--no_dynamic", "--gradient_checkpointing"], False, True, None),
        (["--dynamic", "false", "--no-gradient-checkpointing"], False, False, None),
        (["--fsdp"], None, None, "full_shard auto_wrap"),
        (["--fsdp", "shard_grad_op"], None, None, "shard_grad_op"),
    ],
)
def test_boolean_and_optional_value_flags(argv, dynamic, checkpointing, fsdp):
    ns = build_parser().parse_args(["train", *argv])
    assert (ns.dynamic, ns.gradient_checkpointing, ns.fsdp) == (dynamic, checkpointing, fsdp)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--report-to", "nosuch"), "--report-to nosuch: not an installed integration; allowed here: none, all"),
        (("--push-to-hub",), "--push-to-hub needs the Hugging Face Hub, and HF_HUB_OFFLINE is set"),
        (("--hub-model-id", "me/run"), "--hub-model-id names the repository of --push-to-hub"),
        (("--logging-steps", "0"), "--logging-steps must be >= 1"),
        (("--logging-steps", "5"), "--logging-steps sets how often Trainer reports to --report-to, which is none"),
    ],
)
def test_reporting_flags_refused_in_one_line(tiny_model, csv_task, tmp_path, capsys, monkeypatch, flags, says):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(cli_args(tiny_model, csv_task, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "run").exists()


def test_push_to_hub_uploads_the_model_folder(tiny_model, csv_task, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class Repo:
        repo_id = "someone/tiny-run"

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, exist_ok: calls.append(repo_id) or Repo())
    monkeypatch.setattr(
        huggingface_hub, "upload_folder", lambda repo_id, folder_path, commit_message: calls.append(folder_path)
    )
    out = tmp_path / "tiny-run"
    assert main(cli_args(tiny_model, csv_task, out, "--push-to-hub", "--max-steps", "2")) == 0
    assert calls == ["tiny-run", str(out / "model")]  # the folder's name unless --hub-model-id
    assert (out / "model" / "README.md").exists()  # the card goes up with the adapter


def test_checkpoints_carry_trainer_state_so_trainer_skips_the_data_seen(tiny_model, csv_task, tmp_path):
    out = tmp_path / "run"
    assert main(cli_args(tiny_model, csv_task, out, "--save-every", "4")) == 0
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["max_steps"] == 6


def test_a_checkpoint_of_the_old_loop_is_refused_in_one_line(tiny_model, csv_task, tmp_path, capsys):
    out = tmp_path / "run"
    argv = cli_args(tiny_model, csv_task, out, "--save-every", "3")
    assert main(argv) == 0
    (out / "metrics.json").unlink()  # as if it had stopped after step 6
    (out / "checkpoints" / "step-000006" / "trainer_state.json").unlink()  # as the old loop wrote them
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written by an earlier dynalora" in err and "--overwrite" in err


def test_logging_steps_go_with_report_to():
    from dynalora.training import TrainArgs

    assert TrainArgs().logging_steps == 10  # recorded as before: --resume compares it with older runs
    assert TrainArgs(logging_steps=5, report_to="all").logging_steps == 5
