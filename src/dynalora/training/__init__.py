"""``dynalora train``: its arguments (args.py) and the engine (engine.py: transformers' Trainer)."""

from dynalora.models import DEFAULT_MODEL, resolve_model_path
from dynalora.training.args import RUN_FILES, TrainArgs
from dynalora.training.engine import run

__all__ = ["DEFAULT_MODEL", "RUN_FILES", "TrainArgs", "resolve_model_path", "run"]
