"""Reads for K-wise ranking: the rater's card, their progress, and the export stream."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser

from annotation.models import Campaign, Completion, Ranking, RankingSlot, RankingTask, SlotStatus
from annotation.selectors import snapshot_chunks


@dataclass(frozen=True)
class RankedOutput:
    position: int  # 1..K, as shown
    text: str


@dataclass(frozen=True)
class RankingCard:
    """What the rater sees: the conversation and the outputs in the slot's shown order,
    labelled by position only (no ids, models or sources)."""

    slot: RankingSlot
    messages: list[dict[str, str]]
    outputs: list[RankedOutput]
    lease_expires_at: datetime | None


def ranking_card(*, slot: RankingSlot) -> RankingCard:
    """The card of a leased ranking slot (its ``task`` loaded): two queries, the prompt and
    the outputs."""
    task: RankingTask = slot.task
    messages = task.prompt.messages
    texts = dict(Completion.objects.filter(pk__in=slot.shown_order).values_list("pk", "text"))
    outputs = [
        RankedOutput(position=n, text=texts.get(completion_id, ""))
        for n, completion_id in enumerate(slot.shown_order, start=1)
    ]
    return RankingCard(
        slot=slot,
        messages=list(messages),
        outputs=outputs,
        lease_expires_at=slot.lease_expires_at,
    )


def ranking_slot_for_rater(
    *, rater: AbstractBaseUser, campaign: Campaign, slot_id: int
) -> RankingSlot | None:
    return RankingSlot.objects.filter(id=slot_id, campaign=campaign, rater_id=rater.pk).first()


def ranking_done_count(*, rater: AbstractBaseUser, campaign: Campaign) -> int:
    return Ranking.objects.filter(campaign=campaign, rater_id=rater.pk).count()


def ranking_open_count(*, campaign: Campaign) -> int:
    """Open ranking slots of the campaign (for an admin link or progress line)."""
    return RankingSlot.objects.filter(campaign=campaign, status=SlotStatus.OPEN).count()


def rankings_for_export(
    *, campaign: Campaign, split: str | None = None, chunk_size: int = 500
) -> Iterator[tuple[Ranking, dict[int, str]]]:
    """Stream a campaign's rankings in id order, each with the texts of its completions
    (id -> text). Keyset pagination and an id cutoff taken at the start, as
    ``judgments_for_export``: flat memory, and a snapshot (rankings are append-only). Two
    queries per chunk: the rankings with their prompts, and their completions' texts."""
    base = Ranking.objects.filter(campaign=campaign).select_related("task__prompt").order_by("id")
    if split:
        base = base.filter(task__prompt__split=split)
    for chunk in snapshot_chunks(base, chunk_size=chunk_size):
        ids = {i for ranking in chunk for i in ranking.order}
        texts = dict(Completion.objects.filter(pk__in=ids).values_list("pk", "text"))
        for ranking in chunk:
            yield ranking, texts


def campaigns_with_ranking_tasks(*, campaign_ids: list[int]) -> set[int]:
    """Which of ``campaign_ids`` hold ranking tasks (one query), for the home page's links."""
    return set(
        RankingTask.objects.filter(campaign_id__in=campaign_ids)
        .values_list("campaign_id", flat=True)
        .distinct()
    )
