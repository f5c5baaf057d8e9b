"""What a run leaves in its folder: ``config.json`` when it starts; the test scores, ``log.jsonl``,
``allocations.jsonl``, plots, the trained ``model/`` with its model card, and ``metrics.json`` (last)
when it ends; the upload with ``--push-to-hub``."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynalora import distributed
from dynalora.controller import DynamicAllocator
from dynalora.errors import RunError
from dynalora.methods import is_own, save_adapter
from dynalora.models import portable_model_id
from dynalora.training.args import TrainArgs
from dynalora.training.evaluation import eval_record, evaluate
from dynalora.training.job import Job, check_writable, clear_run

logger = logging.getLogger(__name__)


def counted_memory(steps: list[dict[str, int]]) -> dict[str, float]:
    """What ``metrics.json`` reports of the counted training bytes of each step.

    Peak RSS cannot tell apart selections a few percent apart (glibc keeps freed blocks); these
    are the bytes of live tensors: saved activations (the largest micro-batch), gradients after
    backward and optimizer state after the step, on this process.

    Returns:
        ``peak_<kind>`` and ``mean_<kind>`` of each kind, ``peak_total``/``mean_total`` of their
        sum per step (the peak of the sum, not the sum of the peaks), and, beside them, the model's
        own ``weights`` (every parameter and buffer at its storage dtype) and
        ``peak_total_with_weights``: what the run needs on its device, all of it.
    """
    kinds = ("saved_activations", "gradients", "optimizer_state")
    if not steps:
        return {}
    columns = {kind: [s[kind] for s in steps] for kind in kinds}
    columns["total"] = [sum(s[kind] for kind in kinds) for s in steps]
    if all("weights" in s for s in steps):  # progress saved by an older version lacks them
        columns["weights"] = [s["weights"] for s in steps]
        columns["total_with_weights"] = [t + w for t, w in zip(columns["total"], columns["weights"], strict=True)]
    out: dict[str, float] = {}
    for kind, values in columns.items():
        out[f"peak_{kind}"] = int(max(values))
        out[f"mean_{kind}"] = float(np.mean(values))
    return out


def start_output(out: Path, args: TrainArgs, job: Job, resume: Path | None) -> None:
    check_writable(out)
    if resume is not None:
        logger.info("resuming %s from %s", out, resume)
        return
    clear_run(out)  # --overwrite (or a --resume with nothing saved yet): the old files go first
    resolved = {"model_path": job.model_path, "num_steps": job.num_steps, "resolved_device": str(job.device),
                "num_processes": job.accelerator.num_processes,
                # what ran, after the preset and every flag: the allocator's own config
                "resolved_dynamic": job.allocator.config.to_dict() if job.allocator else None}  # fmt: skip
    config = {**args.to_dict(), **resolved}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info(
        "training %s on %s for %d steps (%d trainable parameters)",
        args.method, args.task, job.num_steps, job.num_trainable,
    )  # fmt: skip


def finish(job: Job, out: Path, records: list[dict[str, Any]], costs: dict[str, Any]) -> dict[str, Any] | None:
    args, model = job.args, job.unwrapped()  # under FSDP every rank comes here: forwards and gathers are collectives
    final = {"validation": costs.pop("last_validation")}
    test = {}
    if "test" in job.eval_loaders:
        final["test"] = evaluate(
            model, job.eval_loaders["test"], job.spec, job.device, job.accelerator.autocast, job.tokenizer
        )
        records.append(eval_record(job.num_steps, "test", final["test"]))
        test = final["test"]["metrics"]
    predictions = {
        split: {"predictions": r["predictions"].tolist(), "labels": r["labels"].tolist()}
        for split, r in final.items()
        if r
    }
    alloc = job.allocator
    metrics = {
        "task": args.task,
        "model": args.model,
        "method": args.method,
        "dynamic": alloc.config.to_dict() | {"k_modules": alloc.k} if alloc else None,
        "validation": final["validation"].get("metrics", {}),
        "test": test,
        # how many examples each figure comes from, so that a sampled split cannot pass for a whole one
        "examples": {split: len(loader.dataset) for split, loader in job.eval_loaders.items()},
        **_class_balance(job.spec, final),
        "main_metric": job.spec.main_metric,
        "trainable_params": job.num_trainable,
        **costs,
        "module_active_steps": alloc.active_steps if alloc else {},
        "num_modules": len(alloc.modules) if alloc else None,
        "num_steps": job.num_steps,
        "seed": args.seed,
        "device": str(job.device),
        "num_processes": job.accelerator.num_processes,
        **(job.hooks.summary(model) if job.hooks.summary else {}),
    }
    if job.hooks.evaluate_each and "validation" in job.eval_loaders:  # DyLoRA: every rank 1..r
        name, settings = job.hooks.evaluate_each
        loader = job.eval_loaders["validation"]
        metrics[name] = {
            str(key): evaluate(model, loader, job.spec, job.device, job.accelerator.autocast, job.tokenizer)["metrics"]
            for key in settings(model)
        }
    state_dict = None
    if job.sharded:  # PEFT and transformers save whole tensors: gathered on every rank, written by the main one
        state_dict = {name: distributed.full_tensor(t).cpu() for name, t in model.state_dict().items()}
        if not job.is_main:
            return None
    (out / "predictions.json").write_text(json.dumps(predictions) + "\n")
    info = {"method": args.method, "base_model": job.model_path, "targets": args.targets and args.targets.split(","),
            "rank": args.rank, "alpha": args.alpha, "num_labels": job.spec.num_labels,
            "problem_type": job.spec.kind.problem_type}  # fmt: skip
    card = model_card(args, metrics, alloc)
    _write_outputs(out, model, job.tokenizer, alloc, records, metrics, info, (card, portable_model_id(args.model)),
                   state_dict)  # fmt: skip
    # (metrics.json is written last: the run is done)
    return metrics


def _class_balance(spec: Any, final: dict[str, Any]) -> dict[str, Any]:
    """Each evaluated split's label counts and the score of always predicting its most common class,
    beside which an accuracy reads for what it is (classification only)."""
    if spec.is_regression or getattr(spec.kind, "objective", None) != "classification":
        return {}
    counts = {split: Counter(r["labels"].tolist()) for split, r in final.items() if r and len(r["labels"])}
    return {
        "label_counts": {split: {str(k): c[k] for k in sorted(c)} for split, c in counts.items()},
        "majority_baseline": {split: max(c.values()) / sum(c.values()) for split, c in counts.items()},
    }


def _finite(value: Any) -> Any:
    """NaN and inf as JSON's null (a constant regression prediction has no correlation), which strict readers take."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def model_card(args: TrainArgs, metrics: dict[str, Any], allocator: DynamicAllocator | None) -> str:
    """``model/README.md``: what was trained, from what, how, and what it scored."""
    base = portable_model_id(args.model)
    library = "peft" if args.method not in ("full", "bitfit", "galore") else "transformers"
    examples = metrics.get("examples", {})
    scores = ", ".join(
        f"{split} {name} {value:.4f}" + (f" (n={examples[split]})" if split in examples else "")
        for split in ("validation", "test")
        for name, value in metrics.get(split, {}).items()
        if isinstance(value, (int, float))
    )
    how = "plain (every trainable tensor, every step)"
    if allocator is not None:
        c = allocator.config
        how = (f"dynamic allocation: {c.measure} importance, {c.allocator} allocator, {c.optimizer} optimisation, "
               f"reallocated every {c.period} steps; {metrics['mean_active_trainable_params']:,.0f} of "
               f"{metrics['trainable_params']:,} trainable parameters active on average")  # fmt: skip
    return "\n".join([
        "---",
        f"base_model: {base}",
        f"library_name: {library}",
        f"tags: [dynalora, {args.method}]",
        "---",
        "",
        f"# {args.method} on {metrics['task']}, trained with dynalora",
        "",
        f"- base model: `{base}`",
        f"- method: `{args.method}`, {how}",
        f"- {metrics['num_steps']} optimizer steps, learning rate {args.lr:g} ({args.lr_scheduler_type}), "
        f"seed {args.seed}",
        f"- scores: {scores or 'none'}",
        "",
        "Every setting of the run is in `../config.json`, every step in `../log.jsonl`; `dynalora train` with",
        "the same flags trains it again.",
        "",
    ])  # fmt: skip


def _portable_adapter_config(folder: Path, base: str) -> None:
    """PEFT writes the base model's path as loaded; write the id others can load instead."""
    path = folder / "adapter_config.json"
    if path.exists():
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = base
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_outputs(out: Path, model, tokenizer, allocator, records, metrics, info, card: tuple[str, str] | None = None,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """``card``: the model card and the base model's portable id; ``state_dict``: the whole tensors of a
    sharded model."""
    from dynalora.analysis.plots import plot_loss, plot_module_activity

    _write_jsonl(out / "log.jsonl", records)
    if allocator is not None:
        _write_jsonl(out / "allocations.jsonl", allocator.history)
        plot_module_activity(
            allocator.active_steps,
            out / "module_activity.png",
            total_steps=metrics["num_steps"],
            title=f"{metrics['method']} on {metrics['task']}: fraction of steps each module trained",
        )
    plot_loss(records, out / "loss.png", metric=metrics["main_metric"])
    if metrics.get("ranks"):  # AdaLoRA, L1RA: where the rank budget went
        plot_module_activity(metrics["ranks"], out / "ranks.png", label="rank",
                             title=f"{metrics['method']} on {metrics['task']}: final rank of each module")  # fmt: skip
    weights = out / "model"
    if is_own(model):  # hydra, dvora: their tensors and how to rebuild the rest (methods.load_trained)
        save_adapter(model, weights, info)
    else:  # PEFT: the adapter (and head) only; full/bitfit: the whole model
        model.save_pretrained(weights, **({"state_dict": state_dict} if state_dict is not None else {}))
        if card is not None:
            _portable_adapter_config(weights, card[1])
    tokenizer.save_pretrained(weights)
    if card is not None:
        (weights / "README.md").write_text(card[0])  # in place of PEFT's empty template
    (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2, allow_nan=False) + "\n")


def push(folder: Path, repo_id: str) -> None:
    """Upload the trained ``model/`` folder to the Hub repository ``repo_id`` (created if need be)."""
    from huggingface_hub import create_repo, upload_folder

    try:
        url = create_repo(repo_id, exist_ok=True).repo_id
        upload_folder(repo_id=url, folder_path=str(folder), commit_message="dynalora train")
    except Exception as err:  # network, auth, permissions: the run itself is complete
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = f"--push-to-hub {repo_id}: the upload failed ({first}); the run is complete in {folder}"
        raise RunError(message) from None
    logger.info("uploaded %s to https://huggingface.co/%s", folder, url)
