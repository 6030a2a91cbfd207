"""Shared by the loop step tests (candidates, critiques): prompts, runs and a recording reporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from annotation.models import Campaign, Prompt
from tests.factories import CampaignFactory, PromptFactory
from training.models import RunKind, TrainingRun
from training.services.progress import RunCancelled


def prompt_campaign(*, train: int = 3, eval: int = 0) -> tuple[Campaign, list[Prompt]]:
    """A campaign with ``train`` train prompts (returned, in id order) and ``eval`` eval ones."""
    campaign = CampaignFactory()
    prompts = [PromptFactory(campaign=campaign) for _ in range(train)]
    for _ in range(eval):
        PromptFactory(campaign=campaign, split="eval")
    return campaign, prompts


def make_run(campaign: Campaign, kind: str, **config: Any) -> TrainingRun:
    return TrainingRun.objects.create(
        campaign=campaign, kind=RunKind(kind), status="running", config=config
    )


@dataclass
class Recorder:
    """A ``Reporter`` that records its calls; ``cancel_after`` calls, it raises RunCancelled
    the way the real one does once a cancel was requested."""

    cancel_after: int | None = None
    calls: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)

    def __call__(self, done: int, total: int, /, **metrics: float) -> None:
        self.calls.append((done, total, metrics))
        if self.cancel_after is not None and len(self.calls) >= self.cancel_after:
            raise RunCancelled("cancel requested")
