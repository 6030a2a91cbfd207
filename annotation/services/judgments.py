"""Leasing slots and recording judgments: the rater's hot path.

Guarantees (each proven on PostgreSQL with real threads in tests/annotation/test_concurrency.py,
and by the state machine in tests/annotation/test_state_machine.py):

- never more judgments than the overlap: a judgment fills one of the comparison's slots (one to
  one), and a comparison has ``overlap`` slots;
- never two live leases for one rater on one comparison, and never two judgments by one rater on
  one comparison: unique constraints on (comparison, rater) for slots and for judgments;
- a rater holds at most one live lease per campaign (partial unique constraint), so a reload or a
  second tab shows the same comparison;
- a repeated submit (same idempotency key, or a double click on the same slot) stores one row
  and returns the same judgment;
- an expired lease goes back to the pool: the next lease request of another rater may take it,
  and the late submit of the first rater is then refused with ``LeaseLost``.

Locks: a transaction here locks at most one slot row. It may wait for that row (a submit in
flight, or the rater's own held lease) or on a unique-index check against a concurrent lease of
the same rater, but never while holding a second slot, so these paths cannot deadlock with each
other. Only ``campaigns._shrink_slots`` locks several slots, and nothing here waits on it while
holding one. The campaign row is never locked here; campaign edits lock it ``FOR NO KEY
UPDATE``, which does not block the key-share lock a judgment insert takes on it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.models import Q, Subquery
from django.utils import timezone

from annotation import db
from annotation.exceptions import CampaignNotActive, InvalidJudgment, LeaseLost, ScreeningFailed
from annotation.models import (
    Campaign,
    CampaignStatus,
    Choice,
    Comparison,
    Critique,
    CritiqueMode,
    CritiqueVerdict,
    Judgment,
    RaterScreening,
    ScreeningStatus,
    Slot,
    SlotStatus,
)

MAX_RATIONALE_CHARS = 5000
MAX_DECISION_MS = 24 * 3600 * 1000
MAX_IDEMPOTENCY_KEY_CHARS = 64
ASPECT_ANSWERS = ("a", "b", "tie")
SIDE_ASPECTS = ("left", "right", "tie")  # aspect answers in the rater's terms
LEASE_ATTEMPTS = 3
# What a submit reads of the slot it locks.
SUBMIT_SLOT_FIELDS = (
    "id",
    "comparison_id",
    "status",
    "rater_id",
    "left_is_a",
    "critique_shown",
    "gold",
)

_rng = random.SystemRandom()


@dataclass(frozen=True)
class SubmitResult:
    judgment: Judgment
    created: bool


def _critiques_exist(*, comparison_id: int) -> bool:
    pair = Comparison.objects.filter(pk=comparison_id)
    return Critique.objects.filter(
        Q(completion_id=Subquery(pair.values("completion_a_id")[:1]))
        | Q(completion_id=Subquery(pair.values("completion_b_id")[:1]))
    ).exists()


def _critique_shown_for(*, campaign: Campaign, slot: Slot, rng: random.Random) -> bool:
    if campaign.critique_mode == CritiqueMode.OFF:
        return False
    if campaign.critique_mode == CritiqueMode.EXPERIMENT and rng.random() >= (
        campaign.critique_fraction
    ):
        return False
    # Recorded as shown only when there is something to show, so the experiment's arms
    # compare raters who saw a critique with raters who did not.
    return _critiques_exist(comparison_id=slot.comparison_id)


def _lease(
    *, slot: Slot, rater: AbstractBaseUser, campaign: Campaign, now: datetime, rng: random.Random
) -> Slot:
    slot.status = SlotStatus.LEASED
    slot.rater = rater  # type: ignore[assignment]
    slot.leased_at = now
    slot.lease_expires_at = now + timedelta(seconds=campaign.lease_seconds)
    # Sides are randomised per lease, so position bias averages out and can be measured.
    slot.left_is_a = rng.random() < 0.5
    slot.critique_shown = _critique_shown_for(campaign=campaign, slot=slot, rng=rng)
    db.update_by_pk(
        Slot,
        slot.pk,
        status=slot.status,
        rater_id=rater.pk,
        leased_at=slot.leased_at,
        lease_expires_at=slot.lease_expires_at,
        left_is_a=slot.left_is_a,
        critique_shown=slot.critique_shown,
    )
    return slot


def slot_lease_next(
    *,
    rater: AbstractBaseUser,
    campaign: Campaign,
    now: datetime | None = None,
    rng: random.Random | None = None,
    exclude_comparison_ids: Collection[int] = (),
) -> Slot | None:
    """Lease the next slot of ``campaign`` for ``rater``; ``None`` when nothing is left for them.

    Raises ``CampaignNotActive`` unless the campaign is active.

    A rater holds at most one lease per campaign: asking again returns (and renews) the lease
    they already hold, with the same sides and critique setting, so a reload shows the same
    comparison. Otherwise the best slot is taken with ``SELECT ... FOR UPDATE SKIP LOCKED``:
    concurrent raters never wait on each other and never get the same row. Expired leases of
    other raters are reclaimed first (that work is older), then open slots in priority order.
    Both scans walk partial indexes (``slot_queue_leased``, ``slot_queue_open``) in order, so
    the cost does not grow with the size of the campaign.

    ``now`` and ``rng`` are for tests: a clock and a seeded source for the left/right and
    critique draws. ``exclude_comparison_ids`` are passed over for a new lease: the ones the
    rater skipped, which would otherwise come straight back to them from the pool.
    """
    if not campaign.is_active:
        raise CampaignNotActive(f"Campaign '{campaign.name}' is {campaign.status}.")
    now = now or timezone.now()
    rng = rng or _rng
    for attempt in range(LEASE_ATTEMPTS):
        try:
            with transaction.atomic():
                return _lease_next_once(
                    rater=rater,
                    campaign=campaign,
                    now=now,
                    rng=rng,
                    exclude_comparison_ids=exclude_comparison_ids,
                )
        except IntegrityError:
            # Another request of the same rater leased a slot first (one live lease per rater
            # per campaign; one slot per rater per comparison). The unique index made us wait
            # for it to commit, so the next attempt finds that lease and returns it.
            if attempt == LEASE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _lease_next_once(
    *,
    rater: AbstractBaseUser,
    campaign: Campaign,
    now: datetime,
    rng: random.Random,
    exclude_comparison_ids: Collection[int] = (),
) -> Slot | None:
    # Wait (no SKIP LOCKED) on the rater's own lease: if a submit of it is in flight we see
    # it filled afterwards and move on; skipping it would hand the rater a second lease.
    held = db.fetch_one(Slot, _held_lease_sql() + db.lock_clause(), [campaign.pk, rater.pk])
    if held is not None:
        held.lease_expires_at = now + timedelta(seconds=campaign.lease_seconds)
        db.update_by_pk(Slot, held.pk, lease_expires_at=held.lease_expires_at)
        return held

    expired, open_slots, gold = lease_queries(
        rater=rater, campaign=campaign, now=now, exclude_comparison_ids=exclude_comparison_ids
    )
    if _screening_pending(campaign=campaign, rater=rater):
        # Screening: gold items only, until the rater has answered enough of them (the
        # submit that answers the last one records the result). When the gold runs out
        # first, the result is recorded on what they answered.
        slot = db.fetch_one(Slot, gold[0] + db.lock_clause(skip_locked=True), gold[1])
        if slot is not None:
            return _lease(slot=slot, rater=rater, campaign=campaign, now=now, rng=rng)
        if not _screening_finish(campaign=campaign, rater=rater, out_of_gold=True):
            raise ScreeningFailed("You did not pass the screening for this campaign.")
    queues = [expired, open_slots]
    if campaign.gold_fraction > 0 and rng.random() < campaign.gold_fraction:
        # Gold is mixed in at the campaign's rate; the slot looks like any other.
        queues.insert(0, gold)
    for sql, params in queues:
        slot = db.fetch_one(Slot, sql + db.lock_clause(skip_locked=True), params)
        if slot is not None:
            return _lease(slot=slot, rater=rater, campaign=campaign, now=now, rng=rng)
    return None


def _screening_pending(*, campaign: Campaign, rater: AbstractBaseUser) -> bool:
    """Whether the rater still has to be screened; raises ``ScreeningFailed`` if they were
    and failed. No query when the campaign does not screen."""
    if campaign.screening_items == 0:
        return False
    status = (
        RaterScreening.objects.filter(campaign=campaign, rater_id=rater.pk)
        .values_list("status", flat=True)
        .first()
    )
    if status == ScreeningStatus.FAILED:
        raise ScreeningFailed("You did not pass the screening for this campaign.")
    return status is None


def _screening_finish(
    *, campaign: Campaign, rater: AbstractBaseUser, out_of_gold: bool = False
) -> bool:
    """Record the rater's screening result once they have answered ``screening_items`` gold
    items (or, with ``out_of_gold``, whatever they answered); returns whether they passed.
    Idempotent: the first result written stands (a unique constraint keeps it one row)."""
    answers = list(
        Judgment.objects.filter(campaign=campaign, rater_id=rater.pk)
        .exclude(comparison__gold_choice="")
        .order_by("id")
        .values_list("choice", "comparison__gold_choice")[: campaign.screening_items]
    )
    if len(answers) < campaign.screening_items and not out_of_gold:
        return True  # not finished yet
    correct = sum(choice == gold for choice, gold in answers)
    # No gold to screen with at all: nothing to fail on.
    passed = not answers or correct >= campaign.screening_min_accuracy * len(answers)
    RaterScreening.objects.bulk_create(
        [
            RaterScreening(
                campaign=campaign,
                rater_id=rater.pk,
                status=ScreeningStatus.PASSED if passed else ScreeningStatus.FAILED,
                correct=correct,
                total=len(answers),
                required_accuracy=campaign.screening_min_accuracy,
            )
        ],
        ignore_conflicts=True,
    )
    stored = RaterScreening.objects.get(campaign=campaign, rater_id=rater.pk)
    return stored.status == ScreeningStatus.PASSED


# Leasing runs on every "next" a rater asks for, so its statements are SQL written once rather
# than querysets compiled per request (that compiling cost more CPU than running them). The
# status values are literals: they must match the partial indexes' conditions for the planner
# to use those indexes.
@functools.cache
def _held_lease_sql() -> str:
    def c(name: str) -> str:
        return db.column(Slot, name)

    return (
        f"SELECT {db.columns(Slot)} FROM {db.table(Slot)}"
        f" WHERE {c('campaign')} = %s AND {c('rater')} = %s AND {c('status')} = 'leased'"
        f" ORDER BY {c('lease_expires_at')} LIMIT 1"
    )


@functools.cache
def _lease_queue_sql(queue: str, excluded: int) -> str:
    def c(name: str) -> str:
        return "s." + db.column(Slot, name)

    if queue == "expired":
        where = f"{c('status')} = 'leased' AND {c('lease_expires_at')} < %s"
        order = c("lease_expires_at")
    elif queue == "gold":
        where = f"{c('status')} = 'open' AND {c('gold')}"
        order = c("id")
    else:
        where = f"{c('status')} = 'open' AND NOT {c('gold')}"
        order = f"{c('priority')} DESC, {c('id')}"
    skipped = ""
    if excluded:
        skipped = f" AND {c('comparison')} NOT IN ({', '.join(['%s'] * excluded)})"
    mine = (
        f"SELECT 1 FROM {db.table(Slot)} m WHERE m.{db.column(Slot, 'comparison')}"
        f" = {c('comparison')} AND m.{db.column(Slot, 'rater')} = %s"
    )
    return (
        f"SELECT {db.columns(Slot, 's')} FROM {db.table(Slot)} s"
        f" WHERE {c('campaign')} = %s AND {where} AND NOT EXISTS ({mine}){skipped}"
        f" ORDER BY {order} LIMIT 1"
    )


def lease_queries(
    *,
    rater: AbstractBaseUser,
    campaign: Campaign,
    now: datetime,
    exclude_comparison_ids: Collection[int] = (),
) -> list[tuple[str, list[Any]]]:
    """The three queues a new lease is taken from, as ``(sql, params)`` selecting one whole
    slot row (the caller adds the lock clause): expired leases of other raters, open slots,
    and open gold slots (served at the campaign's gold fraction, and alone during screening).
    All leave out comparisons the rater already holds or judged, and the ones in
    ``exclude_comparison_ids``. The orderings match the partial indexes ``slot_queue_leased``,
    ``slot_queue_open`` and ``slot_queue_gold`` exactly, so the planner walks an index and
    stops at the first row it can lock: no sort over the queue. Exposed so tests can EXPLAIN
    exactly what runs."""
    skipped = list(exclude_comparison_ids)
    now_param = Slot._meta.get_field("lease_expires_at").get_db_prep_value(now, connection)
    return [
        (
            _lease_queue_sql("expired", len(skipped)),
            [campaign.pk, now_param, rater.pk, *skipped],
        ),
        (_lease_queue_sql("open", len(skipped)), [campaign.pk, rater.pk, *skipped]),
        (_lease_queue_sql("gold", len(skipped)), [campaign.pk, rater.pk, *skipped]),
    ]


def slots_reclaim_expired(*, campaign: Campaign | None = None, now: datetime | None = None) -> int:
    """Return expired leases to the pool (a periodic task may call this; leasing also takes
    expired leases, so correctness never depends on it). Frees at most 10,000 slots per call
    and returns how many. Skips slots whose lease is being submitted right now."""
    now = now or timezone.now()
    qs = Slot.objects.filter(status=SlotStatus.LEASED, lease_expires_at__lt=now)
    if campaign is not None:
        qs = qs.filter(campaign=campaign)
    with transaction.atomic():
        ids = list(qs.select_for_update(skip_locked=True).values_list("id", flat=True)[:10_000])
        return Slot.objects.filter(id__in=ids).update(
            status=SlotStatus.OPEN, rater=None, leased_at=None, lease_expires_at=None
        )


def slot_release(*, rater: AbstractBaseUser, campaign: Campaign, slot_id: int) -> bool:
    """The rater skips their leased slot: it goes back to the pool at once. Returns whether
    there was such a lease (False when it expired and was taken, or was already submitted)."""
    with transaction.atomic():
        return bool(
            Slot.objects.filter(
                id=slot_id, campaign=campaign, rater_id=rater.pk, status=SlotStatus.LEASED
            ).update(status=SlotStatus.OPEN, rater=None, leased_at=None, lease_expires_at=None)
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _validate(
    *,
    campaign: Campaign,
    choice: str,
    strength: int | None,
    aspects: dict[str, str],
    reason_tags: list[str],
    rationale: str,
    flags: list[str],
    decision_ms: int | None,
    idempotency_key: str | None,
) -> None:
    """Check the answer against the campaign's form. Every error names its field."""
    allowed = {Choice.A.value, Choice.B.value}
    if campaign.allow_tie:
        allowed.add(Choice.TIE.value)
    if campaign.allow_both_bad:
        allowed.add(Choice.BOTH_BAD.value)
    if choice not in allowed:
        raise InvalidJudgment(
            f"choice must be one of {', '.join(sorted(allowed))}; got {choice!r}", field="choice"
        )
    if strength is not None:
        if not _is_int(strength):
            raise InvalidJudgment("strength must be a whole number", field="strength")
        if campaign.strength_scale == 0:
            raise InvalidJudgment("this campaign does not ask for strength", field="strength")
        if not 1 <= strength <= campaign.strength_scale:
            raise InvalidJudgment(
                f"strength must be between 1 and {campaign.strength_scale}", field="strength"
            )
        if choice not in (Choice.A, Choice.B):
            raise InvalidJudgment("strength only applies when A or B wins", field="strength")
    if not isinstance(aspects, dict) or not all(isinstance(k, str) for k in aspects):
        raise InvalidJudgment("aspects must map aspect names to answers", field="aspects")
    unknown = set(aspects) - set(campaign.aspects)
    if unknown:
        raise InvalidJudgment(f"unknown aspects: {', '.join(sorted(unknown))}", field="aspects")
    if any(v not in ASPECT_ANSWERS for v in aspects.values()):
        raise InvalidJudgment("aspect answers must be a, b or tie", field="aspects")
    if not _is_str_list(reason_tags):
        raise InvalidJudgment("reason_tags must be a list of strings", field="reason_tags")
    unknown = set(reason_tags) - set(campaign.reason_tags)
    if unknown:
        raise InvalidJudgment(
            f"unknown reason tags: {', '.join(sorted(unknown))}", field="reason_tags"
        )
    if not _is_str_list(flags):
        raise InvalidJudgment("flags must be a list of strings", field="flags")
    unknown = set(flags) - set(campaign.flag_options)
    if unknown:
        raise InvalidJudgment(f"unknown flags: {', '.join(sorted(unknown))}", field="flags")
    if not isinstance(rationale, str):
        raise InvalidJudgment("rationale must be text", field="rationale")
    if len(rationale) > MAX_RATIONALE_CHARS:
        raise InvalidJudgment(
            f"rationale is longer than {MAX_RATIONALE_CHARS} characters", field="rationale"
        )
    if "\x00" in rationale:
        # PostgreSQL text cannot hold NUL; refuse it here rather than fail in the database.
        raise InvalidJudgment("rationale contains a NUL character", field="rationale")
    if campaign.require_rationale and not rationale.strip():
        raise InvalidJudgment("this campaign asks for a rationale", field="rationale")
    check_decision_ms_and_key(decision_ms=decision_ms, idempotency_key=idempotency_key)


def check_decision_ms_and_key(*, decision_ms: int | None, idempotency_key: str | None) -> None:
    """The checks every submit shares (judgments and rankings); errors name the field."""
    if decision_ms is not None and not (
        _is_int(decision_ms) and 0 <= decision_ms <= MAX_DECISION_MS
    ):
        raise InvalidJudgment(
            f"decision_ms must be a whole number from 0 to {MAX_DECISION_MS}", field="decision_ms"
        )
    if idempotency_key is not None and not (
        isinstance(idempotency_key, str) and len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
    ):
        raise InvalidJudgment(
            f"idempotency_key must be text of at most {MAX_IDEMPOTENCY_KEY_CHARS} characters",
            field="idempotency_key",
        )


def side_to_canonical(side: str, *, left_is_a: bool) -> str:
    """A rater's left / right answer in canonical a / b terms, by the slot's layout; tie and
    both_bad (and anything else, which validation then rejects) pass through unchanged."""
    if side == "left":
        return Choice.A.value if left_is_a else Choice.B.value
    if side == "right":
        return Choice.B.value if left_is_a else Choice.A.value
    return side


def canonical_to_side(canonical: str, *, left_was_a: bool) -> str:
    """The inverse of ``side_to_canonical``: a stored answer in the terms the rater saw."""
    if canonical == Choice.A:
        return "left" if left_was_a else "right"
    if canonical == Choice.B:
        return "right" if left_was_a else "left"
    return canonical


MAX_VERDICTS = 20


def _check_verdicts(*, slot: Slot, verdicts: dict[int, bool]) -> None:
    field = "critique_verdicts"
    if not isinstance(verdicts, dict) or len(verdicts) > MAX_VERDICTS:
        raise InvalidJudgment(f"at most {MAX_VERDICTS} critique verdicts", field=field)
    if not all(_is_int(k) and isinstance(v, bool) for k, v in verdicts.items()):
        raise InvalidJudgment("critique verdicts map critique ids to true or false", field=field)
    if not slot.critique_shown:
        raise InvalidJudgment("no critiques were shown with this comparison", field=field)
    pair = Comparison.objects.filter(pk=slot.comparison_id)
    shown = Critique.objects.filter(
        Q(completion_id=Subquery(pair.values("completion_a_id")[:1]))
        | Q(completion_id=Subquery(pair.values("completion_b_id")[:1])),
        id__in=list(verdicts),
    ).count()
    if shown != len(verdicts):
        raise InvalidJudgment("a critique verdict names a critique not shown here", field=field)


def _replay(*, earlier: Judgment, slot_id: int) -> SubmitResult:
    if earlier.slot_id != slot_id:
        # Returning the other judgment would tell the client this answer was stored.
        raise InvalidJudgment(
            "this idempotency key was already used for another comparison",
            field="idempotency_key",
        )
    return SubmitResult(judgment=earlier, created=False)


def judgment_submit(
    *,
    rater: AbstractBaseUser,
    campaign: Campaign,
    slot_id: int,
    choice: str,
    strength: int | None = None,
    aspects: dict[str, str] | None = None,
    reason_tags: list[str] | None = None,
    rationale: str = "",
    flags: list[str] | None = None,
    decision_ms: int | None = None,
    idempotency_key: str | None = None,
    critique_verdicts: dict[int, bool] | None = None,
    expected_left_is_a: bool | None = None,
    side_answers: bool = False,
    now: datetime | None = None,
) -> SubmitResult:
    """Record the rater's judgment on their leased slot and fill the slot, in one transaction
    of three statements (lock the slot, insert, mark it filled).

    Locks the slot row (``SELECT ... FOR UPDATE``): a second submit of the same slot waits for
    the first to commit, then finds the slot filled by this rater and returns the stored
    judgment (``created=False``) instead of writing another. A repeated ``idempotency_key``
    lands on the same filled slot and gets the same answer; a key this rater already used on
    another slot is refused (``InvalidJudgment`` on ``idempotency_key``). A submit after the lease
    expired is still accepted while the slot is untouched; once another rater has taken it, or
    it went back to the pool, it raises ``LeaseLost``. Paused campaigns still accept submits of
    leases handed out before the pause; archived campaigns accept none.

    Callers that mapped the rater's left / right answer to a / b pass the layout they mapped
    with as ``expected_left_is_a``; it is checked under the lock, so an answer given on a card
    whose slot was since released and leased again with the sides swapped is refused
    (``LeaseLost``) instead of being stored flipped.

    ``critique_verdicts`` maps ids of critiques shown with this comparison to the rater's
    call on each (valid: it points at a real problem); stored with the judgment. Only for a
    slot that showed critiques, and only that comparison's critiques (``InvalidJudgment`` on
    ``critique_verdicts`` otherwise).

    With ``side_answers=True``, ``choice`` and the aspect answers are in the rater's terms
    (``left`` / ``right`` / ``tie`` / ``both_bad``) and are mapped to a / b here, with the
    layout of the slot row this transaction locks: the caller needs no read of its own before
    the submit (the API's hot path), and no relayout can slip in between mapping and storing.
    The checks then run in the same order as for a caller that read the slot first: not
    yours (``LeaseLost``), then the form (``InvalidJudgment``), then archived, then replay.
    """
    aspects = {} if aspects is None else aspects
    tags: list[str] = [] if reason_tags is None else reason_tags
    flag_list: list[str] = [] if flags is None else flags
    idempotency_key = idempotency_key or None

    def check(choice: str, aspects: dict[str, str]) -> None:
        _validate(
            campaign=campaign,
            choice=choice,
            strength=strength,
            aspects=aspects,
            reason_tags=tags,
            rationale=rationale,
            flags=flag_list,
            decision_ms=decision_ms,
            idempotency_key=idempotency_key,
        )
        if campaign.status == CampaignStatus.ARCHIVED:
            raise CampaignNotActive(f"Campaign '{campaign.name}' is archived.")

    if not side_answers:
        check(choice, aspects)
    now = now or timezone.now()
    try:
        with transaction.atomic():
            slot = db.get_for_update(
                Slot,
                attnames=SUBMIT_SLOT_FIELDS,
                where={"id": slot_id, "campaign_id": campaign.pk},
            )
            if slot is None or slot.rater_id != rater.pk:
                raise LeaseLost("This comparison is no longer assigned to you. Load the next one.")
            if side_answers:
                # Canonical a / b would pass the mapping unchanged: refuse them in rater terms.
                if choice in (Choice.A, Choice.B):
                    raise InvalidJudgment(
                        "choice must be left, right, tie or both_bad", field="choice"
                    )
                if isinstance(aspects, dict) and not all(
                    v in SIDE_ASPECTS for v in aspects.values()
                ):
                    raise InvalidJudgment(
                        "aspect answers must be left, right or tie", field="aspects"
                    )
                choice = side_to_canonical(choice, left_is_a=slot.left_is_a)
                if isinstance(aspects, dict):  # anything else is refused by the check
                    aspects = {
                        name: side_to_canonical(answer, left_is_a=slot.left_is_a)
                        for name, answer in aspects.items()
                    }
                check(choice, aspects)
            if slot.status == SlotStatus.FILLED:
                # Double click, retry after a lost response, or a replayed form: the stored
                # answer wins, whatever this request carries. A filled slot never changes
                # hands, so this also covers every replay of an idempotency key.
                earlier = Judgment.objects.get(slot_id=slot.id)
                return SubmitResult(judgment=earlier, created=False)
            if expected_left_is_a is not None and slot.left_is_a != expected_left_is_a:
                raise LeaseLost(
                    "This comparison was reloaded with the sides swapped. Answer it again."
                )
            # Deduplicated only now: in side-answer mode they were validated just above.
            reason_tags = list(dict.fromkeys(tags))
            flags = list(dict.fromkeys(flag_list))
            judgment = Judgment(
                campaign=campaign,
                comparison_id=slot.comparison_id,
                slot_id=slot.id,
                rater_id=rater.pk,
                choice=choice,
                strength=strength,
                aspects=aspects,
                reason_tags=reason_tags,
                rationale=rationale,
                flags=flags,
                left_was_a=slot.left_is_a,
                critique_shown=slot.critique_shown,
                decision_ms=decision_ms,
                guidelines_version=campaign.guidelines_version,
                idempotency_key=idempotency_key,
            )
            if critique_verdicts:
                _check_verdicts(slot=slot, verdicts=critique_verdicts)
            db.insert(judgment)
            db.update_by_pk(Slot, slot.id, status=SlotStatus.FILLED, filled_at=now)
            if critique_verdicts:
                CritiqueVerdict.objects.bulk_create(
                    CritiqueVerdict(judgment=judgment, critique_id=critique_id, valid=valid)
                    for critique_id, valid in critique_verdicts.items()
                )
            if slot.gold and campaign.screening_items:
                _screening_finish(campaign=campaign, rater=rater)
    except IntegrityError:
        # We held the slot, and the slot constraints keep this rater off every other slot of
        # the comparison, so only the idempotency key can clash: this rater already used it
        # on another slot (perhaps in a concurrent request).
        if idempotency_key is None:
            raise
        used = Judgment.objects.filter(rater_id=rater.pk, idempotency_key=idempotency_key).first()
        if used is None:
            raise
        return _replay(earlier=used, slot_id=slot_id)
    return SubmitResult(judgment=judgment, created=True)
