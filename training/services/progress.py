"""What a long step reports while it works, and how it learns that it should stop.

Trainers in ``training.core`` report through their ``metrics.jsonl`` (a heartbeat thread reads
it); steps that run in the service itself (candidate generation, critiques) call a
``Reporter`` after each batch. The reporter writes the heartbeat, the step and progress, and
metrics rows, and raises ``RunCancelled`` once someone asked the run to stop.
"""

from __future__ import annotations

from typing import Protocol


class RunCancelled(Exception):
    """Raised inside a run's work when its cancel was requested; the run ends CANCELLED."""


class Reporter(Protocol):
    def __call__(self, done: int, total: int, /, **metrics: float) -> None:
        """``done`` of ``total`` units finished (prompts, completions, ...); ``metrics`` are
        stored as RunMetric rows at step ``done``. Raises ``RunCancelled`` when asked to stop."""
