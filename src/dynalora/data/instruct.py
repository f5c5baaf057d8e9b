"""Causal-LM tasks: instruction tuning (prompt -> response) and language modelling (text).

Standard columns: ``prompt`` and ``response`` for instruction data, ``text`` for language
modelling. :func:`tokenize_causal` turns them into ``input_ids``/``attention_mask``/``labels``,
where ``labels`` is -100 wherever no loss falls:

- instruction data: the loss falls on the response tokens only, its end-of-turn token included, so
  that the model learns to stop. The tokenizer's chat template frames the turn when it has one.
  Prompt positions are masked by their count, never by the pad id: many chat tokenizers pad with
  their end token (SmolLM2: ``<|im_end|>``), and masking by pad id would drop the very token that
  ends the answer.
- too long an example loses prompt tokens from its start; the response is kept whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from dynalora.data.common import SPLITS, TaskData, _Options
from dynalora.data.tasks import Kind, TaskSpec
from dynalora.errors import UsageError

IGNORE = -100
INSTRUCT_METRICS = ("exact_match", "perplexity", "loss")
LM_METRICS = ("perplexity", "loss")


def instruct_spec(name: str, prompt_column: str = "prompt") -> TaskSpec:
    return TaskSpec(name, prompt_column, None, 0, False, INSTRUCT_METRICS, "exact_match", kind=Kind.CAUSAL_LM)


def lm_spec(name: str, text_column: str = "text") -> TaskSpec:
    return TaskSpec(name, text_column, None, 0, False, LM_METRICS, "perplexity", kind=Kind.CAUSAL_LM)


# ------------------------------------------------------------------------------------------ data
RT_PROMPT = "Review: {text}\nIs this movie review positive or negative? Answer with one word."
RT_ANSWERS = ("negative", "positive")  # rotten (0), fresh (1)
DRUG_PROMPT = "Review: {text}\nIs this drug review negative, neutral or positive? Answer with one word."


def _as_instructions(task: str, data: TaskData, template: str, answers: Sequence[str]) -> TaskData:
    """An embedded classification task as instructions: the same fixed splits, the label as a word."""
    splits = datasets.DatasetDict()
    for split, ds in data.splits.items():
        splits[split] = datasets.Dataset.from_dict({
            "prompt": [template.format(text=t) for t in ds["text"]],
            "response": [answers[int(y)] for y in ds["label"]],
        })  # fmt: skip
    return TaskData(instruct_spec(task), splits, list(answers), True)


def load_rotten_tomatoes_instruct(task: str, opts: _Options) -> TaskData:
    """Rotten Tomatoes (the embedded default task) as instructions."""
    from dynalora.data.embedded import _load_rotten_tomatoes

    return _as_instructions(task, _load_rotten_tomatoes("rotten_tomatoes", opts), RT_PROMPT, RT_ANSWERS)


def load_drugreview_instruct(task: str, opts: _Options) -> TaskData:
    """The embedded drug reviews (three classes) as instructions: a second instruction task.

    Reviews are long (a median of 87 words, 155 tokens with SmolLM2's chat template): at a short
    ``--max-length`` the prompt loses the start of the review, never the question or the answer
    (:func:`fit`).
    """
    from dynalora.data.embedded import _DRUG_LABELS, _load_drugreview

    return _as_instructions(task, _load_drugreview("drugreview", opts), DRUG_PROMPT, _DRUG_LABELS)


def load_custom_causal(task: str, opts: _Options) -> TaskData:
    """Files with ``--prompt-column``/``--response-column`` (instructions) or ``--text-column`` (text)."""
    from dynalora.data.files import _read_table

    if "train" not in opts.files or "validation" not in opts.files:
        raise UsageError("--task custom needs --train-file and --validation-file (--test-file is optional)")
    instruct = opts.prompt_column is not None
    columns = {"--prompt-column": opts.prompt_column, "--response-column": opts.response_column} if instruct else {
        "--text-column": opts.text_column}  # fmt: skip
    splits = datasets.DatasetDict()
    for split in SPLITS:
        if split not in opts.files:
            continue
        frame = _read_table(opts.files[split], f"--{split}-file")
        for flag, column in columns.items():
            if column not in frame.columns:
                available = ", ".join(map(str, frame.columns))
                raise UsageError(
                    f"{flag} {column!r} not found in {Path(opts.files[split]).name}; columns are: {available}"
                )
        values = {name: frame[column].fillna("").astype(str).tolist() for name, column in
                  zip(("prompt", "response") if instruct else ("text",), columns.values(), strict=True)}  # fmt: skip
        splits[split] = datasets.Dataset.from_dict(values)
    spec = instruct_spec("custom", opts.prompt_column) if instruct else lm_spec("custom", opts.text_column)
    return TaskData(spec, splits, None, True)


# ------------------------------------------------------------------------------------------ tokens
def encode_turn(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str | None) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)``: the prompt as the model sees it before it answers, and the
    response with whatever closes the turn (the template's end token, else the eos token).

    With a chat template the prompt is the user turn plus the assistant header; the response is
    what the whole conversation adds to it. A template whose full rendering does not start with
    the prompt's rendering is not split at a token boundary; the plain form is used instead.
    """
    template = getattr(tokenizer, "chat_template", None)
    if template:
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        if response is None:
            return prompt_ids, []
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_text.startswith(head) and full[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, full[len(prompt_ids) :]
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if response is None:
        return prompt_ids, []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, tokenizer(" " + response, add_special_tokens=False)["input_ids"] + eos


def fit(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut an example to ``max_length`` tokens: from the prompt's start first, the response last.

    At least one prompt token stays (the model needs something to predict the response from).
    """
    room = max_length - len(response_ids)
    if room >= 1:
        return list(prompt_ids[max(0, len(prompt_ids) - room) :]), list(response_ids)
    return list(prompt_ids[-1:]), list(response_ids[: max_length - 1])


def tokenize_causal(data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.DatasetDict:
    """Every split as ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE where no loss falls).

    Instruction splits also keep ``prompt_ids`` (what greedy decoding starts from) and ``response``
    (the reference answer) for :func:`dynalora.training.evaluation.evaluate_causal`.
    """
    if max_length < 2:
        raise UsageError(f"--max-length must be at least 2 for a causal-LM task, got {max_length}")
    out = datasets.DatasetDict()
    for split, ds in data.splits.items():
        if "prompt" in ds.column_names:

            def encode(row: dict[str, Any]) -> dict[str, Any]:
                prompt, response = fit(*encode_turn(tokenizer, row["prompt"], row["response"]), max_length)
                ids = prompt + response
                head, _ = fit(encode_turn(tokenizer, row["prompt"], None)[0], [], max_length)
                return {"input_ids": ids, "attention_mask": [1] * len(ids),
                        "labels": [IGNORE] * len(prompt) + response, "prompt_ids": head}  # fmt: skip

            out[split] = ds.map(encode, remove_columns=["prompt"])
        else:

            def encode_text(batch: dict[str, list[Any]]) -> dict[str, Any]:
                enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
                return {**enc, "labels": [list(ids) for ids in enc["input_ids"]]}

            out[split] = ds.map(encode_text, batched=True, remove_columns=ds.column_names)
    return out


@dataclass
class CausalCollator:
    """Right-pads ``input_ids`` (with the pad id), ``attention_mask`` (0) and ``labels`` (IGNORE)."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE}
        return {
            key: torch.tensor([list(r[key]) + [pad] * (width - len(r[key])) for r in rows], dtype=torch.long)
            for key, pad in pads.items()
        }
