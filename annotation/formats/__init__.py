"""JSONL import parsing and export line building. Pure functions: no queries, no writes.

Import: ``reading.read_jsonl`` reads a byte stream one line at a time under caps (bytes,
lines, line length, nesting depth) and yields each line's JSON value or a ``LineError`` naming
the line and field. ``schema.parse_item`` checks one value against the schema of an import
kind and returns plain dataclasses; ``annotation.services.imports`` writes them.

Export: ``export.export_chunks`` turns judgments (with their comparison, prompt, completions,
sources and rater already loaded) into JSONL bytes, one line per judgment:

- ``trl``: ``{"prompt": [messages], "chosen": [assistant msg], "rejected": [...], "margin"}``,
  TRL's conversational preference format. Ties and both-bad are skipped.
- ``text``: the same with plain strings; the prompt is rendered in the Anthropic HH dialogue
  format (``"\\n\\nHuman: ...\\n\\nAssistant:"``). Ties and both-bad are skipped.
- ``full``: everything recorded about the judgment, ties and both-bad included.

``margin = strength - 1`` (0 on the weakest point of the campaign's strength scale, and 0 when
the campaign asks no strength), so TRL's reward loss ``-log sigmoid(r_c - r_r - margin)`` asks
for a larger reward gap where raters said "much better".
"""

from annotation.formats.export import (
    EXPORT_FORMATS,
    export_chunks,
    export_line,
    export_lines,
    full_record,
    hh_prompt,
    margin_for,
    text_record,
    trl_record,
)
from annotation.formats.reading import (
    MAX_ERRORS,
    FieldError,
    Limits,
    LineError,
    read_jsonl,
    shorten,
)
from annotation.formats.schema import (
    DEFAULT_CRITIC,
    GOLD_CHOICES,
    KINDS,
    MAX_COMPLETIONS,
    MAX_ID_CHARS,
    MAX_JSON_FIELD_BYTES,
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_SPANS,
    MAX_TEXT_CHARS,
    ROLES,
    SPLITS,
    CandidatesItem,
    CompletionItem,
    CritiqueItem,
    Item,
    PairItem,
    PromptItem,
    item_completions,
    item_prompt,
    parse_item,
    parse_messages,
)

__all__ = [
    "DEFAULT_CRITIC",
    "EXPORT_FORMATS",
    "GOLD_CHOICES",
    "KINDS",
    "MAX_COMPLETIONS",
    "MAX_ERRORS",
    "MAX_ID_CHARS",
    "MAX_JSON_FIELD_BYTES",
    "MAX_MESSAGES",
    "MAX_NAME_CHARS",
    "MAX_SPANS",
    "MAX_TEXT_CHARS",
    "ROLES",
    "SPLITS",
    "CandidatesItem",
    "CompletionItem",
    "CritiqueItem",
    "FieldError",
    "Item",
    "Limits",
    "LineError",
    "PairItem",
    "PromptItem",
    "export_chunks",
    "export_line",
    "export_lines",
    "full_record",
    "hh_prompt",
    "item_completions",
    "item_prompt",
    "margin_for",
    "parse_item",
    "parse_messages",
    "read_jsonl",
    "shorten",
    "text_record",
    "trl_record",
]
