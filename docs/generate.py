"""Regenerate the parts of docs/ that come from the code, so that they cannot drift from it.

    python docs/generate.py          # rewrite them
    python docs/generate.py --check  # exit 1 if a committed page differs (tests/test_docs.py runs this)

Generated now: the table of :class:`dynalora.DynamicConfig` fields in docs/options.md, from the
fields' docstrings, defaults and allowed values; and the grouped list of ``dynalora train`` flags
in docs/cli.md, from the command line's own parser. Each lives between a BEGIN and an END marker;
the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import sys
import textwrap
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BEGIN = "<!-- BEGIN GENERATED: {name} (python docs/generate.py) -->"
END = "<!-- END GENERATED: {name} -->"


def rst_to_markdown(text: str) -> str:
    """One line of Markdown from a docstring: ``x`` -> `x`, :func:`~a.b` -> `b`, paragraphs joined."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    text = text.replace("``", "`")
    text = " ".join(line.strip() for line in text.strip().splitlines())
    return text.replace("|", "\\|")


def field_docstrings(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    docs: dict[str, str] = {}
    body = tree.body
    for node, after in zip(body, body[1:], strict=False):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = str(after.value.value)
    return docs


def dynamic_config_table() -> str:
    from dynalora import config

    choices = {
        "measure": config.MEASURES, "allocator": config.ALLOCATORS, "schedule": config.SCHEDULES,
        "budget_schedule": config.BUDGET_SCHEDULES, "optimizer": config.OPTIMIZERS,
        "state_policy": config.STATE_POLICIES, "local_schedule": config.LOCAL_SCHEDULES,
        "cap_mode": config.CAP_MODES, "inactive_dtype": config.INACTIVE_DTYPES,
    }  # fmt: skip
    docs = field_docstrings(config.DynamicConfig)
    lines = ["| field | default | values | allocators | what it does |", "|---|---|---|---|---|"]
    for field in config.DynamicConfig.__dataclass_fields__.values():
        if field.name not in docs:
            raise SystemExit(f"DynamicConfig.{field.name} has no docstring; every field needs one")
        default = field.default
        shown = "2/3" if default == 2 / 3 else default if isinstance(default, str) else repr(default)
        values = " / ".join(f"`{c}`" for c in choices.get(field.name, ()))
        readers = config.READ_BY.get(field.name)
        read_by = ", ".join(f"`{r}`" for r in sorted(readers)) if readers else "any"
        lines.append(f"| `{field.name}` | `{shown}` | {values} | {read_by} | {rst_to_markdown(docs[field.name])} |")
    return "\n".join(lines)


def train_flags() -> str:
    """``dynalora train``'s flags by group, as ``--help`` lists them."""
    from dynalora.cli import build_parser

    parser = build_parser()
    train = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["train"]  # fmt: skip
    lines: list[str] = []
    for group in train._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
        ]
        if not actions:
            continue
        lines += ["", f"**{group.title}**", ""]
        for action in actions:
            names = ", ".join(f"`{o}`" for o in action.option_strings)
            text = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
            if action.choices and "choices:" not in text:
                text += f" (choices: {', '.join(map(str, action.choices))})"
            lines.append(f"- {names}: {rst_to_markdown(text)}")
    return "\n".join(lines).strip()


GENERATED = {
    "options.md": {"DynamicConfig": dynamic_config_table},
    "cli.md": {"train flags": train_flags},
}


def render(page: str) -> str:
    """The page with every generated region replaced by what the code says now."""
    text = (DOCS / page).read_text()
    for name, make in GENERATED[page].items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        if begin not in text or end not in text:
            raise SystemExit(f"docs/{page} lacks the markers of {name!r}: {begin} ... {end}")
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = f"{head}{begin}\n{make()}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page differs from what the code says")
    ns = parser.parse_args(argv)
    stale = []
    for page in GENERATED:
        new = render(page)
        if (DOCS / page).read_text() != new:
            stale.append(page)
            if not ns.check:
                (DOCS / page).write_text(new)
    if ns.check and stale:
        print(f"docs/{', docs/'.join(stale)} differ from the code; run: python docs/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
