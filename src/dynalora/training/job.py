"""Setting up a ``dynalora train`` run before Trainer exists: the output folder, the device, the data,
the model with its method (and FSDP2 shards), the allocator, and the evaluation loaders (:class:`Job`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dynalora import distributed
from dynalora.adapters import DTYPES, cast_frozen, find_block_list
from dynalora.checkpointing import enable_checkpointing
from dynalora.controller import DynamicAllocator
from dynalora.data import TaskData, load_task, make_collator, tokenize
from dynalora.data.tasks import Kind, TaskSpec
from dynalora.errors import UsageError
from dynalora.methods import REGISTRY, Hooks, MethodOptions
from dynalora.models import load_model, resolve_model_path
from dynalora.training.args import RUN_FILES, TrainArgs, as_flag_message

logger = logging.getLogger(__name__)


def prepare_output_dir(args: TrainArgs) -> Path:
    """Refuse a folder that holds a run (unless --overwrite) or that cannot be a folder; writes nothing."""
    out = Path(args.output_dir)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not (args.overwrite or args.resume):
        hint = "--resume to continue it, " if "checkpoints" in existing and "metrics.json" not in existing else ""
        raise UsageError(
            f"--output-dir {out} already holds a run ({existing[0]}); choose another folder, or pass {hint}--overwrite"
        )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output-dir {out}: {parent} is a file; allowed: a folder")
    return out


def clear_run(out: Path) -> None:
    """Remove a previous run's files (only those dynalora writes) before a new run writes any."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; allowed: cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: unsupported; allowed: cpu, cuda, cuda:N")
    return device


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def method_options(args: TrainArgs, num_steps: int, kind: Kind = Kind.CLASSIFICATION) -> MethodOptions:
    """What ``args`` asks of the method's builder, for a run of ``num_steps`` optimizer steps on a task of ``kind``."""
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    return MethodOptions(
        targets,
        args.rank,
        args.alpha,
        args.adapter_dropout,
        bool(args.dynamic),
        num_steps,
        args.seed,
        args.dylora_frozen,
        Kind(kind).peft_task_type,
    )


@dataclass
class Job:
    """One run: its arguments, what :func:`load` built (data, the model with its method, the
    allocator, evaluation loaders), and the ``Trainer`` that trains it (set by :func:`dynalora.training.engine.run`)."""

    args: TrainArgs
    spec: TaskSpec
    model_path: str
    tokenizer: Any
    model: torch.nn.Module
    options: MethodOptions
    allocator: DynamicAllocator | None
    hooks: Hooks
    tokenized: Any
    collator: Any
    eval_loaders: dict[str, DataLoader]
    num_steps: int
    saved_names: frozenset[str]
    num_trainable: int
    trainer: Any = None

    @property
    def accelerator(self) -> Any:
        return self.trainer.accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrapped(self) -> torch.nn.Module:
        return self.trainer.model  # Trainer's model is never the DDP wrapper

    @property
    def sharded(self) -> bool:
        return self.args.fsdp is not None

    @property
    def weights(self) -> list[torch.Tensor]:
        """Parameters and buffers, looked up now: what autograd saves of these is not an activation."""
        model = self.unwrapped()
        return [*model.parameters(), *model.buffers()]

    def saved(self) -> dict[str, torch.nn.Parameter]:
        """The checkpoint's tensors, looked up now: L1RA replaces its parameters when it resizes."""
        return {n: p for n, p in self.unwrapped().named_parameters() if n in self.saved_names}


def load(args: TrainArgs, device: torch.device) -> Job:
    """Load data and model and set up the method on ``device``, and the allocator when the run is
    dynamic. Raises UsageError on bad input."""
    model_path = resolve_model_path(args.model)

    from transformers import set_seed

    set_seed(args.seed)
    data: TaskData = load_task(
        args.task,
        glue_dir=args.glue_dir,
        train_file=args.train_file,
        validation_file=args.validation_file,
        test_file=args.test_file,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        regression=args.regression,
        max_train_samples=args.max_train_samples,
        seed=args.seed,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        causal=args.generates,
    )
    if args.max_test_samples is not None and not ("test" in data.splits and data.has_test_labels):
        raise UsageError(f"--max-test-samples: --task {args.task} has no labelled test split to sample (custom "
                         "tasks: --test-file); drop it")  # fmt: skip
    # optimizer steps; the last, shorter accumulation of an epoch is a step too
    batches_per_epoch = math.ceil(len(data.splits["train"]) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    num_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    tokenizer, model = load_model(model_path, data.spec, device)
    options = method_options(args, num_steps, data.spec.kind)
    model, modules = REGISTRY[args.method].build(model, options)
    if args.base_dtype != "fp32":  # before the allocator freezes anything: every adapter stays float32
        cast_frozen(model, DTYPES[args.base_dtype])
    hooks = REGISTRY[args.method].hooks
    model.to(device)
    if args.gradient_checkpointing:
        try:
            enable_checkpointing(model)
        except ValueError as err:
            raise UsageError(f"--gradient-checkpointing: {err}") from None
    if args.fsdp is not None:  # before the allocator, which must see the sharded parameters
        modules = _shard(model, args.fsdp, modules)
    saved = frozenset(n for n, p in model.named_parameters() if p.requires_grad)  # before any module is frozen
    allocator = None
    if args.dynamic:
        try:
            allocator = DynamicAllocator(model, args.dynamic_config(), modules=modules)
        except ValueError as err:
            raise UsageError(as_flag_message(err)) from None

    tokenized = tokenize(data, tokenizer, args.max_length)
    collator = make_collator(tokenizer, kind=data.spec.kind)
    eval_loaders = {  # only the main process evaluates, on the whole split
        split: DataLoader(
            # each split has its own cap: --max-eval-samples never shrinks the test split
            _sample(tokenized[split], args.max_eval_samples if split == "validation" else args.max_test_samples),
            batch_size=2 * args.batch_size,
            collate_fn=collator,
            # without its own generator, every pass over the loader draws from the global RNG, and
            # the dropout masks of training would then depend on how often it evaluates
            generator=torch.Generator().manual_seed(0),
        )
        for split in ("validation", "test")
        if split in tokenized and (split != "test" or data.has_test_labels)
    }
    if allocator is not None:
        trained = allocator.num_params + allocator.num_extra_params
    else:
        trained = sum(p.numel() for p in trainable_params(model))
    return Job(args, data.spec, model_path, tokenizer, model, options, allocator, hooks, tokenized, collator,
               eval_loaders, num_steps, saved, trained)  # fmt: skip


def _shard(model: torch.nn.Module, fsdp: str, modules: list | None) -> list | None:
    """--fsdp: FSDP2 over the transformer blocks, then the rest. Trainer is told that the model is
    sharded already, so it neither wraps it in DDP nor shards it again, and it defers the
    reduce-scatter to the last micro-batch of each accumulation. Returns ``modules`` (a method's
    units of allocation) holding the sharded parameters that replaced theirs."""
    found = find_block_list(model)
    if found is None:
        raise UsageError("--fsdp shards each transformer block, and this model has no list of blocks; "
                         "allowed: transformers models (drop --fsdp)")  # fmt: skip
    words = fsdp.replace(",", " ").split()
    names = {id(p): name for name, p in model.named_parameters()}
    distributed.shard(model, found[1], reshard_after_forward="shard_grad_op" not in words, offload="offload" in words)
    if isinstance(getattr(type(model), "is_distributed_loading_by_transformers", None), property):
        model._is_distributed_loading_by_transformers = True  # a transformers model: its flag behind the property
    else:  # a PeftModel or an own wrapper: Trainer reads the attribute
        model.is_distributed_loading_by_transformers = True
    if modules is None:
        return None
    now = dict(model.named_parameters())
    return [dataclasses.replace(m, params=tuple(now[names[id(p)]] for p in m.params)) for m in modules]


def fsdp_group(device: torch.device, fsdp: str) -> None:
    """The process group FSDP2 shards over, before the model loads (under torchrun, one process too)."""
    if "WORLD_SIZE" not in os.environ:
        raise UsageError("--fsdp shards over processes started by a launcher; allowed: torchrun --nproc_per_node "
                         "N -m dynalora train --fsdp ... (N may be 1), or accelerate launch -m dynalora train "
                         "--fsdp")  # fmt: skip
    if "offload" in fsdp.split() and device.type != "cuda":
        raise UsageError("--fsdp offload moves shards from a CUDA device to the CPU; allowed on CPU: --fsdp "
                         "without offload")  # fmt: skip
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState(cpu=device.type == "cpu")  # what TrainingArguments will find: its process group
    if not dist.is_initialized():  # one process: accelerate starts no group, FSDP2 needs one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def check_writable(out: Path, rank: int = 0) -> None:
    """Create ``out`` and write a probe file in it, or raise UsageError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dynalora-write-test-{rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        message = f"--output-dir {out} is not writable ({err.strerror}); allowed: a folder you can write to"
        raise UsageError(message) from None


def _sample(dataset, n: int | None):
    """``n`` examples drawn at random (seed 0, the same every run), or the whole split. Not the first
    ``n``: a split stored by class would give one class (the political speeches' test split did)."""
    if n is None or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    return dataset.select(sorted(order.tolist()))
