"""Measured memory figures: parameters, gradients, optimizer state, saved activations, peak.

Every number here is counted from live tensors or read from the allocator / kernel, never
estimated from a formula. Tensors are counted by *distinct storage*: two views of one tensor, a
tied weight, or an input saved for backward by two ops count once, at the storage's ``nbytes``.

Two consumers: the training loop reports :class:`PeakMemory`, and the cost benchmark reports
:func:`step_memory_breakdown` (memory by category for one training step).
"""

from __future__ import annotations

import logging
import resource
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

# (device, storage data_ptr, storage nbytes): identifies one block of memory while it is alive.
StorageKey = tuple[str, int, int]

# Linux only; module level so tests can point them elsewhere to exercise the fallback.
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")

_PEAK_KINDS = {"cuda": "cuda_max_allocated", "cpu": "cpu_peak_rss"}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its shard under FSDP2 (a DTensor), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor addresses in this process: ``numel * element_size`` (of its
    shard, for an FSDP2 DTensor).

    This is the tensor's own size, not its storage's: a view of a larger tensor reports less.
    """
    t = _local(t)
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> StorageKey:
    t = _local(t)
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr(), storage.nbytes())


def _distinct_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of ``nbytes`` over the distinct storages behind ``tensors``."""
    seen: dict[StorageKey, int] = {}
    for t in tensors:
        key = _storage_key(t)
        seen[key] = key[2]
    return sum(seen.values())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters of ``model``, trainable or not, by distinct storage.

    Tied weights (one tensor registered under two names) count once.
    """
    return _distinct_storage_bytes(model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` at its storage dtype, frozen or not, by
    distinct storage: what the model itself holds, which decides whether a run fits beside the
    training bytes (gradients, optimizer state, saved activations)."""
    return _distinct_storage_bytes(chain(model.parameters(), model.buffers()))


def gradient_bytes(model_or_params: nn.Module | Iterable[torch.Tensor]) -> int:
    """Bytes of the ``.grad`` tensors currently held, by distinct storage.

    Args:
        model_or_params: a module (its parameters are used) or an iterable of tensors.

    Returns:
        The bytes; a parameter whose ``grad`` is ``None`` (frozen, or after
        ``zero_grad(set_to_none=True)``) counts 0.
    """
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    return _distinct_storage_bytes(p.grad for p in params if p.grad is not None)


def _state_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside an optimizer state value (tensors, or dicts/lists/tuples of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _state_tensors(v)


def _inner_optimizers(container: Any) -> Iterable[Any]:
    inner = container.optimizers
    inner = list(inner.values() if isinstance(inner, Mapping) else inner)
    extra = getattr(container, "extra", None)  # LocalOptimizer: the always-trained tensors' (the head's) own
    return [*inner, extra] if extra is not None else inner


def _optimizer_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    if hasattr(optimizer, "optimizers"):
        for opt in _inner_optimizers(optimizer):
            yield from _optimizer_tensors(opt)
    elif isinstance(getattr(optimizer, "state", None), Mapping) and hasattr(optimizer, "param_groups"):
        yield from _state_tensors(optimizer.state)
    else:
        raise TypeError(
            f"optimizer: expected an object with a `state` dict and `param_groups` (a torch optimizer) "
            f"or with an `optimizers` attribute (a container of them), got {type(optimizer).__name__}"
        )


def optimizer_state_bytes(optimizer: Any, device: torch.device | str | None = None) -> int:
    """Bytes of every tensor in the optimizer state, by distinct storage.

    Includes the per-parameter ``step`` tensors (a 0-dim float32 tensor per parameter in
    ``torch.optim.Adam``/``AdamW`` by default: 4 bytes each). Parameters that the optimizer has
    not stepped yet have no state and count 0.

    Args:
        optimizer: anything with a ``state`` dict and ``param_groups`` (a torch optimizer or a
            wrapper that exposes them), or anything with an ``optimizers`` attribute (a list or
            dict of such optimizers, e.g. a per-module "local" optimizer); containers nest.
        device: count only the tensors on this device (``"cuda"`` matches every CUDA device,
            ``"cuda:1"`` only that one); ``None`` counts all. State offloaded to the host is then
            told apart from state in accelerator memory.

    Raises:
        TypeError: ``optimizer`` is neither.
    """
    tensors = _optimizer_tensors(optimizer)
    if device is not None:
        tensors = (t for t in tensors if _on(t, torch.device(device)))
    return _distinct_storage_bytes(tensors)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index in (device.index, None))


class SavedActivations:
    """Counts the bytes of the distinct tensors autograd saves for backward during a forward.

    A context manager over :func:`torch.autograd.graph.saved_tensors_hooks`. The pack hook records
    each saved tensor's storage (device, ``data_ptr``, ``nbytes``) and returns the tensor
    unchanged; it keeps only a weak reference, so nothing lives longer than autograd keeps it.

    A storage saved twice (``y = x * x`` saves ``x`` twice; ``relu`` saves its output, which the
    next ``linear`` saves again as its input) counts once, by its storage ``nbytes``. Storages of
    the tensors in ``exclude`` (typically the model's parameters and buffers) are skipped: a
    weight saved by a matmul is not an activation. A copy of a weight (e.g. a bf16 cast under
    autocast) is a new storage and does count.

    Hooks are thread-local: only saves made by the thread that entered the context are seen.

    Attributes:
        bytes: bytes of the distinct non-excluded storages saved so far.
        count: number of those storages.

    Example::

        with SavedActivations(exclude=model.parameters()) as saved:
            loss = model(**batch).loss
        logger.info("saved for backward: %d bytes in %d tensors", saved.bytes, saved.count)
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        """Create the counter.

        Args:
            exclude: tensors whose storages are not activations (``model.parameters()``,
                ``model.buffers()``); read once, here.
        """
        self._excluded: set[StorageKey] = {_storage_key(t) for t in exclude}
        # One storage may be saved through several tensor objects (views); the storage is alive
        # while any of them is. A key whose tensors are all dead may be a reused address.
        self._seen: dict[StorageKey, list[weakref.ref[torch.Tensor]]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self.bytes = 0
        self.count = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter):  # a weight, also one FSDP2 gathered for this forward
            return t
        key = _storage_key(t)
        if key in self._excluded:
            return t
        refs = self._seen.setdefault(key, [])
        if not any(r() is not None for r in refs):
            refs.clear()
            self.bytes += key[2]
            self.count += 1
        refs.append(weakref.ref(t))
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(exc_type, exc, tb)
            self._hooks = None


def _status_kib(field: str) -> int:
    """One ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``), in KiB."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in {_STATUS}")


def _ru_maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # KiB on Linux, bytes on macOS.
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class PeakMemory:
    """Peak memory over a region of code, measured by the allocator or the kernel.

    On CUDA (``kind == "cuda_max_allocated"``): ``torch.cuda.reset_peak_memory_stats`` at start,
    ``torch.cuda.max_memory_allocated`` at the end, ``memory_allocated`` as baseline; this counts
    tensor memory only, not the caching allocator's reserve or the CUDA context.

    On CPU (``kind == "cpu_peak_rss"``): the process's resident set size. The kernel's high-water
    mark is reset at start by writing ``5`` to ``/proc/self/clear_refs`` (Linux) and ``VmHWM`` is
    read at the end; the baseline is ``VmRSS`` at start. Where that reset is not possible,
    ``ru_maxrss`` is used: the peak of the whole process so far, logged as a warning, and
    ``reset`` is False. RSS is inflated by the allocator keeping freed blocks (about 2x the
    counted tensor bytes has been seen), so compare methods with the counted tensor bytes
    (:func:`step_memory_breakdown`) and report RSS only beside them.

    Nothing is sampled in threads: only the start and end are read.

    Attributes:
        kind: ``"cuda_max_allocated"`` or ``"cpu_peak_rss"``.
        peak_bytes: peak over the region (absolute, not relative to the baseline).
        baseline_bytes: memory in use at start.
        reset: whether the peak was reset at start (always True on CUDA).

    Example::

        with PeakMemory(device) as peak:
            train_step()
        logger.info("%s: %d bytes (%d at start)", peak.kind, peak.peak_bytes, peak.baseline_bytes)
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        """Choose what to measure.

        Args:
            device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``, ...).

        Raises:
            ValueError: a device type other than ``cpu`` or ``cuda``.
        """
        self.device = torch.device(device)
        if self.device.type not in _PEAK_KINDS:
            raise ValueError(f"device: got {self.device.type!r}, allowed: {sorted(_PEAK_KINDS)}")
        self.kind = _PEAK_KINDS[self.device.type]
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.reset = False

    @property
    def increase_bytes(self) -> int:
        """``peak_bytes - baseline_bytes``: how far the region rose above its start."""
        return self.peak_bytes - self.baseline_bytes

    def start(self) -> None:
        """Reset the peak and read the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            self.reset = True
            return
        try:
            _CLEAR_REFS.write_text("5")
            self.reset = True
        except OSError as err:
            self.reset = False
            logger.warning("cannot reset the peak RSS (%s); peak_bytes is the process's peak so far", err)
        try:
            self.baseline_bytes = _status_kib("VmRSS") * 1024
        except (OSError, KeyError):
            self.baseline_bytes = _ru_maxrss_bytes()

    def stop(self) -> None:
        """Read the peak since :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.reset:
            self.peak_bytes = _status_kib("VmHWM") * 1024
        else:
            # ru_maxrss is the kernel's high-water mark, which is updated lazily and which an earlier
            # clear_refs may have lowered: it can lag the resident size right now, so take both.
            try:
                current = _status_kib("VmRSS") * 1024
            except (OSError, KeyError):
                current = 0
            self.peak_bytes = max(_ru_maxrss_bytes(), current, self.baseline_bytes)

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _call_each(optimizer: Any, method: str, **kwargs: Any) -> None:
    """Call ``method`` on ``optimizer``, or on each of its ``optimizers`` if it lacks one."""
    if hasattr(optimizer, method):
        getattr(optimizer, method)(**kwargs)
        return
    for opt in _inner_optimizers(optimizer):
        _call_each(opt, method, **kwargs)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def step_memory_breakdown(
    model: nn.Module,
    optimizer: Any,
    batch: Mapping[str, Any],
    *,
    loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
) -> dict[str, int | str]:
    """Run one training step and measure its memory by category.

    Forward (inside :class:`SavedActivations`, excluding the model's parameters and buffers),
    backward, ``optimizer.step()``; gradients and optimizer state are measured after the step and
    before ``optimizer.zero_grad(set_to_none=True)``, which is called last. The whole step runs
    inside :class:`PeakMemory` on the model's device.

    Args:
        model: the model; ``model(**batch)`` must return an object with ``.loss`` (HF style)
            unless ``loss_fn`` is given. Its train/eval mode is left as it is.
        optimizer: a torch optimizer or a container with ``.optimizers`` (see
            :func:`optimizer_state_bytes`).
        batch: keyword arguments for the model; tensors are moved to the model's device first.
        loss_fn: ``loss_fn(output, batch) -> scalar loss`` when the output has no ``.loss``.

    Returns:
        ``weights`` (every parameter and buffer, :func:`weight_bytes`), ``parameters``,
        ``gradients``, ``optimizer_state`` (on the model's device),
        ``optimizer_state_host`` (optimizer state elsewhere: moments offloaded to host memory, and
        torch's CPU ``step`` counters, when the model is on an accelerator; 0 on CPU),
        ``saved_activations`` (bytes, distinct storages), ``peak`` and ``peak_baseline`` (bytes,
        see :class:`PeakMemory`) and ``peak_kind`` (its ``kind``).
    """
    device = _model_device(model)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    exclude = chain(model.parameters(), model.buffers())
    with PeakMemory(device) as peak:
        with SavedActivations(exclude=exclude) as saved:
            output = model(**batch)
            loss = output.loss if loss_fn is None else loss_fn(output, batch)
        loss.backward()
        _call_each(optimizer, "step")
    breakdown: dict[str, int | str] = {
        "weights": weight_bytes(model),
        "parameters": parameter_bytes(model),
        "gradients": gradient_bytes(model),
        "optimizer_state": optimizer_state_bytes(optimizer, device),
        "optimizer_state_host": optimizer_state_bytes(optimizer) - optimizer_state_bytes(optimizer, device),
        "saved_activations": saved.bytes,
        "peak": peak.peak_bytes,
        "peak_baseline": peak.baseline_bytes,
        "peak_kind": peak.kind,
    }
    _call_each(optimizer, "zero_grad", set_to_none=True)
    return breakdown
