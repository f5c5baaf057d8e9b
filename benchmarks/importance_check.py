"""Does an importance measure rank modules by what they contribute? Checked on trained plain-LoRA runs.

A module's real contribution is the rise in validation loss when its adapter alone is switched off
(its LoRA scaling set to 0) in a trained model. Each measure is read over training batches of the
same task, with every adapter trainable:
    forward   Σ ||(W + ΔW) x||  (eq. 1, the paper's and the v0.1 default)
    adapter   Σ ||ΔW x||
    gradient  ||∇ adapter weights||
and also at initialisation (a fresh adapter, B = 0), which is what the first reallocation sees.
The table gives Spearman's rank correlation between each measure and the contribution.

    .venv/bin/python benchmarks/importance_check.py runs/bench-quality/lora-political-seed0 ...

Run it after benchmarks/quality.py, which leaves the trained LoRA runs under runs/bench-quality/.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from scipy.stats import spearmanr

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import PeftModel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from dynalora.adapters import find_adapter_modules  # noqa: E402
from dynalora.cli import _quiet_libraries  # noqa: E402
from dynalora.data import load_task, make_collator, tokenize  # noqa: E402
from dynalora.importance import MEASURES  # noqa: E402
from dynalora.methods import METHODS, MethodOptions  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MEASURED = ("forward", "adapter", "gradient")


def _loss(model, loader) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            total += float(model(**batch).loss) * len(batch["labels"])
            n += len(batch["labels"])
    return total / n


def _measure(model, modules, batches) -> dict[str, torch.Tensor]:
    """Each measure's scores over the same training batches (train mode, adapters trainable, no update)."""
    out = {}
    for name in MEASURED:
        measure = MEASURES[name](modules, torch.Generator().manual_seed(0))
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
            measure.end_step()
            model.zero_grad(set_to_none=True)
        out[name] = measure.scores()
        measure.close()
    return out


def check(run_dir: Path, num_batches: int) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    torch.manual_seed(0)
    data = load_task(config["task"], max_train_samples=config["max_train_samples"], seed=config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    tokenized = tokenize(data, tokenizer, config["max_length"])
    collate = make_collator(tokenizer)
    train = DataLoader(tokenized["train"], batch_size=config["batch_size"], shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    batches = [b for _, b in zip(range(num_batches), train, strict=False)]
    val = DataLoader(tokenized["validation"], batch_size=64, collate_fn=collate)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(config["model_path"], num_labels=data.spec.num_labels)

    trained = PeftModel.from_pretrained(base(), run_dir / "model", is_trainable=True)
    modules = find_adapter_modules(trained)
    full = _loss(trained, val)
    contribution = []
    for m in modules:
        scaling = dict(m.layer.scaling)
        m.layer.scaling = dict.fromkeys(scaling, 0.0)  # this adapter off, every other one on
        contribution.append(_loss(trained, val) - full)
        m.layer.scaling = scaling
    contribution = torch.tensor(contribution)
    scores = {f"{k} (trained)": v for k, v in _measure(trained, modules, batches).items()}
    opts = MethodOptions(None, config["rank"], config["alpha"], config["adapter_dropout"], False)
    fresh, _ = METHODS["lora"](base(), opts)
    scores |= {f"{k} (init)": v for k, v in _measure(fresh, find_adapter_modules(fresh), batches).items()}
    return {
        "run": str(run_dir),
        "task": config["task"],
        "modules": [m.name for m in modules],
        "contribution": contribution.tolist(),
        "spearman": {k: float(spearmanr(v.numpy(), contribution.numpy())[0]) for k, v in scores.items()},
        "scores": {k: v.tolist() for k, v in scores.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, default=8, help="training batches each measure reads")
    parser.add_argument("--name", default="importance_check")
    ns = parser.parse_args()
    _quiet_libraries()
    torch.set_grad_enabled(True)
    results = [check(d, ns.batches) for d in ns.run_dirs]
    keys = list(results[0]["spearman"])
    lines = [
        "# Importance measures against each module's real contribution (trained plain LoRA)",
        "",
        "Contribution: validation-loss rise when one adapter is switched off. Cells: Spearman's rank"
        " correlation with it over the modules (1 = same order, 0 = unrelated). Generated by"
        " `benchmarks/importance_check.py`.",
        "",
        "| task | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for r in results:
        lines.append(f"| {r['task']} | " + " | ".join(f"{r['spearman'][k]:+.2f}" for k in keys) + " |")
    lines += ["", "Contribution per module (loss rise), largest first:", ""]
    for r in results:
        ranked = sorted(zip(r["modules"], r["contribution"], strict=True), key=lambda x: -x[1])
        lines.append(f"- {r['task']}: " + ", ".join(f"{n.split('encoder.')[-1]} {c:+.3f}" for n, c in ranked[:6]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{ns.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{ns.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
