"""When to reallocate (paper §3.3). ``step`` counts optimizer steps completed so far."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Schedule(Protocol):
    def due(self, step: int) -> bool:
        """True when the selection is to be renewed after ``step`` optimizer steps."""
        ...


@dataclass(frozen=True)
class Periodic:
    """Reallocate every ``period`` optimizer steps."""

    period: int

    def due(self, step: int) -> bool:
        return step > 0 and step % self.period == 0


@dataclass(frozen=True)
class Once:
    """Reallocate a single time, after ``period`` (alpha) optimizer steps."""

    period: int

    def due(self, step: int) -> bool:
        return step == self.period


SCHEDULES: dict[str, type[Periodic] | type[Once]] = {"periodic": Periodic, "once": Once}
