"""Regenerate the parts of docs/ that come from the code, so that they cannot drift from it.

    python docs/generate.py          # rewrite them
    python docs/generate.py --check  # exit 1 if a committed page differs (tests/test_docs.py runs this)

Generated now: the table of :class:`dynalora.DynamicConfig` fields in docs/options.md, from the
fields' docstrings, defaults and allowed values; the grouped list of ``dynalora train`` flags
in docs/cli.md, from the command line's own parser; and the measured tables of README.md and
docs/results.md, from the benchmarks' output files in benchmarks/results/. Each lives between a
BEGIN and an END marker; the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import re
import statistics
import sys
import textwrap
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
RESULTS = ROOT / "benchmarks" / "results"
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

    docs = field_docstrings(config.DynamicConfig)
    lines = ["| field | default | values | allocators | what it does |", "|---|---|---|---|---|"]
    for field in config.DynamicConfig.__dataclass_fields__.values():
        if field.name not in docs:
            raise SystemExit(f"DynamicConfig.{field.name} has no docstring; every field needs one")
        default = field.default
        shown = "2/3" if default == 2 / 3 else default if isinstance(default, str) else repr(default)
        values = " / ".join(f"`{c}`" for c in field.metadata.get("choices", ()))
        readers = config.READ_BY.get(field.name)
        read_by = ", ".join(f"`{r}`" for r in sorted(readers)) if readers else "any"
        lines.append(f"| `{field.name}` | `{shown}` | {values} | {read_by} | {rst_to_markdown(docs[field.name])} |")
    return "\n".join(lines)


def train_flags() -> str:
    """``dynalora train``'s flags by group, as ``--help`` lists them."""
    from dynalora.cli import build_parser
    from dynalora.training.args import flag_names

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
            names = ", ".join(f"`{o}`" for o in flag_names(action))
            text = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
            if action.choices and "choices:" not in text:
                text += f" (choices: {', '.join(map(str, action.choices))})"
            lines.append(f"- {names}: {rst_to_markdown(text)}")
    return "\n".join(lines).strip()


def _results(name: str) -> list[dict]:
    data = json.loads((RESULTS / f"{name}.json").read_text())
    return data.get("runs", data.get("rows"))


def _ratio(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f"{value / base:.3f}"


def _seeds(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return f"seeds {', '.join(map(str, seeds))}"


def _quality_gap(suite: str, variant: str, baseline: str, note: str = "") -> str:
    """Mean over tasks of (accuracy - the baseline's on the same seed), test split, in points, with the
    tasks and seeds it covers; blank when the variant has no paired run. Runs pair only on one engine
    (rows without ``engine`` ran on dynalora's own loop, which draws another data order than Trainer)."""
    rows = _results(suite)

    def key(r: dict) -> tuple[str, int, str]:
        return r["task"], r["seed"], r.get("engine", "loop")

    base = {key(r): r["test"] for r in rows if r["variant"] == baseline}
    per_task: dict[str, list[float]] = {}
    for r in rows:
        if r["variant"] == variant and key(r) in base:
            per_task.setdefault(r["task"], []).append(100 * (r["test"] - base[key(r)]))
    if not per_task:
        return ""
    gap = sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)
    seeds = sorted({r["seed"] for r in rows if r["variant"] == variant and key(r) in base})
    what = "task" if len(per_task) == 1 else "tasks"
    sign = "−" if gap < 0 else "+"
    return f"{sign}{abs(gap):.2f} ({len(per_task)} {what}, {_seeds(seeds)}{note})"


# README's headline: (configuration, model, baseline, whole-run step and counted bytes from cost.json's runs
# or llm_cost.json's rows, total peak from total_memory.json, quality from a quality suite: suite.json, each task
# at LoRA's best rate; quality.json, the older suite at 2e-3; llm_quality.json, exact match on SmolLM2)
HEADLINE = [
    ("default (`cutoff`, budget 0.5, `local`)", "MiniLM-L6 q,v", "LoRA",
     ("cost", "default", "lora"), ("minilm", "default"), ("suite", "default", "lora")),
    ("`--memory-cap 0.5`", "MiniLM-L6 q,v", "LoRA",
     ("cost", "memory cap 0.5", "lora"), ("minilm", "cap-0.5"), ("quality", "memory-cap-0.5", "lora", "; 2e-3 suite")),
    ("the default over a bf16 base (`--base-dtype bf16`)", "MiniLM-L6 q,v", "LoRA",
     None, ("minilm", "default-bf16-base"), None),
    ("dynamic full, bf16 storage (`--method full --dynamic --inactive-dtype bf16`)", "MiniLM-L6", "full FT",
     None, ("minilm", "dynamic-full-bf16"), ("suite", "dynamic-full-bf16", "full")),
    ("the same, `--memory-cap 0.35 --cap-mode recompute`", "MiniLM-L6", "full FT",
     None, ("minilm", "dynamic-full-bf16-cap-0.35"), ("suite", "dynamic-full-bf16-cap-0.35", "full")),
    ("default, all 210 block linears", "SmolLM2-135M", "LoRA",
     ("llm_cost", "DynaLoRA default (cutoff 0.5, local)", "all-linear lora"), ("smollm2", "default"),
     ("llm_quality", "default", "lora")),
    ("the default over a bf16 base", "SmolLM2-135M", "LoRA", None, ("smollm2", "default-bf16-base"),
     ("llm_quality", "default-bf16-base", "lora")),
    ("BAdam's class: a tenth of the layers at a time, bf16 storage", "SmolLM2-135M", "full FT",
     None, ("smollm2", "badam-like-bf16"), ("llm_quality", "badam-like-bf16", "full")),
]  # fmt: skip


def headline_table() -> str:
    """README's table: every figure read from benchmarks/results/."""
    cost = {f"{name}/{r['name']}": r for name in ("cost", "llm_cost") for r in _results(name)}
    memory = {(r["model"], r["row"]): r for r in _results("total_memory")}
    lines = [
        "| configuration | model | against | whole-run step | counted bytes, peak / mean | total peak | quality |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for label, model, against, timed, total, quality in HEADLINE:
        step = counted = peak = ""
        if timed:
            r, b = cost[f"{timed[0]}/{timed[1]}"], cost[f"{timed[0]}/{timed[2]}"]
            step = _ratio(r.get("total_ms"), b.get("total_ms"))
            counted = f"{_ratio(r['peak_counted_bytes'], b['peak_counted_bytes'])} / " + _ratio(
                r["mean_counted_bytes"], b["mean_counted_bytes"])  # fmt: skip
        if total:
            from_row = {"LoRA": "lora", "full FT": "full"}[against]
            peak = _ratio(memory[total]["total"], memory[(total[0], from_row)]["total"])
        gap = _quality_gap(*quality) if quality else ""
        lines.append(f"| {label} | {model} | {against} | {step} | {counted} | {peak} | {gap} |")
    return "\n".join(lines)


def total_memory_table(model: str) -> str:
    """docs/results.md: weights beside training bytes, one row per row of ``benchmarks/total_memory.py``."""
    spec = importlib.util.spec_from_file_location("bench_total_memory", ROOT / "benchmarks" / "total_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    index = {(r["model"], r["row"]): r for r in _results("total_memory")}
    mib = 2**20
    lines = ["| row | configuration | weights MiB | training MiB | total MiB | total vs its baseline |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for row, (_, what) in bench.ROWS.items():
        r = index.get((model, row))
        if r is None:
            continue
        baseline = bench.BASELINE.get(row, "lora")
        ratio = "1.000 (baseline)" if row == baseline else _ratio(r["total"], index[(model, baseline)]["total"])
        lines.append(f"| `{row}` | {what} | {r['weights'] / mib:,.1f} | {r['training'] / mib:,.1f}"
                     f" | {r['total'] / mib:,.1f} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def cost_runs_table() -> str:
    """docs/results.md: ``benchmarks/cost.py``'s whole runs, each row against its own baseline."""
    rows = _results("cost")
    by = {r["name"]: r for r in rows}
    lines = ["| configuration | baseline | whole-run step | predicted | peak counted bytes | mean counted bytes"
             " | total peak |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        b = by[r["baseline"]]
        predicted = statistics.mean(r["predicted_step_ratio"]) if r.get("predicted_step_ratio") else None
        total = _ratio(r.get("peak_total_bytes"), b.get("peak_total_bytes"))
        lines.append(f"| {r['name']} | {r['baseline']} | {_ratio(r['total_ms'], b['total_ms'])}"
                     f" | {'' if predicted is None else f'{predicted:.3f}'}"
                     f" | {_ratio(r['peak_counted_bytes'], b['peak_counted_bytes'])}"
                     f" | {_ratio(r['mean_counted_bytes'], b['mean_counted_bytes'])} | {total} |")  # fmt: skip
    return "\n".join(lines)


def llm_cost_table() -> str:
    """docs/results.md: ``benchmarks/llm_cost.py``'s rows, each against its own baseline."""
    rows = _results("llm_cost")
    by = {r["name"]: r for r in rows}
    lines = ["| configuration | baseline | peak counted bytes | mean counted bytes | total peak | median step |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        b = by[r["baseline"]]
        step = ""
        if r.get("step_ms") and b.get("step_ms"):
            step = _ratio(statistics.median(r["step_ms"]), statistics.median(b["step_ms"]))
        lines.append(f"| {r['name']} | {r['baseline']} | {_ratio(r['peak_counted_bytes'], b['peak_counted_bytes'])}"
                     f" | {_ratio(r['mean_counted_bytes'], b['mean_counted_bytes'])}"
                     f" | {_ratio(r.get('peak_total_bytes'), b.get('peak_total_bytes'))} | {step} |")  # fmt: skip
    return "\n".join(lines)


def checkpointing_table() -> str:
    """docs/options.md: ``benchmarks/checkpointing.py``'s rows on both models, each against its own baseline."""
    data = json.loads((RESULTS / "checkpointing.json").read_text())
    models = {"minilm": "MiniLM-L6 (batch {} × {})", "smollm2": "SmolLM2-135M (all-linear, batch {} × {})"}
    lines = ["| model | configuration | baseline | whole-run step | peak counted bytes | total peak |",
             "|---|---|---|---:|---:|---:|"]  # fmt: skip
    for model, title in models.items():
        rows = data[model]["rows"]
        by = {r["name"]: r for r in rows}
        for i, r in enumerate(r for r in rows if r["name"] != r["baseline"]):
            b = by[r["baseline"]]
            name = "" if i else title.format(*data[model]["meta"]["batch"])
            lines.append(f"| {name} | {r['name']} | {r['baseline']} | {_ratio(r['total_ms'], b['total_ms'])}"
                         f" | {_ratio(r['peak_counted_bytes'], b['peak_counted_bytes'])}"
                         f" | {_ratio(r.get('peak_total_bytes'), b.get('peak_total_bytes'))} |")  # fmt: skip
    return "\n".join(lines)


GENERATED = {
    "docs/options.md": {"DynamicConfig": dynamic_config_table, "checkpointing": checkpointing_table},
    "docs/cli.md": {"train flags": train_flags},
    "README.md": {"headline": headline_table},
    "docs/results.md": {
        "total memory minilm": lambda: total_memory_table("minilm"),
        "total memory smollm2": lambda: total_memory_table("smollm2"),
        "cost runs": cost_runs_table,
        "llm cost": llm_cost_table,
    },
}
"""Pages, relative to the repository's root, and their generated regions."""


def render(page: str) -> str:
    """The page with every generated region replaced by what the code says now."""
    text = (ROOT / page).read_text()
    for name, make in GENERATED[page].items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        if begin not in text or end not in text:
            raise SystemExit(f"{page} lacks the markers of {name!r}: {begin} ... {end}")
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
        if (ROOT / page).read_text() != new:
            stale.append(page)
            if not ns.check:
                (ROOT / page).write_text(new)
    if ns.check and stale:
        print(f"{', '.join(stale)} differ from the code or the results; run: python docs/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
