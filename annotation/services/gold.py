"""Gold items: comparisons whose right answer is known, mixed into raters' queues.

Two ways in: an admin marks a comparison (import ``"gold"``, or ``comparison_set_gold``), or
``gold_generate`` makes them, corrupting good completions in known ways
(``annotation.gold``) so the original must win. Either way the comparison's slots wait in the
gold queue and are served at the campaign's ``gold_fraction`` (and alone during screening);
nothing a rater sees tells them apart.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import Count, Max

from annotation import gold
from annotation.exceptions import AnnotationError, InvalidJudgment
from annotation.models import Campaign, Choice, Comparison, Completion, Slot, SlotStatus, SourceKind
from annotation.services.items import PairSpec, comparisons_create, source_get_or_create

MAX_GENERATED = 1000
POOL_SIZE = 200  # answers to other prompts that "swap" draws from


@dataclass(frozen=True)
class GoldReport:
    created: int
    by_kind: dict[str, int] = field(default_factory=dict)
    tried: int = 0  # completions looked at; the rest had no corruption that applied


def gold_generate(
    *,
    campaign: Campaign,
    count: int,
    kinds: Sequence[str] | None = None,
    planted_errors: str = "",
    source_name: str = "",
    seed: int | None = None,
) -> GoldReport:
    """Make up to ``count`` gold comparisons: a completion of the campaign against a corrupted
    copy of itself (``kinds``: ``annotation.gold.Corruption`` values, all by default), gold
    answer the original. ``source_name`` limits the originals to one source's completions
    (pick the model whose answers are good); copies are never used as originals. A
    completion already used as an original is not used again. All or nothing.

    Raises ``InvalidJudgment`` naming the field for a bad count, kind or planted-error line.
    """
    if not 1 <= count <= MAX_GENERATED:
        raise InvalidJudgment(f"count must be between 1 and {MAX_GENERATED}", field="count")
    try:
        chosen = [gold.Corruption(k) for k in kinds] if kinds else list(gold.Corruption)
    except ValueError:
        names = ", ".join(c.value for c in gold.Corruption)
        raise InvalidJudgment(f"kinds must be among {names}", field="kinds") from None
    try:
        errors = gold.parse_planted_errors(planted_errors)
    except ValueError as exc:
        raise InvalidJudgment(f"planted_errors: {exc}", field="planted_errors") from None
    if gold.Corruption.PLANTED_ERROR in chosen and not errors:
        if kinds:
            raise InvalidJudgment(
                "planted_error needs at least one planted error", field="planted_errors"
            )
        chosen.remove(gold.Corruption.PLANTED_ERROR)
    rng = random.Random(seed)

    candidates = Completion.objects.filter(prompt__campaign=campaign).exclude(
        source__kind=SourceKind.GOLD
    )
    if source_name:
        candidates = candidates.filter(source__name=source_name)
    used = set(
        Comparison.objects.filter(campaign=campaign)
        .exclude(gold_kind="")
        .values_list("completion_a_id", flat=True)
    )
    ids = [i for i in candidates.order_by("id").values_list("id", flat=True) if i not in used]
    if not ids:
        raise AnnotationError(
            "no completions to make gold items from"
            + (f" with source {source_name!r}" if source_name else "")
        )
    rng.shuffle(ids)

    by_kind: Counter[str] = Counter()
    tried = 0
    with transaction.atomic():
        specs: list[PairSpec] = []
        for start in range(0, len(ids), 200):
            if len(specs) >= count:
                break
            batch = list(
                Completion.objects.filter(id__in=ids[start : start + 200]).only(
                    "id", "prompt_id", "text"
                )
            )
            for original in batch:
                if len(specs) >= count:
                    break
                tried += 1
                pool = _pool(campaign=campaign, prompt_id=original.prompt_id, rng=rng)
                candidate = gold.make_gold(
                    original.text, rng=rng, kinds=chosen, pool=pool, planted_errors=errors
                )
                if candidate is None:
                    continue
                copy = Completion.objects.create(
                    prompt_id=original.prompt_id,
                    source=source_get_or_create(
                        name=f"gold copy ({candidate.kind.value})", kind=SourceKind.GOLD
                    ),
                    text=candidate.text,
                    generation={"gold_of": original.pk, "corruption": candidate.kind.value},
                )
                # The copy has the larger id, so the original is canonical A: it must win.
                specs.append(
                    PairSpec(
                        prompt_id=original.prompt_id,
                        completion_x=original.pk,
                        completion_y=copy.pk,
                        gold_choice=Choice.A,
                        gold_kind=candidate.kind.value,
                        gold_note=candidate.description,
                    )
                )
                by_kind[candidate.kind.value] += 1
        created = comparisons_create(campaign=campaign, pairs=specs)
    return GoldReport(created=created, by_kind=dict(by_kind), tried=tried)


def _pool(*, campaign: Campaign, prompt_id: int, rng: random.Random) -> list[str]:
    """Answers to other prompts of the campaign, for ``swap`` (a bounded random sample)."""
    ids = list(
        Completion.objects.filter(prompt__campaign=campaign)
        .exclude(prompt_id=prompt_id)
        .exclude(source__kind=SourceKind.GOLD)
        .values_list("id", flat=True)[: POOL_SIZE * 5]
    )
    picked = rng.sample(ids, min(len(ids), 5))
    return list(Completion.objects.filter(id__in=picked).values_list("text", flat=True))


def comparison_set_gold(*, campaign: Campaign, comparison_id: int, gold_choice: str) -> Comparison:
    """Mark a comparison as gold with its right answer (canonical ``a`` / ``b`` / ``tie`` /
    ``both_bad``), or unmark it (``""``). Its open slots move to the gold queue (or back),
    and it gets ``gold_overlap`` slots (``overlap`` when unmarked) unless it already has more:
    filled and leased slots are never removed."""
    if gold_choice not in ("", *Choice.values):
        raise InvalidJudgment(
            f"gold_choice must be empty or one of {', '.join(Choice.values)}", field="gold_choice"
        )
    with transaction.atomic():
        comparison = (
            Comparison.objects.select_for_update()
            .filter(campaign=campaign, pk=comparison_id)
            .first()
        )
        if comparison is None:
            raise AnnotationError("no such comparison in this campaign")
        comparison.gold_choice = gold_choice
        is_gold = bool(gold_choice)
        comparison.judgments_wanted = campaign.gold_overlap if is_gold else campaign.overlap
        comparison.save(update_fields=["gold_choice", "judgments_wanted"])
        Slot.objects.filter(comparison=comparison).update(gold=is_gold)
        have = Slot.objects.filter(comparison=comparison).aggregate(n=Count("id"), top=Max("index"))
        missing = comparison.judgments_wanted - have["n"]
        first = 0 if have["top"] is None else have["top"] + 1
        Slot.objects.bulk_create(
            Slot(
                campaign=campaign,
                comparison=comparison,
                index=first + i,
                priority=comparison.priority,
                gold=is_gold,
                status=SlotStatus.OPEN,
            )
            for i in range(max(missing, 0))
        )
    return comparison
