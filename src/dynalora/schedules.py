"""When to reallocate (paper §3.3). ``step`` counts optimizer steps completed so far."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Schedule(Protocol):
    def due(self, step: int) -> bool:
        """True when the selection is to be renewed after ``step`` optimizer steps."""
        ...

    def finished(self, step: int) -> bool:
        """True when no reallocation follows ``step``: importance need not be measured any more."""
        ...


@dataclass(frozen=True)
class Periodic:
    """Reallocate every ``period`` optimizer steps."""

    period: int

    def due(self, step: int) -> bool:
        return step > 0 and step % self.period == 0

    def finished(self, step: int) -> bool:
        return False


@dataclass(frozen=True)
class Once:
    """Reallocate a single time, after ``period`` (alpha) optimizer steps."""

    period: int

    def due(self, step: int) -> bool:
        return step == self.period

    def finished(self, step: int) -> bool:
        return step >= self.period


SCHEDULES: dict[str, type[Periodic] | type[Once]] = {"periodic": Periodic, "once": Once}
