"""Tiny offline models and batches for the tests (milliseconds to build, ~15 ms a step)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 100


def bert(seed: int = 0, layers: int = 2, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


PEFT_CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "dora": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS"
    ),
    "vera": lambda: VeraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
}


def peft_bert(method: str = "lora", seed: int = 0, layers: int = 2, nonzero_b: bool = True):
    """A PEFT-wrapped tiny BERT. ``nonzero_b`` fills LoRA B and VeRA lambda_b (zero at init), so ΔW != 0."""
    model = get_peft_model(bert(seed, layers), PEFT_CONFIGS[method]())
    if nonzero_b:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "vera_lambda_b" in name:  # both start at zero
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def batches(n: int, seed: int = 0, batch: int = 4, length: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (batch, length), generator=gen),
            "labels": torch.randint(0, 2, (batch,), generator=gen),
        }
        for _ in range(n)
    ]


def train(model, allocator, optimizer, scheduler, data, *, step_before_zero_grad: bool = False) -> None:
    model.train()
    for batch in data:
        model(**batch).loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step_before_zero_grad:
            allocator.step()
            optimizer.zero_grad()
        else:
            optimizer.zero_grad()
            allocator.step()


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def write_csv(path: Path, n: int, seed: int, regression: bool = False) -> str:
    """A CSV of n short reviews, ``text,label`` (pos/neg, or floats for regression), from a seed."""
    gen = torch.Generator().manual_seed(seed)
    rows = ["text,label"]
    for _ in range(n):
        positive = bool(torch.randint(0, 2, (1,), generator=gen))
        words = ["good", "great", "fun"] if positive else ["bad", "awful", "dull"]
        picks = [words[int(i)] for i in torch.randint(0, 3, (4,), generator=gen)]
        label = f"{float(positive) + 0.25:.2f}" if regression else ("pos" if positive else "neg")
        rows.append(f"the movie was {' '.join(picks)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)
