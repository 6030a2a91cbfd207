"""Reads: scoped querysets, the rater's card, progress figures and export streams."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar, cast

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.db import connection, models
from django.db.models import Count, Exists, F, Max, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from annotation import db
from annotation.models import (
    Campaign,
    CampaignStatus,
    Comparison,
    Completion,
    Critique,
    Judgment,
    Membership,
    Prompt,
    RaterScreening,
    Role,
    Slot,
    SlotStatus,
)

AnyUser = User | AnonymousUser
M = TypeVar("M", bound=models.Model)


def user_roles(*, user: AnyUser, campaign: Campaign) -> set[str]:
    """The user's roles in the campaign. Superusers act as admin and ML staff everywhere."""
    if not user.is_authenticated:
        return set()
    roles = set(
        Membership.objects.filter(campaign=campaign, user_id=user.pk).values_list("role", flat=True)
    )
    if getattr(user, "is_superuser", False):
        roles |= {Role.ADMIN, Role.ML_STAFF}
    return roles


def campaigns_for_user(*, user: AnyUser) -> QuerySet[Campaign]:
    """Campaigns the user may see at all (any role); everyone else's are invisible (404)."""
    if not user.is_authenticated:
        return Campaign.objects.none()
    if getattr(user, "is_superuser", False):
        return Campaign.objects.all()
    return Campaign.objects.filter(memberships__user_id=user.pk).distinct()


def campaigns_with_roles(*, user: AnyUser) -> list[tuple[Campaign, set[str]]]:
    """The home page list: each visible campaign with the user's roles in it (two queries)."""
    campaigns = list(campaigns_for_user(user=user).order_by("name"))
    roles: dict[int, set[str]] = {c.pk: set() for c in campaigns}
    if user.is_authenticated:
        for campaign_id, role in Membership.objects.filter(user_id=user.pk).values_list(
            "campaign_id", "role"
        ):
            if campaign_id in roles:
                roles[campaign_id].add(role)
        if getattr(user, "is_superuser", False):
            for role_set in roles.values():
                role_set |= {Role.ADMIN, Role.ML_STAFF}
    return [(c, roles[c.pk]) for c in campaigns]


@dataclass(frozen=True)
class Side:
    text: str
    critiques: list[Critique]


@dataclass(frozen=True)
class Card:
    """What the rater sees: sides are already in left/right order; no model names."""

    slot: Slot
    messages: list[dict[str, str]]
    left: Side
    right: Side
    lease_expires_at: datetime | None


def slot_card(*, slot: Slot) -> Card:
    """Build the rater's card for a leased slot: one fixed statement (a second one when the
    slot shows critiques). Runs on every lease, hence SQL written once (``annotation.db``)."""
    with connection.cursor() as cursor:
        cursor.execute(_card_sql(), [slot.comparison_id])
        row = cursor.fetchone()
    if row is None:
        raise Comparison.DoesNotExist(f"comparison {slot.comparison_id} of slot {slot.pk}")
    a_id, b_id, a_text, b_text, messages = row
    messages = db.to_python(Prompt, "messages", messages)
    critiques: dict[int, list[Critique]] = {a_id: [], b_id: []}
    if slot.critique_shown:
        for critique in Critique.objects.filter(completion_id__in=[a_id, b_id]).order_by("id"):
            critiques[critique.completion_id].append(critique)
    a = Side(text=a_text, critiques=critiques[a_id])
    b = Side(text=b_text, critiques=critiques[b_id])
    left, right = (a, b) if slot.left_is_a else (b, a)
    return Card(
        slot=slot,
        messages=list(messages),
        left=left,
        right=right,
        lease_expires_at=slot.lease_expires_at,
    )


@functools.cache
def _card_sql() -> str:
    def c(model: type[models.Model], name: str) -> str:
        return db.column(model, name)

    text = c(Completion, "text")
    return (
        f"SELECT x.{c(Comparison, 'completion_a')}, x.{c(Comparison, 'completion_b')},"
        f" ca.{text}, cb.{text}, p.{c(Prompt, 'messages')}"
        f" FROM {db.table(Comparison)} x"
        f" JOIN {db.table(Completion)} ca ON ca.{c(Completion, 'pk')} = x.{c(Comparison, 'completion_a')}"
        f" JOIN {db.table(Completion)} cb ON cb.{c(Completion, 'pk')} = x.{c(Comparison, 'completion_b')}"
        f" JOIN {db.table(Prompt)} p ON p.{c(Prompt, 'pk')} = x.{c(Comparison, 'prompt')}"
        f" WHERE x.{c(Comparison, 'pk')} = %s"
    )


def slot_for_rater(*, rater: AbstractBaseUser, campaign: Campaign, slot_id: int) -> Slot | None:
    return Slot.objects.filter(id=slot_id, campaign=campaign, rater_id=rater.pk).first()


@dataclass
class RaterProgress:
    rater_id: int
    username: str
    judgments: int
    median_decision_ms: float | None
    ties: int
    both_bad: int
    left_chosen: int
    last_at: datetime | None

    @property
    def tie_or_both_bad_rate(self) -> float | None:
        return (self.ties + self.both_bad) / self.judgments if self.judgments else None

    @property
    def left_chosen_rate(self) -> float | None:
        """Share of decisive (A or B) judgments won by the side shown left: about 0.5 unless
        the rater has a position bias."""
        decisive = self.judgments - self.ties - self.both_bad
        return self.left_chosen / decisive if decisive else None


@dataclass
class CampaignProgress:
    comparisons: int
    slots: int
    filled: int
    leased: int
    open: int
    expired_leases: int
    judgments: int
    raters: list[RaterProgress] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.filled / self.slots if self.slots else 0.0


def campaign_progress(*, campaign: Campaign, with_raters: bool = True) -> CampaignProgress:
    """Progress of the campaign's real work: gold items and their slots are left out (the
    gold page has their figures), so "open" is what raters still have to do."""
    now = timezone.now()
    by_status = dict(
        Slot.objects.filter(campaign=campaign, gold=False)
        .values("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    expired = Slot.objects.filter(
        campaign=campaign, gold=False, status=SlotStatus.LEASED, lease_expires_at__lt=now
    ).count()
    progress = CampaignProgress(
        comparisons=Comparison.objects.filter(campaign=campaign, gold_choice="").count(),
        slots=sum(by_status.values()),
        filled=by_status.get(SlotStatus.FILLED, 0),
        leased=by_status.get(SlotStatus.LEASED, 0),
        open=by_status.get(SlotStatus.OPEN, 0),
        expired_leases=expired,
        judgments=by_status.get(SlotStatus.FILLED, 0),
    )
    if with_raters:
        progress.raters = rater_progress(campaign=campaign)
    return progress


def rater_progress(*, campaign: Campaign) -> list[RaterProgress]:
    rows = (
        Judgment.objects.filter(campaign=campaign)
        .values("rater_id", "rater__username")
        .annotate(
            n=Count("id"),
            ties=Count("id", filter=Q(choice="tie")),
            both_bad=Count("id", filter=Q(choice="both_bad")),
            # The left side won: (A won and A was left) or (B won and B was left).
            left=Count(
                "id",
                filter=Q(choice="a", left_was_a=True) | Q(choice="b", left_was_a=False),
            ),
        )
        .order_by("-n")
    )
    times: dict[int, list[int]] = {}
    for rater_id, ms in (
        Judgment.objects.filter(campaign=campaign, decision_ms__isnull=False)
        .values_list("rater_id", "decision_ms")
        .iterator()
    ):
        times.setdefault(rater_id, []).append(cast(int, ms))  # filtered to non-null above
    last = dict(
        Judgment.objects.filter(campaign=campaign)
        .values("rater_id")
        .annotate(last=Max("created_at"))
        .values_list("rater_id", "last")
    )
    return [
        RaterProgress(
            rater_id=row["rater_id"],
            username=row["rater__username"],
            judgments=row["n"],
            median_decision_ms=(
                statistics.median(times[row["rater_id"]]) if times.get(row["rater_id"]) else None
            ),
            ties=row["ties"],
            both_bad=row["both_bad"],
            left_chosen=row["left"],
            last_at=last.get(row["rater_id"]),
        )
        for row in rows
    ]


def rater_done_count(*, rater: AbstractBaseUser, campaign: Campaign) -> int:
    return Judgment.objects.filter(campaign=campaign, rater_id=rater.pk).count()


def judgments_for_export(
    *, campaign: Campaign, split: str | None = None, chunk_size: int = 2000
) -> Iterator[Judgment]:
    """Stream a campaign's judgments in id order with everything an export line needs.

    Keyset pagination (id > last) keeps memory flat and works on every database, unlike a
    server-side cursor, which SQLite and connection poolers do not offer.
    """
    base = (
        Judgment.objects.filter(campaign=campaign)
        .select_related(
            "rater",
            "comparison__prompt",
            "comparison__completion_a__source",
            "comparison__completion_b__source",
        )
        .order_by("id")
    )
    if split:
        base = base.filter(comparison__prompt__split=split)
    for chunk in snapshot_chunks(base, chunk_size=chunk_size):
        yield from chunk


def snapshot_chunks(base: QuerySet[M], *, chunk_size: int) -> Iterator[list[M]]:
    """``base`` (ordered by id) in chunks by keyset pagination (id > last): flat memory, and
    it works on every database, unlike a server-side cursor. The ids are capped at the
    largest when it starts: rows are append-only, so a long export is a snapshot, not a file
    that keeps growing while raters work."""
    cutoff = base.aggregate(m=Max("id"))["m"]
    if cutoff is None:
        return
    capped = base.filter(id__lte=cutoff)
    last_id = 0
    while chunk := list(capped.filter(id__gt=last_id)[:chunk_size]):
        yield chunk
        last_id = chunk[-1].pk


def active_campaigns_for_rater(*, user: AnyUser) -> QuerySet[Campaign]:
    if not user.is_authenticated:
        return Campaign.objects.none()
    return Campaign.objects.filter(
        status=CampaignStatus.ACTIVE, memberships__user_id=user.pk, memberships__role=Role.RATER
    ).distinct()


def campaign_with_roles(*, user: AnyUser, slug: str) -> tuple[Campaign, set[str]] | None:
    """The campaign named ``slug`` with the user's roles in it; ``None`` if it does not exist.

    The API's hot path checks membership on every request, so this is one fixed statement:
    the campaign, left-joined to the user's membership rows in it (a row per role, or one row
    with no role for an outsider, who then gets 404 rather than "does not exist"). Written as
    SQL because compiling the equivalent queryset cost more than running it. A superuser also
    holds admin and ML staff everywhere."""
    if not user.is_authenticated:
        return None
    with connection.cursor() as cursor:
        cursor.execute(_campaign_with_roles_sql(), [user.pk, slug])
        rows = cursor.fetchall()
    if not rows:
        return None
    roles: set[str] = {row[-1] for row in rows if row[-1] is not None}
    if getattr(user, "is_superuser", False):
        roles |= {Role.ADMIN, Role.ML_STAFF}
    return db.from_row(Campaign, None, rows[0][:-1]), roles


@functools.cache
def _campaign_with_roles_sql() -> str:
    return (
        f"SELECT {db.columns(Campaign, 'c')}, m.{db.column(Membership, 'role')}"
        f" FROM {db.table(Campaign)} c LEFT JOIN {db.table(Membership)} m"
        f" ON m.{db.column(Membership, 'campaign')} = c.{db.column(Campaign, 'pk')}"
        f" AND m.{db.column(Membership, 'user')} = %s"
        f" WHERE c.{db.column(Campaign, 'slug')} = %s"
    )


def rater_remaining_count(
    *, rater: AbstractBaseUser, campaign: Campaign, cap: int = 500
) -> tuple[int, bool]:
    """How many more comparisons the rater could be given (not counting one they hold now),
    as ``(count, more)``; ``more`` means the count stopped at the cap and there are more.

    Bounded work: it walks at most ``cap * overlap`` open slots on the open-slot index, so it
    costs the same on a campaign of a thousand comparisons or a million, early or late in it.
    (Expired leases of others, which the rater could also take, are left out: few, and they
    would cost a second scan.)"""
    limit = cap * max(campaign.overlap, 1)
    mine = Slot.objects.filter(comparison=OuterRef("comparison_id"), rater_id=rater.pk)
    window = (
        Slot.objects.filter(campaign=campaign, status=SlotStatus.OPEN, gold=False)
        .exclude(Exists(mine))
        .order_by()
        .values("id")[:limit]
    )
    counts = Slot.objects.filter(id__in=Subquery(window)).aggregate(
        comparisons=Count("comparison_id", distinct=True), rows=Count("id")
    )
    return min(counts["comparisons"], cap), counts["rows"] >= limit


def campaigns_administered(*, user: AnyUser) -> list[Campaign]:
    """Campaigns where the user is an admin (every campaign for a superuser), by name."""
    return [c for c, roles in campaigns_with_roles(user=user) if Role.ADMIN in roles]


def campaign_memberships(*, campaign: Campaign) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(campaign=campaign)
        .select_related("user")
        .order_by("role", "user__username")
    )


def user_by_username(*, username: str) -> AbstractBaseUser | None:
    return get_user_model().objects.filter(username=username, is_active=True).first()


def user_by_id(*, user_id: int) -> AbstractBaseUser | None:
    return get_user_model().objects.filter(pk=user_id).first()


@dataclass(frozen=True)
class GoldRow:
    comparison: Comparison
    answers: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answers if self.answers else None


@dataclass(frozen=True)
class GoldSummary:
    items: int
    answers: int
    correct: int
    rows: list[GoldRow]  # the newest ``limit`` gold items
    screenings: list[RaterScreening]

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answers if self.answers else None


def gold_summary(*, campaign: Campaign, limit: int = 200) -> GoldSummary:
    """The campaign's gold items with how raters answered them, and the screening results;
    four queries whatever the campaign's size (the table shows the newest ``limit`` items)."""
    gold = Comparison.objects.filter(campaign=campaign).exclude(gold_choice="")
    answered = Count("judgments")
    right = Count("judgments", filter=Q(judgments__choice=F("gold_choice")))
    totals = gold.aggregate(items=Count("id", distinct=True), answers=answered, correct=right)
    rows = [
        GoldRow(comparison=c, answers=c.n_answers, correct=c.n_correct)
        for c in gold.select_related("prompt")
        .annotate(n_answers=answered, n_correct=right)
        .order_by("-id")[:limit]
    ]
    screenings = list(
        RaterScreening.objects.filter(campaign=campaign)
        .select_related("rater")
        .order_by("-finished_at")
    )
    return GoldSummary(
        items=totals["items"],
        answers=totals["answers"],
        correct=totals["correct"],
        rows=rows,
        screenings=screenings,
    )
