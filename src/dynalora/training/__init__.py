"""``dynalora train``: its arguments (args.py) and the loop (loop.py)."""

from dynalora.training.args import DEFAULT_LR, DEFAULT_MODEL, RUN_FILES, TrainArgs, parse_k
from dynalora.training.loop import prepare, resolve_model_path, run

__all__ = ["DEFAULT_LR", "DEFAULT_MODEL", "RUN_FILES", "TrainArgs", "parse_k", "prepare", "resolve_model_path", "run"]
