"""Launched processes in tests: stop a whole tree, and read what it printed without hanging.

torchrun starts each worker, and ``dynalora sweep`` each run, in a session of its own, so killing
the launcher's process group leaves them running; and reading a pipe to its end waits for every
process that holds it. These helpers kill the launcher's group and every descendant first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def _descendants(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    children = [int(p) for p in found]
    return children + [d for c in children for d in _descendants(c)]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, its process group, and every descendant's group (no-op once it has exited)."""
    if proc.poll() is not None:
        return
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # a worker in a session of its own leads its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def output_of_failed(proc: subprocess.Popen, tail: int = 3000) -> str:
    """For a failing assertion's message: stop the tree, then what it wrote to stderr (never hangs)."""
    kill_tree(proc)
    try:
        _, err = proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):  # ValueError: the pipe was read already
        return "(stderr not readable)"
    return (err or "")[-tail:]
