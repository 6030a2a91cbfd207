"""Ready the demo campaign for the loop: SmolLM2-135M-Instruct as its base policy, a queued
run that writes its first real candidates (two per prompt, compared with each other) and then
critiques of them, and a loop schedule (off until ML staff switch it on).

Idempotent: once the base model has written candidates, or a generate run is on its way, it
queues nothing more. Runs after ``seed_demo`` (``make run`` calls both); the worker started by
``make run`` picks the run up, and its progress shows in the terminal and on the run page.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.urls import reverse

from annotation.models import Campaign, Completion
from training import tasks
from training.models import ACTIVE_STATUSES, LoopSchedule, RunKind, TrainingRun
from training.services import rounds, runs

DEMO_SLUG = "demo"
FIRST_CANDIDATES = {
    "num_samples": 2,
    "max_new_tokens": 64,
    "temperature": 0.8,
    "strategy": "two_samples",
    "pairs_per_prompt": 1,
    "round_number": 0,
    "critiques": True,
    "batch_size": 6,
}


class Command(BaseCommand):
    help = "Queue the demo's first SmolLM2 candidates and critiques; add its loop schedule."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--campaign", default=DEMO_SLUG, help="Campaign slug (demo).")
        parser.add_argument(
            "--model", default="", help="Base model (default: the LOOP_POLICY_MODEL setting)."
        )

    def handle(self, *args: Any, campaign: str, model: str, **options: Any) -> None:
        target = Campaign.objects.filter(slug=campaign).first()
        if target is None:
            raise CommandError(f"no campaign {campaign!r}: run seed_demo first")
        from django.conf import settings

        try:
            path = rounds.model_path(model or settings.LOOP_POLICY_MODEL)
        except runs.RunError as exc:
            self.stderr.write(f"The loop demo is off: {exc}")
            return
        base = rounds.base_policy_version(model=path)
        LoopSchedule.objects.get_or_create(
            campaign=target,
            defaults={
                "enabled": False,
                "min_new_judgments": 20,
                "config": rounds.round_config_clean({}),
            },
        )
        written = Completion.objects.filter(prompt__campaign=target, source=base.source).exists()
        pending = TrainingRun.objects.filter(
            campaign=target, kind=RunKind.GENERATE, status__in=ACTIVE_STATUSES
        ).first()
        if written or pending:
            where = f" (run {pending.pk} is {pending.status})" if pending else ""
            self.stdout.write(f"Kept the demo's {base.name} candidates{where}.")
            return
        assert base.source is not None
        run = runs.run_create(
            campaign=target,
            kind=RunKind.GENERATE,
            config={**FIRST_CANDIDATES, "model": path, "source_name": base.source.name},
            enqueue=tasks.enqueue_run,
        )
        page = reverse("training:run", kwargs={"run_id": run.pk})
        self.stdout.write(
            f"Queued run {run.pk}: {base.name} writes the demo's first candidates, then "
            f"critiques of them (the first start converts the model once). Follow it in this "
            f"terminal or at {page}"
        )
