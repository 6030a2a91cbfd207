"""factory_boy factories for the annotation domain."""

from __future__ import annotations

import factory
from django.contrib.auth import get_user_model

from annotation.models import (
    Campaign,
    CampaignStatus,
    Completion,
    Membership,
    Prompt,
    Role,
    Source,
)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("correct-horse-battery")


class CampaignFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Campaign

    name = factory.Sequence(lambda n: f"Campaign {n}")
    slug = factory.Sequence(lambda n: f"campaign-{n}")
    status = CampaignStatus.ACTIVE
    guidelines = "Pick the more helpful and harmless answer."
    overlap = 1
    aspects = factory.LazyFunction(lambda: ["helpfulness", "harmlessness"])
    reason_tags = factory.LazyFunction(lambda: ["more accurate", "clearer", "safer"])
    flag_options = factory.LazyFunction(lambda: ["unsafe", "pii", "hallucination"])


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    campaign = factory.SubFactory(CampaignFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.RATER


class SourceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Source
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"model-{n}")


class PromptFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Prompt

    campaign = factory.SubFactory(CampaignFactory)
    messages = factory.Sequence(lambda n: [{"role": "user", "content": f"Question {n}?"}])


class CompletionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Completion

    prompt = factory.SubFactory(PromptFactory)
    source = factory.SubFactory(SourceFactory)
    text = factory.Sequence(lambda n: f"Answer number {n}.")
