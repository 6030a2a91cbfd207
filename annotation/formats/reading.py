"""Reading a JSONL byte stream one bounded line at a time, with caps and strict decoding."""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

MAX_ERRORS = 50


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_lines: int
    max_line_bytes: int = 8 * 1024 * 1024
    max_depth: int = 32


@dataclass(frozen=True)
class LineError:
    """One problem in an import file. ``fatal`` ones stop the reading (caps, encodings)."""

    line: int
    field: str
    error: str
    fatal: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"line": self.line, "field": self.field, "error": self.error}


class FieldError(ValueError):
    def __init__(self, field: str, error: str) -> None:
        super().__init__(f"{field}: {error}")
        self.field = field
        self.error = error


class _Rejected(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _Rejected(f"{name} is not valid JSON (numbers must be finite)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Rejected(f"duplicate key {shorten(key)!r} in one object")
        obj[key] = value
    return obj


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _bad_string(text: str) -> str | None:
    # PostgreSQL text cannot hold NUL, and lone surrogates (legal as JSON escapes) cannot be
    # encoded to UTF-8: either would fail at insert time, after the transaction started.
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate escape"
    return None


def _check_value(value: Any, *, max_depth: int) -> FieldError | None:
    """Depth and string checks over a parsed value, iteratively (no recursion limit)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict | list) and depth > max_depth:
            return FieldError(path, f"nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else key
                problem = _bad_string(key)
                if problem:
                    return FieldError(path, f"a key {problem}")
                stack.append((child, child_path, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            problem = _bad_string(item)
            if problem:
                return FieldError(path, problem)
        elif isinstance(item, float) and not math.isfinite(item):
            # 1e400 parses to inf without passing through parse_constant.
            return FieldError(path, "number is out of range")
    return None


def _skip_rest_of_line(stream: BinaryIO) -> int:
    skipped = 0
    while True:
        chunk = stream.readline(64 * 1024)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def read_jsonl(stream: BinaryIO, *, limits: Limits) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for each non-blank line, or ``(line_number, LineError)``.

    Reads with bounded ``readline`` calls only, so memory stays within one line however big
    the file is. After a fatal error (a cap passed, a UTF-16 file) nothing more is yielded.
    """
    total = 0
    line_no = 0
    while True:
        raw = stream.readline(limits.max_line_bytes + 1)
        if not raw:
            return
        line_no += 1
        start = total
        total += len(raw)
        if line_no > limits.max_lines:
            yield (
                line_no,
                LineError(
                    line_no, "", f"more than {limits.max_lines} lines; split the file", fatal=True
                ),
            )
            return
        content = raw[:-1] if raw.endswith(b"\n") else raw
        if len(content) > limits.max_line_bytes:
            total += _skip_rest_of_line(stream)
            if total > limits.max_bytes:
                yield line_no, _too_big(line_no, limits)
                return
            yield (
                line_no,
                LineError(line_no, "", f"line is longer than {limits.max_line_bytes} bytes"),
            )
            continue
        if total > limits.max_bytes:
            yield line_no, _too_big(line_no, limits)
            return
        if line_no == 1:
            if content.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                yield (
                    line_no,
                    LineError(
                        line_no, "", "the file is UTF-16 (or UTF-32); save it as UTF-8", fatal=True
                    ),
                )
                return
            if content.startswith(codecs.BOM_UTF8):
                content = content[len(codecs.BOM_UTF8) :]
        nul = content.find(b"\x00")
        if nul >= 0:
            yield (
                line_no,
                LineError(
                    line_no,
                    "",
                    f"NUL byte at byte {nul} of the line (file byte {start + nul}); "
                    "is this a UTF-16 file? Save it as UTF-8",
                ),
            )
            continue
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                line_no,
                LineError(
                    line_no,
                    "",
                    f"not valid UTF-8 at byte {exc.start} of the line (file byte {start + exc.start});"
                    " save the file as UTF-8",
                ),
            )
            continue
        if not text.strip():
            continue
        yield line_no, _parse_json(text, line_no=line_no, max_depth=limits.max_depth)


def _too_big(line_no: int, limits: Limits) -> LineError:
    return LineError(line_no, "", f"the file is larger than {limits.max_bytes} bytes", fatal=True)


def _parse_json(text: str, *, line_no: int, max_depth: int) -> Any:
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except _Rejected as exc:
        return LineError(line_no, "", str(exc))
    except json.JSONDecodeError as exc:
        truncated = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        hint = " (the line looks truncated)" if truncated else ""
        where = f"column {exc.colno}" if exc.msg.endswith(" at") else f"at column {exc.colno}"
        what = exc.msg[:1].lower() + exc.msg[1:]
        return LineError(line_no, "", f"bad JSON: {what} {where}{hint}")
    except RecursionError:
        return LineError(line_no, "", f"nested deeper than {max_depth} levels")
    except ValueError as exc:  # e.g. an integer with too many digits
        return LineError(line_no, "", f"bad JSON: {exc}")
    if not isinstance(value, dict):
        return LineError(line_no, "", "each line must be a JSON object")
    problem = _check_value(value, max_depth=max_depth)
    if problem is not None:
        return LineError(line_no, problem.field, problem.error)
    return value
