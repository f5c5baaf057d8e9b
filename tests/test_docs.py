"""The pages of docs/ that come from the code say what the code says now."""

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_match_the_code():
    gen = _generator()
    for page in gen.GENERATED:
        assert (DOCS.parent / page).read_text() == gen.render(page), f"{page} is stale: run python docs/generate.py"


def test_every_config_field_and_train_flag_is_documented():
    from dynalora import DynamicConfig
    from dynalora.cli import build_parser

    gen = _generator()
    options = (DOCS / "options.md").read_text()
    for name in DynamicConfig.__dataclass_fields__:
        assert f"| `{name}` |" in options, name
    cli = (DOCS / "cli.md").read_text()
    train = build_parser().parse_args(["train"])
    for dest in vars(train):
        if dest not in ("command", "config"):
            assert f"`--{dest.replace('_', '-')}`" in cli, dest
    assert gen.rst_to_markdown("``a`` :func:`~x.y.z` |\n  b") == "`a` `z` \\| b"


def test_field_docstrings_and_missing_markers(tmp_path, monkeypatch):
    from dataclasses import dataclass

    gen = _generator()

    @dataclass
    class Partly:
        x: int = 1
        """documented"""
        y: int = 2

    assert gen.field_docstrings(Partly) == {"x": "documented"}
    (tmp_path / "page.md").write_text("no markers here\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "GENERATED", {"page.md": {"table": lambda: "generated"}})
    with pytest.raises(SystemExit, match="lacks the markers of 'table'"):
        gen.render("page.md")
    begin, end = gen.BEGIN.format(name="table"), gen.END.format(name="table")
    (tmp_path / "page.md").write_text(f"head\n{begin}\nold\n{end}\ntail\n")
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert (tmp_path / "page.md").read_text() == f"head\n{begin}\ngenerated\n{end}\ntail\n"
    assert gen.main(["--check"]) == 0
