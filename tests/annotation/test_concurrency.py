"""The rater hot path under real concurrency, on PostgreSQL with real threads and row locks.

Every test here commits for real (``transaction=True``): each thread has its own connection,
so the threads race exactly as gunicorn workers would. Each thread closes its connection when
it is done, so the database can be flushed afterwards.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Q
from django.utils import timezone

from annotation.exceptions import LeaseLost
from annotation.models import Campaign, Comparison, Judgment, Slot, SlotStatus
from annotation.services.campaigns import campaign_update
from annotation.services.judgments import (
    SubmitResult,
    judgment_submit,
    slot_lease_next,
    slot_release,
    slots_reclaim_expired,
)
from tests.conftest import make_campaign
from tests.factories import UserFactory

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

T = TypeVar("T")


def run_in_threads(n: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(i)`` in ``n`` threads that start together; re-raise the first error."""
    barrier = threading.Barrier(n)

    def thread_main(i: int) -> T:
        try:
            barrier.wait(timeout=30)
            return work(i)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(thread_main, i) for i in range(n)]
        return [f.result(timeout=120) for f in futures]


def assert_slots_consistent(campaign: Campaign) -> None:
    """The invariants every test ends on, read straight from the tables."""
    campaign.refresh_from_db()
    for comparison in Comparison.objects.filter(campaign=campaign).annotate(
        n_slots=Count("slots", distinct=True),
        n_filled=Count("slots", filter=Q(slots__status=SlotStatus.FILLED), distinct=True),
        n_leased=Count("slots", filter=Q(slots__status=SlotStatus.LEASED), distinct=True),
        n_judgments=Count("judgments", distinct=True),
    ):
        assert comparison.n_judgments == comparison.n_filled, comparison
        assert comparison.n_slots == max(campaign.overlap, comparison.n_filled), comparison
        if comparison.n_filled <= campaign.overlap:
            assert comparison.n_filled + comparison.n_leased <= campaign.overlap, comparison
        else:
            assert comparison.n_leased == 0, comparison
    twice = (
        Judgment.objects.filter(campaign=campaign)
        .values("comparison", "rater")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    assert not twice.exists()
    held_twice = (
        Slot.objects.filter(campaign=campaign, rater__isnull=False)
        .values("comparison", "rater")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    assert not held_twice.exists()


def test_hammering_lease_and_submit_never_exceeds_the_overlap():
    """16 threads share 10 raters (so one rater's requests also race each other) and lease,
    submit or skip until no work is left. Every comparison ends with exactly ``overlap``
    judgments by distinct raters, and every acknowledged judgment is stored once."""
    campaign = make_campaign(comparisons=6, overlap=2)
    raters = [UserFactory() for _ in range(10)]
    acknowledged: list[SubmitResult] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        rng = random.Random(i)
        submitted = 0
        idle_passes = 0
        while idle_passes < 2:
            found = False
            for rater in rng.sample(raters, len(raters)):
                slot = slot_lease_next(rater=rater, campaign=campaign)
                if slot is None:
                    continue
                found = True
                if rng.random() < 0.15:
                    slot_release(rater=rater, campaign=campaign, slot_id=slot.pk)
                    continue
                try:
                    result = judgment_submit(
                        rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", strength=1
                    )
                except LeaseLost:
                    # Another thread of the same rater released this slot meanwhile.
                    continue
                with lock:
                    acknowledged.append(result)
                submitted += 1
            idle_passes = 0 if found else idle_passes + 1
        return submitted

    run_in_threads(16, work)

    assert_slots_consistent(campaign)
    per_comparison = Counter(
        Judgment.objects.filter(campaign=campaign).values_list("comparison_id", flat=True)
    )
    assert sorted(per_comparison.values()) == [2] * 6
    created_ids = [r.judgment.pk for r in acknowledged if r.created]
    assert len(created_ids) == len(set(created_ids)) == 12
    stored = set(Judgment.objects.filter(campaign=campaign).values_list("id", flat=True))
    assert {r.judgment.pk for r in acknowledged} == stored


def test_one_rater_leasing_from_many_threads_gets_one_lease():
    """A rater with many tabs (or a retrying client) asking at once holds one lease, and every
    request is shown the same comparison."""
    campaign = make_campaign(comparisons=20, overlap=2)
    rater = UserFactory()

    slots = run_in_threads(16, lambda i: slot_lease_next(rater=rater, campaign=campaign))

    assert all(s is not None for s in slots)
    assert len({s.pk for s in slots}) == 1
    live = Slot.objects.filter(campaign=campaign, rater=rater, status=SlotStatus.LEASED)
    assert live.count() == 1
    assert_slots_consistent(campaign)


def test_database_rejects_a_second_slot_of_one_comparison_for_one_rater():
    campaign = make_campaign(comparisons=1, overlap=3)
    rater = UserFactory()
    slot = slot_lease_next(rater=rater, campaign=campaign)
    assert slot is not None
    other = Slot.objects.filter(comparison_id=slot.comparison_id).exclude(pk=slot.pk).first()
    now = timezone.now()

    with pytest.raises(IntegrityError), transaction.atomic():
        Slot.objects.filter(pk=other.pk).update(
            status=SlotStatus.LEASED, rater=rater, lease_expires_at=now + timedelta(minutes=5)
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        Slot.objects.create(
            campaign=campaign,
            comparison_id=slot.comparison_id,
            index=99,
            status=SlotStatus.FILLED,
            rater=rater,
        )


def test_database_rejects_a_second_live_lease_for_one_rater_in_a_campaign():
    campaign = make_campaign(comparisons=2, overlap=1)
    rater = UserFactory()
    slot = slot_lease_next(rater=rater, campaign=campaign)
    assert slot is not None
    other = Slot.objects.filter(campaign=campaign).exclude(pk=slot.pk).get()

    with pytest.raises(IntegrityError), transaction.atomic():
        Slot.objects.filter(pk=other.pk).update(
            status=SlotStatus.LEASED,
            rater=rater,
            lease_expires_at=timezone.now() + timedelta(minutes=5),
        )


def test_a_rater_never_judges_a_comparison_twice():
    """Many threads of one rater lease and submit on a comparison with room for three: the
    rater gets it once. The database refuses a forged second judgment."""
    campaign = make_campaign(comparisons=1, overlap=3)
    rater = UserFactory()

    def work(i: int) -> bool:
        slot = slot_lease_next(rater=rater, campaign=campaign)
        if slot is None:
            return False
        try:
            return judgment_submit(
                rater=rater, campaign=campaign, slot_id=slot.pk, choice="b"
            ).created
        except LeaseLost:
            return False

    created = run_in_threads(12, work)

    assert created.count(True) == 1
    assert Judgment.objects.filter(rater=rater).count() == 1
    assert slot_lease_next(rater=rater, campaign=campaign) is None
    judgment = Judgment.objects.get(rater=rater)
    free = Slot.objects.filter(comparison=judgment.comparison, status=SlotStatus.OPEN).first()
    with pytest.raises(IntegrityError), transaction.atomic():
        Judgment.objects.create(
            campaign=campaign,
            comparison=judgment.comparison,
            slot=free,
            rater=rater,
            choice="a",
            left_was_a=True,
            guidelines_version=1,
        )
    assert_slots_consistent(campaign)


@pytest.mark.parametrize("key", ["k-7f3a", None], ids=["same-idempotency-key", "double-click"])
def test_repeated_submit_stores_one_row_and_returns_the_same_judgment(key):
    campaign = make_campaign(comparisons=1, overlap=1)
    rater = UserFactory()
    slot = slot_lease_next(rater=rater, campaign=campaign)
    assert slot is not None

    results = run_in_threads(
        20,
        lambda i: judgment_submit(
            rater=rater,
            campaign=campaign,
            slot_id=slot.pk,
            choice="a",
            strength=2,
            idempotency_key=key,
        ),
    )

    assert Judgment.objects.count() == 1
    stored = Judgment.objects.get()
    assert {r.judgment.pk for r in results} == {stored.pk}
    assert [r.created for r in results].count(True) == 1
    assert all(r.judgment.choice == "a" and r.judgment.strength == 2 for r in results)
    slot.refresh_from_db()
    assert slot.status == SlotStatus.FILLED


def test_repeated_key_from_many_threads_after_commit_still_returns_the_stored_judgment():
    """A client retrying after a lost response: the first submit already committed."""
    campaign = make_campaign(comparisons=1, overlap=1)
    rater = UserFactory()
    slot = slot_lease_next(rater=rater, campaign=campaign)
    first = judgment_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, choice="tie", idempotency_key="retry-1"
    )

    results = run_in_threads(
        8,
        lambda i: judgment_submit(
            rater=rater,
            campaign=campaign,
            slot_id=slot.pk,
            choice="tie",
            idempotency_key="retry-1",
        ),
    )

    assert {r.judgment.pk for r in results} == {first.judgment.pk}
    assert not any(r.created for r in results)
    assert Judgment.objects.count() == 1


def test_expired_lease_goes_to_exactly_one_of_many_racing_raters():
    campaign = make_campaign(comparisons=1, overlap=1, lease_seconds=60)
    first = UserFactory()
    slot = slot_lease_next(rater=first, campaign=campaign)
    assert slot is not None
    later = timezone.now() + timedelta(seconds=120)
    raters = [UserFactory() for _ in range(10)]

    taken = run_in_threads(
        10, lambda i: slot_lease_next(rater=raters[i], campaign=campaign, now=later)
    )

    winners = [s for s in taken if s is not None]
    assert len(winners) == 1
    assert winners[0].pk == slot.pk
    with pytest.raises(LeaseLost):
        judgment_submit(rater=first, campaign=campaign, slot_id=slot.pk, choice="a", now=later)
    assert_slots_consistent(campaign)


def test_late_submit_races_a_reclaiming_rater_and_exactly_one_wins():
    """The first rater submits after expiry while another rater leases the same slot: either
    the submit lands (and the other rater gets nothing) or the lease does (and the submit is
    refused). Never both."""
    for attempt in range(10):
        campaign = make_campaign(comparisons=1, overlap=1, lease_seconds=60)
        first, second = UserFactory(), UserFactory()
        slot = slot_lease_next(rater=first, campaign=campaign)
        later = timezone.now() + timedelta(seconds=120)

        def work(i: int, slot=slot, first=first, second=second, campaign=campaign, later=later):
            if i == 0:
                try:
                    return judgment_submit(
                        rater=first, campaign=campaign, slot_id=slot.pk, choice="a", now=later
                    )
                except LeaseLost:
                    return "lost"
            return slot_lease_next(rater=second, campaign=campaign, now=later)

        submit, lease = run_in_threads(2, work)
        if submit == "lost":
            assert lease is not None, attempt
            assert lease.pk == slot.pk, attempt
            assert not Judgment.objects.filter(campaign=campaign).exists()
        else:
            assert submit.created, attempt
            assert lease is None, attempt
        assert_slots_consistent(campaign)


def test_late_submit_races_the_reclaimer_and_exactly_one_wins():
    """The periodic reclaim and a late submit of the same expired lease: the reclaim skips a
    slot whose submit holds the lock, and a submit after the reclaim is refused."""
    for attempt in range(10):
        campaign = make_campaign(comparisons=1, overlap=1, lease_seconds=60)
        rater = UserFactory()
        slot = slot_lease_next(rater=rater, campaign=campaign)
        later = timezone.now() + timedelta(seconds=120)

        def work(i: int, slot=slot, rater=rater, campaign=campaign, later=later):
            if i == 0:
                try:
                    return judgment_submit(
                        rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", now=later
                    )
                except LeaseLost:
                    return "lost"
            return slots_reclaim_expired(campaign=campaign, now=later)

        submit, freed = run_in_threads(2, work)
        slot.refresh_from_db()
        if submit == "lost":
            assert freed == 1, attempt
            assert slot.status == SlotStatus.OPEN, attempt
            assert not Judgment.objects.filter(campaign=campaign).exists()
        else:
            assert submit.created, attempt
            assert freed == 0, attempt
            assert slot.status == SlotStatus.FILLED, attempt
        assert_slots_consistent(campaign)


def test_lowering_the_overlap_while_raters_work_keeps_filled_plus_leased_within_it():
    campaign = make_campaign(comparisons=8, overlap=3)
    raters = [UserFactory() for _ in range(12)]
    stop = threading.Event()

    def rater_loop(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            rater = rng.choice(raters)
            slot = slot_lease_next(rater=rater, campaign=campaign)
            if slot is None:
                return
            if rng.random() < 0.7:
                with contextlib.suppress(LeaseLost):
                    judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")

    def work(i: int) -> None:
        if i == 0:
            for overlap in (2, 1, 3, 1, 2):
                campaign_update(campaign=campaign, overlap=overlap)
            stop.set()
        else:
            rater_loop(i)

    run_in_threads(8, work)

    assert_slots_consistent(campaign)
    assert Campaign.objects.get(pk=campaign.pk).overlap == 2


def test_raising_the_overlap_while_raters_work_adds_slots_for_everyone():
    campaign = make_campaign(comparisons=5, overlap=1)
    raters = [UserFactory() for _ in range(6)]

    def work(i: int) -> None:
        if i == 0:
            campaign_update(campaign=campaign, overlap=3)
            return
        rater = raters[i]
        for _ in range(10):
            slot = slot_lease_next(rater=rater, campaign=campaign)
            if slot is None:
                return
            judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="b")

    run_in_threads(6, work)
    # Drain what is left with the remaining raters so every comparison reaches 3.
    for rater in raters:
        while (slot := slot_lease_next(rater=rater, campaign=campaign)) is not None:
            judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="b")

    assert_slots_consistent(campaign)
    counts = Counter(
        Judgment.objects.filter(campaign=campaign).values_list("comparison_id", flat=True)
    )
    assert sorted(counts.values()) == [3] * 5
