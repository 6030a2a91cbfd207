"""Training examples, the JSONL formats they are read from, and collation into tensors.

Accepted preference line formats (one JSON object per line):

* TRL standard: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; a text prompt in the
  Anthropic ``"\\n\\nHuman: ...\\n\\nAssistant:"`` format is split into messages.
* TRL conversational: ``prompt`` a list of ``{role, content}`` messages, ``chosen`` and
  ``rejected`` one-message assistant lists; or, with no ``prompt``, whole conversations in
  ``chosen`` / ``rejected`` that share everything but the last assistant turn.
* The annotation app's full export: ``{"prompt", "completion_a", "completion_b", "choice"}``
  with ``choice`` in a / b / tie / both_bad. A tie becomes a pair with label 0.5; both_bad says
  nothing about the order and is skipped.

Optional ``margin`` and ``weight`` numbers ride along. ``weight`` (default 1, finite and not
negative) is how much the line counts in the loss, for instance the Dawid-Skene reliability of
the rater who made the judgment; 0 keeps the line but makes it count for nothing. A bad line
raises ``DataError`` naming the file, the line number and the field; nothing is half-read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]

CHOICES = ("a", "b", "tie", "both_bad")


class DataError(ValueError):
    """A training file line that cannot be used; the message names file, line and field."""

    def __init__(self, path: str | Path, line: int, field: str, problem: str) -> None:
        self.path, self.line, self.field = str(path), line, field
        super().__init__(f"{path}, line {line}, field {field!r}: {problem}")


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages
    chosen: str
    rejected: str
    margin: float = 0.0
    weight: float = 1.0
    label: float = 1.0  # probability that ``chosen`` is the better one; 0.5 for a tie


@dataclass(frozen=True)
class PromptItem:
    prompt: Messages
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Demonstration:
    prompt: Messages
    completion: str


@dataclass(frozen=True)
class UnpairedExample:
    prompt: Messages
    completion: str
    desirable: bool
    weight: float = 1.0


# ---- parsing -------------------------------------------------------------------------------


class _LineError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem


def _iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(path, number, "<line>", f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(path, number, "<line>", "expected a JSON object")
            yield number, row


def split_anthropic(text: str) -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` -> messages.

    The trailing empty ``Assistant:`` turn is the generation prompt, not a message.
    """
    roles = {"Human": "user", "Assistant": "assistant"}
    messages: Messages = []
    rest = text
    while rest:
        starts = [(rest.find(f"\n\n{name}:"), name) for name in roles]
        found = sorted((i, name) for i, name in starts if i >= 0)
        if not found:
            break
        i, name = found[0]
        if messages:
            messages[-1]["content"] = (messages[-1]["content"] + rest[:i]).strip()
        elif rest[:i].strip():
            messages.append({"role": "user", "content": rest[:i].strip()})
        messages.append({"role": roles[name], "content": ""})
        rest = rest[i + len(name) + 3 :]
    if messages:
        messages[-1]["content"] = (messages[-1]["content"] + rest).strip()
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _messages(value: Any, name: str) -> Messages:
    if not isinstance(value, list):
        raise _LineError(name, "expected a list of {role, content} messages")
    out: Messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _LineError(f"{name}[{i}]", "expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise _LineError(f"{name}[{i}].role", "missing or not a string")
        if not isinstance(content, str):
            raise _LineError(f"{name}[{i}].content", "missing or not a string")
        out.append({"role": role, "content": content})
    return out


def _prompt(row: dict[str, Any]) -> Messages:
    if "prompt" not in row:
        raise _LineError("prompt", "missing")
    value = row["prompt"]
    if isinstance(value, str):
        if "\n\nHuman:" in value:
            return split_anthropic(value)
        if not value.strip():
            raise _LineError("prompt", "empty")
        return [{"role": "user", "content": value}]
    return _messages(value, "prompt")


def _completion(row: dict[str, Any], name: str) -> str:
    if name not in row:
        raise _LineError(name, "missing")
    value = row[name]
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "role" not in value and "text" in value:
        # The annotation app's ``full`` export: {"id", "external_id", "text", "source"}.
        if not isinstance(value["text"], str):
            raise _LineError(f"{name}.text", "expected text")
        return value["text"]
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise _LineError(name, "expected text or a list with one assistant message")
    return messages[0]["content"]


def _number(row: dict[str, Any], name: str, default: float) -> float:
    value = row.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _LineError(name, f"expected a finite number, got {value!r}")
    return float(value)


def _weight(row: dict[str, Any]) -> float:
    weight = _number(row, "weight", 1.0)
    if weight < 0:
        raise _LineError("weight", f"must not be negative, got {weight!r}")
    return weight


def _implicit_prompt(row: dict[str, Any]) -> tuple[Messages, str, str]:
    """TRL's implicit-prompt preference rows: the prompt is what both sides share."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = chosen.rfind("\n\nAssistant:")
        if cut < 0 or rejected[:cut] != chosen[:cut]:
            raise _LineError(
                "prompt", "missing, and chosen/rejected share no Human/Assistant prompt"
            )
        head = len("\n\nAssistant:")
        return (
            split_anthropic(chosen[: cut + head]),
            chosen[cut + head :].strip(),
            rejected[cut + head :].strip(),
        )
    c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if len(c) < 2 or c[:-1] != r[:-1] or c[-1]["role"] != "assistant":
        raise _LineError("prompt", "missing, and chosen/rejected are not one shared conversation")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def _preference(row: dict[str, Any]) -> PreferencePair | None:
    margin, weight = _number(row, "margin", 0.0), _weight(row)
    if "choice" in row:
        choice = row["choice"]
        if choice not in CHOICES:
            raise _LineError("choice", f"expected one of {', '.join(CHOICES)}, got {choice!r}")
        if choice == "both_bad":
            return None
        prompt = _prompt(row)
        a, b = _completion(row, "completion_a"), _completion(row, "completion_b")
        if choice == "b":
            a, b = b, a
        label = 0.5 if choice == "tie" else 1.0
        return PreferencePair(prompt, a, b, margin=margin, weight=weight, label=label)
    if "prompt" in row:
        prompt, chosen, rejected = (
            _prompt(row),
            _completion(row, "chosen"),
            _completion(row, "rejected"),
        )
    else:
        prompt, chosen, rejected = _implicit_prompt(row)
    label = _number(row, "label", 1.0)
    if not 0.0 <= label <= 1.0:
        raise _LineError("label", "must lie in [0, 1]")
    return PreferencePair(prompt, chosen, rejected, margin=margin, weight=weight, label=label)


def read_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    pairs = []
    for number, row in _iter_json_lines(path):
        try:
            pair = _preference(row)
        except _LineError as e:
            raise DataError(path, number, e.field, e.problem) from None
        if pair is not None:
            pairs.append(pair)
    return pairs


def read_prompt_jsonl(path: str | Path) -> list[PromptItem]:
    """Prompt-only lines; every other key of the line is kept in ``meta``."""
    items = []
    for number, row in _iter_json_lines(path):
        try:
            prompt = _prompt(row)
        except _LineError as e:
            raise DataError(path, number, e.field, e.problem) from None
        items.append(PromptItem(prompt, {k: v for k, v in row.items() if k != "prompt"}))
    return items


def read_sft_jsonl(path: str | Path) -> list[Demonstration]:
    """``{"prompt", "completion"}``, ``{"messages": [...]}`` ending in an assistant turn, or a
    preference line (its chosen side is the demonstration)."""
    demos = []
    for number, row in _iter_json_lines(path):
        try:
            if "messages" in row:
                messages = _messages(row["messages"], "messages")
                if len(messages) < 1 or messages[-1]["role"] != "assistant":
                    raise _LineError("messages", "must end with an assistant message")
                demos.append(Demonstration(messages[:-1], messages[-1]["content"]))
            elif "completion" in row:
                demos.append(Demonstration(_prompt(row), _completion(row, "completion")))
            elif "chosen" in row or "choice" in row:
                pair = _preference(row)
                if pair is not None and pair.label > 0.5:
                    demos.append(Demonstration(pair.prompt, pair.chosen))
            else:
                raise _LineError("completion", "missing (or give messages, or chosen)")
        except _LineError as e:
            raise DataError(path, number, e.field, e.problem) from None
    return demos


def unpair(pairs: Sequence[PreferencePair]) -> list[UnpairedExample]:
    """Each strict preference gives one desirable and one undesirable example; ties give none."""
    out = []
    for p in pairs:
        if p.label == 0.5:
            continue
        good, bad = (p.chosen, p.rejected) if p.label > 0.5 else (p.rejected, p.chosen)
        out.append(UnpairedExample(p.prompt, good, True, p.weight))
        out.append(UnpairedExample(p.prompt, bad, False, p.weight))
    return out


def read_unpaired_jsonl(path: str | Path) -> list[UnpairedExample]:
    """TRL KTO lines ``{"prompt", "completion", "label": bool}`` (``desirable`` also accepted);
    preference lines are split into one desirable and one undesirable example."""
    out: list[UnpairedExample] = []
    for number, row in _iter_json_lines(path):
        try:
            if "completion" in row:
                key = "label" if "label" in row else "desirable"
                flag = row.get(key)
                if not isinstance(flag, bool):
                    raise _LineError(key, "expected true or false")
                weight = _weight(row)
                out.append(
                    UnpairedExample(_prompt(row), _completion(row, "completion"), flag, weight)
                )
            else:
                pair = _preference(row)
                if pair is not None:
                    out.extend(unpair([pair]))
        except _LineError as e:
            raise DataError(path, number, e.field, e.problem) from None
    return out


# ---- tokenisation and collation ------------------------------------------------------------


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """The text the model sees before its answer: the chat template with the generation prompt,
    or ``role: content`` lines ending in ``assistant:`` for tokenizers without a template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, max_prompt_length: int
) -> list[int]:
    """Prompt token ids, keeping the END when too long: the last turn is what is answered."""
    ids: list[int] = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)[
        "input_ids"
    ]
    return ids[-max_prompt_length:] if max_prompt_length > 0 else ids


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, completion: str, max_tokens: int
) -> list[int]:
    """Completion ids plus EOS, cut from the right; a cut completion loses its EOS, honestly."""
    ids: list[int] = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = [*ids, int(tokenizer.eos_token_id)]
    return ids[: max(max_tokens, 0)]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    completion: str,
    *,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) with ``len(prompt) + len(completion) <= max_length``."""
    prompt = encode_prompt(tokenizer, messages, min(max_prompt_length, max_length - 1))
    return prompt, encode_completion(tokenizer, completion, max_length - len(prompt))


def pad_rows(
    rows: Sequence[list[int]], pad_id: int, *, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged rows into ``(ids (B, T), mask (B, T))`` padded on ``side``."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@dataclass
class SequenceBatch:
    """Right-padded prompt+completion rows; ``completion_mask`` marks completion tokens."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T)

    def to(self, device: torch.device | str) -> SequenceBatch:
        return type(self)(**{k: v.to(device) for k, v in vars(self).items()})


@dataclass
class PairBatch:
    """Chosen rows first, then rejected: row ``i`` and row ``B + i`` are one pair."""

    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T)
    completion_mask: torch.Tensor  # (2B, T)
    margin: torch.Tensor  # (B,)
    weight: torch.Tensor  # (B,)
    label: torch.Tensor  # (B,)

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(**{k: v.to(device) for k, v in vars(self).items()})

    @property
    def num_pairs(self) -> int:
        return int(self.margin.shape[0])


@dataclass
class UnpairedBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T)
    desirable: torch.Tensor  # (B,) bool
    weight: torch.Tensor  # (B,)

    def to(self, device: torch.device | str) -> UnpairedBatch:
        return UnpairedBatch(**{k: v.to(device) for k, v in vars(self).items()})


def collate_encoded_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """Right-padded batch from already tokenised ``(prompt ids, completion ids)`` rows."""
    full, completion_rows = [], []
    for prompt, answer in rows:
        full.append(prompt + answer)
        completion_rows.append([0] * len(prompt) + [1] * len(answer))
    input_ids, attention_mask = pad_rows(full, pad_id)
    completion_mask, _ = pad_rows(completion_rows, 0)
    return SequenceBatch(input_ids, attention_mask, completion_mask)


def _collate_sequences(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[Messages, str]],
    *,
    max_length: int,
    max_prompt_length: int,
) -> SequenceBatch:
    rows = [
        encode_example(
            tokenizer,
            messages,
            completion,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for messages, completion in examples
    ]
    return collate_encoded_rows(rows, int(tokenizer.pad_token_id))


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair tokenised once: the prompt (shared by both answers, so rendered and
    tokenised once) and each answer's ids with EOS, cut exactly as ``encode_example`` cuts.

    Trainers that visit pairs more than once, or that also run a reference pass over them,
    encode every pair up front (as TRL tokenises its dataset before training) instead of
    rendering the chat template and tokenising again in every step.
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    weight: float = 1.0
    label: float = 1.0

    def rows(self) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        return (self.prompt, self.chosen), (self.prompt, self.rejected)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    max_prompt_length: int,
) -> list[EncodedPair]:
    out = []
    for p in pairs:
        prompt = encode_prompt(tokenizer, p.prompt, min(max_prompt_length, max_length - 1))
        room = max_length - len(prompt)
        out.append(
            EncodedPair(
                prompt,
                encode_completion(tokenizer, p.chosen, room),
                encode_completion(tokenizer, p.rejected, room),
                margin=p.margin,
                weight=p.weight,
                label=p.label,
            )
        )
    return out


def collate_encoded_pairs(encoded: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    """``collate_pairs`` for pairs tokenised by ``encode_pairs``: chosen rows, then rejected."""
    rows = [e.rows()[0] for e in encoded] + [e.rows()[1] for e in encoded]
    seq = collate_encoded_rows(rows, pad_id)
    return PairBatch(
        seq.input_ids,
        seq.attention_mask,
        seq.completion_mask,
        margin=torch.tensor([e.margin for e in encoded], dtype=torch.float32),
        weight=torch.tensor([e.weight for e in encoded], dtype=torch.float32),
        label=torch.tensor([e.label for e in encoded], dtype=torch.float32),
    )


def collate_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    max_prompt_length: int,
) -> PairBatch:
    encoded = encode_pairs(
        tokenizer, pairs, max_length=max_length, max_prompt_length=max_prompt_length
    )
    return collate_encoded_pairs(encoded, int(tokenizer.pad_token_id))


def collate_sft(
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[Demonstration],
    *,
    max_length: int,
    max_prompt_length: int,
) -> SequenceBatch:
    return _collate_sequences(
        tokenizer,
        [(d.prompt, d.completion) for d in demos],
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )


def collate_unpaired(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[UnpairedExample],
    *,
    max_length: int,
    max_prompt_length: int,
) -> UnpairedBatch:
    seq = _collate_sequences(
        tokenizer,
        [(e.prompt, e.completion) for e in examples],
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
    return UnpairedBatch(
        seq.input_ids,
        seq.attention_mask,
        seq.completion_mask,
        desirable=torch.tensor([e.desirable for e in examples], dtype=torch.bool),
        weight=torch.tensor([e.weight for e in examples], dtype=torch.float32),
    )


def collate_prompts(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[PromptItem | Messages],
    max_prompt_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LEFT-padded prompt ids and mask (B, P), so that every row's next token is at the end."""
    rows = [
        encode_prompt(tokenizer, i.prompt if isinstance(i, PromptItem) else i, max_prompt_length)
        for i in items
    ]
    return pad_rows(rows, int(tokenizer.pad_token_id), side="left")
