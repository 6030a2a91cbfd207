"""Campaigns and memberships."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Case, Count, IntegerField, Max, QuerySet, Value, When, Window
from django.db.models.functions import RowNumber

from annotation.exceptions import AnnotationError
from annotation.models import (
    Campaign,
    CampaignStatus,
    Comparison,
    Membership,
    Role,
    Slot,
    SlotStatus,
)

EDITABLE_FIELDS = (
    "name",
    "description",
    "guidelines",
    "overlap",
    "lease_seconds",
    "strength_scale",
    "aspects",
    "reason_tags",
    "flag_options",
    "allow_tie",
    "allow_both_bad",
    "require_rationale",
    "critique_mode",
    "critique_fraction",
    "gold_fraction",
    "gold_overlap",
    "screening_items",
    "screening_min_accuracy",
    "agreement_fraction",
    "agreement_overlap",
)

# Allowed status transitions; archived is terminal.
_TRANSITIONS = {
    CampaignStatus.DRAFT: {CampaignStatus.ACTIVE, CampaignStatus.ARCHIVED},
    CampaignStatus.ACTIVE: {CampaignStatus.PAUSED, CampaignStatus.ARCHIVED},
    CampaignStatus.PAUSED: {CampaignStatus.ACTIVE, CampaignStatus.ARCHIVED},
    CampaignStatus.ARCHIVED: set(),
}


def clean_option_list(value: Any, *, field: str) -> list[str]:
    """A campaign's aspects, reason tags or flags: distinct non-empty strings of at most 60
    characters, trimmed. Raises AnnotationError naming ``field``."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AnnotationError(f"{field} must be a list of strings")
    cleaned = [v.strip() for v in value if v.strip()]
    if len(set(cleaned)) != len(cleaned):
        raise AnnotationError(f"{field} has duplicates")
    if any(len(v) > 60 for v in cleaned):
        raise AnnotationError(f"{field}: each entry must be at most 60 characters")
    return cleaned


# The model's check constraints, restated per field so that errors name the field (a violated
# constraint is reported under ``__all__``).
_RANGES: dict[str, tuple[float, float, str]] = {
    "overlap": (1, 50, "between 1 and 50"),
    "lease_seconds": (10, float("inf"), "at least 10 seconds"),
    "critique_fraction": (0, 1, "between 0 and 1"),
    "gold_fraction": (0, 1, "between 0 and 1"),
    "gold_overlap": (1, 50, "between 1 and 50"),
    "screening_items": (0, 100, "between 0 and 100"),
    "screening_min_accuracy": (0, 1, "between 0 and 1"),
    "agreement_fraction": (0, 1, "between 0 and 1"),
    "agreement_overlap": (1, 50, "between 1 and 50"),
}


def _full_clean(campaign: Campaign) -> None:
    errors: dict[str, list[str]] = {}
    for name, (low, high, words) in _RANGES.items():
        value = getattr(campaign, name)
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and not low <= value <= high:
            errors[name] = [f"must be {words}"]
    if errors:
        raise ValidationError(errors)
    campaign.full_clean(exclude=["created_by"])


def campaign_create(*, creator: AbstractBaseUser, name: str, slug: str, **fields: Any) -> Campaign:
    """Create a campaign in draft; its creator becomes its admin.

    Raises ``AnnotationError`` for unknown fields, malformed lists and a taken slug, and
    Django's ``ValidationError`` (per field) for values the model refuses.
    """
    unknown = set(fields) - set(EDITABLE_FIELDS)
    if unknown:
        raise AnnotationError(f"unknown campaign fields: {', '.join(sorted(unknown))}")
    for list_field in ("aspects", "reason_tags", "flag_options"):
        if list_field in fields:
            fields[list_field] = clean_option_list(fields[list_field], field=list_field)
    fields.setdefault("flag_options", ["unsafe", "pii", "hallucination"])
    taken = AnnotationError(f"a campaign with slug '{slug}' already exists")
    try:
        with transaction.atomic():
            if Campaign.objects.filter(slug=slug).exists():
                raise taken
            campaign = Campaign(name=name, slug=slug, created_by_id=creator.pk, **fields)
            _full_clean(campaign)
            campaign.save()
            Membership.objects.create(campaign=campaign, user_id=creator.pk, role=Role.ADMIN)
    except IntegrityError as exc:
        # Two admins picked the same slug at the same moment; the unique index decided.
        raise taken from exc
    return campaign


def campaign_update(*, campaign: Campaign, **fields: Any) -> Campaign:
    """Edit settings and return the updated campaign.

    Changing the guidelines text bumps their version (recorded on every judgment). Changing
    the overlap adds or removes slots so that, per comparison, filled slots plus live leases
    never exceed it; filled slots are never removed (judgments are append-only), so a
    comparison that already has more judgments than the new overlap keeps them and gets no
    more.

    Locks the campaign row (``FOR NO KEY UPDATE``) so two edits, or an edit and an import,
    do not interleave; a weaker lock than ``FOR UPDATE`` so that submits, whose inserts
    take a key-share lock on the campaign row, are not blocked by it (and cannot deadlock
    with the slot locks taken while shrinking).
    """
    unknown = set(fields) - set(EDITABLE_FIELDS)
    if unknown:
        raise AnnotationError(f"unknown campaign fields: {', '.join(sorted(unknown))}")
    for list_field in ("aspects", "reason_tags", "flag_options"):
        if list_field in fields:
            fields[list_field] = clean_option_list(fields[list_field], field=list_field)
    with transaction.atomic():
        locked = Campaign.objects.select_for_update(no_key=True).get(pk=campaign.pk)
        old = {group: getattr(locked, field) for group, field in _OVERLAP_FIELDS.items()}
        if "guidelines" in fields and fields["guidelines"] != locked.guidelines:
            locked.guidelines_version += 1
        for key, value in fields.items():
            setattr(locked, key, value)
        _full_clean(locked)
        locked.save()
        for group, field in _OVERLAP_FIELDS.items():
            if getattr(locked, field) != old[group]:
                _resize_slots(
                    campaign=locked, old=old[group], new=getattr(locked, field), group=group
                )
    return locked


# Each group of comparisons and the campaign field that says how many raters answer it.
_OVERLAP_FIELDS = {"ordinary": "overlap", "agreement": "agreement_overlap", "gold": "gold_overlap"}


def _group(campaign: Campaign, group: str) -> QuerySet[Comparison]:
    comparisons = Comparison.objects.filter(campaign=campaign)
    if group == "gold":
        return comparisons.exclude(gold_choice="")
    return comparisons.filter(gold_choice="", agreement_item=group == "agreement")


def _resize_slots(*, campaign: Campaign, old: int, new: int, group: str) -> None:
    """Make every comparison of one group have ``max(new, filled)`` slots: the ordinary
    comparisons (``overlap``), the agreement share (``agreement_overlap``) or the gold items
    (``gold_overlap``).

    Slot indexes are not dense after a shrink (filled slots keep theirs), so new slots are
    numbered after the highest index in use rather than from the old overlap.
    """
    comparisons = _group(campaign, group)
    comparisons.update(judgments_wanted=new)
    if new < old:
        _shrink_slots(campaign=campaign, new=new, group=group)
        return
    gold = group == "gold"
    short = (
        comparisons.annotate(n_slots=Count("slots"), top=Max("slots__index"))
        .filter(n_slots__lt=new)
        .values_list("id", "priority", "n_slots", "top")
    )
    batch: list[Slot] = []
    for comparison_id, priority, n_slots, top in short.iterator(chunk_size=2000):
        first = 0 if top is None else top + 1
        batch.extend(
            Slot(
                campaign=campaign,
                comparison_id=comparison_id,
                index=first + i,
                priority=priority,
                gold=gold,
            )
            for i in range(new - n_slots)
        )
        if len(batch) >= 5000:
            Slot.objects.bulk_create(batch)
            batch = []
    Slot.objects.bulk_create(batch)


def _shrink_slots(*, campaign: Campaign, new: int, group: str) -> None:
    """Delete the slots ranked past ``new`` in each comparison (filled first, then leases,
    then open ones), except filled ones. A rater whose lease is deleted gets LeaseLost.

    Only the doomed slots are locked, not the whole campaign, so raters keep leasing
    meanwhile. A doomed lease may be submitted between ranking and locking; the lock waits
    for that submit, the re-check then skips the now-filled slot, and the next round ranks it
    first and dooms another slot instead. Each round deletes a slot or ends, so it stops.
    """
    while doomed := _shrink_ids(campaign=campaign, new=new, group=group):
        for start in range(0, len(doomed), 5000):
            still_unfilled = list(
                Slot.objects.select_for_update()
                .filter(id__in=doomed[start : start + 5000])
                .exclude(status=SlotStatus.FILLED)
                .values_list("id", flat=True)
            )
            Slot.objects.filter(id__in=still_unfilled).delete()


def _shrink_ids(*, campaign: Campaign, new: int, group: str) -> list[int]:
    rank = Window(
        expression=RowNumber(),
        partition_by="comparison_id",
        order_by=[
            Case(
                When(status=SlotStatus.FILLED, then=Value(0)),
                When(status=SlotStatus.LEASED, then=Value(1)),
                default=Value(2),
                output_field=IntegerField(),
            ).asc(),
            "index",
        ],
    )
    return [
        slot_id
        for slot_id, status in Slot.objects.filter(
            campaign=campaign, comparison__in=_group(campaign, group)
        )
        .annotate(rank=rank)
        .filter(rank__gt=new)
        .values_list("id", "status")
        if status != SlotStatus.FILLED
    ]


def campaign_set_status(*, campaign: Campaign, status: str) -> Campaign:
    """Move a campaign through draft -> active <-> paused -> archived."""
    with transaction.atomic():
        locked = Campaign.objects.select_for_update(no_key=True).get(pk=campaign.pk)
        if status not in _TRANSITIONS.get(CampaignStatus(locked.status), set()):
            raise AnnotationError(f"a {locked.status} campaign cannot become {status}")
        locked.status = status
        locked.save(update_fields=["status", "updated_at"])
    return locked


def membership_add(*, campaign: Campaign, user: AbstractBaseUser, role: str) -> Membership:
    if role not in Role.values:
        raise AnnotationError(f"unknown role {role!r}")
    with transaction.atomic():
        membership, _ = Membership.objects.get_or_create(
            campaign=campaign, user_id=user.pk, role=role
        )
    return membership


def membership_remove(*, campaign: Campaign, user: AbstractBaseUser, role: str) -> None:
    """Remove one role of a user in a campaign. The last admin cannot be removed.

    Locks the campaign's admin rows (not a COUNT: PostgreSQL does not lock aggregates), so two
    admins removing each other at once cannot leave the campaign with none.
    """
    with transaction.atomic():
        if role == Role.ADMIN:
            admin_ids = set(
                Membership.objects.select_for_update()
                .filter(campaign=campaign, role=Role.ADMIN)
                .values_list("user_id", flat=True)
            )
            if admin_ids == {user.pk}:
                raise AnnotationError("a campaign needs at least one admin")
        Membership.objects.filter(campaign=campaign, user_id=user.pk, role=role).delete()
