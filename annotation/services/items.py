"""Prompts, completions, critiques and comparisons (with their slots)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, connection, transaction

from annotation.exceptions import AnnotationError
from annotation.models import (
    Campaign,
    Choice,
    Comparison,
    Completion,
    Critique,
    Prompt,
    Slot,
    Source,
    SourceKind,
    Split,
)

MAX_MESSAGE_CHARS = 100_000
MAX_EXTERNAL_ID_CHARS = 200
ROLES = ("system", "user", "assistant")


class PairingStrategy:
    ALL_PAIRS = "all_pairs"
    RANDOM_K = "random_k"
    CHOICES = (ALL_PAIRS, RANDOM_K)


def clean_messages(messages: Any, *, where: str = "messages") -> list[dict[str, str]]:
    """Validate a conversation: a non-empty list of {role, content} ending with a user turn
    (the turn the completions answer). Raises AnnotationError naming the field."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise AnnotationError(f"{where}: must be a non-empty list of {{role, content}}")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise AnnotationError(f"{where}[{i}]: must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise AnnotationError(f"{where}[{i}].role: must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise AnnotationError(f"{where}[{i}].content: must be a string")
        if len(content) > MAX_MESSAGE_CHARS:
            raise AnnotationError(f"{where}[{i}].content: longer than {MAX_MESSAGE_CHARS} chars")
        if "\x00" in content:
            # PostgreSQL's jsonb cannot store NUL; say so instead of failing in the database.
            raise AnnotationError(f"{where}[{i}].content: contains a NUL character")
        cleaned.append({"role": role, "content": content})
    if cleaned[-1]["role"] != "user":
        raise AnnotationError(f"{where}: the last message must be from the user")
    return cleaned


def _check_text(value: Any, *, field: str, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    if not isinstance(value, str):
        raise AnnotationError(f"{field}: must be a string")
    if len(value) > max_chars:
        raise AnnotationError(f"{field}: longer than {max_chars} chars")
    if "\x00" in value:
        raise AnnotationError(f"{field}: contains a NUL character")
    return value


def source_get_or_create(*, name: str, kind: str = SourceKind.MODEL) -> Source:
    """The source called ``name`` (cut to 200 characters), created on first use. Safe to call
    concurrently: ``get_or_create`` retries the read when a parallel insert wins."""
    name = _check_text(name, field="source", max_chars=10_000).strip()[:200]
    if not name:
        raise AnnotationError("source: must not be empty")
    if kind not in SourceKind.values:
        raise AnnotationError(f"source kind: must be one of {', '.join(SourceKind.values)}")
    source, _ = Source.objects.get_or_create(name=name, defaults={"kind": kind})
    return source


def prompt_create(
    *,
    campaign: Campaign,
    messages: Any,
    external_id: str = "",
    split: str = "train",
    metadata: dict[str, Any] | None = None,
) -> Prompt:
    _check_text(external_id, field="external_id", max_chars=MAX_EXTERNAL_ID_CHARS)
    if split not in Split.values:
        raise AnnotationError(f"split: must be one of {', '.join(Split.values)}")
    if metadata is not None and not isinstance(metadata, dict):
        raise AnnotationError("metadata: must be an object")
    cleaned = clean_messages(messages)
    taken = AnnotationError(f"external_id: a prompt with id {external_id!r} is already here")
    if external_id and Prompt.objects.filter(campaign=campaign, external_id=external_id).exists():
        raise taken
    try:
        with transaction.atomic():
            return Prompt.objects.create(
                campaign=campaign,
                messages=cleaned,
                external_id=external_id,
                split=split,
                metadata=metadata or {},
            )
    except IntegrityError as exc:  # a concurrent create with the same id won
        raise taken from exc


def completion_create(
    *,
    prompt: Prompt,
    text: str,
    source: Source,
    generation: dict[str, Any] | None = None,
    round_number: int | None = None,
    external_id: str = "",
) -> Completion:
    _check_text(text, field="text")
    _check_text(external_id, field="external_id", max_chars=MAX_EXTERNAL_ID_CHARS)
    if generation is not None and not isinstance(generation, dict):
        raise AnnotationError("generation: must be an object")
    return Completion.objects.create(
        prompt=prompt,
        text=text,
        source=source,
        generation=generation or {},
        round_number=round_number,
        external_id=external_id,
    )


def critique_create(
    *, completion: Completion, critic: str, text: str, spans: list[dict[str, int]] | None = None
) -> Critique:
    _check_text(critic, field="critic", max_chars=200)
    _check_text(text, field="text")
    spans = spans or []
    if not isinstance(spans, list):
        raise AnnotationError("spans: must be a list of {start, end}")
    for i, span in enumerate(spans):
        if not isinstance(span, dict):
            raise AnnotationError(f"spans[{i}]: must be an object with start and end")
        start, end = span.get("start"), span.get("end")
        # ``type(...) is int`` rather than isinstance: True and False are not offsets.
        if not (type(start) is int and type(end) is int and 0 <= start < end):
            raise AnnotationError(f"spans[{i}]: start and end must be integers, 0 <= start < end")
        if end > len(completion.text):
            raise AnnotationError(f"spans[{i}]: end is past the end of the completion")
    return Critique.objects.create(completion=completion, critic=critic, text=text, spans=spans)


@dataclass(frozen=True)
class PairSpec:
    prompt_id: int
    completion_x: int
    completion_y: int
    priority: float = 0.0
    gold_choice: str = ""
    gold_kind: str = ""
    gold_note: str = ""


def comparisons_create(
    *, campaign: Campaign, pairs: Iterable[PairSpec], batch_size: int = 2000
) -> int:
    """Create comparisons (canonical order, duplicates skipped) with ``overlap`` slots each
    (``gold_overlap`` for gold ones, whose slots go to the gold queue).

    Both completions of a pair must answer the pair's prompt, and the prompt must belong to
    the campaign: a comparison never shows text from another campaign. ``gold_choice`` is
    given for the pair as written (x is A) and flipped with the pair when stored canonically.
    Errors name the pair by its position: ``pairs[i]``.

    Returns how many new comparisons were created. Runs in the caller's transaction when there
    is one, so an import is all-or-nothing. Locks the campaign row (``FOR NO KEY UPDATE``) and
    reads the overlap under that lock, so an overlap change cannot interleave and leave the new
    comparisons with the old number of slots.
    """
    created = slots = 0
    with transaction.atomic():
        overlap, gold_overlap, agreement_fraction, agreement_overlap = (
            Campaign.objects.select_for_update(no_key=True)
            .values_list("overlap", "gold_overlap", "agreement_fraction", "agreement_overlap")
            .get(pk=campaign.pk)
        )
        position = 0
        for chunk in _chunks(pairs, batch_size):
            owners = _completion_owners(campaign=campaign, chunk=chunk)
            rows = []
            for spec in chunk:
                where = f"pairs[{position}]"
                position += 1
                if spec.completion_x == spec.completion_y:
                    raise AnnotationError(f"{where}: a comparison needs two different completions")
                for completion_id in (spec.completion_x, spec.completion_y):
                    if owners.get(completion_id) != spec.prompt_id:
                        raise AnnotationError(
                            f"{where}: completion {completion_id} does not answer prompt "
                            f"{spec.prompt_id} of this campaign"
                        )
                if spec.gold_choice not in ("", *Choice.values):
                    raise AnnotationError(
                        f"{where}.gold_choice: must be empty or one of {', '.join(Choice.values)}"
                    )
                if not math.isfinite(spec.priority):
                    raise AnnotationError(f"{where}.priority: must be a finite number")
                a, b = sorted((spec.completion_x, spec.completion_y))
                gold = spec.gold_choice
                if gold and spec.completion_x > spec.completion_y:
                    gold = {"a": "b", "b": "a"}.get(gold, gold)
                # The agreement share is drawn per pair, reproducibly (the same pair is in
                # or out however often it is imported); gold items have their own overlap.
                agreement_item = not gold and (
                    random.Random(f"{campaign.pk}:{a}:{b}").random() < agreement_fraction
                )
                wanted = (
                    gold_overlap if gold else (agreement_overlap if agreement_item else overlap)
                )
                rows.append(
                    Comparison(
                        campaign=campaign,
                        prompt_id=spec.prompt_id,
                        completion_a_id=a,
                        completion_b_id=b,
                        priority=spec.priority,
                        gold_choice=gold,
                        gold_kind=spec.gold_kind,
                        gold_note=spec.gold_note[:300],
                        agreement_item=agreement_item,
                        # Gold items are answered by more raters: each answer grades a rater.
                        judgments_wanted=wanted,
                    )
                )
            existing = set(
                Comparison.objects.filter(
                    campaign=campaign,
                    completion_a_id__in=[r.completion_a_id for r in rows],
                ).values_list("completion_a_id", "completion_b_id")
            )
            seen: set[tuple[int, int]] = set()
            fresh = []
            for row in rows:
                key = (row.completion_a_id, row.completion_b_id)
                if key in existing or key in seen:
                    continue
                seen.add(key)
                fresh.append(row)
            made = Comparison.objects.bulk_create(fresh)
            Slot.objects.bulk_create(
                Slot(
                    campaign=campaign,
                    comparison_id=c.pk,
                    index=i,
                    priority=c.priority,
                    gold=c.is_gold,
                )
                for c in made
                for i in range(c.judgments_wanted)
            )
            created += len(made)
            slots += sum(c.judgments_wanted for c in made)
        if slots >= ANALYZE_AFTER_SLOTS and connection.vendor == "postgresql":
            # A big import changes the slot table's statistics so much that until autovacuum
            # analyses it (minutes), the planner leaves the open-slot index and each lease
            # takes seconds. Analyse once the rows are visible; robust: the import is
            # committed, so a failed ANALYZE is logged, never raised to the caller.
            transaction.on_commit(_analyze_slots, robust=True)
    return created


ANALYZE_AFTER_SLOTS = 10_000


def _analyze_slots() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {connection.ops.quote_name(Slot._meta.db_table)}")


def comparisons_build(
    *,
    campaign: Campaign,
    strategy: str = PairingStrategy.ALL_PAIRS,
    k: int = 1,
    seed: int | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> int:
    """Build comparisons from each prompt's candidate completions.

    ``all_pairs``: every unordered pair; ``random_k``: k distinct random pairs per prompt.
    Pairs that already exist are skipped, so building twice is harmless.
    """
    if strategy not in PairingStrategy.CHOICES:
        raise AnnotationError(f"strategy must be one of {', '.join(PairingStrategy.CHOICES)}")
    if k < 1:
        raise AnnotationError("k must be at least 1")
    rng = random.Random(seed)
    completions = Completion.objects.filter(prompt__campaign=campaign)
    if prompt_ids is not None:
        completions = completions.filter(prompt_id__in=prompt_ids)
    by_prompt: dict[int, list[int]] = {}
    for prompt_id, completion_id in completions.order_by("prompt_id", "id").values_list(
        "prompt_id", "id"
    ):
        by_prompt.setdefault(prompt_id, []).append(completion_id)

    def specs() -> Iterable[PairSpec]:
        for prompt_id, ids in by_prompt.items():
            for x, y in choose_pairs(ids, strategy=strategy, k=k, rng=rng):
                yield PairSpec(prompt_id=prompt_id, completion_x=x, completion_y=y)

    return comparisons_create(campaign=campaign, pairs=specs())


def choose_pairs(
    ids: Sequence[int], *, strategy: str, k: int, rng: random.Random
) -> list[tuple[int, int]]:
    """The pairs of one prompt's completions that ``strategy`` picks (shared with imports)."""
    pairs = list(itertools.combinations(ids, 2))
    if strategy == PairingStrategy.RANDOM_K and len(pairs) > k:
        pairs = rng.sample(pairs, k)
    return pairs


def _completion_owners(*, campaign: Campaign, chunk: list[PairSpec]) -> dict[int, int]:
    """Completion id -> prompt id, for the chunk's completions that are in the campaign."""
    ids = {spec.completion_x for spec in chunk} | {spec.completion_y for spec in chunk}
    return dict(
        Completion.objects.filter(id__in=ids, prompt__campaign=campaign).values_list(
            "id", "prompt_id"
        )
    )


def _chunks(items: Iterable[PairSpec], size: int) -> Iterable[list[PairSpec]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
