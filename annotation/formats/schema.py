"""The import schemas: one line's JSON object -> plain dataclasses, or a ``FieldError``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from annotation.formats.reading import FieldError

KINDS = ("prompts", "candidates", "pairs")
SPLITS = ("train", "eval")
ROLES = ("system", "user", "assistant")
GOLD_CHOICES = ("a", "b", "tie")

MAX_TEXT_CHARS = 100_000  # one message, completion or critique (as items.MAX_MESSAGE_CHARS)
MAX_ID_CHARS = 200
MAX_NAME_CHARS = 200  # source and critic names
MAX_MESSAGES = 200
MAX_COMPLETIONS = 32  # per prompt: all pairs of 32 is 496 comparisons
MAX_SPANS = 200
MAX_JSON_FIELD_BYTES = 16 * 1024  # metadata and generation settings, serialised


@dataclass(frozen=True)
class PromptItem:
    messages: list[dict[str, str]]
    external_id: str = ""
    split: str = "train"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CritiqueItem:
    critic: str
    text: str
    spans: list[dict[str, int]]


@dataclass(frozen=True)
class CompletionItem:
    text: str
    source: str = ""  # empty: the import's default source
    external_id: str = ""
    generation: dict[str, Any] = field(default_factory=dict)
    critique: CritiqueItem | None = None


@dataclass(frozen=True)
class CandidatesItem:
    prompt: PromptItem
    completions: list[CompletionItem]


@dataclass(frozen=True)
class PairItem:
    prompt: PromptItem
    a: CompletionItem
    b: CompletionItem
    gold: str = ""


Item = PromptItem | CandidatesItem | PairItem

_PROMPT_KEYS = {"prompt", "id", "split", "metadata"}
_KEYS = {
    "prompts": _PROMPT_KEYS,
    "candidates": _PROMPT_KEYS | {"completions"},
    "pairs": _PROMPT_KEYS | {"a", "b", "gold"},
}
_COMPLETION_KEYS = {"text", "source", "id", "generation", "critique"}
_CRITIQUE_KEYS = {"critic", "text", "spans"}
DEFAULT_CRITIC = "imported-critic"


def _check_keys(obj: dict[str, Any], *, allowed: set[str], where: str = "") -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise FieldError(name, f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _string(value: Any, *, where: str, max_chars: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise FieldError(where, f"must be a string, not {_type_name(value)}")
    if len(value) > max_chars:
        raise FieldError(where, f"longer than {max_chars} characters")
    if not allow_empty and not value.strip():
        raise FieldError(where, "must not be empty")
    return value


def _json_object(value: Any, *, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldError(where, f"must be an object, not {_type_name(value)}")
    if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_JSON_FIELD_BYTES:
        raise FieldError(where, f"larger than {MAX_JSON_FIELD_BYTES} bytes")
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def parse_messages(value: Any, *, where: str = "prompt") -> list[dict[str, str]]:
    """A prompt: a string (one user turn) or a list of ``{role, content}`` ending with a user
    turn, the turn the completions answer."""
    if isinstance(value, str):
        _string(value, where=where, max_chars=MAX_TEXT_CHARS, allow_empty=False)
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise FieldError(where, f"must be a string or a list of messages, not {_type_name(value)}")
    if not value:
        raise FieldError(where, "must not be empty")
    if len(value) > MAX_MESSAGES:
        raise FieldError(where, f"more than {MAX_MESSAGES} messages")
    messages = []
    for i, message in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise FieldError(here, "must be an object with role and content")
        _check_keys(message, allowed={"role", "content"}, where=here)
        if "role" not in message:
            raise FieldError(f"{here}.role", "is required")
        if message["role"] not in ROLES:
            raise FieldError(f"{here}.role", f"must be one of {', '.join(ROLES)}")
        if "content" not in message:
            raise FieldError(f"{here}.content", "is required")
        content = _string(message["content"], where=f"{here}.content", max_chars=MAX_TEXT_CHARS)
        messages.append({"role": message["role"], "content": content})
    last = len(messages) - 1
    if messages[last]["role"] != "user":
        raise FieldError(f"{where}[{last}].role", "the last message must be 'user'")
    if not messages[last]["content"].strip():
        raise FieldError(f"{where}[{last}].content", "the question must not be empty")
    return messages


def _prompt(obj: dict[str, Any]) -> PromptItem:
    if "prompt" not in obj:
        raise FieldError("prompt", "is required")
    messages = parse_messages(obj["prompt"])
    external_id = ""
    if "id" in obj:
        external_id = _string(obj["id"], where="id", max_chars=MAX_ID_CHARS, allow_empty=False)
    split = obj.get("split", "train")
    if split not in SPLITS:
        raise FieldError("split", f"must be one of {', '.join(SPLITS)}")
    metadata = _json_object(obj["metadata"], where="metadata") if "metadata" in obj else {}
    return PromptItem(messages=messages, external_id=external_id, split=split, metadata=metadata)


def _critique(value: Any, *, where: str, completion_text: str) -> CritiqueItem:
    if isinstance(value, str):
        text = _string(value, where=where, max_chars=MAX_TEXT_CHARS, allow_empty=False)
        return CritiqueItem(critic=DEFAULT_CRITIC, text=text, spans=[])
    if not isinstance(value, dict):
        raise FieldError(where, f"must be a string or an object, not {_type_name(value)}")
    _check_keys(value, allowed=_CRITIQUE_KEYS, where=where)
    if "text" not in value:
        raise FieldError(f"{where}.text", "is required")
    text = _string(
        value["text"], where=f"{where}.text", max_chars=MAX_TEXT_CHARS, allow_empty=False
    )
    critic = DEFAULT_CRITIC
    if "critic" in value:
        critic = _string(
            value["critic"], where=f"{where}.critic", max_chars=MAX_NAME_CHARS, allow_empty=False
        )
    spans_value = value.get("spans", [])
    if not isinstance(spans_value, list):
        raise FieldError(f"{where}.spans", "must be a list of {start, end}")
    if len(spans_value) > MAX_SPANS:
        raise FieldError(f"{where}.spans", f"more than {MAX_SPANS} spans")
    spans = []
    for i, span in enumerate(spans_value):
        here = f"{where}.spans[{i}]"
        if not isinstance(span, dict) or set(span) != {"start", "end"}:
            raise FieldError(here, "must be an object with exactly start and end")
        start, end = span["start"], span["end"]
        # bool is an int subclass; True is not an offset.
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (start, end)):
            raise FieldError(here, "start and end must be integers")
        if not 0 <= start < end <= len(completion_text):
            raise FieldError(here, "needs 0 <= start < end <= the completion's length")
        spans.append({"start": start, "end": end})
    return CritiqueItem(critic=critic, text=text, spans=spans)


def _completion(value: Any, *, where: str) -> CompletionItem:
    if isinstance(value, str):
        text = _string(value, where=where, max_chars=MAX_TEXT_CHARS, allow_empty=False)
        return CompletionItem(text=text)
    if not isinstance(value, dict):
        raise FieldError(where, f"must be a string or an object, not {_type_name(value)}")
    _check_keys(value, allowed=_COMPLETION_KEYS, where=where)
    if "text" not in value:
        raise FieldError(f"{where}.text", "is required")
    text = _string(
        value["text"], where=f"{where}.text", max_chars=MAX_TEXT_CHARS, allow_empty=False
    )
    source = ""
    if "source" in value:
        source = _string(
            value["source"], where=f"{where}.source", max_chars=MAX_NAME_CHARS, allow_empty=False
        )
    external_id = ""
    if "id" in value:
        external_id = _string(
            value["id"], where=f"{where}.id", max_chars=MAX_ID_CHARS, allow_empty=False
        )
    generation = (
        _json_object(value["generation"], where=f"{where}.generation")
        if "generation" in value
        else {}
    )
    critique = None
    if "critique" in value:
        critique = _critique(value["critique"], where=f"{where}.critique", completion_text=text)
    return CompletionItem(
        text=text, source=source, external_id=external_id, generation=generation, critique=critique
    )


_KIND_OF_KEY = {"completions": "candidates", "a": "pairs", "b": "pairs", "gold": "pairs"}


def parse_item(obj: dict[str, Any], *, kind: str) -> Item:
    """Check one line's object against ``kind``'s schema. Raises :class:`FieldError`."""
    for key, other in _KIND_OF_KEY.items():
        # The most likely mistake: the right file imported as the wrong kind.
        if key in obj and key not in _KEYS[kind]:
            raise FieldError(key, f"belongs to the '{other}' kind, but this import is '{kind}'")
    _check_keys(obj, allowed=_KEYS[kind])
    prompt = _prompt(obj)
    if kind == "prompts":
        return prompt
    if kind == "candidates":
        if "completions" not in obj:
            raise FieldError("completions", "is required")
        values = obj["completions"]
        if not isinstance(values, list):
            raise FieldError("completions", f"must be a list, not {_type_name(values)}")
        if not values:
            raise FieldError("completions", "must not be empty")
        if len(values) > MAX_COMPLETIONS:
            raise FieldError("completions", f"more than {MAX_COMPLETIONS} completions")
        completions = [_completion(v, where=f"completions[{i}]") for i, v in enumerate(values)]
        first_seen: dict[str, int] = {}
        for i, completion in enumerate(completions):
            if completion.text in first_seen:
                raise FieldError(
                    f"completions[{i}].text", f"repeats completions[{first_seen[completion.text]}]"
                )
            first_seen[completion.text] = i
        return CandidatesItem(prompt=prompt, completions=completions)
    for side in ("a", "b"):
        if side not in obj:
            raise FieldError(side, "is required")
    a = _completion(obj["a"], where="a")
    b = _completion(obj["b"], where="b")
    if a.text == b.text:
        raise FieldError("b", "has the same text as a")
    gold = obj.get("gold", "")
    if gold not in (*GOLD_CHOICES, ""):
        raise FieldError("gold", f"must be one of {', '.join(GOLD_CHOICES)}")
    return PairItem(prompt=prompt, a=a, b=b, gold=gold)


def item_completions(item: Item) -> list[CompletionItem]:
    if isinstance(item, CandidatesItem):
        return item.completions
    if isinstance(item, PairItem):
        return [item.a, item.b]
    return []


def item_prompt(item: Item) -> PromptItem:
    return item if isinstance(item, PromptItem) else item.prompt
