"""Metrics lines, progress display and atomic JSON files.

``metrics.jsonl`` is what the web app tails to draw live plots, so each line is flushed as it is
written and is a complete JSON object: a reader never sees half a line it has to parse.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

log = logging.getLogger("training.core")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null reads as "no value" in the plots
    return value


# A file of this name in the folder of ``metrics.jsonl`` asks the trainer to stop: the next
# ``MetricsWriter.write`` raises ``StopRequested``. This is how a worker cancels a run from
# another thread without signals, in every process of a multi-process run (the file is shared).
STOP_FILE = "STOP"
# Holds a step number: save a checkpoint after that step, then stop (``runner.should_save``).
PAUSE_FILE = "PAUSE"


class StopRequested(Exception):
    """Raised by ``MetricsWriter.write`` when ``STOP`` exists beside the metrics file."""


class MetricsWriter:
    """Appends ``{"step", "time", **metrics}`` lines to ``path``; safe to reopen after a resume."""

    def __init__(
        self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None
    ) -> None:
        """``resume_step``: a resumed run drops the lines a killed run wrote after its last
        checkpoint, so the plots show each step once."""
        self.path = Path(path)
        self.enabled = enabled
        self._file: IO[str] | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
                os.replace(tmp, self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if (self.path.parent / STOP_FILE).exists():
            raise StopRequested(f"stop requested at step {step}")
        if self._file is None:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics file (a torn last line from a crash is ignored)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON via a temp file and ``os.replace``: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    """A tqdm bar on a terminal; plain ``desc: step/total`` log lines otherwise (Celery logs)."""

    def __init__(
        self, total: int, desc: str, *, enabled: bool = True, every_s: float = 10.0
    ) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self.enabled = enabled
        self._every_s = every_s
        self._last_print = 0.0
        self._start = time.monotonic()
        self._postfix: dict[str, Any] = {}
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        self._postfix = {k: _jsonable(v) for k, v in postfix.items()}
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self._postfix.items()})
            return
        now = time.monotonic()
        if now - self._last_print >= self._every_s or self.n >= self.total or self.n == 1:
            self._last_print = now
            self._print()

    def _print(self) -> None:
        elapsed = time.monotonic() - self._start
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self._postfix.items())
        line = f"{self.desc}: {self.n}/{self.total} [{elapsed:.1f}s] {extra}".rstrip()
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextmanager
def progress(total: int, desc: str, *, enabled: bool = True) -> Iterator[Progress]:
    bar = Progress(total, desc, enabled=enabled)
    try:
        yield bar
    finally:
        bar.close()
