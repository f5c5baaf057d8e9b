"""``dynalora train``'s arguments: one dataclass, one ``--flag`` per field, checked before anything loads."""

from __future__ import annotations

import argparse
import json
import math
import typing
from dataclasses import Field, asdict, dataclass, field, fields, make_dataclass
from typing import Any

from transformers import HfArgumentParser

from dynalora.config import PRESETS, DynamicConfig
from dynalora.data import DEFAULT_INSTRUCT_TASK, DEFAULT_TASK, INSTRUCT_TASKS, TASKS, resolve_task
from dynalora.data.tasks import GLUE_TASKS, Kind
from dynalora.errors import UsageError
from dynalora.integrations.trainer import SUPPORTED_OPTIM
from dynalora.methods import REGISTRY
from dynalora.models import DEFAULT_MODEL, EMBEDDED_LLM, is_decoder

OBJECTIVES = tuple(dict.fromkeys(k.objective for k in Kind))  # classification, causal-lm
# Greedy decoding runs once per example: a causal-LM evaluation scores this many by default.
DEFAULT_CAUSAL_EVAL_SAMPLES = 200
# Batch, length and evaluation interval unless given. Causal LM is sized for a CPU: on 2 cores an
# all-linear step of SmolLM2-135M at batch 8 x 96 tokens takes 2.7-4 s (docs/results.md),
# 96 tokens hold 95% of the embedded instruction examples whole (chat template included; median 73), and a
# validation pass decodes up to 200 answers (1-2 minutes), so it comes every 200 steps.
CLASSIFICATION_SIZES = {"batch_size": 32, "max_length": 64, "eval_every": 50}
CAUSAL_SIZES = {"batch_size": 8, "max_length": 96, "eval_every": 200}
METHOD_ONLY = {o: tuple(n for n, m in REGISTRY.items() if o in m.options) for m in REGISTRY.values() for o in m.options}
"""Options that only some methods read (``--rank``, ``--dylora-frozen``), and those methods."""
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "cosine_with_min_lr", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay")  # fmt: skip
ADAM_OPTIMS = ("adamw_torch", "adamw_torch_fused")
ADAM_FIELDS = ("adam_beta1", "adam_beta2", "adam_epsilon")
REGRESSION_TASKS = tuple(name for name, spec in GLUE_TASKS.items() if spec.is_regression)
FSDP_WORDS = ("full_shard", "shard_grad_op", "auto_wrap", "offload")
# Files that mark a folder as holding a run; --overwrite is needed to write over them.
RUN_FILES = (
    "config.json",
    "metrics.json",
    "log.jsonl",
    "allocations.jsonl",
    "predictions.json",
    "loss.png",
    "module_activity.png",
    "model",
    "checkpoints",
    "ranks.png",
)


def _refused_by(option: str) -> str:
    """``; refused by --method full, bitfit``: the methods whose record does not read ``option``."""
    return "; refused by --method " + ", ".join(n for n, m in REGISTRY.items() if option not in m.options)


def _opt(help: str, **kw: Any) -> Any:
    """A field and its flag: ``help``, and ``choices``, ``aliases`` (each also with underscores), ``nargs``..."""
    if "aliases" in kw:  # transformers' spellings too: --learning_rate as well as --learning-rate
        kw["aliases"] = tuple(dict.fromkeys(a for n in kw["aliases"] for a in (n, "--" + n[2:].replace("-", "_"))))
    return field(default=kw.pop("default", None), metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    """The model and the fine-tuning method."""

    _argument_group_name = "model and method"  # HfArgumentParser: the --help group
    model: str = _opt(
        "Hugging Face model id, local folder or .gguf file; embedded:minilm-l6 (an encoder) or "
        "embedded:smollm2-135m (a decoder LLM)",
        default=DEFAULT_MODEL,
        aliases=("--model-name-or-path",),
    )
    method: str = _opt("fine-tuning method", default="lora", choices=tuple(REGISTRY))
    targets: str | None = _opt(
        "comma-separated layer names to adapt, or all-linear for every linear layer of the blocks "
        "(default: query,value; full: all-linear; plain full fine-tuning trains every weight)" + _refused_by("targets")
    )
    rank: int = _opt(
        "adapter rank r (galore: its projection's)" + _refused_by("rank"), default=8, aliases=("--lora-r",)
    )
    alpha: float = _opt(
        "LoRA alpha (scaling = alpha / r)" + _refused_by("alpha"), default=16.0, aliases=("--lora-alpha",)
    )
    adapter_dropout: float = _opt(
        "dropout on the adapter input" + _refused_by("adapter_dropout"), default=0.1, aliases=("--lora-dropout",)
    )
    dylora_frozen: bool = _opt("--method dylora: update only row/column b of the rank b drawn each step", default=False)
    base_dtype: str = _opt(
        "storage dtype of the frozen weights; adapters, their gradients and optimizer state stay float32, and "
        "the forward runs under autocast at this dtype (fp16: CUDA only)",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
    )


@dataclass
class DataArgs:
    """The task and its data."""

    _argument_group_name = "data"  # HfArgumentParser: the --help group
    task: str | None = _opt(
        f"task to fine-tune on (default: custom when --train-file is given, else {DEFAULT_TASK}; "
        f"{DEFAULT_INSTRUCT_TASK} for decoder models)",
        choices=TASKS,
    )
    objective: str | None = _opt(
        "classification (a task head; --regression for floats) or causal-lm (next tokens: instruction tuning "
        "with --prompt-column/--response-column, language modelling on --text-column alone) "
        "(default: causal-lm for decoder models and with --prompt-column, else classification)",
        choices=OBJECTIVES,
    )
    max_length: int | None = _opt("maximum tokens per example (default: 64; 96 for causal LM)")
    max_train_samples: int | None = _opt("use only this many training examples")
    max_eval_samples: int | None = _opt(
        "validate on N examples drawn at random (seed 0) from the validation split (the test split has its own cap)"
    )
    max_test_samples: int | None = _opt(
        "test on N examples drawn at random (seed 0); metrics.json records examples.test (default: the whole split)"
    )
    glue_dir: str | None = _opt("folder of the official GLUE TSV files (offline GLUE)")
    train_file: str | None = _opt("training file for --task custom (.csv/.json/.jsonl)")
    validation_file: str | None = _opt("validation file for --task custom")
    test_file: str | None = _opt("test file for --task custom (optional)")
    text_column: str = _opt("text column of custom files", default="text")
    text_pair_column: str | None = _opt("second text column of custom files")
    label_column: str = _opt("label column of custom files", default="label")
    regression: bool = _opt("custom labels are floats (regression)", default=False)
    prompt_column: str | None = _opt("instruction column of custom causal-LM files (with --response-column)")
    response_column: str | None = _opt("answer column of custom causal-LM files; the loss falls on it only")


def _dynamic_flag(setting: Field) -> tuple[str, Any, Any]:
    """A :class:`DynamicConfig` field as the flag of its name, default None: "the preset's value"."""
    if "help" not in setting.metadata:
        raise TypeError(f"DynamicConfig.{setting.name} has no flag help; declare it with _setting(default, help)")
    hint = str if setting.name == "k" else _CONFIG_HINTS[setting.name]  # k: "2/3" as well as numbers
    meta = dict(setting.metadata)
    if setting.default is not None:  # the None-default fields say in their help what None means
        default = setting.default
        shown = ("on" if default else "off") if isinstance(default, bool) else "2/3" if default == 2 / 3 else default
        meta["help"] += f" (default: {shown})"
    if hint is bool:  # --X alone is True (HfArgumentParser gives bool | None fields no bare form of their own)
        meta |= {"nargs": "?", "const": True}
    return setting.name, hint | None, _opt(**meta)


_CONFIG_HINTS = typing.get_type_hints(DynamicConfig)
DynamicArgs = make_dataclass(
    "DynamicArgs",
    [
        ("dynamic", bool | None, _opt(
            "dynamic allocation (default: on for lora, dora, vera, dvora, hydra and dylora; off for full; refused "
            "by bitfit, adalora, l1ra and galore, which have nothing to allocate or allocate by their own rule)",
            nargs="?", const=True,
        )),
        ("preset", str | None, _opt(
            "starting point of the dynamic settings below; each flag given overrides it "
            "(default: full for --method full, else default)",
            choices=tuple(PRESETS),
        )),
        *(_dynamic_flag(f) for f in fields(DynamicConfig) if f.name != "seed"),  # --seed is the run's
    ],
    namespace={
        "__module__": __name__,
        "__doc__": "Dynamic allocation: ``--dynamic``, ``--preset`` and a flag per :class:`dynalora.DynamicConfig` "
        "field (its help and choices are the field's; None: the preset's value).",
        "_argument_group_name": "dynamic allocation (dynalora.DynamicConfig)",  # HfArgumentParser: the --help group
    },
)  # fmt: skip


@dataclass
class TrainingArgs:
    """Training, by transformers' ``TrainingArguments`` names where it has one (aliases where dynalora's differs)."""

    _argument_group_name = "training (transformers' TrainingArguments)"  # HfArgumentParser: the --help group
    lr: float | None = _opt(
        "peak learning rate (default: by method, from its record in dynalora.methods; 5e-4 for LoRA on decoders)",
        aliases=("--learning-rate",),
    )
    # None: not given (the defaults are transformers'), so that a flag that does not apply is refused
    optim: str | None = _opt(
        "optimizer, by transformers' name (dynamic runs with --optimizer local: one per module; --method galore "
        "and l1ra build their own) (default: adamw_torch)",
        choices=SUPPORTED_OPTIM,
    )
    adam_beta1: float | None = _opt("Adam's beta1 (--optim adamw_torch, adamw_torch_fused) (default: 0.9)")
    adam_beta2: float | None = _opt("Adam's beta2 (--optim adamw_torch, adamw_torch_fused) (default: 0.999)")
    adam_epsilon: float | None = _opt("Adam's epsilon (--optim adamw_torch, adamw_torch_fused) (default: 1e-8)")
    weight_decay: float = _opt("the optimizer's weight decay, on every trained tensor", default=0.01)
    lr_scheduler_type: str = _opt(
        "learning-rate schedule after the warm-up (transformers' get_scheduler)", default="linear",
        choices=LR_SCHEDULERS,
    )  # fmt: skip
    lr_scheduler_kwargs: str | None = _opt(
        "the schedule's own arguments, a JSON object: num_cycles (cosine, cosine_with_restarts), lr_end and power "
        "(polynomial), min_lr or min_lr_rate (cosine_with_min_lr), num_decay_steps (warmup_stable_decay), ..."
    )
    warmup_ratio: float | None = _opt("fraction of steps of linear warm-up (default: 0.06)")
    warmup_steps: int | None = _opt("steps of linear warm-up; overrides --warmup-ratio")
    max_grad_norm: float = _opt(
        "clip the norm of every trained tensor's gradient, together, at this value before each optimizer step "
        "(0: no clipping; transformers' Trainer clips at 1.0, the recipes measured here ran without)",
        default=0.0,
    )
    label_smoothing_factor: float = _opt(
        "smooth the one-hot targets of the cross-entropy loss by this much, in [0, 1) (classification tasks)",
        default=0.0,
    )
    batch_size: int | None = _opt(
        "training batch size: the global batch, split over the processes (default: 32; 8 for causal LM)"
    )
    epochs: float = _opt("training epochs (ignored with --max-steps)", default=1.0, aliases=("--num-train-epochs",))
    max_steps: int | None = _opt("stop after this many optimizer steps")
    gradient_accumulation_steps: int = _opt(
        "micro-batches of --batch-size per optimizer step; every schedule counts optimizer steps", default=1
    )
    gradient_checkpointing: bool | None = _opt(
        "activation checkpointing of the transformer blocks (non-reentrant); with --dynamic, blocks below the "
        "lowest trained one are neither checkpointed nor run backward (default: on for causal LM, as TRL's "
        "SFTConfig: 0.24x the counted bytes of the default on SmolLM2-135M for a 1.2x step; off for classification)",
        nargs="?",
        const=True,
    )
    fsdp: str | None = _opt(
        "shard the model over the processes with FSDP2 (fully_shard, each transformer block its own unit); "
        "--fsdp alone is full_shard. Also HF's words, space-separated: full_shard or shard_grad_op (keep "
        "gathered weights from forward to backward), auto_wrap (always on), offload (shards and optimizer state "
        "on the CPU; CUDA only). Start with torchrun --nproc_per_node N -m dynalora train --fsdp",
        nargs="?",
        const="full_shard auto_wrap",
    )
    bf16: bool = _opt("bfloat16 autocast (CUDA)", default=False)
    fp16: bool = _opt("float16 autocast with loss scaling (CUDA)", default=False)
    device: str | None = _opt("cpu or cuda (default: cuda when available)")
    dataloader_num_workers: int = _opt("processes that load training batches (0: the main process)", default=0)
    seed: int = _opt("random seed (data order, initialisation, allocation)", default=0)
    eval_every: int | None = _opt(
        "evaluate on the validation split every N steps (0: only at the end) (default: 50; 200 for causal LM)",
        aliases=("--eval-steps",),
    )


@dataclass
class OutputArgs:
    """Outputs, checkpoints and reporting."""

    _argument_group_name = "outputs, checkpoints and reporting"  # HfArgumentParser: the --help group
    output_dir: str = _opt("folder for config, metrics, logs, plots and the trained weights", default="runs/train")
    overwrite: bool = _opt("write over a run already in --output-dir", default=False)
    resume: bool = _opt("continue the run in --output-dir from its newest checkpoint", default=False)
    save_every: int = _opt(
        "write a checkpoint every N optimizer steps under --output-dir/checkpoints (0: only on SIGINT/SIGTERM)",
        default=0,
        aliases=("--save-steps",),
    )
    keep_checkpoints: int = _opt("keep only the newest N checkpoints", default=2, aliases=("--save-total-limit",))
    quiet: bool = _opt("no progress bar", default=False)
    report_to: str = _opt(
        "where Trainer also reports the training loss and learning rate: none, all, or a comma-separated list of "
        "installed integrations (tensorboard, wandb, mlflow, ...)",
        default="none",
    )
    logging_steps: int | None = _opt("report to --report-to every N optimizer steps (default: 10)")
    push_to_hub: bool = _opt(
        "upload the trained model/ folder (adapter, tokenizer, model card) to the Hugging Face Hub at the end",
        default=False,
    )
    hub_model_id: str | None = _opt("the Hub repository for --push-to-hub (default: the --output-dir folder's name)")


@dataclass
class TrainArgs(OutputArgs, TrainingArgs, DynamicArgs, DataArgs, ModelArgs):
    """Everything ``dynalora train`` takes: the five groups of flags in one, checked before anything loads."""

    def __post_init__(self) -> None:
        counts = ("rank", "batch_size", "max_length", "period", "gradient_accumulation_steps", "keep_checkpoints",
                  "logging_steps", "max_steps", "max_train_samples", "max_eval_samples",
                  "max_test_samples")  # fmt: skip
        for name, low in [*((n, 1) for n in counts), ("eval_every", 0), ("save_every", 0)]:
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        for name in ("epochs", "alpha", "weight_decay", "threshold", "warmup_ratio", "adapter_dropout"):
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise UsageError(f"--epochs must be > 0, got {self.epochs}")
        if not 0 <= self.adapter_dropout < 1:
            raise UsageError(f"--adapter-dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        defaults = {f.name: f.default for f in fields(self)}
        dynamic_only = {name: getattr(self, name) for name in REGISTRY[self.method].dynamic_options}  # as given
        for name, owners in METHOD_ONLY.items():  # an option this method does not read, set: refused, not ignored
            if getattr(self, name) != defaults[name] and self.method not in owners:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} applies to --method {', '.join(owners)} only, not {self.method}; drop it")
        self._resolve_objective()
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.generates
        sizes = CAUSAL_SIZES if self.generates else CLASSIFICATION_SIZES
        for name, value in sizes.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.task = resolve_task(self.task, self.train_file)
        if self.bf16 and self.fp16:
            raise UsageError("--bf16 and --fp16 exclude each other; choose one")
        self._check_reporting()
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UsageError(f"--max-grad-norm must be a number >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.max_grad_norm and self.fp16:
            raise UsageError("--max-grad-norm with --fp16 is not supported (the loss scaler would clip scaled "
                             "gradients); allowed: --bf16, or no clipping")  # fmt: skip
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UsageError(f"--warmup-steps must be an int >= 0, got {self.warmup_steps}")
        for name in ("warmup_steps", "warmup_ratio"):  # transformers' constant has no warm-up
            if getattr(self, name) and self.lr_scheduler_type == "constant":
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} is not read by --lr-scheduler-type constant; allowed: "
                                 f"--lr-scheduler-type constant_with_warmup, or drop {flag}")  # fmt: skip
        if self.warmup_ratio is None:  # None until here: a ratio given with a constant rate is refused
            self.warmup_ratio = 0.06
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --output-dir and --overwrite starts it over; choose one")
        if self.base_dtype != "fp32" and (self.bf16 or self.fp16):
            flag = "--bf16" if self.bf16 else "--fp16"
            if flag != "--" + self.base_dtype:
                raise UsageError(f"--base-dtype {self.base_dtype} computes in {self.base_dtype}; drop {flag}")
        method = REGISTRY[self.method]
        if self.base_dtype != "fp32" and method.trains_base:
            raise UsageError(
                f"--base-dtype {self.base_dtype} stores frozen weights, and --method {self.method} trains the base "
                "weights; allowed: --base-dtype fp32, or an adapter method"
            )
        if self.dynamic is None:
            self.dynamic = method.dynamic
        preset_given = self.preset is not None
        if self.preset is None:  # one default does not fit all: dynamic full fine-tuning has its own
            self.preset = "full" if self.method == "full" else "default"
        if self.lr is None:
            self.lr = method.default_lr(causal=self.generates, dynamic=self.dynamic)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a finite number > 0, got {self.lr}")
        self._check_optimizer()  # after the learning rate: the schedule is checked at it
        if self.dynamic and method.static:  # refused now, not once the model has loaded
            raise UsageError(method.static)
        if not self.dynamic:
            for name, value in dynamic_only.items():  # read by the method's dynamic variant only
                if value != defaults[name]:
                    flag = "--" + name.replace("_", "-")
                    raise UsageError(f"{flag} is read by dynamic --method {self.method} only, and this run is static; "
                                     "drop it, or add --dynamic")  # fmt: skip
            given = [f.name for f in fields(DynamicConfig) if f.name != "seed" and getattr(self, f.name) is not None]
            if preset_given:
                given.insert(0, "preset")
            if given:
                flag = "--" + given[0].replace("_", "-")
                if method.static:  # --dynamic would be refused too
                    raise UsageError(f"{flag} is a dynamic setting, and --method {self.method} trains statically; "
                                     "drop it")  # fmt: skip
                raise UsageError(f"{flag} is a dynamic setting and this run is static; drop it, or add --dynamic")
        if self.dynamic:
            self._check_dynamic()  # validate now, before anything is loaded or written
        if self.fsdp is not None:
            self._check_fsdp()

    def _check_dynamic(self) -> None:
        """The dynamic settings, and what this run's other flags would leave unread of them."""
        config = self.dynamic_config()
        if config.cap_mode == "recompute" and self.gradient_checkpointing:
            default = " (on by default for causal LM)" if self.generates else ""
            raise UsageError(
                f"--cap-mode recompute holds --memory-cap by checkpointing the lowest trained blocks, and "
                f"--gradient-checkpointing{default} already checkpoints every block, so the cap would do nothing; "
                "allowed: --no-gradient-checkpointing with the cap, or the cap dropped"
            )

    def _check_optimizer(self) -> None:
        """--optim and its Adam settings, --lr-scheduler-kwargs, --label-smoothing-factor: what applies, or one line."""
        given = [
            name for name in ("optim", "adam_beta1", "adam_beta2", "adam_epsilon") if getattr(self, name) is not None
        ]
        if given and REGISTRY[self.method].hooks.make_optimizer is not None:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag}: --method {self.method} builds its own optimizer; drop the flag")
        adam = [name for name in given if name != "optim"]
        if adam and (self.optim or "adamw_torch") not in ADAM_OPTIMS:
            raise UsageError(f"--{adam[0].replace('_', '-')} is read by --optim {' and '.join(ADAM_OPTIMS)} only, "
                             f"not {self.optim}; drop it, or choose one of those")  # fmt: skip
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon is not None and not (math.isfinite(self.adam_epsilon) and self.adam_epsilon > 0):
            raise UsageError(f"--adam-epsilon must be a finite number > 0, got {self.adam_epsilon}")
        if not 0 <= self.label_smoothing_factor < 1:
            raise UsageError(f"--label-smoothing-factor must be in [0, 1), got {self.label_smoothing_factor}")
        if self.label_smoothing_factor and (self.regression or self.task in REGRESSION_TASKS):
            what = "--regression" if self.regression else f"--task {self.task}"
            raise UsageError(f"--label-smoothing-factor smooths class targets; {what} has none; drop one")
        if self.label_smoothing_factor and self.generates:  # TRL deprecates it: an extra forward pass per step
            raise UsageError("--label-smoothing-factor is for classification here; TRL's SFTTrainer deprecates it "
                             "for causal LM (it costs an extra forward pass each step); drop it")  # fmt: skip
        if self.dataloader_num_workers < 0:
            raise UsageError(f"--dataloader-num-workers must be >= 0, got {self.dataloader_num_workers}")
        kwargs = self.scheduler_kwargs()  # refused now, not when training starts
        # one spelling of the same kwargs, so that --resume and a sweep compare them as equal
        self.lr_scheduler_kwargs = json.dumps(kwargs, sort_keys=True) if kwargs else None

    def scheduler_kwargs(self) -> dict[str, Any]:
        """--lr-scheduler-kwargs as a dict, checked against --lr-scheduler-type's own arguments."""
        import inspect

        import torch
        from transformers import get_scheduler
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        flag = f"--lr-scheduler-kwargs {self.lr_scheduler_kwargs!r}"
        try:
            kwargs = json.loads(self.lr_scheduler_kwargs or "{}")
        except json.JSONDecodeError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise UsageError(f"{flag} is not a JSON object; e.g. '{{\"num_cycles\": 2}}'")
        params = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(self.lr_scheduler_type)]).parameters
        own = [n for n in params if n not in ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")]
        for key in kwargs:
            if key not in own:
                raise UsageError(f"{flag}: {self.lr_scheduler_type} takes no {key!r}; "
                                 f"allowed: {', '.join(own) or 'nothing (drop the flag)'}")  # fmt: skip
        try:  # the values: the schedule itself checks them, over a few steps at the run's rate
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.lr)
            schedule = get_scheduler(self.lr_scheduler_type, probe, num_warmup_steps=2, num_training_steps=10,
                                     scheduler_specific_kwargs=kwargs)  # fmt: skip
            for _ in range(10):
                probe.step()
                schedule.step()
        except (TypeError, ValueError, ArithmeticError) as err:
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not self.lr_scheduler_kwargs:
                flag, why = f"--lr-scheduler-type {self.lr_scheduler_type}", f"{why}; give --lr-scheduler-kwargs"
            raise UsageError(f"{flag}: {why}") from None
        return kwargs

    def _check_fsdp(self) -> None:
        """--fsdp: HF's words that FSDP2 has a meaning for, and methods whose tensors it can shard."""
        words = self.fsdp.replace(",", " ").split()
        unknown = [w for w in words if w not in FSDP_WORDS]
        if unknown or not words:
            raise UsageError(f"--fsdp {self.fsdp!r}: {unknown[0] if unknown else 'empty'} is not an FSDP2 setting "
                             f"here; allowed: {', '.join(FSDP_WORDS)} (space-separated), or --fsdp alone")  # fmt: skip
        if "full_shard" in words and "shard_grad_op" in words:
            raise UsageError("--fsdp: full_shard and shard_grad_op exclude each other; choose one")
        if not REGISTRY[self.method].shardable:
            shardable = ", ".join(n for n, m in REGISTRY.items() if m.shardable)
            raise UsageError(f"--fsdp shards the tensors of {shardable}; --method {self.method} keeps state "
                             "of its own outside them; allowed: one of those methods, or drop --fsdp")  # fmt: skip
        if self.base_dtype != "fp32":
            raise UsageError(f"--fsdp gathers each block's weights in one dtype, so --base-dtype "
                             f"{self.base_dtype} (half-precision weights beside fp32 adapters) cannot shard; "
                             "allowed: --base-dtype fp32, with --bf16 for half-precision compute")  # fmt: skip
        if self.dynamic and self.dynamic_config().inactive_dtype != "fp32":
            raise UsageError("--inactive-dtype changes parameters' storage, which FSDP holds; allowed with --fsdp: "
                             "--inactive-dtype fp32")  # fmt: skip

    def _check_reporting(self) -> None:
        """--report-to names installed integrations; --push-to-hub needs the Hub."""
        if self.report_to not in ("none", "all"):
            from transformers.integrations import get_available_reporting_integrations

            available = get_available_reporting_integrations()
            for name in (n.strip() for n in self.report_to.split(",")):
                if name not in available:
                    allowed = ", ".join(["none", "all", *available])
                    raise UsageError(f"--report-to {name}: not an installed integration; allowed here: {allowed}")
        if self.logging_steps is not None and self.report_to == "none":  # log.jsonl has every step regardless
            raise UsageError("--logging-steps sets how often Trainer reports to --report-to, which is none; "
                             "add --report-to, or drop it (log.jsonl records every step)")  # fmt: skip
        if self.logging_steps is None:
            self.logging_steps = 10
        if self.hub_model_id is not None and not self.push_to_hub:
            raise UsageError("--hub-model-id names the repository of --push-to-hub; add --push-to-hub, or drop it")
        if self.push_to_hub:
            import os

            if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
                raise UsageError("--push-to-hub needs the Hugging Face Hub, and HF_HUB_OFFLINE is set; drop the flag "
                                 "(model/ holds everything to upload later with `hf upload`)")  # fmt: skip

    @property
    def generates(self) -> bool:
        """The objective is next tokens (causal LM), not a task head."""
        return self.objective == Kind.CAUSAL_LM.objective

    def _resolve_objective(self) -> None:
        """What the model learns follows from the model and the data: a decoder, or a prompt
        column, means causal LM; a decoder with no data gets the embedded instruction task."""
        if (self.prompt_column is None) != (self.response_column is None):
            raise UsageError(
                "--prompt-column and --response-column go together; give both for instruction tuning, "
                "or neither for language modelling on --text-column"
            )
        if self.objective is None:
            causal = self.prompt_column is not None or model_is_decoder(self.model)
            self.objective = (Kind.CAUSAL_LM if causal else Kind.CLASSIFICATION).objective
        if self.objective == "classification":
            if self.prompt_column is not None or self.task in INSTRUCT_TASKS:
                what = "--prompt-column" if self.prompt_column is not None else f"--task {self.task}"
                raise UsageError(f"{what} is causal-LM data; allowed with it: --objective causal-lm (a decoder model)")
            return
        if self.task is None and self.train_file is None:
            self.task = DEFAULT_INSTRUCT_TASK
        task = resolve_task(self.task, self.train_file)
        if task not in INSTRUCT_TASKS and task != "custom":
            raise UsageError(
                f"--task {task} is a classification task; allowed with --objective causal-lm: "
                f"{', '.join(INSTRUCT_TASKS)}, or custom files (--prompt-column/--response-column, or --text-column)"
            )
        if self.regression:
            raise UsageError("--regression needs --objective classification; a causal LM predicts tokens")
        if self.targets is None and "targets" in REGISTRY[self.method].options:
            self.targets = "all-linear"  # decoders: attention and MLP, as LoRA is used on LLMs
        if self.max_eval_samples is None:
            self.max_eval_samples = DEFAULT_CAUSAL_EVAL_SAMPLES

    def dynamic_config(self) -> DynamicConfig:
        """The preset, with every dynamic flag that was given on top (each field has a flag of its name)."""
        values = {f.name: getattr(self, f.name) for f in fields(DynamicConfig)}
        values = {name: value for name, value in values.items() if value is not None}
        if "k" in values:
            values["k"] = parse_k(values["k"])
        try:
            return DynamicConfig.from_preset(self.preset, **values)
        except ValueError as err:
            raise UsageError(as_flag_message(err)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_is_decoder(model: str) -> bool:
    """``--model`` names a decoder-only LM (see :func:`dynalora.models.is_decoder`)."""
    if model in (EMBEDDED_LLM, DEFAULT_MODEL):
        return model == EMBEDDED_LLM
    return is_decoder(model)


ARG_GROUPS = (ModelArgs, DataArgs, DynamicArgs, TrainingArgs, OutputArgs)
"""``dynalora train``'s flags, one ``HfArgumentParser`` dataclass per ``--help`` group."""


class TrainParser(HfArgumentParser):
    """transformers' ``HfArgumentParser`` over :data:`ARG_GROUPS` (every flag also with underscores, as
    in transformers' scripts), with ``--no-X`` for every boolean flag and help that names one spelling."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("usage", "%(prog)s [--flag VALUE ...] (each below; also --flag_name and --config FILE)")
        super().__init__(ARG_GROUPS, formatter_class=_FlagHelp, **kwargs)
        hints = typing.get_type_hints(TrainArgs)
        booleans = {name for name, kind in hints.items() if kind in (bool, bool | None)}
        for action in list(self._actions):
            if action.dest not in _FIELD_NAMES:
                continue
            meta, action.metavar = _FIELDS[action.dest].metadata, action.dest.upper()  # not {a,b,c,...}
            if action.choices:
                action.help += f" (choices: {', '.join(map(str, action.choices))})"
            if action.default is not None and action.default is not False:
                action.help += f" (default: {action.default})"
            if meta.get("aliases"):
                action.help += f" (also {', '.join(a for a in meta['aliases'] if '_' not in a)})"
            if action.dest in booleans:  # after the flag itself: its default stays the field's
                dash = action.dest.replace("_", "-")
                hidden = {"dest": action.dest, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
                group = self._group_of(action)
                names = dict.fromkeys((f"--no-{dash}", f"--no_{action.dest}", f"--no-{action.dest}"))
                group.add_argument(*names, action="store_false", **hidden)

    def _group_of(self, action: argparse.Action) -> argparse._ArgumentGroup:
        return next(g for g in self._action_groups if action in g._group_actions)

    @staticmethod
    def explain(message: str) -> str:
        """argparse's message, or, for a transformers/TRL flag, why it is refused (:func:`refuse_hf_flag`)."""
        if message.startswith("unrecognized arguments: "):
            flags = [w for w in message.split(": ", 1)[1].split() if w.startswith("--")]
            message = next((line for line in map(refuse_hf_flag, flags) if line), message)
        if message.startswith("argument --optim: invalid choice: 'local'") or message.startswith(
            "argument --optim: invalid choice: 'global'"
        ):  # --optim local was --optimizer local, by abbreviation, before --optim existed
            return f"{message}; the dynamic setting of global or local optimisation is --optimizer"
        head, sep, rest = message.partition(": ")
        if sep and head.startswith("argument --") and "/" in head:  # one spelling: --max-grad-norm, not all three
            names = head.removeprefix("argument ").split("/")
            message = f"argument {next((n for n in names if '_' not in n), names[0])}: {rest}"
        return message

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {self.explain(message)}\n")  # one line, no usage dump


_FIELDS = {f.name: f for f in fields(TrainArgs)}
_FIELD_NAMES = frozenset(_FIELDS)
_ALIASES = {a.lstrip("-").replace("-", "_"): f.name for f in _FIELDS.values() for a in f.metadata.get("aliases", ())}


def field_name(key: str) -> str | None:
    """The TrainArgs field that a key of a config file names (``lr``, ``learning_rate``, ``--lora-r``), or None."""
    name = str(key).lstrip("-").replace("-", "_")
    return name if name in _FIELD_NAMES else _ALIASES.get(name)


def flag_names(action: argparse.Action) -> list[str]:
    """How help shows a flag: its dashed name, and ``--no-X`` beside a boolean's."""
    if action.dest not in _FIELD_NAMES or not action.option_strings:
        return list(action.option_strings)
    dash = "--" + action.dest.replace("_", "-")
    return [dash, "--no-" + dash[2:]] if action.const is True else [dash]


class _FlagHelp(argparse.HelpFormatter):
    """One spelling per flag (``--max-grad-norm``): the underscore forms and aliases are in its help."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if action.dest not in _FIELD_NAMES or not action.option_strings:
            return super()._format_action_invocation(action)
        names = flag_names(action)
        if action.nargs == 0 or action.const is True:
            return ", ".join(names)
        return f"{names[0]} {self._format_args(action, action.dest.upper())}"


HF_INSTEAD = {
    "per_device_train_batch_size": "--batch-size, the global batch (split over the processes)",
    "per_device_eval_batch_size": "--batch-size (evaluation batches are twice it)",
    "use_cpu": "--device cpu",
    "eval_strategy": "--eval-every N",
    "save_strategy": "--save-every N",
    "logging_strategy": "--logging-steps N with --report-to",
    "resume_from_checkpoint": "--resume",
    "disable_tqdm": "--quiet",
    "gradient_checkpointing_kwargs": "--gradient-checkpointing (non-reentrant; frozen lower blocks are skipped)",
    "activation_checkpointing": "--gradient-checkpointing",
    "fsdp_config": "--fsdp WORDS",
    "deepspeed": "--fsdp (FSDP2)",
    "dataset_text_field": "--text-column",
    "max_seq_length": "--max-length",
    "completion_only_loss": "--prompt-column and --response-column (the loss falls on the response only)",
    "assistant_only_loss": "--prompt-column and --response-column (the loss falls on the response only)",
    "hub_strategy": "--push-to-hub (it uploads model/ once, at the end)",
}
"""transformers' and TRL's training settings that ``dynalora train`` sets itself, and what to use instead."""


def refuse_hf_flag(flag: str) -> str | None:
    """One line refusing ``flag`` (``--optim_args``, ``--per-device-train-batch-size=8``) when it names a field of
    ``TrainingArguments`` or ``SFTConfig`` that ``dynalora train`` does not take; None for any other word."""
    from transformers import TrainingArguments

    name = flag.split("=")[0].lstrip("-").replace("-", "_")
    known = {f.name for f in fields(TrainingArguments)}
    owner = "transformers' TrainingArguments"
    if name.startswith("no_") and field_name(name[3:]) is not None:  # --no-fsdp; in a config file, fsdp: false
        return f"--{name[3:]} takes a value and has no --no- form; omit it (in a config file: drop the key)"
    if name.startswith("no_") and name[3:] in known:  # HF's --no_X of a field that defaults to True
        name = name[3:]
    if name not in known:
        try:
            from trl import SFTConfig

            known = {f.name for f in fields(SFTConfig)}
        except ImportError:
            known = set()
        if name not in known and name not in HF_INSTEAD:
            return None
        owner = "TRL's SFTConfig" if name in known else "TRL's SFTConfig, in older versions"
    if name in ("do_train", "do_eval", "do_predict"):
        return f"--{name} ({owner}) is not needed: dynalora train trains, validates and tests; drop it"
    if name in HF_INSTEAD:
        return f"--{name} ({owner}) is set by dynalora train itself; use {HF_INSTEAD[name]}"
    return (f"--{name} is a setting of {owner} that dynalora train does not apply; its training settings are "
            "listed by dynalora train --help (a Trainer of your own takes any, with dynalora.attach)")  # fmt: skip


def as_flag_message(err: ValueError) -> str:
    """``"state_policy='x' is ..."`` (a config field) -> ``"--state-policy='x' is ..."`` (the CLI flag)."""
    text = str(err)
    field_name, sep, rest = text.partition("=")
    if sep and field_name.isidentifier():
        return f"--{field_name.replace('_', '-')}={rest}"
    return text


def parse_k(text: str) -> int | float:
    """``"16"`` -> 16, ``"0.5"`` -> 0.5, ``"2/3"`` -> 0.666..."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return int(text) if text.strip().lstrip("-").isdigit() else float(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--k {text!r} is not a number; allowed: an int >= 1, a fraction in (0, 1], or a/b") from None
