"""Export lines: judgments (with relations loaded) -> JSONL bytes. See the package docstring
for the formats and the strength -> margin mapping."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

EXPORT_FORMATS = ("trl", "text", "full", "rankings")
# Formats read from rankings (``selectors_rankings.rankings_for_export``), not judgments.
RANKING_FORMATS = ("rankings",)
# The formats whose lines carry the rater's ``weight`` when the export is given weights.
WEIGHTED_FORMATS = ("trl", "full")
WEIGHT_DIGITS = 4
_HH_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def margin_for(strength: int | None) -> float:
    """``strength - 1``: 0 for the weakest preference, and 0 when no strength was asked."""
    return float(strength - 1) if strength else 0.0


def _winner_loser(judgment: Any) -> tuple[Any, Any] | None:
    comparison = judgment.comparison
    if judgment.choice == "a":
        return comparison.completion_a, comparison.completion_b
    if judgment.choice == "b":
        return comparison.completion_b, comparison.completion_a
    return None


def trl_record(judgment: Any, *, weight: float | None = None) -> dict[str, Any] | None:
    """TRL's conversational preference row, or ``None`` for a tie or both-bad. With a
    ``weight``, the row carries it (rounded to ``WEIGHT_DIGITS`` places)."""
    pair = _winner_loser(judgment)
    if pair is None:
        return None
    chosen, rejected = pair
    record = {
        "prompt": judgment.comparison.prompt.messages,
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "margin": margin_for(judgment.strength),
    }
    if weight is not None:
        record["weight"] = round(weight, WEIGHT_DIGITS)
    return record


def hh_prompt(messages: list[dict[str, str]]) -> str:
    """A conversation in the Anthropic HH format, ending with the assistant's cue."""
    turns = "".join(f"\n\n{_HH_NAMES[m['role']]}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


def text_record(judgment: Any, *, weight: float | None = None) -> dict[str, Any] | None:
    """TRL's plain-text preference row (HH dialogue prompt). It carries no weight: ``weight``
    is accepted so every record builder has one signature, and ignored."""
    pair = _winner_loser(judgment)
    if pair is None:
        return None
    chosen, rejected = pair
    return {
        "prompt": hh_prompt(judgment.comparison.prompt.messages),
        "chosen": chosen.text,
        "rejected": rejected.text,
        "margin": margin_for(judgment.strength),
    }


def _completion_record(completion: Any) -> dict[str, Any]:
    return {
        "id": completion.pk,
        "external_id": completion.external_id,
        "text": completion.text,
        "source": completion.source.name,
    }


def full_record(judgment: Any, *, weight: float | None = None) -> dict[str, Any]:
    """Everything recorded about the judgment; with a ``weight``, that too (rounded)."""
    comparison = judgment.comparison
    prompt = comparison.prompt
    record = {
        "judgment_id": judgment.pk,
        "comparison_id": comparison.pk,
        "prompt_id": prompt.pk,
        "prompt_external_id": prompt.external_id,
        "split": prompt.split,
        "prompt": prompt.messages,
        "completion_a": _completion_record(comparison.completion_a),
        "completion_b": _completion_record(comparison.completion_b),
        "choice": judgment.choice,
        "strength": judgment.strength,
        "margin": margin_for(judgment.strength) if judgment.choice in ("a", "b") else None,
        "aspects": judgment.aspects,
        "reason_tags": judgment.reason_tags,
        "rationale": judgment.rationale,
        "flags": judgment.flags,
        "rater": judgment.rater.get_username(),
        "left_was_a": judgment.left_was_a,
        "critique_shown": judgment.critique_shown,
        "decision_ms": judgment.decision_ms,
        "guidelines_version": judgment.guidelines_version,
        "created_at": judgment.created_at.isoformat(),
        "gold": comparison.gold_choice or None,
    }
    if weight is not None:
        record["weight"] = round(weight, WEIGHT_DIGITS)
    return record


_RECORDS = {"trl": trl_record, "text": text_record, "full": full_record}


def ranking_records(ranking: Any, texts: Mapping[int, str]) -> Iterator[dict[str, Any]]:
    """A K-wise ranking as its K(K-1)/2 TRL conversational preference pairs, best first:
    every output beats every output ranked below it. All pairs of one ranking share
    ``group`` (the ranking's id), so training can put them in one batch and weight each
    ranking once, as InstructGPT did; ``rank_chosen`` / ``rank_rejected`` are 1-based ranks.
    ``texts`` maps completion ids to their text. ``weight`` is 1 / (K(K-1)/2): with the
    reward trainer's weighted mean, each ranking then counts as much as one comparison however
    many pairs it expands into (InstructGPT's fix for rankings overfitting when their pairs
    were treated as independent)."""
    order = ranking.order
    messages = ranking.task.prompt.messages
    group = str(ranking.pk)
    weight = round(1 / math.comb(len(order), 2), 6)
    for i, j in itertools.combinations(range(len(order)), 2):
        yield {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": texts[order[i]]}],
            "rejected": [{"role": "assistant", "content": texts[order[j]]}],
            "group": group,
            "rank_chosen": i + 1,
            "rank_rejected": j + 1,
            "weight": weight,
        }


def export_line(record: dict[str, Any]) -> bytes:
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # JSON allows these raw inside strings, but Python's str.splitlines() and some JSONL
    # readers break lines on them; escaping keeps one record per physical line everywhere.
    line = line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028")
    line = line.replace("\u2029", "\\u2029")
    return line.encode("utf-8") + b"\n"


def export_lines(
    judgments: Iterable[Any], *, fmt: str, weights: Mapping[int, float] | None = None
) -> Iterator[bytes]:
    """One line per judgment. ``weights`` (rater id -> weight, computed once per export) puts
    a ``weight`` on every line of the ``WEIGHTED_FORMATS``; a rater missing from it gets 0,
    what Dawid-Skene gives a rater it has no evidence about. Without ``weights``, no line
    has the field."""
    if fmt in RANKING_FORMATS:
        # ``judgments`` are (ranking, completion texts) from ``rankings_for_export``.
        for ranking, texts in judgments:
            for pair in ranking_records(ranking, texts):
                yield export_line(pair)
        return
    build = _RECORDS[fmt]
    lookup = weights if fmt in WEIGHTED_FORMATS else None
    for judgment in judgments:
        weight = None if lookup is None else lookup.get(judgment.rater_id, 0.0)
        record = build(judgment, weight=weight)
        if record is not None:
            yield export_line(record)


def export_chunks(
    judgments: Iterable[Any],
    *,
    fmt: str,
    chunk_bytes: int = 64 * 1024,
    weights: Mapping[int, float] | None = None,
) -> Iterator[bytes]:
    """Export lines grouped into chunks of about ``chunk_bytes``: one write per chunk, not
    per line, while memory stays bounded by the chunk. ``weights``: see ``export_lines``."""
    buffer: list[bytes] = []
    size = 0
    for line in export_lines(judgments, fmt=fmt, weights=weights):
        buffer.append(line)
        size += len(line)
        if size >= chunk_bytes:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)
