"""``dynalora train``: its arguments (args.py), set-up (job.py), the engine on transformers' Trainer
(engine.py, meter.py), evaluation, checkpoints and resume (checkpoint.py, resume.py) and outputs;
``dynalora sweep`` (sweep.py)."""

from dynalora.models import DEFAULT_MODEL, resolve_model_path
from dynalora.training.args import RUN_FILES, TrainArgs
from dynalora.training.engine import run

__all__ = ["DEFAULT_MODEL", "RUN_FILES", "TrainArgs", "resolve_model_path", "run"]
