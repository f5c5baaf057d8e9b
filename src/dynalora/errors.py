"""Errors that the CLI reports as one line, without a traceback."""

from __future__ import annotations

import sys


class UsageError(ValueError):
    """Bad user input: a configuration, file, column or label that cannot work.

    The message is one line that says what is wrong and what is allowed. The CLI prints it
    without a traceback and exits with code 2.
    """


class RunError(RuntimeError):
    """A run that started and cannot go on (a diverged loss, a full disk); exit code 1.

    The message says what happened, at which step, and which checkpoint is still good.
    """

    exit_code = 1


class Interrupted(RunError):
    """SIGINT or SIGTERM: a checkpoint was written; the exit code is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
        self.reported = False

    def report(self) -> None:
        """Print the one line on stderr now (once): the command line then does not repeat it."""
        if not self.reported:
            print(f"dynalora: {self}", file=sys.stderr, flush=True)
            self.reported = True
