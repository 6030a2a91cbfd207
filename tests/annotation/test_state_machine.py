"""A Hypothesis state machine over the real services and database.

Raters ask for leases, submit, release, the clock moves, expired leases are reclaimed and the
admin lowers or raises the overlap, in any order Hypothesis finds. After every step the tables
must satisfy the guarantees, and every service call must do exactly what the state before it
says it should (which slot a lease gets, whether a submit is stored, replayed or refused).
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.db.models import Count, Q
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from annotation.exceptions import LeaseLost
from annotation.models import Comparison, Judgment, Slot, SlotStatus
from annotation.services.campaigns import campaign_update
from annotation.services.judgments import (
    judgment_submit,
    slot_lease_next,
    slot_release,
    slots_reclaim_expired,
)
from tests.conftest import make_campaign
from tests.factories import UserFactory

RATERS = 3
LEASE_SECONDS = 60


class LeasingMachine(RuleBasedStateMachine):
    @initialize(comparisons=st.integers(1, 2), overlap=st.integers(2, 4))
    def start(self, comparisons: int, overlap: int) -> None:
        self.campaign = make_campaign(
            comparisons=comparisons, overlap=overlap, lease_seconds=LEASE_SECONDS
        )
        self.raters = [UserFactory() for _ in range(RATERS)]
        self.now = timezone.now()
        self.rng = random.Random(0)
        self.handed: dict[int, int] = {}  # rater index -> last slot id handed to them

    # -- helpers --------------------------------------------------------------------------------

    def _slots(self):
        return Slot.objects.filter(campaign=self.campaign)

    def _eligible(self, rater):
        """Slots a new lease of ``rater`` may take, best first per queue."""
        mine = self._slots().filter(rater=rater).values("comparison_id")
        free = self._slots().exclude(comparison_id__in=mine)
        expired = free.filter(status=SlotStatus.LEASED, lease_expires_at__lt=self.now)
        return list(expired.order_by("lease_expires_at", "id")), list(
            free.filter(status=SlotStatus.OPEN).order_by("-priority", "id")
        )

    # -- rules ----------------------------------------------------------------------------------

    @rule(who=st.integers(0, RATERS - 1))
    def request_lease(self, who: int) -> None:
        rater = self.raters[who]
        held = self._slots().filter(rater=rater, status=SlotStatus.LEASED).first()
        expired, open_slots = self._eligible(rater)

        slot = slot_lease_next(rater=rater, campaign=self.campaign, now=self.now, rng=self.rng)

        if held is not None:
            assert slot is not None
            assert slot.pk == held.pk
        elif expired:
            assert slot is not None
            assert slot.lease_expires_at is not None
            assert slot.pk in {
                s.pk for s in expired if s.lease_expires_at == expired[0].lease_expires_at
            }
        elif open_slots:
            assert slot is not None
            assert slot.pk == open_slots[0].pk
        else:
            assert slot is None
            return
        stored = Slot.objects.get(pk=slot.pk)
        assert stored.status == SlotStatus.LEASED
        assert stored.rater_id == rater.pk
        assert stored.lease_expires_at == self.now + timedelta(seconds=LEASE_SECONDS)
        self.handed[who] = slot.pk

    @rule(
        who=st.integers(0, RATERS - 1),
        own=st.booleans(),
        pick=st.integers(0, 100),
        choice=st.sampled_from(["a", "b", "tie", "both_bad"]),
    )
    def submit(self, who: int, own: bool, pick: int, choice: str) -> None:
        rater = self.raters[who]
        if own and who in self.handed:
            slot_id = self.handed[who]
        else:
            ids = list(self._slots().order_by("id").values_list("id", flat=True))
            if not ids:
                return
            slot_id = ids[pick % len(ids)]
        before = Slot.objects.filter(pk=slot_id).first()
        judgments_before = Judgment.objects.filter(campaign=self.campaign).count()

        try:
            result = judgment_submit(
                rater=rater, campaign=self.campaign, slot_id=slot_id, choice=choice, now=self.now
            )
        except LeaseLost:
            assert before is None or before.rater_id != rater.pk
            assert Judgment.objects.filter(campaign=self.campaign).count() == judgments_before
            return

        assert before is not None
        assert before.rater_id == rater.pk
        if before.status == SlotStatus.FILLED:
            assert not result.created
            assert result.judgment.pk == Judgment.objects.get(slot_id=slot_id).pk
            return
        assert before.status == SlotStatus.LEASED
        assert result.created
        judgment = result.judgment
        assert (judgment.left_was_a, judgment.critique_shown) == (
            before.left_is_a,
            before.critique_shown,
        )
        # The guarantee itself: no judgment is accepted beyond the overlap in force.
        on_comparison = Judgment.objects.filter(comparison_id=before.comparison_id).count()
        assert on_comparison <= self.campaign.overlap

    @rule(who=st.integers(0, RATERS - 1), choice=st.sampled_from(["a", "b"]))
    def lease_and_submit(self, who: int, choice: str) -> None:
        """The common case in one step, so that sequences reach full comparisons sooner."""
        self.request_lease(who)
        if who in self.handed:
            self.submit(who, True, 0, choice)

    @precondition(lambda self: bool(self.handed))
    @rule(pick=st.integers(0, RATERS - 1))
    def release(self, pick: int) -> None:
        who = sorted(self.handed)[pick % len(self.handed)]
        rater = self.raters[who]
        before = Slot.objects.filter(pk=self.handed[who]).first()
        expected = before is not None and before.rater_id == rater.pk and before.status == "leased"

        released = slot_release(rater=rater, campaign=self.campaign, slot_id=self.handed[who])

        assert released == expected

    # Preconditions keep the clock and the reclaimer from eating steps when they cannot matter.
    @precondition(lambda self: self._slots().filter(status=SlotStatus.LEASED).exists())
    @rule(seconds=st.sampled_from([5, 30, 61, 200]))
    def advance_clock(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @precondition(
        lambda self: (
            self._slots().filter(status=SlotStatus.LEASED, lease_expires_at__lt=self.now).exists()
        )
    )
    @rule()
    def reclaim(self) -> None:
        expired = self._slots().filter(status=SlotStatus.LEASED, lease_expires_at__lt=self.now)
        expected = expired.count()

        assert slots_reclaim_expired(campaign=self.campaign, now=self.now) == expected
        assert not expired.exists()

    @rule(overlap=st.integers(1, 4))
    def set_overlap(self, overlap: int) -> None:
        before = self._per_comparison()

        self.campaign = campaign_update(campaign=self.campaign, overlap=overlap)

        # Judgments are kept, then as many live leases as still fit, then open slots.
        for comparison_id, (filled, leased, _) in before.items():
            kept_leases = min(leased, max(0, overlap - filled))
            kept_open = max(0, overlap - filled - kept_leases)
            assert self._per_comparison()[comparison_id] == (filled, kept_leases, kept_open)

    def _per_comparison(self) -> dict[int, tuple[int, int, int]]:
        """comparison id -> (filled, leased, open) slots."""
        counts: dict[int, list[int]] = {}
        order = {SlotStatus.FILLED: 0, SlotStatus.LEASED: 1, SlotStatus.OPEN: 2}
        for comparison_id, status in self._slots().values_list("comparison_id", "status"):
            counts.setdefault(comparison_id, [0, 0, 0])[order[status]] += 1
        return {k: (v[0], v[1], v[2]) for k, v in counts.items()}

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def guarantees_hold(self) -> None:
        if not hasattr(self, "campaign"):
            return
        # Never more judgments than the overlap; slots = max(overlap, judgments); filled slots
        # plus live leases within the overlap (a comparison already above it takes no lease).
        overlap = self.campaign.overlap
        rows = Comparison.objects.filter(campaign=self.campaign).annotate(
            n_slots=Count("slots", distinct=True),
            filled=Count("slots", filter=Q(slots__status=SlotStatus.FILLED), distinct=True),
            leased=Count("slots", filter=Q(slots__status=SlotStatus.LEASED), distinct=True),
            judged=Count("judgments", distinct=True),
        )
        for c in rows:
            assert c.judged == c.filled, c
            assert c.n_slots == max(overlap, c.filled), c
            assert c.filled + c.leased <= max(overlap, c.filled), c
            assert c.judgments_wanted == overlap, c
        # No rater twice on a comparison (slot held or judged), one live lease per rater.
        slots = list(self._slots().exclude(rater=None).values_list("comparison", "rater", "status"))
        pairs = [(comparison, rater) for comparison, rater, _ in slots]
        assert len(pairs) == len(set(pairs)), slots
        leasing = [rater for _, rater, status in slots if status == SlotStatus.LEASED]
        assert len(leasing) == len(set(leasing)), slots
        judged = list(
            Judgment.objects.filter(campaign=self.campaign).values_list("comparison", "rater")
        )
        assert len(judged) == len(set(judged)), judged


@pytest.mark.django_db
def test_leasing_state_machine():
    run_state_machine_as_test(
        LeasingMachine,
        settings=settings(
            max_examples=50,
            stateful_step_count=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
