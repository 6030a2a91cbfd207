"""K-wise ranking (InstructGPT): tasks of K = 3..9 outputs for one prompt, leased and ranked.

The same guarantees as pairwise judging (``annotation.services.judgments``), enforced by the
same kind of database constraints on ``RankingSlot`` and ``Ranking``:

- never more rankings than a task wants: a ranking fills one of the task's slots (one to one);
- a rater holds at most one slot of a task (live lease or filled) and ranks a task once;
- a rater holds at most one live ranking lease per campaign, so a reload shows the same task;
- a repeated submit (same idempotency key, or a double click on the same slot) stores one row;
- an expired lease goes back to the pool; a late submit after another rater took it raises
  ``LeaseLost``.

The outputs are shown in an order drawn at random for each lease (``shown_order``) and
recorded with the ranking, so position bias can be measured. A ranking is a total order:
ties are not supported. For training, a ranking of K outputs is expanded into its
K(K-1)/2 pairs (``ranking_pairs``), which the export keeps together per ranking.

Locks: a transaction here locks at most one ranking slot row (never a comparison slot), so
these paths cannot deadlock with each other or with the pairwise paths. The hot pairwise path
is SQL written once; ranking is rarer and uses the ORM's ``select_for_update``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from annotation.exceptions import AnnotationError, CampaignNotActive, InvalidJudgment, LeaseLost
from annotation.models import (
    Campaign,
    CampaignStatus,
    Completion,
    Prompt,
    Ranking,
    RankingSlot,
    RankingTask,
    SlotStatus,
)
from annotation.services.judgments import check_decision_ms_and_key

MIN_K = 3
MAX_K = 9
LEASE_ATTEMPTS = 3

_rng = random.SystemRandom()


@dataclass(frozen=True)
class RankingResult:
    ranking: Ranking
    created: bool


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ranking_pairs(order: Sequence[int]) -> list[tuple[int, int]]:
    """A ranking (ids, best first) as its K(K-1)/2 pairs ``(winner, loser)``: every output
    beats every output ranked below it. Pairs come in rank order: (1st, 2nd), (1st, 3rd), ...,
    (2nd, 3rd), ..."""
    return list(itertools.combinations(order, 2))


# -- tasks ----------------------------------------------------------------------------------------


def _task_key(completion_ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in sorted(completion_ids))


def ranking_tasks_create(
    *,
    campaign: Campaign,
    prompt_id: int,
    completion_ids: Sequence[int],
    priority: float = 0.0,
) -> tuple[RankingTask, bool]:
    """The ranking task of these completions of one prompt, with ``overlap`` slots; created
    unless the same set is already a task of the campaign. Returns ``(task, created)``.

    Raises ``AnnotationError`` naming the field when there are not 3 to 9 distinct
    completions, one of them does not answer the prompt, or the prompt is not the campaign's.
    Locks the campaign row (``FOR NO KEY UPDATE``) to read the overlap, like
    ``comparisons_create``.
    """
    ids = list(completion_ids)
    if not all(_is_int(i) for i in ids):
        raise AnnotationError("completion_ids: must be whole numbers")
    if len(set(ids)) != len(ids):
        raise AnnotationError("completion_ids: must be distinct")
    if not MIN_K <= len(ids) <= MAX_K:
        raise AnnotationError(f"completion_ids: a ranking shows {MIN_K} to {MAX_K} outputs")
    if not math.isfinite(priority):
        raise AnnotationError("priority: must be a finite number")
    with transaction.atomic():
        overlap = (
            Campaign.objects.select_for_update(no_key=True)
            .values_list("overlap", flat=True)
            .get(pk=campaign.pk)
        )
        if not Prompt.objects.filter(pk=prompt_id, campaign=campaign).exists():
            raise AnnotationError(f"prompt_id: prompt {prompt_id} is not in this campaign")
        owned = set(
            Completion.objects.filter(pk__in=ids, prompt_id=prompt_id).values_list("pk", flat=True)
        )
        stray = [i for i in ids if i not in owned]
        if stray:
            raise AnnotationError(
                f"completion_ids: completion {stray[0]} does not answer prompt {prompt_id}"
            )
        key = _task_key(ids)
        task = RankingTask.objects.filter(campaign=campaign, prompt_id=prompt_id, key=key).first()
        if task is not None:
            return task, False
        task = RankingTask.objects.create(
            campaign=campaign,
            prompt_id=prompt_id,
            completions=sorted(ids),
            key=key,
            priority=priority,
            judgments_wanted=overlap,
        )
        RankingSlot.objects.bulk_create(
            RankingSlot(campaign=campaign, task=task, index=i, priority=priority)
            for i in range(overlap)
        )
    return task, True


def ranking_tasks_build(*, campaign: Campaign, k: int, seed: int | None = None) -> int:
    """One task of ``k`` completions, chosen at random, for each prompt of the campaign with
    at least ``k`` of them. A prompt that already has a task of size ``k`` is skipped, so
    building twice is harmless. Returns how many tasks were created. All or nothing."""
    if not _is_int(k) or not MIN_K <= k <= MAX_K:
        raise AnnotationError(f"k: must be a whole number from {MIN_K} to {MAX_K}")
    rng = random.Random(seed)
    by_prompt: dict[int, list[int]] = {}
    for prompt_id, completion_id in (
        Completion.objects.filter(prompt__campaign=campaign)
        .order_by("prompt_id", "id")
        .values_list("prompt_id", "id")
    ):
        by_prompt.setdefault(prompt_id, []).append(completion_id)
    sizes = {
        (prompt_id, len(completions))
        for prompt_id, completions in RankingTask.objects.filter(campaign=campaign).values_list(
            "prompt_id", "completions"
        )
    }
    created = 0
    with transaction.atomic():
        for prompt_id, candidates in by_prompt.items():
            if len(candidates) < k or (prompt_id, k) in sizes:
                continue
            chosen = rng.sample(candidates, k)
            _task, made = ranking_tasks_create(
                campaign=campaign, prompt_id=prompt_id, completion_ids=chosen
            )
            created += made
    return created


# -- leasing --------------------------------------------------------------------------------------


def ranking_lease_next(
    *,
    rater: AbstractBaseUser,
    campaign: Campaign,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> RankingSlot | None:
    """Lease the next ranking task of ``campaign`` for ``rater`` (``task`` loaded); ``None``
    when nothing is left for them. Raises ``CampaignNotActive`` unless the campaign is active.

    As ``slot_lease_next``: a rater asking again gets (and renews) the lease they hold, with
    the same ``shown_order``. Otherwise ``SELECT ... FOR UPDATE SKIP LOCKED`` takes expired
    leases of other raters first, then open slots by priority (partial indexes
    ``ranking_slot_queue_leased`` and ``ranking_slot_queue_open``), leaving out tasks the
    rater already holds or ranked. ``now`` and ``rng`` are for tests.
    """
    if not campaign.is_active:
        raise CampaignNotActive(f"Campaign '{campaign.name}' is {campaign.status}.")
    now = now or timezone.now()
    rng = rng or _rng
    for attempt in range(LEASE_ATTEMPTS):
        try:
            with transaction.atomic():
                return _lease_next_once(rater=rater, campaign=campaign, now=now, rng=rng)
        except IntegrityError:
            # A concurrent request of the same rater leased first (one live lease per rater
            # per campaign); the unique index made us wait for it, so retrying finds it.
            if attempt == LEASE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _slots() -> Any:
    # ``of=("self",)``: lock the slot row only, not the task joined for its completions.
    return RankingSlot.objects.select_related("task")


def _lease_next_once(
    *, rater: AbstractBaseUser, campaign: Campaign, now: datetime, rng: random.Random
) -> RankingSlot | None:
    # Wait (no SKIP LOCKED) on the rater's own lease: a submit of it in flight is then seen
    # filled, and skipping it would hand the rater a second lease.
    held = (
        _slots()
        .select_for_update(of=("self",))
        .filter(campaign=campaign, rater_id=rater.pk, status=SlotStatus.LEASED)
        .order_by("lease_expires_at")
        .first()
    )
    if held is not None:
        held.lease_expires_at = now + timedelta(seconds=campaign.lease_seconds)
        RankingSlot.objects.filter(pk=held.pk).update(lease_expires_at=held.lease_expires_at)
        return held
    mine = RankingSlot.objects.filter(task_id=OuterRef("task_id"), rater_id=rater.pk)
    free = _slots().select_for_update(skip_locked=True, of=("self",)).filter(campaign=campaign)
    free = free.exclude(Exists(mine))
    queues = [
        free.filter(status=SlotStatus.LEASED, lease_expires_at__lt=now).order_by(
            "lease_expires_at"
        ),
        free.filter(status=SlotStatus.OPEN).order_by("-priority", "id"),
    ]
    for queue in queues:
        slot = queue.first()
        if slot is not None:
            return _lease(slot=slot, rater=rater, campaign=campaign, now=now, rng=rng)
    return None


def _lease(
    *,
    slot: RankingSlot,
    rater: AbstractBaseUser,
    campaign: Campaign,
    now: datetime,
    rng: random.Random,
) -> RankingSlot:
    slot.status = SlotStatus.LEASED
    slot.rater = rater  # type: ignore[assignment]
    slot.leased_at = now
    slot.lease_expires_at = now + timedelta(seconds=campaign.lease_seconds)
    # A fresh random order for every lease: position bias averages out and can be measured.
    completions = list(slot.task.completions)
    slot.shown_order = rng.sample(completions, len(completions))
    RankingSlot.objects.filter(pk=slot.pk).update(
        status=slot.status,
        rater_id=rater.pk,
        leased_at=slot.leased_at,
        lease_expires_at=slot.lease_expires_at,
        shown_order=slot.shown_order,
    )
    return slot


# -- submitting -----------------------------------------------------------------------------------


def _check_order(order: Any, *, completions: list[int]) -> list[int]:
    if not isinstance(order, list | tuple) or not all(_is_int(i) for i in order):
        raise InvalidJudgment("order must be a list of output ids, best first", field="order")
    if len(order) != len(completions) or sorted(order) != sorted(completions):
        raise InvalidJudgment(
            f"order must rank each of the {len(completions)} outputs exactly once "
            "(ties are not supported)",
            field="order",
        )
    return list(order)


def positions_to_order(positions: Any, *, shown_order: Sequence[int]) -> list[int]:
    """The rater's ranking in their terms (positions 1..K as shown, best first) as
    completion ids, by the order the slot showed them in. Anything that is not a ranking of
    every position once raises ``InvalidJudgment`` on ``order``."""
    k = len(shown_order)
    if (
        not isinstance(positions, list | tuple)
        or not all(_is_int(p) for p in positions)
        or sorted(positions) != list(range(1, k + 1))
    ):
        raise InvalidJudgment(
            f"order must list each of the positions 1 to {k} exactly once, best first",
            field="order",
        )
    return [shown_order[p - 1] for p in positions]


def ranking_submit(
    *,
    rater: AbstractBaseUser,
    campaign: Campaign,
    slot_id: int,
    order: list[int],
    decision_ms: int | None = None,
    idempotency_key: str | None = None,
    expected_shown_order: Sequence[int] | None = None,
    now: datetime | None = None,
) -> RankingResult:
    """Record the rater's ranking on their leased slot and fill the slot, in one transaction.

    ``order`` holds the task's completion ids, best first, each once (``InvalidJudgment`` on
    ``order`` otherwise). Locks the slot row: a second submit of the same slot waits, then
    finds it filled by this rater and gets the stored ranking back (``created=False``), as
    does a repeated ``idempotency_key``; a key already used on another slot is refused. A
    submit after the lease expired is accepted while the slot is untouched; once another
    rater took it, or it is not this rater's, ``LeaseLost``. Paused campaigns still accept
    submits of leases handed out before the pause; archived campaigns accept none.

    Callers that mapped shown positions to ids pass the ``shown_order`` they mapped with as
    ``expected_shown_order``; it is checked under the lock, so a ranking given on a card whose
    slot was since leased again in another order is refused (``LeaseLost``), never stored
    scrambled.
    """
    idempotency_key = idempotency_key or None
    check_decision_ms_and_key(decision_ms=decision_ms, idempotency_key=idempotency_key)
    now = now or timezone.now()
    try:
        with transaction.atomic():
            slot = (
                _slots()
                .select_for_update(of=("self",))
                .filter(pk=slot_id, campaign=campaign)
                .first()
            )
            if slot is None or slot.rater_id != rater.pk:
                raise LeaseLost("This task is no longer assigned to you. Load the next one.")
            if slot.status == SlotStatus.FILLED:
                # Double click, retry after a lost response, or a replayed key: the stored
                # ranking wins, whatever this request carries.
                return RankingResult(ranking=Ranking.objects.get(slot_id=slot.pk), created=False)
            if expected_shown_order is not None and list(expected_shown_order) != list(
                slot.shown_order
            ):
                raise LeaseLost("This task was reloaded in another order. Rank it again.")
            checked = _check_order(order, completions=list(slot.task.completions))
            if campaign.status == CampaignStatus.ARCHIVED:
                raise CampaignNotActive(f"Campaign '{campaign.name}' is archived.")
            ranking = Ranking.objects.create(
                campaign=campaign,
                task_id=slot.task_id,
                slot=slot,
                rater_id=rater.pk,
                order=checked,
                shown_order=list(slot.shown_order),
                decision_ms=decision_ms,
                guidelines_version=campaign.guidelines_version,
                idempotency_key=idempotency_key,
            )
            RankingSlot.objects.filter(pk=slot.pk).update(status=SlotStatus.FILLED, filled_at=now)
    except IntegrityError:
        # We held the slot and the slot constraints keep this rater off every other slot of
        # the task, so only the idempotency key can clash: used on another slot already.
        if idempotency_key is None:
            raise
        used = Ranking.objects.filter(rater_id=rater.pk, idempotency_key=idempotency_key).first()
        if used is None:
            raise
        if used.slot_id != slot_id:
            raise InvalidJudgment(
                "this idempotency key was already used for another task", field="idempotency_key"
            ) from None
        return RankingResult(ranking=used, created=False)
    return RankingResult(ranking=ranking, created=True)
