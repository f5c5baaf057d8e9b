"""How a run is scored on its validation and test splits (eval mode, no grad: no importance from
evaluation): loss and the task's metrics for a task head; loss, perplexity and greedy exact match
for decoders. Which models are decoders and how they load (GGUF included) is :mod:`dynalora.models`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dynalora.data.instruct import IGNORE
from dynalora.data.tasks import TaskSpec, compute_metrics

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model, loader: DataLoader, spec: TaskSpec, device: torch.device, autocast, tokenizer=None
) -> dict[str, Any]:
    """Mean loss, the task's metrics and the predictions over a split (eval mode, no grad: no importance).

    Returns:
        ``{"loss": float, "metrics": {name: float}, "predictions": (N,) array, "labels": (N,) array}``;
        predictions are class ids, floats for regression, or generated text for causal LM
        (:func:`evaluate_causal`).
    """
    if spec.kind.generates:
        return evaluate_causal(model, loader, spec, device, autocast, tokenizer)
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


def eval_record(step: int, split: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"type": "eval", "step": step, "split": split, "loss": result["loss"], "metrics": result["metrics"]}


@torch.no_grad()
def evaluate_causal(model, loader, spec: TaskSpec, device: torch.device, autocast, tokenizer) -> dict[str, Any]:
    """Per-token loss and perplexity on the labelled tokens; greedy exact match for instructions.

    The loss is the mean negative log-likelihood over every labelled token of the split (not the
    mean of batch means). Exact match decodes greedily from each prompt, as many tokens as the
    longest reference has plus two, and compares the text with the reference after stripping
    whitespace on both sides.

    Returns:
        ``{"loss", "metrics", "predictions", "labels"}``; predictions and labels are strings
        (instructions) or empty (language modelling).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((targets != IGNORE).sum())
    loss = total / max(count, 1)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    predictions: list[str] = []
    references: list[str] = []
    dataset = loader.dataset
    if "prompt_ids" in dataset.column_names:
        references = [str(r) for r in dataset["response"]]
        longest = max(sum(1 for t in labels if t != IGNORE) for labels in dataset["labels"])
        predictions = generate(model, tokenizer, dataset["prompt_ids"], longest + 2, device, loader.batch_size or 8)
        metrics["exact_match"] = exact_match(predictions, references)
    model.train(was_training)
    metrics = {name: metrics[name] for name in spec.metrics if name in metrics}
    return {"loss": loss, "metrics": metrics, "predictions": np.array(predictions, dtype=object),
            "labels": np.array(references, dtype=object)}  # fmt: skip


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device: torch.device,
             batch_size: int) -> list[str]:  # fmt: skip
    """Greedy continuations of token-id prompts, left-padded in batches, decoded without special tokens."""
    pad = tokenizer.pad_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)[:, width:]  # fmt: skip
        out += [tokenizer.decode(row, skip_special_tokens=True) for row in new.tolist()]
    return out


def matches(predictions: list[str], references: list[str]) -> np.ndarray:
    """Per example: is the prediction its reference after stripping whitespace? Shape (N,), bool."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return np.array([str(p).strip() == str(r).strip() for p, r in zip(predictions, references, strict=True)])


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after stripping whitespace."""
    return float(np.mean(matches(predictions, references)))
