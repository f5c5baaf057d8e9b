"""Errors that the CLI reports as one line and exit code 2."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad user input: a configuration, file, column or label that cannot work.

    The message is one line that says what is wrong and what is allowed. The CLI prints it
    without a traceback and exits with code 2.
    """
