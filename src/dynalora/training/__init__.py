"""``dynalora train``: its arguments (args.py) and the engine (engine.py: transformers' Trainer)."""

from dynalora.training.args import DEFAULT_LR, DEFAULT_MODEL, RUN_FILES, TrainArgs, parse_k
from dynalora.training.engine import resolve_model_path, run

__all__ = ["DEFAULT_LR", "DEFAULT_MODEL", "RUN_FILES", "TrainArgs", "parse_k", "resolve_model_path", "run"]
