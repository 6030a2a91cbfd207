"""Create the demo campaign and its users, and print the users' fresh one-time passwords.

Idempotent: running it again keeps the campaign and its data, and only gives every demo user
a new random password (printed again) and clears any login lockout. No password is ever a
default or stored anywhere but as a hash. It refuses to run with DEBUG off unless ``--force``
is given, because it resets the passwords of users named ``admin`` and friends.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from axes.utils import reset as axes_reset
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.urls import reverse

from annotation.models import Campaign, CampaignStatus, CritiqueMode, Prompt, Role
from annotation.services.campaigns import campaign_create, campaign_set_status, membership_add
from annotation.services.imports import import_jsonl

DEMO_DATA = Path(__file__).resolve().parents[2] / "demo_data"
DEMO_SLUG = "demo"
# username -> (role in the demo campaign, what the printout says)
DEMO_USERS = {
    "admin": (Role.ADMIN, "campaign admin; can create campaigns"),
    "rater1": (Role.RATER, "rater"),
    "rater2": (Role.RATER, "rater"),
    "mlstaff": (Role.ML_STAFF, "ML staff"),
}
CAMPAIGN_SETTINGS: dict[str, Any] = {
    "description": (
        "Everyday questions with hand-written answers, and SmolLM2-135M-Instruct's own answers "
        "and critiques once the worker has written them: a demo of rating and of the loop."
    ),
    "overlap": 2,
    "lease_seconds": 600,
    "strength_scale": 3,
    "aspects": ["correctness", "helpfulness", "clarity"],
    "reason_tags": ["more accurate", "more complete", "clearer", "more concise", "friendlier"],
    "flag_options": ["unsafe", "pii", "hallucination"],
    "allow_tie": True,
    "allow_both_bad": True,
    "critique_mode": CritiqueMode.ALWAYS,
}


class Command(BaseCommand):
    help = "Create the demo campaign and users; print the users' new one-time passwords."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--force",
            action="store_true",
            help="Run even with DEBUG off (it resets the demo users' passwords).",
        )

    def handle(self, *args: Any, force: bool = False, **options: Any) -> None:
        if not settings.DEBUG and not force:
            raise CommandError(
                "seed_demo resets the passwords of the demo users (admin, rater1, rater2, "
                "mlstaff); it runs only with DEBUG=1, or with --force."
            )
        with transaction.atomic():
            users, passwords = self._users()
            campaign, created = self._campaign(users)
        for name in users:
            axes_reset(username=name)

        verb = "Created" if created else "Kept"
        where = reverse("annotation:rate", kwargs={"slug": campaign.slug})
        self.stdout.write(f"{verb} the demo campaign '{campaign.name}' (rate at {where}).")
        self.stdout.write("Demo users (new one-time passwords; run seed_demo again for new ones):")
        for name, password in passwords.items():
            self.stdout.write(f"  {name:<8} {password}   ({DEMO_USERS[name][1]})")

    def _users(self) -> tuple[dict[str, AbstractBaseUser], dict[str, str]]:
        model = get_user_model()
        users: dict[str, AbstractBaseUser] = {}
        passwords: dict[str, str] = {}
        for name in DEMO_USERS:
            user, _ = model.objects.get_or_create(username=name)
            password = secrets.token_urlsafe(12)
            user.set_password(password)
            user.is_active = True
            user.save()
            users[name] = user
            passwords[name] = password
        can_create = Permission.objects.get(
            content_type__app_label="annotation", codename="add_campaign"
        )
        users["admin"].user_permissions.add(can_create)  # type: ignore[attr-defined]
        return users, passwords

    def _campaign(self, users: dict[str, AbstractBaseUser]) -> tuple[Campaign, bool]:
        campaign = Campaign.objects.filter(slug=DEMO_SLUG).first()
        created = campaign is None
        if campaign is None:
            campaign = campaign_create(
                creator=users["admin"],
                name="Demo: everyday questions",
                slug=DEMO_SLUG,
                guidelines=(DEMO_DATA / "guidelines.md").read_text(encoding="utf-8"),
                **CAMPAIGN_SETTINGS,
            )
        for name, (role, _) in DEMO_USERS.items():
            membership_add(campaign=campaign, user=users[name], role=role)
        if not Prompt.objects.filter(campaign=campaign).exists():
            with (DEMO_DATA / "demo.jsonl").open("rb") as stream:
                import_jsonl(
                    campaign=campaign,
                    stream=stream,
                    kind="candidates",
                    source_name_default="demo",
                    seed=0,
                )
        if campaign.status == CampaignStatus.DRAFT:
            campaign = campaign_set_status(campaign=campaign, status=CampaignStatus.ACTIVE)
        return campaign, created
