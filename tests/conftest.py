import os

# Never touch the network: a hub lookup without this retries for about 46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from tests.tiny import write_csv

WORDS = ["good", "great", "fine", "fun", "bad", "awful", "dull", "boring", "movie", "plot", "film", "the", "a", "was",
         "is", "very", "not"]  # fmt: skip
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _save_tiny_bert(path, dropout: float) -> str:
    (path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer BERT (hidden 32) and its tokenizer in a folder, with BERT's dropout 0.1."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


@pytest.fixture(scope="session")
def still_model(tmp_path_factory) -> str:
    """The same model without dropout: runs that split batches differently can then agree."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-still"), dropout=0.0)


@pytest.fixture(scope="session")
def csv_task(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("csv")
    return {
        "train": write_csv(d / "train.csv", 64, 0),
        "validation": write_csv(d / "validation.csv", 16, 1),
        "test": write_csv(d / "test.csv", 16, 2),
    }
