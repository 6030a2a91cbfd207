"""Shared by the training run tests: a campaign with judgments, and a tiny base model."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from annotation.models import Campaign, Judgment, Slot, SlotStatus
from tests.conftest import make_campaign
from tests.factories import UserFactory


def judge(campaign: Campaign, *, raters: int = 2, choices: Sequence[str] = "ab") -> list[Judgment]:
    """One judgment per open slot of ``campaign``, from ``raters`` raters in turn."""
    people = [UserFactory() for _ in range(raters)]
    made = []
    cycle = itertools.cycle(choices)
    slots = Slot.objects.filter(campaign=campaign, status=SlotStatus.OPEN).order_by("id")
    by_comparison: dict[int, int] = {}
    for slot in slots:
        k = by_comparison.get(slot.comparison_id, 0)
        by_comparison[slot.comparison_id] = k + 1
        rater = people[k % raters]
        made.append(
            Judgment.objects.create(
                campaign=campaign,
                comparison_id=slot.comparison_id,
                slot=slot,
                rater=rater,
                choice=next(cycle),
                left_was_a=True,
                guidelines_version=1,
            )
        )
        Slot.objects.filter(pk=slot.pk).update(status=SlotStatus.FILLED, rater=rater)
    return made


def judged_campaign(*, comparisons: int = 6, overlap: int = 2) -> Campaign:
    campaign = make_campaign(comparisons=comparisons, overlap=overlap)
    judge(campaign, raters=overlap)
    return campaign


def add_judgments(campaign: Campaign, *, comparisons: int = 2, overlap: int = 2) -> list[Judgment]:
    """New comparisons in ``campaign`` and a judgment on each of their slots (newer ids)."""
    from annotation.models import Comparison

    extra = make_campaign(comparisons=comparisons, overlap=overlap)
    Comparison.objects.filter(campaign=extra).update(campaign=campaign)
    Slot.objects.filter(campaign=extra).update(campaign=campaign)
    return judge(campaign, raters=overlap, choices="ba")


def tiny_base_model(folder: Path) -> Path:
    from training.core.modeling import build_tiny_causal_lm

    return build_tiny_causal_lm(folder, arch="llama", seed=0)
